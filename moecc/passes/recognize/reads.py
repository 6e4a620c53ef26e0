"""Which of a block's sub-modules its calls read: a child whose parameters no call touches takes no part in what the
block computes on those inputs (a noise projection only training mode adds, a shared expert a flag turns off), so
recognition does not have to find a canonical meaning for it."""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


class ParameterReads(TorchFunctionMode):
    """Records every tensor handed to a torch function, method or tensor property while it is on: a parameter is
    read whether the block calls its module, passes it to ``F.linear`` or takes ``.T`` of it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                self.seen.add(id(leaf))
        return func(*args, **kwargs)


def unread_modules(block: nn.Module, reads: ParameterReads) -> set[int]:
    """Ids of the modules inside each child of the block that holds parameters none of which ``reads`` saw."""
    return {id(m) for child in block.children()
            if (params := list(child.parameters())) and not any(id(p) in reads.seen for p in params)
            for m in child.modules()}
