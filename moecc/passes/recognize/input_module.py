"""The module a block applies to its own input before routing (a pre-norm inside the block).

OpenAI's reference GPT-OSS ``MLPBlock`` normalizes its input itself, ``t = self.norm(x)``, then routes and runs its
experts on ``t`` and returns ``x + moe(t)``. Its router module is called with ``t``, so what the router was called
with on the block's probes names the module: the one of the block's leftover modules (weights, no Linear) that maps
the block's input to it. A router weight the block holds itself (``F.linear(t, self.router_weight)``) is no module
call to watch; what a loop over expert modules hands each expert is then the witness (``expert_input_module``)."""

from __future__ import annotations

import torch
from torch import nn

from moecc.passes.recognize.probe import close
from moecc.passes.recognize.router import chosen_by_expert_calls


def input_module(x: torch.Tensor, router_args: tuple, leftovers: list[nn.Module]) -> nn.Module | None:
    """The module of ``leftovers`` that gives what the router was called with (``router_args``, on the block input
    ``x``); None when the router reads the block input itself, or no leftover gives what it read."""
    seen = router_args[0] if router_args and isinstance(router_args[0], torch.Tensor) else None
    if seen is None or seen.numel() != x.numel():
        return None
    if close(x.reshape(seen.shape).to(seen.dtype), seen):
        return None
    return _first_giving(x, leftovers, lambda got: got.numel() == seen.numel()
                         and close(got.reshape(seen.shape).to(seen.dtype), seen))


def expert_input_module(x: torch.Tensor, expert_inputs: list[list], leftovers: list[nn.Module]) -> nn.Module | None:
    """The module of ``leftovers`` whose output on the block input ``x`` holds every row the expert modules were
    called with (``expert_inputs[e]``: the inputs of expert ``e``'s calls); None when they read rows of ``x`` itself,
    or no leftover gives theirs."""
    hidden = x.shape[-1]
    if chosen_by_expert_calls(expert_inputs, x.reshape(-1, hidden)) is not None:
        return None
    return _first_giving(x, leftovers, lambda got: got.shape == x.shape
                         and chosen_by_expert_calls(expert_inputs, got.reshape(-1, hidden)) is not None)


def _first_giving(x: torch.Tensor, leftovers: list[nn.Module], gives) -> nn.Module | None:
    """The first module of ``leftovers`` whose output on ``x`` is a tensor that ``gives`` accepts."""
    for module in leftovers:
        try:
            with torch.no_grad():
                got = module(x)
        except Exception:  # noqa: BLE001 - a leftover that does not take the block's input is not its pre-norm
            continue
        if isinstance(got, torch.Tensor) and gives(got):
            return module
    return None
