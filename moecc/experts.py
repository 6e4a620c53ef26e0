"""Plain-torch reference semantics of one expert's activation, shared by the ops and the recognizer."""

from __future__ import annotations

import torch
from torch import Tensor

from moecc.activations import ACTIVATIONS, PLAIN_ACTIVATIONS, apply

__all__ = ["ACTIVATIONS", "PLAIN_ACTIVATIONS", "expert_activation", "clamps"]


def clamps(activation: str, limit: float) -> bool:
    """Whether gate and up are clamped at ``limit`` before the activation (GPT-OSS's clamp)."""
    return limit > 0 and activation != "swiglu_softcap"


def _softcap(v: Tensor, cap: float) -> Tensor:
    return torch.tanh(v / cap) * cap


def expert_activation(h: Tensor, activation: str, gated: bool, alpha: float, limit: float) -> Tensor:
    """``h`` is the up projection ``[n, U]``; gated layouts hold the gate in the first half, up in the second.
    ``alpha`` is the activation's parameter (``moecc.activations``), or GPT-OSS's sigmoid scale, or the gate's cap."""
    if not gated:
        return apply(h, activation, alpha)
    inter = h.shape[-1] // 2
    gate, up = h[..., :inter], h[..., inter:]
    if activation == "swiglu_softcap":
        return _softcap(gate, alpha) * torch.sigmoid(gate) * _softcap(up, limit)
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    if activation == "swiglu_oai":
        # GPT-OSS: gate * sigmoid(alpha * gate) * (up + 1)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return apply(gate, activation, alpha) * up


def shared_ffn_reference(x: Tensor, w_up: Tensor, w_down: Tensor, b_up: Tensor | None, b_down: Tensor | None,
                         gate: Tensor | None, activation: str, gated: bool, alpha: float, limit: float) -> Tensor:
    """One always-selected expert (``w_up [1, U, H]``), scaled by ``sigmoid(x @ gate^T)`` when gated; plain,
    export-friendly torch."""
    h = x @ w_up[0].t().to(x.dtype)
    if b_up is not None:
        h = h + b_up[0].to(h.dtype)
    h = expert_activation(h, activation, gated, alpha, limit)
    y = h @ w_down[0].t().to(h.dtype)
    if b_down is not None:
        y = y + b_down[0].to(y.dtype)
    if gate is not None:
        y = torch.sigmoid(x @ gate.t().to(x.dtype)) * y
    return y


# Expert weight layouts (the ``weight_layout`` argument of the fused MoE ops):
# - ``oi``: canonical, w_up [E, U, H] (gate rows first when gated), w_down [E, H, I], b_up [E, U];
# - ``io``: both weights transposed, [E, in, out];
# - ``oi_gu``: ``oi`` with the gate and up rows of w_up (and b_up) interleaved, row 2n = gate n and row 2n+1 =
#   up n, so that one weight tile holds the gate and up rows of the same output columns.
WEIGHT_LAYOUTS = ("oi", "io", "oi_gu")


def interleave_gate_up(w: Tensor) -> Tensor:
    """[E, 2I, ...] gate-first rows (a weight or a bias) -> the same rows with gate and up interleaved."""
    e, up_rows, *rest = w.shape
    return w.reshape(e, 2, up_rows // 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


def deinterleave_gate_up(w: Tensor) -> Tensor:
    e, up_rows, *rest = w.shape
    return w.reshape(e, up_rows // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def to_canonical(w_up: Tensor, w_down: Tensor, b_up: Tensor | None, layout: str):
    """(w_up, w_down, b_up) of ``layout`` as views or copies in the canonical ``oi`` layout."""
    if layout == "io":
        return w_up.transpose(1, 2), w_down.transpose(1, 2), b_up
    if layout == "oi_gu":
        return deinterleave_gate_up(w_up), w_down, None if b_up is None else deinterleave_gate_up(b_up)
    if layout != "oi":
        raise ValueError(f"weight_layout must be one of {WEIGHT_LAYOUTS}, got {layout!r}")
    return w_up, w_down, b_up


def from_canonical(w_up: Tensor, w_down: Tensor, b_up: Tensor | None, layout: str):
    """Canonical (w_up, w_down, b_up) laid out as ``layout``, contiguous."""
    if layout == "io":
        return w_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous(), b_up
    if layout == "oi_gu":
        return interleave_gate_up(w_up), w_down, None if b_up is None else interleave_gate_up(b_up)
    if layout != "oi":
        raise ValueError(f"weight_layout must be one of {WEIGHT_LAYOUTS}, got {layout!r}")
    return w_up, w_down, b_up
