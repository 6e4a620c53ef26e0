"""Routers whose block transforms the logits before scoring them: ``softmax(gate(x) / T)``, ``gate(x) * s``,
``gate(x) + b``. The block's first scoring op (softmax, log-softmax, sigmoid, softplus or top-k over the experts)
is watched on a probe; when its input is ``a * logits + b`` (``a`` one number, ``b`` one per expert) and not the
logits themselves, the router is taken as the Linear with weight ``a * W`` and bias ``a * bias + b``, which the
canonical route computes. A block that takes the top-k of the logits as they are and scales only the k it kept
(``softmax(topk(gate(x)).values / T)``) is read at its first scoring op over fewer columns, against the top-k of
the logits: a positive scale keeps the same k, so it folds into the router as well. Recognition tries it only
after the router as found fits no candidate."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from moecc.passes.recognize.probe import rel_err, snap, tolerance
from moecc.passes.recognize.router import Router

SCORING = {torch.softmax, torch.Tensor.softmax, F.softmax, torch.log_softmax, torch.Tensor.log_softmax,
           F.log_softmax, torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid, F.softplus, torch.topk, torch.Tensor.topk}


class _FirstScoring(TorchFunctionMode):
    """Keeps the input of the first scoring op over ``num_experts`` columns."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.seen: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None  # the first scored input over fewer columns, once ``seen`` is

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SCORING and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
            columns = args[0].shape[-1]
            if self.seen is None and columns == self.num_experts:
                self.seen = args[0].detach().clone()
            elif (self.seen is not None and self.kept is None and columns < self.num_experts
                  and func not in (torch.topk, torch.Tensor.topk)):
                self.kept = args[0].detach().clone()
        return func(*args, **(kwargs or {}))


def _fit(z: torch.Tensor, logits: torch.Tensor, per_column_shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the least-squares ``z ~ a * logits + b``: ``b`` one per column, or one number."""
    centred = logits - (logits.mean(0) if per_column_shift else logits.mean())
    target = z - (z.mean(0) if per_column_shift else z.mean())
    scale = (target * centred).sum() / (centred * centred).sum().clamp_min(1e-300)
    shift = z - scale * logits
    return scale, shift.mean(0) if per_column_shift else shift.mean().expand(logits.shape[1])


def affine_router(block: nn.Module, router: Router, x: torch.Tensor, router_x: torch.Tensor | None = None
                  ) -> Router | None:
    """``router`` with the affine map the block applies to its logits folded in, or None when the block scores the
    logits as they are, or scores something no affine map of them gives. ``router_x``: what the router reads of
    the block input ``x`` (``x`` itself by default)."""
    num_experts, hidden = router.weight.shape
    watch = _FirstScoring(num_experts)
    try:
        with torch.no_grad(), watch:
            block(x)
    except Exception:  # noqa: BLE001 - the block ran on this probe before; any failure here means no fit
        return None
    tokens = x.numel() // hidden
    if watch.seen is None or watch.seen.numel() != tokens * num_experts:
        return None
    logits = (x if router_x is None else router_x).reshape(-1, hidden).double() @ router.weight.detach().double().t()
    if router.bias is not None:
        logits = logits + router.bias.detach().double()
    dtype = router.weight.dtype
    fitted = _transform(watch.seen.reshape(tokens, num_experts).double(), logits, True, dtype)
    if fitted is None and watch.kept is not None and watch.kept.numel() % tokens == 0:
        kept = watch.kept.reshape(tokens, -1).double()
        fitted = _transform(kept.sort(-1, descending=True).values,
                            logits.topk(kept.shape[1], -1).values, False, dtype)
    if fitted is None:
        return None
    scale, shift, scaled, shifted = fitted
    bias = None if router.bias is None else router.bias.detach().double() * scale
    if shifted:
        bias = shift if bias is None else bias + shift
    what = " + ".join(([f"x{scale:g}"] if scaled else []) + (["a shift"] if shifted else []))
    # a low-precision weight times the scale, rounded again, moves every logit by up to a rounding step: the folded
    # router is kept in fp32 (its logits then in fp32), nearer the block's scaled logits than that copy
    folded = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    return replace(router, weight=(router.weight.detach().double() * scale).to(folded),
                   bias=None if bias is None else bias.to(folded), path=f"{router.path} (logits {what} folded in)")


def _transform(z: torch.Tensor, logits: torch.Tensor, per_column_shift: bool, dtype: torch.dtype):
    """(a, b, scaled, shifted) where ``z`` is ``a * logits + b``, other than ``logits`` themselves; else None. With
    one shift for all columns, ``z`` holds the logits kept by a top-k, which only a positive ``a`` keeps."""
    bound = 10 * tolerance(dtype)
    scale, shift = _fit(z, logits, per_column_shift)
    if rel_err(scale * logits + shift, z) > bound or (not per_column_shift and scale.item() <= 0):
        return None
    scale = snap(scale.item(), dtype)
    scaled = abs(scale - 1.0) > bound
    shifted = shift.abs().max().item() > bound * z.abs().max().item()
    if not scaled and not shifted:
        return None
    return scale, shift, scaled, shifted
