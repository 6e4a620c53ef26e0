"""Plain-torch reference semantics of routing and capacity, shared by the ops and the recognizer."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# sqrtsoftplus: sqrt(softplus(logit)), DeepSeek-V4's
SCORES = ("softmax", "sigmoid", "sqrtsoftplus")
PRIORITIES = ("token", "slot")


def route_reference(
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
    """Weights [T, k] (float32) and expert ids [T, k] (int64) of ``logits`` [T, E]. Group-limited top-k
    (``n_group > 1``) keeps the ``topk_group`` groups whose best ``group_top`` choice scores sum highest: 2 for
    DeepSeek-V3, 1 (each group's best) for DeepSeek-V2's ``group_limited_greedy``. ``expert_scale`` [E]: each
    chosen weight is multiplied by its expert's factor last, after renormalisation and ``scale`` (Gemma 4's
    ``per_expert_scale``)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    logits = logits.float()
    t, e = logits.shape
    k = min(top_k, e)
    if topk_first:
        # Top-k of the raw logits (plus the selection bias), then the score of the chosen ones only (GPT-OSS's
        # softmax over them; Kolibri's sigmoid of each)
        choice = logits if selection_bias is None else logits + selection_bias.float()
        ids = torch.topk(choice, k, dim=-1)[1]
        weights = scores(logits.gather(1, ids), score)
    else:
        probs = scores(logits, score)
        choice = probs if selection_bias is None else probs + selection_bias.float()
        if n_group > 1 and t > 0:
            per_group = e // n_group
            top = min(group_top, per_group)
            group_scores = choice.view(t, n_group, per_group).topk(top, dim=-1)[0].sum(-1)
            group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
            keep = group_mask.unsqueeze(-1).expand(t, n_group, per_group).reshape(t, e).bool()
            choice = choice.masked_fill(~keep, float("-inf"))
        ids = torch.topk(choice, k, dim=-1)[1]
        weights = probs.gather(1, ids)
    if renormalizes(score, topk_first, renormalize):
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if scale != 1.0:
        weights = weights * scale
    if expert_scale is not None:
        weights = weights * expert_scale.float()[ids]
    return weights.float().contiguous(), ids.to(torch.int64).contiguous()


def optional_route_args(group_top: int, expert_scale) -> list:
    """The trailing arguments of a ``moecc::route`` or ``fused_route`` call, left out where they are the op's
    defaults, as torch's own graphs leave them out."""
    if expert_scale is not None:
        return [group_top, expert_scale]
    return [group_top] if group_top != 2 else []


def renormalizes(score: str, topk_first: bool, renormalize: bool) -> bool:
    """Whether the chosen weights are divided by their sum: not after a softmax over the chosen ones, which sums
    to 1 already."""
    return renormalize and not (topk_first and score == "softmax")


def scores(logits: Tensor, score: str) -> Tensor:
    """Softmax over the last dim, or an elementwise score of each logit."""
    if score == "softmax":
        return torch.softmax(logits, dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(logits)
    return torch.sqrt(torch.nn.functional.softplus(logits))


def router_logits(x: Tensor, weight: Tensor, bias: Tensor | None, fp32: bool) -> Tensor:
    """``x @ weight^T + bias``, in fp32 when the router reads its input in fp32 (DeepSeek, Switch)."""
    xs, w = (x.float(), weight.float()) if fp32 else (x, weight)
    return torch.nn.functional.linear(xs, w, None if bias is None else bias.to(w.dtype))


def fused_route_reference(x, router_weight, router_bias, selection_bias, top_k, score, topk_first, renormalize,
                          n_group, topk_group, scale, logits_fp32, group_top=2, expert_scale=None):
    """Router matmul then ``route_reference``: the semantics of ``moecc::fused_route``; plain, exportable torch."""
    logits = router_logits(x, router_weight, router_bias, logits_fp32)
    return route_reference(logits, selection_bias, top_k, score, topk_first, renormalize, n_group, topk_group, scale,
                           group_top, expert_scale)


CAPACITY_ROUNDINGS = ("ceil", "floor")


def effective_capacity(group_tokens: int, top_k: int, num_experts: int, capacity: int,
                       capacity_factor: float, capacity_min: int, rounding: str = "ceil") -> int:
    """Fixed ``capacity`` when >= 0, else ``max(capacity_min, ceil(k * G * cf / E))`` (``floor`` with
    ``rounding="floor"``: ``int(...)``, as Mesh TensorFlow's Switch and nanoMoE write it), else dropless (-1)."""
    if capacity >= 0:
        return capacity
    if capacity_factor > 0:
        if rounding not in CAPACITY_ROUNDINGS:
            raise ValueError(f"capacity rounding must be one of {CAPACITY_ROUNDINGS}, got {rounding!r}")
        exact = top_k * group_tokens * capacity_factor / num_experts
        return max(capacity_min, math.ceil(exact) if rounding == "ceil" else math.floor(exact))
    return -1


def apply_capacity(ids: Tensor, num_experts: int, capacity: int, capacity_factor: float, capacity_min: int,
                   group_size: int, priority: str, rounding: str = "ceil") -> Tensor:
    """Mark the (token, slot) pairs that overflow their expert's capacity as null (id ``num_experts``).

    Tokens are split into consecutive groups of ``group_size`` (0: one group). Within a group, pairs claim
    capacity in token order (``priority="token"``) or slot-major order, all first choices before any second
    choice (``priority="slot"``)."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    t, k = ids.shape
    g = t if group_size <= 0 else group_size
    if t == 0:
        return ids
    if t % g:
        raise ValueError(f"token count {t} is not a multiple of the capacity group size {g}")
    cap = effective_capacity(g, k, num_experts, capacity, capacity_factor, capacity_min, rounding)
    if cap < 0:
        return ids
    grouped = ids.reshape(t // g, g, k)
    ordered = grouped if priority == "token" else grouped.transpose(1, 2)
    flat = ordered.reshape(t // g, g * k)
    valid = (flat >= 0) & (flat < num_experts)
    onehot = torch.nn.functional.one_hot(torch.where(valid, flat, num_experts), num_experts + 1)
    position = (onehot.cumsum(1) * onehot).sum(-1) - 1
    kept = torch.where(valid & (position < cap), flat, torch.full_like(flat, num_experts))
    kept = kept.reshape(ordered.shape)
    kept = kept if priority == "token" else kept.transpose(1, 2)
    return kept.reshape(t, k)
