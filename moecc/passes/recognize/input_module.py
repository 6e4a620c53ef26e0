"""The module a block applies to its own input before routing (a pre-norm inside the block).

OpenAI's reference GPT-OSS ``MLPBlock`` normalizes its input itself, ``t = self.norm(x)``, then routes and runs its
experts on ``t`` and returns ``x + moe(t)``. Its router module is called with ``t``, so what the router was called
with on the block's probes names the module: the one of the block's leftover modules (weights, no Linear) that maps
the block's input to it."""

from __future__ import annotations

import torch
from torch import nn

from moecc.passes.recognize.probe import close


def input_module(x: torch.Tensor, router_args: tuple, leftovers: list[nn.Module]) -> nn.Module | None:
    """The module of ``leftovers`` that gives what the router was called with (``router_args``, on the block input
    ``x``); None when the router reads the block input itself, or no leftover gives what it read."""
    seen = router_args[0] if router_args and isinstance(router_args[0], torch.Tensor) else None
    if seen is None or seen.numel() != x.numel():
        return None
    if close(x.reshape(seen.shape).to(seen.dtype), seen):
        return None
    for module in leftovers:
        try:
            with torch.no_grad():
                got = module(x)
        except Exception:  # noqa: BLE001 - a leftover that does not take the block's input is not its pre-norm
            continue
        if isinstance(got, torch.Tensor) and got.numel() == seen.numel() \
                and close(got.reshape(seen.shape).to(seen.dtype), seen):
            return module
    return None
