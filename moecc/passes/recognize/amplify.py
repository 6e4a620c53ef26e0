"""Probe inputs whose expert inputs are a multiple of another probe's.

Small weights leave pre-activations of a few hundredths, where bf16 cannot tell one activation from another, and
GPT-OSS's clamp at 7 is never reached. Scaling a block's input scales its experts' inputs, unless the block
normalizes its input first (a pre-norm inside the block): then the norm's own parameters are scaled instead, for the
duration of the probe."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from moecc.passes.recognize.probe import close


@contextlib.contextmanager
def amplifier(pre: nn.Module | None, scale: float, x: torch.Tensor
              ) -> Iterator[Callable[[torch.Tensor], torch.Tensor] | None]:
    """A function mapping a block input to one whose expert inputs are ``scale`` times its own; None when the
    pre-norm's output does not scale with its parameters (checked on ``x``)."""
    if pre is None:
        yield lambda x: (x.double() * scale).to(x.dtype)
        return
    params = list(pre.parameters())
    with torch.no_grad():
        before = pre(x)
        kept = [p.data for p in params]
        try:
            for p in params:
                p.data = (p.data.double() * scale).to(p.dtype)
            yield (lambda x: x) if close(pre(x), (before.double() * scale).to(before.dtype)) else None
        finally:
            for p, data in zip(params, kept):
                p.data = data
