"""Fast plain-torch fused MoE: one sort, a gather, per-expert GEMMs on contiguous rows, a deterministic combine."""

from __future__ import annotations

import torch
from torch import Tensor

from moecc.experts import expert_activation, to_canonical
from moecc.routing import apply_capacity


def _grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    return (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype in (torch.bfloat16,)
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def _gemm(xs: Tensor, w_io: Tensor, counts: list[int] | None, offs: Tensor | None) -> Tensor:
    """xs [N, K] sorted by expert, w_io [E, K, M] -> [N, M]."""
    if offs is not None:
        return torch._grouped_mm(xs, w_io, offs=offs)
    out = xs.new_empty((xs.shape[0], w_io.shape[2]))
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(xs[start:start + n], w_io[e], out=out[start:start + n])
        start += n
    return out


@torch.library.custom_op("moecc::fused_moe_torch", mutates_args=())
def fused_moe_torch(
    x: Tensor, weights: Tensor, ids: Tensor, w_up: Tensor, w_down: Tensor, b_up: Tensor | None,
    b_down: Tensor | None, activation: str, gated: bool, alpha: float, limit: float, capacity: int,
    capacity_factor: float, capacity_min: int, group_size: int, priority: str, weight_layout: str,
    rounding: str = "ceil",
) -> Tensor:
    """Same contract as ``moecc::fused_moe``."""
    t, k = ids.shape
    num_experts = w_up.shape[0]
    if t == 0 or k == 0:
        return torch.zeros_like(x)
    if weight_layout != "io":  # these GEMMs read [E, in, out]
        w_up, w_down, b_up = to_canonical(w_up, w_down, b_up, weight_layout)
        w_up, w_down = w_up.transpose(1, 2), w_down.transpose(1, 2)
    flat = ids.reshape(-1)
    if capacity >= 0 or capacity_factor > 0:
        flat = apply_capacity(ids, num_experts, capacity, capacity_factor, capacity_min, group_size,
                              priority, rounding).reshape(-1)
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    sorted_e, order = torch.sort(flat, stable=True)
    counts_t = torch.bincount(flat, minlength=num_experts + 1)
    use_grouped = _grouped_mm_ok(x, w_up)
    if use_grouped:
        # Rows past offs[-1] (null or dropped pairs) are left unwritten by the kernel; their weight is zeroed.
        offs = torch.cumsum(counts_t[:num_experts], 0, dtype=torch.int32)
        counts, rows = None, order
    else:
        offs = None
        all_counts = counts_t.tolist()  # the one host sync of this path
        counts, rows = all_counts[:num_experts], order[: t * k - all_counts[num_experts]]
    xs = x[torch.div(rows, k, rounding_mode="floor")]
    h = _gemm(xs, w_up.to(x.dtype), counts, offs)
    if b_up is not None:
        h = h + b_up.to(h.dtype)[sorted_e[: h.shape[0]].clamp(max=num_experts - 1)]
    h = expert_activation(h, activation, gated, alpha, limit)
    y = _gemm(h, w_down.to(h.dtype), counts, offs)
    if b_down is not None:
        y = y + b_down.to(y.dtype)[sorted_e[: y.shape[0]].clamp(max=num_experts - 1)]
    w = weights.reshape(-1)[rows].to(torch.float32)
    if use_grouped:
        w = torch.where(sorted_e < num_experts, w, 0.0)
        y = torch.where((sorted_e < num_experts).unsqueeze(1), y, 0)
    pair = torch.zeros((t * k, x.shape[1]), dtype=torch.float32, device=x.device)
    pair[rows] = y.float() * w.unsqueeze(1)
    return pair.view(t, k, x.shape[1]).sum(1).to(x.dtype)


@fused_moe_torch.register_fake
def _fused_moe_torch_fake(x, *args):
    return torch.empty_like(x)
