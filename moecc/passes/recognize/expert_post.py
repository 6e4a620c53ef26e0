"""The module an expert bank applies to each expert's output rows before it weights them: a post-expert norm.

Hugging Face's experts integration has a ``has_post_expert_norm`` for it (Muse Spark's ``post_expert_norm``, an
RMSNorm that scales before it normalizes), and Ergo's experts normalize each route's output with a weight per
expert, called as ``norm(rows, expert_ids)``. No canonical expert computes either, so the canonical form calls the
bank's own module on the rows of every (token, slot) pair and weights and sums them after it
(``CanonicalMoE``); the experts themselves stay canonical and fuse.

A candidate is a module inside the bank, not the bank, that holds no Linear and none of the bank's ``[E, ., .]``
weights, and either keeps parameters or buffers or is named a norm (a parameterless RMSNorm): an activation
module is no candidate. Each is called once on probe rows to learn how: ``m(rows)``, else ``m(rows, expert_ids)``;
recognition then proves which one, if any, the bank's outputs show."""

from __future__ import annotations

import torch
from torch import nn

from moecc.ir import ExpertPost


def candidates(bank: nn.Module, num_experts: int) -> list[nn.Module]:
    """The bank's modules that may be its post-expert module, outermost first."""
    found, inside = [], set()
    for name, mod in bank.named_modules():
        if mod is bank or id(mod) in inside or isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            continue
        if any(isinstance(m, nn.Linear) for m in mod.modules()):
            continue
        tensors = [*mod.parameters(), *mod.buffers()]
        if any(t.dim() == 3 and t.shape[0] >= num_experts for t in tensors):
            continue
        if tensors or "norm" in type(mod).__name__.lower() or "norm" in name.rsplit(".", 1)[-1].lower():
            found.append(mod)
            inside |= {id(m) for m in mod.modules()}
    return found


def how_called(module: nn.Module, hidden: int, like: torch.Tensor) -> ExpertPost | None:
    """How ``module`` is called on expert output rows ``[n, hidden]``: alone, else with the rows' expert ids; None
    when neither returns rows of that shape."""
    rows = torch.randn(3, hidden, dtype=like.dtype, device=like.device)
    ids = torch.zeros(3, dtype=torch.long, device=like.device)
    for takes_ids in (False, True):
        try:
            with torch.no_grad():
                out = module(rows, ids) if takes_ids else module(rows)
        except Exception:  # noqa: BLE001, S112 - another calling convention, or no function of rows
            continue
        if isinstance(out, torch.Tensor) and out.shape == rows.shape:
            return ExpertPost(module, takes_ids)
    return None
