"""Casts of a module to the dtype and device it already has, made inside a forward that torch.export traces.

Some routers cast themselves on every call: Switch Transformers' and NLLB-MoE's run
``self.classifier = self.classifier.to(self.dtype)`` in forward. Eager, when the weights already have that dtype,
the cast changes nothing. While torch.export traces, ``Module._apply`` tries to swap each parameter for its
converted copy and fails ("Couldn't swap Linear.weight"), so the whole capture fails. Inside
``idle_module_casts()``, a ``Module.to`` that would change no parameter or buffer returns the module as it is, as
eager in effect does; any other cast runs as before."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _same_device(have: torch.device, want: torch.device) -> bool:
    return have.type == want.type and (want.index is None or have.index == want.index)


def changes_nothing(module: nn.Module, *args, **kwargs) -> bool:
    """Whether ``module.to(*args, **kwargs)`` would leave every parameter and buffer as it is."""
    try:
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    except (TypeError, RuntimeError):
        return False
    if memory_format is not None:
        return False
    for t in [*module.parameters(), *module.buffers()]:
        if device is not None and not _same_device(t.device, device):
            return False
        # Module.to casts only floating and complex tensors
        if dtype is not None and (t.is_floating_point() or t.is_complex()) and t.dtype != dtype:
            return False
    return True


@contextlib.contextmanager
def idle_module_casts() -> Iterator[None]:
    """``Module.to`` that would change nothing returns the module untouched inside."""
    before = nn.Module.to

    def idle_to(self: nn.Module, *args, **kwargs):
        return self if changes_nothing(self, *args, **kwargs) else before(self, *args, **kwargs)

    nn.Module.to = idle_to
    try:
        yield
    finally:
        nn.Module.to = before
