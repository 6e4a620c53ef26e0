"""The canonical moecc MoE ops.

Every op is a ``torch.library.custom_op`` in the ``moecc`` namespace with a fake (shape) function and a
reference implementation in plain torch, so every stage of the IR is a runnable program.

Conventions (see ``moecc/passes/README.md`` for the invariants):
- tokens are flattened: ``x`` is ``[T, H]``; routing gives ``weights [T, k]`` (float) and ``ids [T, k]`` (int64);
- an id ``>= E`` is a null expert: it does no compute and contributes nothing;
- expert weights are stacked: ``w_up [E, U, H]`` (``U = 2I`` when gated, gate rows first, else ``I``) and
  ``w_down [E, H, I]``, optional biases ``b_up [E, U]``, ``b_down [E, H]``;
- capacity: ``capacity >= 0`` is a fixed per-expert capacity, else ``capacity_factor > 0`` gives
  ``max(capacity_min, ceil(k * G * cf / E))`` (``floor`` where ``rounding="floor"``) per group of ``G = group_size``
  tokens (0: all tokens), else dropless;
  pairs claim capacity in ``priority`` order and dropped pairs contribute nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moecc.experts import expert_activation, shared_ffn_reference, to_canonical
from moecc.routing import apply_capacity, fused_route_reference, route_reference

LIB = "moecc"


# ---------------------------------------------------------------- routing


@torch.library.custom_op(f"{LIB}::route", mutates_args=())
def route(
    logits: Tensor,
    selection_bias: Tensor | None,
    top_k: int,
    score: str,
    topk_first: bool,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    scale: float,
    group_top: int = 2,
    expert_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """logits [T, E] -> (weights [T, k] float32, ids [T, k] int64); ``moecc.routing.route_reference``."""
    return route_reference(logits, selection_bias, top_k, score, topk_first, renormalize, n_group, topk_group, scale,
                           group_top, expert_scale)


@route.register_fake
def _route_fake(logits, selection_bias, top_k, score, topk_first, renormalize, n_group, topk_group, scale,
                group_top=2, expert_scale=None):
    t = logits.shape[0]
    return logits.new_empty((t, top_k), dtype=torch.float32), logits.new_empty((t, top_k), dtype=torch.int64)


@torch.library.custom_op(f"{LIB}::fused_route", mutates_args=())
def fused_route(
    x: Tensor,
    router_weight: Tensor,
    router_bias: Tensor | None,
    selection_bias: Tensor | None,
    top_k: int,
    score: str,
    topk_first: bool,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    scale: float,
    logits_fp32: bool,
    group_top: int = 2,
    expert_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Router matmul, scoring, top-k, renormalisation and scaling in one op: x [T, H] -> (weights, ids)."""
    return fused_route_reference(x, router_weight, router_bias, selection_bias, top_k, score, topk_first,
                                 renormalize, n_group, topk_group, scale, logits_fp32, group_top, expert_scale)


@fused_route.register_fake
def _fused_route_fake(x, router_weight, router_bias, selection_bias, top_k, *args):
    t = x.shape[0]
    return x.new_empty((t, top_k), dtype=torch.float32), x.new_empty((t, top_k), dtype=torch.int64)


# ---------------------------------------------------------------- dispatch / experts / combine


def _dispatch_reference(x, ids, num_experts, capacity, capacity_factor, capacity_min, group_size, priority,
                        rounding="ceil"):
    t, k = ids.shape
    flat = ids.reshape(-1)
    if capacity >= 0 or capacity_factor > 0:
        flat = apply_capacity(ids, num_experts, capacity, capacity_factor, capacity_min, group_size,
                              priority, rounding).reshape(-1)
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, torch.full_like(flat, num_experts))
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1)[: num_experts + 1]
    offsets = torch.zeros(num_experts + 2, dtype=torch.int64, device=x.device)
    offsets[1:] = torch.cumsum(counts, 0)
    x_sorted = x[torch.div(order, k, rounding_mode="floor")] if k > 0 else x[:0]
    return x_sorted, order, offsets


@torch.library.custom_op(f"{LIB}::dispatch", mutates_args=())
def dispatch(
    x: Tensor, ids: Tensor, num_experts: int, capacity: int, capacity_factor: float, capacity_min: int,
    group_size: int, priority: str, rounding: str = "ceil",
) -> tuple[Tensor, Tensor, Tensor]:
    """Sort (token, slot) pairs by expert.

    Returns ``x_sorted [T*k, H]`` (rows of x in expert order, null/dropped pairs last), ``order [T*k]`` (the pair
    index ``t*k + j`` of each sorted row) and ``offsets [E+2]`` (row ranges per expert; ``E`` collects null and
    dropped pairs)."""
    return _dispatch_reference(x, ids, num_experts, capacity, capacity_factor, capacity_min, group_size, priority,
                               rounding)


@dispatch.register_fake
def _dispatch_fake(x, ids, num_experts, *args):
    n = ids.shape[0] * ids.shape[1]
    return (x.new_empty((n, x.shape[1])), ids.new_empty((n,), dtype=torch.int64),
            ids.new_empty((num_experts + 2,), dtype=torch.int64))


def _expert_ffn_reference(x_sorted, offsets, w_up, w_down, b_up, b_down, activation, gated, alpha, limit):
    num_experts = w_up.shape[0]
    out = x_sorted.new_zeros((x_sorted.shape[0], w_down.shape[1]))
    bounds = offsets.tolist()
    for e in range(num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        h = x_sorted[lo:hi] @ w_up[e].t().to(x_sorted.dtype)
        if b_up is not None:
            h = h + b_up[e].to(h.dtype)
        h = expert_activation(h, activation, gated, alpha, limit)
        y = h @ w_down[e].t().to(h.dtype)
        if b_down is not None:
            y = y + b_down[e].to(y.dtype)
        out[lo:hi] = y
    return out


@torch.library.custom_op(f"{LIB}::expert_ffn", mutates_args=())
def expert_ffn(
    x_sorted: Tensor,
    offsets: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_up: Tensor | None,
    b_down: Tensor | None,
    activation: str,
    gated: bool,
    alpha: float,
    limit: float,
) -> Tensor:
    """Per-expert FFN on expert-sorted rows; rows past ``offsets[E]`` (null/dropped) are zero."""
    return _expert_ffn_reference(x_sorted, offsets, w_up, w_down, b_up, b_down, activation, gated, alpha, limit)


@expert_ffn.register_fake
def _expert_ffn_fake(x_sorted, offsets, w_up, w_down, *args):
    return x_sorted.new_empty((x_sorted.shape[0], w_down.shape[1]))


def _combine_reference(y_sorted, order, weights):
    t, k = weights.shape
    pair_out = y_sorted.new_zeros((t * k, y_sorted.shape[1]))
    pair_out[order] = y_sorted
    w = weights.reshape(t * k, 1).to(torch.float32)
    return (pair_out.float() * w).reshape(t, k, y_sorted.shape[1]).sum(1).to(y_sorted.dtype)


@torch.library.custom_op(f"{LIB}::combine", mutates_args=())
def combine(y_sorted: Tensor, order: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of each token's expert outputs, in a fixed order (deterministic, no atomics)."""
    return _combine_reference(y_sorted, order, weights)


@combine.register_fake
def _combine_fake(y_sorted, order, weights):
    return y_sorted.new_empty((weights.shape[0], y_sorted.shape[1]))


@torch.library.custom_op(f"{LIB}::fused_moe", mutates_args=())
def fused_moe(
    x: Tensor,
    weights: Tensor,
    ids: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_up: Tensor | None,
    b_down: Tensor | None,
    activation: str,
    gated: bool,
    alpha: float,
    limit: float,
    capacity: int,
    capacity_factor: float,
    capacity_min: int,
    group_size: int,
    priority: str,
    weight_layout: str,
    rounding: str = "ceil",
) -> Tensor:
    """dispatch + expert_ffn + combine in one op: x [T, H] -> y [T, H].

    ``weight_layout`` is one of ``moecc.experts.WEIGHT_LAYOUTS``: ``"oi"`` for the canonical ``[E, out, in]``
    weights, or a layout the place-experts pass may choose."""
    w_up, w_down, b_up = to_canonical(w_up, w_down, b_up, weight_layout)
    xs, order, offsets = _dispatch_reference(x, ids, w_up.shape[0], capacity, capacity_factor, capacity_min,
                                             group_size, priority, rounding)
    ys = _expert_ffn_reference(xs, offsets, w_up, w_down, b_up, b_down, activation, gated, alpha, limit)
    return _combine_reference(ys, order, weights)


@fused_moe.register_fake
def _fused_moe_fake(x, *args):
    return torch.empty_like(x)


CANONICAL_OPS = {
    "route": torch.ops.moecc.route.default,
    "fused_route": torch.ops.moecc.fused_route.default,
    "dispatch": torch.ops.moecc.dispatch.default,
    "expert_ffn": torch.ops.moecc.expert_ffn.default,
    "combine": torch.ops.moecc.combine.default,
    "fused_moe": torch.ops.moecc.fused_moe.default,
}


@torch.library.custom_op(f"{LIB}::shared_ffn", mutates_args=())
def shared_ffn(
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_up: Tensor | None,
    b_down: Tensor | None,
    gate: Tensor | None,
    activation: str,
    gated: bool,
    alpha: float,
    limit: float,
) -> Tensor:
    """A shared (always-selected) expert, ``w_up [1, U, H]``, optionally scaled by ``sigmoid(x @ gate^T)``."""
    return shared_ffn_reference(x, w_up, w_down, b_up, b_down, gate, activation, gated, alpha, limit)


@shared_ffn.register_fake
def _shared_ffn_fake(x, w_up, w_down, *args):
    return x.new_empty((x.shape[0], w_down.shape[1]))


CANONICAL_OPS["shared_ffn"] = torch.ops.moecc.shared_ffn.default
