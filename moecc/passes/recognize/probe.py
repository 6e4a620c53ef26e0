"""Helpers to probe modules with random inputs and compare results."""

from __future__ import annotations

import torch
from torch import Tensor

# Probe inputs spread an expert's pre-activations this wide: at the spread of small initial weights (a few tenths) silu
# and gelu differ by less than bf16's probe bound, so the activation tried first passed for the other.
PROBE_PRE_ACTIVATION_STD = 2.0
# A second probe spreads them this many times wider: an activation clipped past a few units (relu6, a GELU clipped
# at 10, a clamp) equals its unclipped neighbour on the first.
PROBE_WIDE = 4.0
# An expert activation fitted no closer than this fraction of the dtype's rounding has the rarer ones tried against
# it (``moecc.activations.MORE_ACTIVATIONS``).
RIVALS_BELOW = 0.25


def common_or_rival(common, rival, dtype: torch.dtype):
    """``common``, a (fit, error) of the common activations or None, unless it is no closer than ``RIVALS_BELOW``
    of ``dtype``'s rounding and ``rival()``, the same of the rarer ones, halves its error (or it is None)."""
    if common is not None and common[1] <= RIVALS_BELOW * tolerance(dtype):
        return common
    other = rival()
    if other is not None and (common is None or other[1] < common[1] / 2):
        return other
    return common

_TOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def tolerance(dtype: torch.dtype) -> float:
    return _TOL.get(dtype, 1e-5)


def snap(c: float, dtype: torch.dtype) -> float:
    """The shortest decimal within half a unit in the last place of ``dtype`` of ``c``: a coefficient fitted on
    values rounded to ``dtype`` is 2.5 or 0.5, not 2.49971 or 0.499285."""
    rel = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -12}.get(dtype, 1e-7)
    for digits in range(1, 8):
        r = float(f"{c:.{digits}g}")
        if abs(r - c) <= rel * abs(c):
            return r
    return c


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def close(a: Tensor, b: Tensor, scale: float = 10.0) -> bool:
    """Same function within a few ulps of the working dtype (``scale`` x the dtype's tolerance)."""
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return rel_err(a, b) <= scale * tolerance(b.dtype)


def probe_input(n: int, hidden: int, like: Tensor | torch.nn.Parameter, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden, generator=g).to(device=like.device, dtype=like.dtype)


def tensor_leaves(out) -> list[Tensor]:
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]
