"""MoE blocks whose sub-module's output the model returns: a recorded output, as Hugging Face's
``output_router_logits=True`` records each router's logits with a forward hook on the router.

A fused block never calls its router apart, so capture keeps such a block's call as a ``RecordingBlock``: the block
and that sub-module's output of the same call, which recognition then reproduces from the canonical block's own
outputs (its router logits, weights or ids) like any other output a block returns. While exporting, the block's
stand-in hands the sub-module's output to the hooks the model put on it (``run_forward_hooks``), so the model's own
recording code sees a value of the graph."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import _pytree as pytree


class RecordingBlock(nn.Module):
    """Calls ``block``; returns (its output, the output of its sub-module ``sub`` in that call). It holds the
    block's own children, parameters and buffers under their names, not the block itself: recognition reads the
    same module tree as the block's (a child named ``block`` would pass for one more MLP beside the experts)."""

    def __init__(self, block: nn.Module, sub: str):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, p in block.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in block.named_buffers(recurse=False):
            self.register_buffer(name, b)
        object.__setattr__(self, "recorded_block", block)  # called, not a child
        self.sub = sub

    def forward(self, *args, **kwargs):
        block = self.recorded_block
        seen = []
        handle = block.get_submodule(self.sub).register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            out = block(*args, **kwargs)
        finally:
            handle.remove()
        return out, seen[0]


def recordable(out) -> bool:
    """Whether a sub-module's output can travel as outputs of a graph leaf: tensors (or None) in tuples and lists."""
    leaves, _ = pytree.tree_flatten(out)
    return bool(leaves) and all(t is None or isinstance(t, torch.Tensor) for t in leaves)


def run_forward_hooks(module: nn.Module, args: tuple, out) -> None:
    """The forward hooks on ``module`` (as its own call would run them), given ``out`` as its output."""
    for hook_id, hook in list(module._forward_hooks.items()):
        if hook_id in module._forward_hooks_with_kwargs:
            hook(module, args, {}, out)
        else:
            hook(module, args, out)
