"""Export-friendly plain-torch forms of the moecc ops: no data-dependent shapes, so torch.onnx can translate them
to standard ONNX ops (MatMul, TopK, ScatterElements, CumSum, ...). Exact for any routing, capacity included. Also
attention, whose translation by torch.onnx is not torch's for a query that attends to no key."""

from __future__ import annotations

import torch
from torch import Tensor

from moecc.experts import expert_activation, shared_ffn_reference, to_canonical
from moecc.routing import route_reference, router_logits


def kept_pairs(ids: Tensor, num_experts: int, capacity: int, capacity_factor: float, capacity_min: int,
                group_size, priority: str, rounding: str = "ceil") -> Tensor:
    """[T, k] mask of the pairs that do compute: real experts within capacity, as a dense cumsum."""
    valid = (ids >= 0) & (ids < num_experts)
    if capacity < 0 and capacity_factor <= 0:
        return valid
    t, k = ids.shape
    g = t if (isinstance(group_size, int) and group_size <= 0) else group_size
    if capacity >= 0:
        cap = capacity
    else:
        round_ = torch.ceil if rounding == "ceil" else torch.floor
        cap = torch.clamp(round_(torch.tensor(k * capacity_factor / num_experts) * g), min=capacity_min)
    grouped = ids.reshape(-1, g, k)
    ordered = grouped if priority == "token" else grouped.transpose(1, 2)
    flat = ordered.reshape(grouped.shape[0], -1)
    # ids of no expert (negative ones too) count toward no expert's capacity
    onehot = torch.nn.functional.one_hot(torch.where((flat >= 0) & (flat < num_experts), flat, num_experts),
                                         num_experts + 1)
    position = (onehot.cumsum(1) * onehot).sum(-1) - 1
    keep = (position < cap).reshape(ordered.shape)
    keep = keep if priority == "token" else keep.transpose(1, 2)
    return keep.reshape(t, k) & valid


def fused_moe(x, weights, ids, w_up, w_down, b_up, b_down, activation, gated, alpha, limit, capacity,
              capacity_factor, capacity_min, group_size, priority, weight_layout, rounding="ceil"):
    """Every expert on every token, then a dense combine: exact, E/k times the FLOPs of the routed form."""
    w_up, w_down, b_up = to_canonical(w_up, w_down, b_up, weight_layout)
    num_experts = w_up.shape[0]
    h = torch.matmul(x.unsqueeze(0), w_up.transpose(1, 2).to(x.dtype))
    if b_up is not None:
        h = h + b_up.unsqueeze(1).to(h.dtype)
    h = expert_activation(h, activation, gated, alpha, limit)
    y = torch.matmul(h, w_down.transpose(1, 2).to(h.dtype))
    if b_down is not None:
        y = y + b_down.unsqueeze(1).to(y.dtype)
    keep = kept_pairs(ids, num_experts, capacity, capacity_factor, capacity_min, group_size, priority, rounding)
    w = torch.where(keep, weights.float(), 0.0)
    slot = torch.where(keep, ids, num_experts)
    dense = torch.zeros(ids.shape[0], num_experts + 1, dtype=torch.float32, device=x.device)
    dense = dense.scatter_add(1, slot, w)[:, :num_experts]
    return torch.einsum("te,eth->th", dense, y.float()).to(x.dtype)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """torch's attention, with its answer for a query that every key is masked from (a left-padded position): zero.
    ONNX has no such softmax, and torch.onnx's own translation masks with the dtype's lowest number instead of
    -inf, so such a query attends to every key evenly and its output is not eager's."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        group = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(group, dim=-3)
        value = value.repeat_interleave(group, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    allowed = None
    if is_causal:
        allowed = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask if allowed is None else allowed & attn_mask
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        scores = scores + attn_mask.to(scores.dtype)
        attends = scores.amax(-1, keepdim=True) > float("-inf")
        probs = torch.where(attends, torch.softmax(scores, dim=-1), 0.0).to(value.dtype)
    elif allowed is not None:
        # the dtype's lowest number added where a key is hidden (its exp is 0, as -inf's), and the rows that see no
        # key (even weights there, not NaN) zeroed by a product on the mask's own shape: ONNX Runtime's broadcast
        # Add and Mul take a fraction of the time of a Where over the scores (16 heads x 512 x 512: 7-10 ms each)
        hidden = torch.where(allowed, 0.0, torch.finfo(scores.dtype).min).to(scores.dtype)
        probs = torch.softmax(scores + hidden, dim=-1)
        if not (is_causal and attn_mask is None):  # a causal row sees its own key at least
            probs = probs * allowed.any(-1, keepdim=True).to(probs.dtype)
        probs = probs.to(value.dtype)
    else:
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    out = torch.matmul(probs, value)
    # laid out as torch's attention lays out its output, [batch, seq, heads, dim]: models view it so after a transpose
    return out.transpose(1, 2).contiguous().transpose(1, 2) if out.dim() == 4 else out


def fused_route(x, router_weight, router_bias, selection_bias, top_k, score, topk_first, renormalize, n_group,
                topk_group, scale, logits_fp32, group_top=2, expert_scale=None):
    """``moecc::fused_route`` with 16-bit logits rounded once, as torch's GEMM rounds them (its bias added before
    the rounding): ONNX's MatMul then Add would round twice, a last-bit difference from eager in about a quarter of
    the logits, which breaks ties between experts the other way."""
    once = not logits_fp32 and x.element_size() < 4
    logits = router_logits(x, router_weight, router_bias, logits_fp32 or once)
    return route_reference(logits.to(x.dtype) if once else logits, selection_bias, top_k, score, topk_first,
                           renormalize, n_group, topk_group, scale, group_top, expert_scale)


DECOMPOSITIONS = {
    torch.ops.aten.scaled_dot_product_attention.default: scaled_dot_product_attention,
    torch.ops.moecc.fused_route.default: fused_route,
    torch.ops.moecc.route.default: route_reference,
    torch.ops.moecc.fused_moe.default: fused_moe,
    torch.ops.moecc.shared_ffn.default: shared_ffn_reference,
}
