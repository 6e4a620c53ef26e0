"""Lower a pass-pipeline result to a backend: retarget the fused canonical ops to that backend's kernels."""

from __future__ import annotations

import torch
from torch import fx

import moecc.codegen.torch.moe  # noqa: F401 - registers moecc::fused_moe_torch

BACKENDS = ("torch", "reference")
# The layout each backend's expert kernels read; the place-experts pass is told, it does not know backends.
EXPERT_LAYOUT = {"torch": "io", "reference": "oi"}


def lower(gm: fx.GraphModule, backend: str) -> fx.GraphModule:
    if backend == "reference":
        return gm
    if backend == "torch":
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.moecc.fused_moe.default:
                node.target = torch.ops.moecc.fused_moe_torch.default
        gm.recompile()
        return gm
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
