"""Decode experts: two pair-wise GEMV launches, no align, and the combine folded into the second.

At a handful of tokens every pair reads its own expert's weights (the top-k of one token are distinct experts), so
sorting pairs by expert buys no weight reuse; it costs the two align launches, a combine launch and row blocks of
which one row in 16 is real. Here GEMM 1 is one program per (pair, column block) that gathers its token's row and
streams the expert's gate and up rows, and GEMM 2 is one program per (token, column block) that sums the token's
k pairs, weighted, in slot order (deterministic, accumulated in fp32, no atomics). Both stream the weights with
plain coalesced loads along K in short steps over many programs (``_blocks``).

On sm_90 and newer both are programmatic dependent launches (``dependent_launch``): GEMM 1 waits for the gating
first thing and lets GEMM 2 launch at once, and GEMM 2's programs, on the SMs GEMM 1 leaves free, read their ids,
routing weights and first weight step while GEMM 1 still streams, then wait for GEMM 1 before they read its rows.

Knob ``MOECC_TRITON_DECODE_MAX_TOKENS``: the largest token count that takes this path (0: never); below it,
``use_decode`` leaves to the grouped kernels the token counts whose pairs would read many experts twice."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from moecc import knobs
from moecc.codegen.triton import dependent_launch
from moecc.codegen.triton.grouped_gemm import ACT_IDS, _epilogue1, _expert_base, _gate_up_rows
from moecc.experts import clamps


@triton.jit
def _gate_up_dot(x_ptr, w_ptr, gate_row, up_offset, rows_ok, stride_wn, stride_wk, K, GATED: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """(gate, up) [len(gate_row)] fp32: the weight rows ``gate_row`` and ``gate_row + up_offset`` (from ``w_ptr``)
    dotted with the vector at ``x_ptr``; up is gate when not ``GATED``. Both tiles of a step are loaded together,
    and the next step's before this one is used, so that a program keeps four loads in flight. The products are
    summed in a [rows, BLOCK_K] accumulator and reduced across threads once, after the K loop (a reduction at every
    step cost Qwen3-MoE's decode experts 3-10 % on an H200)."""
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = w_ptr + gate_row[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
    u_ptrs = g_ptrs + up_offset * stride_wn
    acc_g = tl.zeros((gate_row.shape[0], BLOCK_K), tl.float32)
    acc_u = acc_g
    first = rows_ok[:, None] & (offs_k < K)[None, :]
    w_g = tl.load(g_ptrs, mask=first, other=0.0)
    w_u = w_g
    if GATED:
        w_u = tl.load(u_ptrs, mask=first, other=0.0)
    for k in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + k + offs_k, mask=k + offs_k < K, other=0.0).to(tl.float32)
        after = rows_ok[:, None] & (k + BLOCK_K + offs_k < K)[None, :]
        next_g = tl.load(g_ptrs + (k + BLOCK_K) * stride_wk, mask=after, other=0.0)
        acc_g += w_g.to(tl.float32) * x[None, :]
        w_g = next_g
        if GATED:
            next_u = tl.load(u_ptrs + (k + BLOCK_K) * stride_wk, mask=after, other=0.0)
            acc_u += w_u.to(tl.float32) * x[None, :]
            w_u = next_u
    gate = tl.sum(acc_g, 1)
    up = gate
    if GATED:
        up = tl.sum(acc_u, 1)
    return gate, up


@triton.jit(do_not_specialize=["top_k", "num_routed", "num_experts"])
def _up_kernel(x_ptr, ids_ptr, w_ptr, ws_ptr, b_ptr, h_ptr, top_k, num_routed, num_experts, N, K, stride_xm,
               stride_we, stride_wn, stride_wk, stride_be, stride_hm, alpha, limit, GATED: tl.constexpr,
               INTERLEAVED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pair = tl.program_id(0).to(tl.int64)
    e = tl.load(ids_ptr + pair)
    if (e < 0) | (e >= num_experts):  # null or dropped: GEMM 2 skips the pair
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    gate_row, up_offset = _gate_up_rows(offs_n, N, INTERLEAVED)
    w_base = _expert_base(w_ptr, ws_ptr, e, num_routed, stride_we)
    x_row = x_ptr + (pair // top_k) * stride_xm
    g, u = _gate_up_dot(x_row, w_base, gate_row, up_offset, n_ok, stride_wn, stride_wk, K, GATED, BLOCK_K)
    h = _epilogue1(g[None, :], u[None, :], b_ptr + e * stride_be, gate_row, up_offset, n_ok, alpha, limit, GATED,
                   ACT, HAS_BIAS, CLAMP)
    tl.store(h_ptr + pair * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.jit(do_not_specialize=["num_routed", "num_experts"])
def _down_kernel(h_ptr, ids_ptr, weights_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, num_routed, num_experts, N, K,
                 stride_hm, stride_we, stride_wn, stride_wk, stride_be, stride_om, TOP_K: tl.constexpr,
                 K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr):
    """One token's k pairs at once: a [K_PAD, BLOCK_N, BLOCK_K] tile of their experts' rows per step, so that the
    loads of all k pairs are in flight together; the next step's tile is loaded before this one is used, and the
    products are reduced across threads once, after the K loop. With ``PDL`` everything but GEMM 1's rows is read
    before ``gdc_wait``."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, K_PAD)
    pair = t * TOP_K + slot
    e = tl.load(ids_ptr + pair, mask=slot < TOP_K, other=-1)
    live = (e >= 0) & (e < num_experts)
    routed = e < num_routed
    w_off = tl.where(routed, e, e - num_routed) * stride_we
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    rows = (w_off[:, None] + offs_n[None, :].to(tl.int64) * stride_wn)[:, :, None] + offs_k[None, None, :] * stride_wk
    w_ptrs = tl.where(routed[:, None, None], w_ptr + rows, ws_ptr + rows)
    h_ptrs = h_ptr + pair[:, None] * stride_hm + offs_k[None, :]
    w_ok = (live[:, None] & n_ok[None, :])[:, :, None]
    weight = tl.load(weights_ptr + pair, mask=live, other=0.0)
    products = tl.zeros((K_PAD, BLOCK_N, BLOCK_K), tl.float32)
    y = tl.zeros((K_PAD, BLOCK_N), tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + e[:, None] * stride_be + offs_n[None, :], mask=live[:, None] & n_ok[None, :],
                     other=0.0).to(tl.float32)
    w = tl.load(w_ptrs, mask=w_ok & (offs_k < K)[None, None, :], other=0.0)
    if PDL:
        gdc_wait()
    for k in range(0, K, BLOCK_K):
        h = tl.load(h_ptrs + k, mask=live[:, None] & (k + offs_k < K)[None, :], other=0.0).to(tl.float32)
        w_next = tl.load(w_ptrs + (k + BLOCK_K) * stride_wk, mask=w_ok & (k + BLOCK_K + offs_k < K)[None, None, :],
                         other=0.0)
        products += w.to(tl.float32) * h[:, None, :]
        w = w_next
    y += tl.sum(products, 2)
    out = tl.sum(tl.where(live[:, None], y * weight[:, None], 0.0), 0)
    tl.store(out_ptr + t * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


# The pair-wise GEMVs read an expert's weights once per pair, the grouped kernels once per expert. On an H200
# (benchmarks/knob_ab.py, MOECC_TRITON_DECODE_MAX_TOKENS 4 against 0, RESULTS session 24) the GEMVs won wherever
# the pairs read at most 10 % more weights than the distinct experts hold (Qwen3-MoE at 2-4 tokens, 1.03-1.10:
# 6-22 % faster) and lost from 1.14 on (GPT-OSS-20B at 3 tokens 10 %, Mixtral at 4 tokens 17 %, Qwen1.5-MoE's
# shared expert at 2 tokens 9 %).
MAX_REREADS = 1.10


def expected_rereads(tokens: int, top_k: int, num_routed: int, num_shared: int = 0) -> float:
    """Weights the GEMVs read over those the distinct experts hold, for ``tokens`` tokens each routed to ``top_k``
    of ``num_routed`` experts uniformly at random, each also through all ``num_shared`` shared experts (ids past
    the routed ones). 1.0 at one token."""
    routed = min(top_k, num_routed)
    distinct = num_routed * (1 - (1 - routed / num_routed) ** tokens) + num_shared if num_routed else num_shared
    return tokens * (routed + num_shared) / max(distinct, 1e-9)


def use_decode(tokens: int, top_k: int = 1, num_routed: int = 1, num_shared: int = 0) -> bool:
    """Whether ``tokens`` tokens take the GEMVs: at most ``MOECC_TRITON_DECODE_MAX_TOKENS`` of them, whose pairs
    read few weights twice (``MAX_REREADS``)."""
    if not 0 < tokens <= knobs.TRITON_DECODE_MAX_TOKENS.get():
        return False
    return tokens == 1 or expected_rereads(tokens, top_k, num_routed, num_shared) <= MAX_REREADS


TILE_ELEMENTS = 8192  # weight elements a program loads per step: 16 KB in 16-bit types
NUM_WARPS = 4
BLOCK_K = 0  # a fixed K step (benchmarks/decode_ab.py sweeps it); 0: the rule of ``_blocks``
DOWN_BLOCK_K = 0  # the same for GEMM 2 alone, over BLOCK_K


def _blocks(rows_per_column: int, k: int, columns: int, block_k: int = 0) -> tuple[int, int]:
    """(columns, K) of a program's step, ``TILE_ELEMENTS`` weights of ``rows_per_column`` rows per column (no more
    columns than the power of two above ``columns``). Short steps over many programs keep the loads of the whole
    GPU in flight; on an H100 (``benchmarks/decode_ab.py``) Qwen3's K of 2048 ran best in steps of 512, Mixtral's
    4096 and 14336 in steps of 2048 (243.6 against 264.1 us for both GEMVs at T=1). The step is the longest power
    of two up to that (``_k_step``) whose last step is not mostly masked: Qwen3's K of 768 in steps of 256 rather
    than 512 took GEMV 2 from 45.0 to 40.4 us."""
    block_k = min(triton.next_power_of_2(k), block_k or BLOCK_K or _k_step(k))
    block_n = max(1, TILE_ELEMENTS // (block_k * rows_per_column))
    return min(block_n, triton.next_power_of_2(columns)), block_k


def _k_step(k: int) -> int:
    """The longest power-of-two step up to 512 (K <= 2048) or 2048 whose masked tail is at most K / 8; else the
    step, down to 64, that masks least."""
    longest = 512 if k <= 2048 else 2048
    steps = [longest >> i for i in range(longest.bit_length()) if longest >> i >= 64]
    waste = {step: -k % step for step in steps}
    for step in steps:
        if waste[step] * 8 <= k:
            return step
    return min(steps, key=lambda step: (waste[step], -step))


def experts(x, weights, ids, w_up, w_down, b_up, b_down, activation: str, gated: bool, alpha: float, limit: float,
            shared_up, shared_down, interleaved: bool) -> torch.Tensor:
    """The experts and the combine of ``run_experts`` for few tokens: out [T, H]. Ids ``>= E`` address
    ``shared_up``/``shared_down``; ids outside [0, E + shared) do no compute."""
    t, k = ids.shape
    num_routed, up_rows, hidden = w_up.shape
    num_experts = num_routed + (shared_up.shape[0] if shared_up is not w_up else 0)
    inter = up_rows // 2 if gated else up_rows
    n_pairs = t * k
    h = torch.empty((n_pairs, inter), dtype=x.dtype, device=x.device)
    pdl = dependent_launch.enabled(x)
    block_n, block_k = _blocks(2 if gated else 1, hidden, inter)
    _up_kernel[(n_pairs, triton.cdiv(inter, block_n))](
        x, ids, w_up, shared_up, b_up if b_up is not None else w_up, h, k, num_routed, num_experts, inter, hidden,
        x.stride(0), *w_up.stride(), b_up.stride(0) if b_up is not None else 0, h.stride(0), float(alpha),
        float(limit), GATED=gated, INTERLEAVED=interleaved and gated, ACT=ACT_IDS[activation],
        HAS_BIAS=b_up is not None, CLAMP=clamps(activation, limit), BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
        num_warps=NUM_WARPS, **dependent_launch.launch_options(pdl))
    out = torch.empty((t, hidden), dtype=x.dtype, device=x.device)
    k_pad = triton.next_power_of_2(k)
    block_n, block_k = _blocks(k_pad, inter, hidden, DOWN_BLOCK_K)
    _down_kernel[(t, triton.cdiv(hidden, block_n))](
        h, ids, weights, w_down, shared_down, b_down if b_down is not None else w_down, out, num_routed, num_experts,
        hidden, inter, h.stride(0), *w_down.stride(), b_down.stride(0) if b_down is not None else 0,
        out.stride(0), TOP_K=k, K_PAD=k_pad, HAS_BIAS=b_down is not None, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
        num_warps=NUM_WARPS, **dependent_launch.launch_options(pdl))
    return out
