"""Fused gating: scores, selection bias, group-limited top-k, top-k, renormalisation and scaling in one kernel.

Each program selects for a tile of tokens, one token per row, so that the reductions over experts stay inside a
row and a large T is not one small program per token (on an H100, 16384 Qwen3 tokens took 0.086 ms that way). For
small T one launch also does the router GEMV, a few experts of one token per program; the last of a token's programs
to finish selects for it. On sm_90 and newer both kernels let the next launch start early (``dependent_launch``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from moecc.codegen.triton import dependent_launch
from moecc.codegen.triton.scratch import zeroed_counters
from moecc.routing import renormalizes

SCORE_IDS = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}


@triton.jit
def _elementwise_score(v, SCORE: tl.constexpr):
    """sigmoid (1) or sqrt(softplus) (2) of each logit. softplus(v) = max(v, 0) + log1p(exp(-|v|)), log1p(y) by
    Kahan's log(u) * y / (u - 1) with u = 1 + y: log(1 + y) alone keeps only the bits of y that survive the
    rounding of 1 + y, 4e-4 off at a logit of -9 and 0 below -17 in fp32."""
    if SCORE == 1:
        return 1.0 / (1.0 + tl.exp(-v))
    else:
        y = tl.exp(-tl.abs(v))
        u = 1.0 + y
        # both sides are computed: the divisor is kept off zero where the other side is taken
        log1p = tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))
        return tl.sqrt(tl.maximum(v, 0.0) + log1p)


@triton.jit
def _select(logits, bias_ptr, expert_scale_ptr, weights_ptr, ids_ptr, t, n_tokens, num_experts, scale,
            K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, SCORE: tl.constexpr,
            TOPK_FIRST: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
            N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, GROUP_TOP: tl.constexpr,
            HAS_EXPERT_SCALE: tl.constexpr):
    """Scores, selection bias, group-limited top-k (a group scored by its best choice, or its best two summed:
    ``GROUP_TOP``), top-k, renormalisation, scaling and per-expert scaling of the logits of tokens
    ``t`` ([BLOCK_T, E_PAD], one token per row; rows from ``n_tokens`` on are not stored)."""
    offs = tl.arange(0, E_PAD)[None, :]
    valid = offs < num_experts
    logits = tl.where(valid, logits, -float("inf"))
    if TOPK_FIRST:
        probs = logits
        choice = logits
        if HAS_BIAS:
            choice = tl.where(valid, logits + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32),
                              -float("inf"))
    else:
        if SCORE == 0:
            e = tl.exp(logits - tl.max(logits, 1)[:, None])
            probs = e / tl.sum(e, 1)[:, None]
        else:
            probs = _elementwise_score(logits, SCORE)
        choice = probs
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        choice = tl.where(valid, choice, -float("inf"))
        if N_GROUP > 1:
            per_group = num_experts // N_GROUP
            group = offs // per_group
            goffs = tl.arange(0, G_PAD)[None, :]
            gscore = tl.full([logits.shape[0], G_PAD], -float("inf"), tl.float32)
            for g in tl.static_range(N_GROUP):
                vals = tl.where(group == g, choice, -float("inf"))
                if GROUP_TOP == 1:
                    s = tl.max(vals, 1)
                else:
                    first, at = tl.max(vals, 1, return_indices=True, return_indices_tie_break_left=True)
                    second = tl.max(tl.where(offs == at[:, None], -float("inf"), vals), 1)
                    s = tl.where(per_group >= 2, first + second, first)
                gscore = tl.where(goffs == g, s[:, None], gscore)
            keep = tl.zeros(logits.shape, tl.int1)
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.argmax(gscore, 1)[:, None]
                keep = keep | (group == best)
                gscore = tl.where(goffs == best, -float("inf"), gscore)
            choice = tl.where(keep & valid, choice, -float("inf"))
    kk = tl.arange(0, K_PAD)[None, :]
    chosen_w = tl.zeros([logits.shape[0], K_PAD], tl.float32)
    chosen_i = tl.zeros([logits.shape[0], K_PAD], tl.int64)
    for j in tl.static_range(K):
        if HAS_BIAS:  # the choice is not the weight: read the weight at the choice's argmax
            at = tl.argmax(choice, 1)[:, None]
            w = tl.sum(tl.where(offs == at, probs, 0.0), 1)[:, None]
        else:  # the choice is the weight (or masked): one reduction gives both, half of the top-k's reductions
            w, at = tl.max(choice, 1, return_indices=True, return_indices_tie_break_left=True)
            w, at = w[:, None], at[:, None]
        chosen_w = tl.where(kk == j, w, chosen_w)
        chosen_i = tl.where(kk == j, at.to(tl.int64), chosen_i)
        choice = tl.where(offs == at, -float("inf"), choice)
    in_k = kk < K
    if TOPK_FIRST:
        if SCORE == 0:
            m = tl.max(tl.where(in_k, chosen_w, -float("inf")), 1)[:, None]
            e = tl.where(in_k, tl.exp(chosen_w - m), 0.0)
            chosen_w = e / tl.sum(e, 1)[:, None]
        else:
            chosen_w = _elementwise_score(chosen_w, SCORE)
    if RENORM:
        chosen_w = chosen_w / (tl.sum(tl.where(in_k, chosen_w, 0.0), 1)[:, None] + 1e-20)
    chosen_w = chosen_w * scale
    store = in_k & (t < n_tokens)[:, None]
    if HAS_EXPERT_SCALE:
        chosen_w = chosen_w * tl.load(expert_scale_ptr + chosen_i, mask=store, other=1.0).to(tl.float32)
    out = t[:, None] * K + kk
    tl.store(weights_ptr + out, chosen_w, mask=store)
    tl.store(ids_ptr + out, chosen_i, mask=store)


@triton.jit
def _gating_kernel(logits_ptr, bias_ptr, expert_scale_ptr, weights_ptr, ids_ptr, stride_t, n_tokens, num_experts,
                   scale, BLOCK_T: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                   SCORE: tl.constexpr, TOPK_FIRST: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, GROUP_TOP: tl.constexpr,
                   HAS_EXPERT_SCALE: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # the decode GEMV 1 waits for this kernel to finish before it reads anything
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs = tl.arange(0, E_PAD)
    # rows past the last token read zeros (not -inf: a row of -inf has NaN scores) and are not stored
    logits = tl.load(logits_ptr + t[:, None] * stride_t + offs[None, :],
                     mask=(t < n_tokens)[:, None] & (offs < num_experts)[None, :], other=0.0)
    _select(logits.to(tl.float32), bias_ptr, expert_scale_ptr, weights_ptr, ids_ptr, t, n_tokens, num_experts, scale,
            K, K_PAD, E_PAD, SCORE, TOPK_FIRST, RENORM, HAS_BIAS, N_GROUP, TOPK_GROUP, G_PAD, GROUP_TOP,
            HAS_EXPERT_SCALE)


@triton.jit
def _gemv_gating_kernel(x_ptr, w_ptr, rb_ptr, bias_ptr, expert_scale_ptr, logits_ptr, arrived_ptr, weights_ptr,
                        ids_ptr, stride_x, stride_w, hidden, num_experts, scale, HAS_ROUTER_BIAS: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_H: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                        E_PAD: tl.constexpr, SCORE: tl.constexpr, TOPK_FIRST: tl.constexpr, RENORM: tl.constexpr,
                        HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr,
                        GROUP_TOP: tl.constexpr, HAS_EXPERT_SCALE: tl.constexpr, PDL: tl.constexpr,
                        ROUND: tl.constexpr):
    """Small T: the router GEMV in fp32, ``ROWS`` experts of one token per program, then the same selection, run by
    the token's last program to finish (it counts arrivals in ``arrived``, and sets the count back to zero for the
    next launch: ``scratch.zeroed_counters``); one launch for all of gating. With ``ROUND`` the logits are rounded
    to the input's dtype once, bias added, as a bf16/fp16 GEMM rounds them."""
    if PDL:
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    rows_ok = rows < num_experts
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros([ROWS, BLOCK_H], tl.float32)
    for start in range(0, hidden, BLOCK_H):
        h_ok = start + offs_h < hidden
        x = tl.load(x_ptr + t * stride_x + start + offs_h, mask=h_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * stride_w + start + offs_h[None, :], mask=rows_ok[:, None] & h_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += w * x[None, :]
    logits = tl.sum(acc, 1)
    if HAS_ROUTER_BIAS:
        logits += tl.load(rb_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)
    if ROUND:
        logits = logits.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(logits_ptr + t * E_PAD + rows, logits, mask=rows_ok)
    # release: this program's logits are visible to whichever program sees the last arrival (acquire)
    if tl.atomic_add(arrived_ptr + t, 1, sem="acq_rel") == tl.num_programs(1) - 1:
        tl.store(arrived_ptr + t, 0)  # every program of this token has counted: none reads it again in this launch
        offs_e = tl.arange(0, E_PAD)
        all_logits = tl.load(logits_ptr + t * E_PAD + offs_e, mask=offs_e < num_experts, other=0.0,
                             cache_modifier=".cg")
        _select(all_logits[None, :], bias_ptr, expert_scale_ptr, weights_ptr, ids_ptr, t + tl.arange(0, 1), t + 1,
                num_experts, scale, K, K_PAD, E_PAD, SCORE, TOPK_FIRST, RENORM, HAS_BIAS, N_GROUP, TOPK_GROUP, G_PAD,
                GROUP_TOP, HAS_EXPERT_SCALE)


def _meta(top_k, e, score, topk_first, renormalize, has_bias, n_group, topk_group, group_top, has_expert_scale):
    if n_group > 1 and group_top not in (1, 2):
        raise NotImplementedError(f"Triton gating scores a group by its best 1 or 2 choices, not {group_top}")
    k = min(top_k, e)
    return dict(K=k, K_PAD=triton.next_power_of_2(k), E_PAD=triton.next_power_of_2(e), SCORE=SCORE_IDS[score],
                TOPK_FIRST=topk_first, RENORM=renormalizes(score, topk_first, renormalize),
                HAS_BIAS=has_bias,
                N_GROUP=n_group if not topk_first else 1, TOPK_GROUP=topk_group,
                G_PAD=triton.next_power_of_2(max(n_group, 1)), GROUP_TOP=group_top,
                HAS_EXPERT_SCALE=has_expert_scale)


GEMV_MAX_TOKENS = 64  # up to here one fused launch beats a GEMM plus a gating launch
# a router GEMV program reads up to this many weights in steps of up to ROUTER_BLOCK_H: a single program per token
# looping over all experts took 8-9 us on an H100 at T=1 (each step waiting on its load), for 64-512 KB of weights.
# Four warps: one warp a program on tiles of 4096 (its top-k reduced with shuffles alone) was 1-2 % slower per
# layer on an H200 for Mixtral and DeepSeek-V3 at 1-8 tokens (RESULTS session 24)
ROUTER_TILE_ELEMENTS = 8192
ROUTER_BLOCK_H = 4096
ROUTER_WARPS = 4


def fused_gating(x: torch.Tensor, router_weight: torch.Tensor, router_bias, selection_bias, top_k: int, score: str,
                 topk_first: bool, renormalize: bool, n_group: int, topk_group: int, scale: float,
                 round_logits: bool = False, group_top: int = 2, expert_scale: torch.Tensor | None = None):
    """Router GEMV (fp32 accumulation) and gating in one launch, for small token counts; ``round_logits``: the
    logits rounded to ``x``'s dtype (a router whose eager GEMM returns them in it)."""
    t, hidden = x.shape
    e = router_weight.shape[0]
    k = min(top_k, e)
    weights = torch.empty((t, k), dtype=torch.float32, device=x.device)
    ids = torch.empty((t, k), dtype=torch.int64, device=x.device)
    if t == 0:
        return weights, ids
    x, w = x.contiguous(), router_weight.contiguous()
    bias = selection_bias if selection_bias is not None else w
    block_h = min(triton.next_power_of_2(hidden), ROUTER_BLOCK_H)
    rows = min(max(1, ROUTER_TILE_ELEMENTS // block_h), triton.next_power_of_2(e))
    meta = _meta(top_k, e, score, topk_first, renormalize, selection_bias is not None, n_group, topk_group, group_top,
                 expert_scale is not None)
    logits = torch.empty((t, meta["E_PAD"]), dtype=torch.float32, device=x.device)
    arrived = zeroed_counters(t, x.device)
    _gemv_gating_kernel[(t, triton.cdiv(e, rows))](
        x, w, router_bias if router_bias is not None else w, bias, _per_expert(expert_scale, w), logits, arrived,
        weights, ids, x.stride(0), w.stride(0), hidden, e, float(scale), HAS_ROUTER_BIAS=router_bias is not None,
        ROWS=rows, BLOCK_H=block_h,
        PDL=dependent_launch.enabled(x), ROUND=round_logits and x.dtype != torch.float32, num_warps=ROUTER_WARPS,
        **meta)
    return weights, ids


def gating(logits: torch.Tensor, selection_bias, top_k: int, score: str, topk_first: bool, renormalize: bool,
           n_group: int, topk_group: int, scale: float, group_top: int = 2, expert_scale: torch.Tensor | None = None):
    """logits [T, E] -> (weights [T, k] fp32, ids [T, k] int64); the semantics of ``moecc::route``."""
    t, e = logits.shape
    k = min(top_k, e)
    weights = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    logits = logits.contiguous()
    bias = selection_bias if selection_bias is not None else logits
    block_t = tokens_per_program(t, e)
    meta = _meta(top_k, e, score, topk_first, renormalize, selection_bias is not None, n_group, topk_group, group_top,
                 expert_scale is not None)
    _gating_kernel[(triton.cdiv(t, block_t),)](
        logits, bias, _per_expert(expert_scale, logits), weights, ids, logits.stride(0), t, e, float(scale),
        BLOCK_T=block_t, num_warps=_warps(block_t * meta["E_PAD"]), PDL=dependent_launch.enabled(logits), **meta)
    return weights, ids


def _per_expert(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """An [E] tensor as the kernels read it (contiguous), or any pointer where there is none (never read)."""
    return placeholder if t is None else t.contiguous()


TILE_ELEMENTS = 2048  # logits per program, at most
MIN_PROGRAMS = 512  # before tiles grow past one token


def _warps(elements: int) -> int:
    """Warps for a selection over ``elements`` logits: one warp reduces a row of up to 256 with shuffles alone, where
    four also meet in shared memory for each of the k argmaxes (4.1 us for one Qwen3 token on an H100)."""
    return max(1, min(4, elements // 256))


def tokens_per_program(t: int, num_experts: int) -> int:
    """A power of two: one token per program up to ``MIN_PROGRAMS`` tokens, then more, up to ``TILE_ELEMENTS``
    logits a program."""
    cap = max(1, TILE_ELEMENTS // triton.next_power_of_2(num_experts))
    return min(cap, triton.next_power_of_2(triton.cdiv(t, MIN_PROGRAMS)))
