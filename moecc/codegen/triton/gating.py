"""Fused gating: scores, selection bias, group-limited top-k, top-k, renormalisation and scaling in one kernel,
one program per token."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gating_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_t, num_experts, scale,
                   K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, SIGMOID: tl.constexpr,
                   TOPK_FIRST: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E_PAD)
    valid = offs < num_experts
    logits = tl.load(logits_ptr + t * stride_t + offs, mask=valid, other=-float("inf")).to(tl.float32)
    if TOPK_FIRST:
        probs = logits
        choice = logits
    else:
        if SIGMOID:
            probs = 1.0 / (1.0 + tl.exp(-logits))
        else:
            e = tl.exp(logits - tl.max(logits, 0))
            probs = e / tl.sum(e, 0)
        choice = probs
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        choice = tl.where(valid, choice, -float("inf"))
        if N_GROUP > 1:
            per_group = num_experts // N_GROUP
            group = offs // per_group
            goffs = tl.arange(0, G_PAD)
            gscore = tl.full([G_PAD], -float("inf"), tl.float32)
            for g in tl.static_range(N_GROUP):
                vals = tl.where(group == g, choice, -float("inf"))
                first = tl.max(vals, 0)
                at = tl.argmax(vals, 0)
                second = tl.max(tl.where(offs == at, -float("inf"), vals), 0)
                s = tl.where(per_group >= 2, first + second, first)
                gscore = tl.where(goffs == g, s, gscore)
            keep = tl.zeros([E_PAD], tl.int1)
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.argmax(gscore, 0)
                keep = keep | (group == best)
                gscore = tl.where(goffs == best, -float("inf"), gscore)
            choice = tl.where(keep & valid, choice, -float("inf"))
    kk = tl.arange(0, K_PAD)
    chosen_w = tl.zeros([K_PAD], tl.float32)
    chosen_i = tl.zeros([K_PAD], tl.int64)
    for j in tl.static_range(K):
        at = tl.argmax(choice, 0)
        w = tl.sum(tl.where(offs == at, probs, 0.0), 0)
        chosen_w = tl.where(kk == j, w, chosen_w)
        chosen_i = tl.where(kk == j, at.to(tl.int64), chosen_i)
        choice = tl.where(offs == at, -float("inf"), choice)
    in_k = kk < K
    if TOPK_FIRST:
        if SIGMOID:
            chosen_w = 1.0 / (1.0 + tl.exp(-chosen_w))
        else:
            m = tl.max(tl.where(in_k, chosen_w, -float("inf")), 0)
            e = tl.where(in_k, tl.exp(chosen_w - m), 0.0)
            chosen_w = e / tl.sum(e, 0)
    if RENORM:
        chosen_w = chosen_w / (tl.sum(tl.where(in_k, chosen_w, 0.0), 0) + 1e-20)
    chosen_w = chosen_w * scale
    tl.store(weights_ptr + t * K + kk, chosen_w, mask=in_k)
    tl.store(ids_ptr + t * K + kk, chosen_i, mask=in_k)


def gating(logits: torch.Tensor, selection_bias, top_k: int, score: str, topk_first: bool, renormalize: bool,
           n_group: int, topk_group: int, scale: float):
    """logits [T, E] -> (weights [T, k] fp32, ids [T, k] int64); the semantics of ``moecc::route``."""
    t, e = logits.shape
    k = min(top_k, e)
    weights = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    logits = logits.contiguous()
    bias = selection_bias if selection_bias is not None else logits
    _gating_kernel[(t,)](
        logits, bias, weights, ids, logits.stride(0), e, float(scale), K=k, K_PAD=triton.next_power_of_2(k),
        E_PAD=triton.next_power_of_2(e), SIGMOID=score == "sigmoid", TOPK_FIRST=topk_first,
        RENORM=renormalize and not topk_first, HAS_BIAS=selection_bias is not None and not topk_first,
        N_GROUP=n_group if not topk_first else 1, TOPK_GROUP=topk_group,
        G_PAD=triton.next_power_of_2(max(n_group, 1)))
    return weights, ids
