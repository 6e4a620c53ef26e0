"""Grouped expert GEMMs over block-padded, expert-sorted pair rows.

GEMM 1 gathers each row's token straight from ``x`` (no permuted copy), computes the gate and up tiles of the same
output columns in one program and applies the (gated) activation, biases and GPT-OSS clamp in the epilogue.
GEMM 2 multiplies by the down projection, adds its bias and the routing weight, and writes each pair's row in pair
order, so the combine that follows is a plain, deterministic sum over the k slots (no atomics).

Two kernel families share those contracts. The pointer kernels load every tile with masked loads and serve small
row blocks (decode) and GPUs before Hopper. The TMA kernels (row blocks of 64 and more, Hopper and newer; knob
``MOECC_TRITON_TMA``) read the weight tiles, and GEMM 2's activation rows, through tensor descriptors; GEMM 1 reads
zeros for padding rows and stores them, so both GEMMs multiply zero rows there. With the ``oi_gu`` weight layout,
GEMM 1 takes the gate and up rows of its output columns as one ``[2*BLOCK_N, BLOCK_K]`` tile and one dot, and splits
the accumulator in the epilogue; with ``oi`` it takes two tiles and two dots. Measured on an H100 at Mixtral
T=4096 (``benchmarks/gemm_variants.py``): GEMM 1 3.6 ms through pointers, 3.46 through TMA (``oi``), 3.24 through
TMA (``oi_gu``); GEMM 2 1.92 through pointers, 1.48–1.60 through TMA. A third family, persistent and
warp-specialized, is written in Gluon (``ws_gemm``, knob ``MOECC_TRITON_WS``); by default it takes GEMM 2 with long
K loops on sm_90.

fp32 inputs multiply at fp32 accuracy unless torch allows TF32 (``torch.set_float32_matmul_precision``), as
torch's own fp32 matmuls do; on GPUs with TF32 tensor cores that is three TF32 products per dot (``_precision``)."""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from moecc import knobs
from moecc.activations import TRITON_IDS
from moecc.codegen.triton import dependent_launch
from moecc.codegen.triton.configs import (
    INTERPRET,
    device_index,
    fit_shared_memory,
    shared_memory_limit,
    shrink,
    sm90_or_newer,
    tf32_tensor_cores,
    within_registers,
)
from moecc.codegen.triton.dependent_launch import follow_previous
from moecc.experts import clamps

log = logging.getLogger("moecc.codegen.triton")

ACT_IDS = TRITON_IDS


@triton.jit
def _activate(g, ACT: tl.constexpr, alpha):
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    elif ACT == 3:
        return tl.maximum(g, 0.0)
    elif ACT == 4:
        return g / (1.0 + tl.exp(-alpha * g))
    elif ACT == 5:
        r = tl.maximum(g, 0.0)
        return r * r
    elif ACT == 7:  # identity
        return g
    elif ACT == 8:  # swish, beta = alpha
        return g / (1.0 + tl.exp(-alpha * g))
    elif ACT == 9:  # sigmoid
        return 1.0 / (1.0 + tl.exp(-g))
    elif ACT == 10:  # tanh(g) = 2 sigmoid(2g) - 1
        return 2.0 / (1.0 + tl.exp(-2.0 * g)) - 1.0
    elif ACT == 11:  # mish: g tanh(softplus(g)) = g (e^2s - 1) / (e^2s + 1), e^s = 1 + e^g
        sp = tl.maximum(g, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(g)))
        return g * (2.0 / (1.0 + tl.exp(-2.0 * sp)) - 1.0)
    elif ACT == 12:  # relu6
        return tl.minimum(tl.maximum(g, 0.0), 6.0)
    elif ACT == 13:  # hardswish
        return g * tl.minimum(tl.maximum(g + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 14:  # softplus, overflow-free; torch returns g itself above 20, which this equals in fp32
        return tl.maximum(g, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(g)))
    elif ACT == 15:  # leaky_relu, slope = alpha
        return tl.where(g >= 0.0, g, alpha * g)
    elif ACT == 16:  # elu
        return tl.where(g > 0.0, g, alpha * (tl.exp(tl.minimum(g, 0.0)) - 1.0))
    else:  # selu
        return 1.0507009873554805 * tl.where(g > 0.0, g, 1.6732632423543772 * (tl.exp(tl.minimum(g, 0.0)) - 1.0))


@triton.jit
def _tile(total_ptr, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block, live?) of this program: GROUP_M row blocks share each weight tile in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(tl.load(total_ptr), BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // (GROUP_M * num_n) * GROUP_M + (pid % GROUP_M)
    pid_n = (pid % (GROUP_M * num_n)) // GROUP_M
    return pid_m, pid_n, pid_m < num_m


@triton.jit
def _block_rows(sorted_ptr, block_expert_ptr, pid_m, n_pairs, BLOCK_M: tl.constexpr):
    """This row block's positions, their pair ids, which are real (not padding) and the block's expert."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    return rows, pair, pair < n_pairs, tl.load(block_expert_ptr + pid_m).to(tl.int64)


@triton.jit
def _expert_base(w_ptr, ws_ptr, e, num_routed, stride_we):
    """Routed expert ``e``'s weights, or shared expert ``e - num_routed``'s (always-selected experts)."""
    if e < num_routed:
        base = w_ptr + e * stride_we
    else:
        base = ws_ptr + (e - num_routed) * stride_we
    return base


@triton.jit
def _gate_up_rows(offs_n, N, INTERLEAVED: tl.constexpr):
    """(gate weight rows of output columns ``offs_n``, offset from a gate row to its up row): ``oi_gu`` has gate n at
    row 2n and up n at row 2n+1, ``oi`` gate n at row n and up n at row N+n."""
    if INTERLEAVED:
        return offs_n * 2, 1
    return offs_n, N


@triton.jit
def _epilogue1(acc_g, acc_u, bias_ptr, gate_row, up_offset, n_ok, alpha, limit, GATED: tl.constexpr,
               ACT: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr):
    """Bias (read at the weight rows' positions), GPT-OSS clamp and (gated) activation of GEMM 1's tile."""
    if HAS_BIAS:
        acc_g += tl.load(bias_ptr + gate_row, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(bias_ptr + gate_row + up_offset, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if CLAMP:
            acc_g = tl.minimum(acc_g, limit)
            acc_u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        if ACT == 4:
            h = _activate(acc_g, ACT, alpha) * (acc_u + 1.0)
        elif ACT == 6:  # caps alpha (gate) and limit (up): c * tanh(v / c), tanh(v) = 2 sigmoid(2v) - 1
            capped_g = alpha * (2.0 / (1.0 + tl.exp(-2.0 * acc_g / alpha)) - 1.0)
            capped_u = limit * (2.0 / (1.0 + tl.exp(-2.0 * acc_u / limit)) - 1.0)
            h = capped_g / (1.0 + tl.exp(-acc_g)) * capped_u
        else:
            h = _activate(acc_g, ACT, alpha) * acc_u
    else:
        h = _activate(acc_g, ACT, alpha)
    return h


@triton.jit(do_not_specialize=["n_pairs", "top_k", "num_routed"])
def _gemm1_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, h_ptr, sorted_ptr, block_expert_ptr, total_ptr,
                  n_pairs, top_k, num_routed, N, K, stride_xm, stride_we, stride_wn, stride_wk, stride_be, stride_hm,
                  alpha, limit,
                  GATED: tl.constexpr, INTERLEAVED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  CLAMP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr):
    follow_previous(PDL)
    pid_m, pid_n, live_tile = _tile(total_ptr, N, BLOCK_M, BLOCK_N, GROUP_M)
    if not live_tile:
        return
    rows, pair, live, e = _block_rows(sorted_ptr, block_expert_ptr, pid_m, n_pairs, BLOCK_M)
    tok = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
    w_base = _expert_base(w_ptr, ws_ptr, e, num_routed, stride_we)
    gate_row, up_offset = _gate_up_rows(offs_n, N, INTERLEAVED)
    g_ptrs = w_base + gate_row[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=live[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
        if GATED:
            wu = tl.load(g_ptrs + up_offset * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
    h = _epilogue1(acc_g, acc_u, b_ptr + e * stride_be, gate_row, up_offset, n_ok, alpha, limit, GATED, ACT, HAS_BIAS,
                   CLAMP)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=live[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["n_pairs", "num_routed"])
def _gemm2_kernel(h_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, total_ptr,
                  n_pairs, num_routed, N, K, stride_hm, stride_we, stride_wn, stride_wk, stride_be, stride_om,
                  HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr):
    follow_previous(PDL)
    pid_m, pid_n, live_tile = _tile(total_ptr, N, BLOCK_M, BLOCK_N, GROUP_M)
    if not live_tile:
        return
    rows, pair, live, e = _block_rows(sorted_ptr, block_expert_ptr, pid_m, n_pairs, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
    w_base = _expert_base(w_ptr, ws_ptr, e, num_routed, stride_we)
    w_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=live[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * stride_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc * tl.load(weights_ptr + pair, mask=live, other=0.0).to(tl.float32)[:, None]
    o_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=live[:, None] & n_ok[None, :])


@triton.jit
def _token_tile(a_ptrs, live, k, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The K step ``k`` of gathered token rows, zeros in padding rows (see ``_gemm1_tma_kernel``)."""
    if EVEN_K:
        return tl.load(a_ptrs, mask=live[:, None], other=0.0)
    return tl.load(a_ptrs, mask=live[:, None] & (tl.arange(0, BLOCK_K)[None, :] < K - k * BLOCK_K), other=0.0)


@triton.jit
def _gathered_dot(x_ptr, tok, live, stride_xm, w_desc, w_row, K, acc, PRECISION: tl.constexpr,
                  EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[tok] @ w[w_row : w_row + tile rows]^T over K: token rows gathered by pointer (zeros where not
    ``live``), weights by TMA."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = _token_tile(a_ptrs, live, k, K, EVEN_K, BLOCK_K)
        w = w_desc.load([w_row, k * BLOCK_K])
        acc = tl.dot(a, w.T, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
    return acc


@triton.jit
def _gathered_dot_apart(x_ptr, tok, live, stride_xm, w_desc, gate_row, up_row, K, acc_g, acc_u,
                        PRECISION: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_gathered_dot`` for gate and up rows stored apart (``oi``): two weight tiles, two dots per K step."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = _token_tile(a_ptrs, live, k, K, EVEN_K, BLOCK_K)
        wg = w_desc.load([gate_row, k * BLOCK_K])
        wu = w_desc.load([up_row, k * BLOCK_K])
        acc_g = tl.dot(a, wg.T, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, wu.T, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
    return acc_g, acc_u


@triton.jit
def _gate_up_dot(x_ptr, tok, live, stride_xm, w_desc, expert, pid_n, N, K, INTERLEAVED: tl.constexpr,
                 PRECISION: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """(gate, up) accumulators of expert ``expert`` for BLOCK_N output columns: one [2*BLOCK_N, BLOCK_K] tile and
    one dot when interleaved (``oi_gu``), two tiles and two dots when stored apart (``oi``)."""
    if INTERLEAVED:
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), tl.float32)
        row = (expert * 2 * N + pid_n * 2 * BLOCK_N).to(tl.int32)
        acc = _gathered_dot(x_ptr, tok, live, stride_xm, w_desc, row, K, acc, PRECISION, EVEN_K, BLOCK_K)
        acc_g, acc_u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        row = (expert * 2 * N + pid_n * BLOCK_N).to(tl.int32)
        acc_g, acc_u = _gathered_dot_apart(x_ptr, tok, live, stride_xm, w_desc, row, row + N, K, acc_g, acc_u,
                                           PRECISION, EVEN_K, BLOCK_K)
    return acc_g, acc_u


@triton.jit(do_not_specialize=["n_pairs", "top_k", "num_routed"])
def _gemm1_tma_kernel(w_desc, ws_desc, x_ptr, b_ptr, h_ptr, sorted_ptr, block_expert_ptr, total_ptr,
                      n_pairs, top_k, num_routed, N, K, stride_xm, stride_be, stride_hm, alpha, limit,
                      GATED: tl.constexpr, INTERLEAVED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      CLAMP: tl.constexpr, HAS_SHARED: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      PDL: tl.constexpr):
    """GEMM 1 with TMA weight tiles (``_gate_up_dot`` for gated experts, in either layout). Padding rows load
    zeros and store zeros, so that both GEMMs multiply zero rows there: where the power limit sets the clock (large
    T on an H100), a zero row costs the tensor cores less than a copy of a token (measured, ``benchmarks/RESULTS.md``,
    session 14)."""
    follow_previous(PDL)
    pid_m, pid_n, live_tile = _tile(total_ptr, N, BLOCK_M, BLOCK_N, GROUP_M)
    if not live_tile:
        return
    rows, pair, live, e = _block_rows(sorted_ptr, block_expert_ptr, pid_m, n_pairs, BLOCK_M)
    tok = tl.where(live, pair // top_k, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # one K loop whichever weights this block reads: a loop per branch would take a ring of shared memory each,
    # and the launch would then shrink the pipeline until both fit
    desc, expert = w_desc, e
    if HAS_SHARED:
        if e >= num_routed:
            desc, expert = ws_desc, e - num_routed
    if GATED:
        acc_g, acc_u = _gate_up_dot(x_ptr, tok, live, stride_xm, desc, expert, pid_n, N, K, INTERLEAVED, PRECISION,
                                    EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        if INTERLEAVED:
            h = _epilogue1(acc_g, acc_u, b_ptr + e * stride_be, offs_n * 2, 1, n_ok, alpha, limit, GATED, ACT,
                           HAS_BIAS, CLAMP)
        else:
            h = _epilogue1(acc_g, acc_u, b_ptr + e * stride_be, offs_n, N, n_ok, alpha, limit, GATED, ACT, HAS_BIAS,
                           CLAMP)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        w_row = (expert * N + pid_n * BLOCK_N).to(tl.int32)
        acc = _gathered_dot(x_ptr, tok, live, stride_xm, desc, w_row, K, acc, PRECISION, EVEN_K, BLOCK_K)
        h = _epilogue1(acc, acc, b_ptr + e * stride_be, offs_n, 0, n_ok, alpha, limit, GATED, ACT, HAS_BIAS, CLAMP)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, tl.where(live[:, None], h, 0.0).to(h_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.jit
def _tma_dot(a_desc, a_row, w_desc, w_row, K, acc, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([a_row, k * BLOCK_K])
        w = w_desc.load([w_row, k * BLOCK_K])
        acc = tl.dot(a, w.T, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["n_pairs", "num_routed"])
def _gemm2_tma_kernel(h_desc, w_desc, ws_desc, b_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, total_ptr,
                      n_pairs, num_routed, N, K, stride_be, stride_om,
                      HAS_BIAS: tl.constexpr, HAS_SHARED: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      PDL: tl.constexpr):
    """GEMM 2 with both operands through TMA: the aligned rows of h are contiguous. Padding rows of h were never
    written; each only reaches its own output row, which is not stored."""
    follow_previous(PDL)
    pid_m, pid_n, live_tile = _tile(total_ptr, N, BLOCK_M, BLOCK_N, GROUP_M)
    if not live_tile:
        return
    rows, pair, live, e = _block_rows(sorted_ptr, block_expert_ptr, pid_m, n_pairs, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    desc, expert = w_desc, e
    if HAS_SHARED:  # one K loop for both (see _gemm1_tma_kernel)
        if e >= num_routed:
            desc, expert = ws_desc, e - num_routed
    acc = _tma_dot(h_desc, pid_m * BLOCK_M, desc, (expert * N + pid_n * BLOCK_N).to(tl.int32), K, acc, PRECISION,
                   BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * stride_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc * tl.load(weights_ptr + pair, mask=live, other=0.0).to(tl.float32)[:, None]
    o_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=live[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(pairs_ptr, ids_ptr, out_ptr, num_experts, H, K: tl.constexpr, BLOCK_H: tl.constexpr,
                    PDL: tl.constexpr):
    follow_previous(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in tl.static_range(K):
        e = tl.load(ids_ptr + t * K + j)
        live = (e >= 0) & (e < num_experts)
        # null and dropped pairs were never written: their rows are read (in bounds) and discarded
        row = tl.load(pairs_ptr + (t * K + j) * H + offs, mask=ok, other=0.0).to(tl.float32)
        acc += tl.where(live, row, 0.0)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _precision(t: torch.Tensor) -> str:
    """``tl.dot``'s input precision for operands like ``t`` (16-bit operands ignore it). fp32 at torch's default
    "highest" multiplies as three TF32 products of split operands (``tf32x3``) where tensor cores take TF32: on an
    H200 that came out as close to a float64 reference as Triton's ``ieee`` dot (7e-7 to 1e-6 against 1.3e-6 to
    2.8e-6) and up to 100x faster, the ``ieee`` dot being a loop of FMAs that took Mixtral's layer at 512 tokens
    0.96 s per call (``benchmarks/RESULTS.md``, session 25). "high" and "medium" allow one TF32 product, as for
    torch's own matmuls."""
    if t.dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "tf32x3" if t.is_cuda and not INTERPRET and tf32_tensor_cores(device_index(t)) else "ieee"


def _fit(cfg, t: torch.Tensor, b_tiles: int):
    if not t.is_cuda:  # the interpreter has no shared-memory limit
        return cfg
    return fit_shared_memory(cfg, t.element_size(), b_tiles, shared_memory_limit(device_index(t)))


def _launch(kernel, grid_of, cfg, descriptors, *args, **meta):
    """Launch with ``cfg``; a tile the compiler finds too large for shared memory is retried smaller (once per
    tile and specialization: the smaller one is remembered for the same kernel, tile, constexprs and dtypes only,
    so that one variant's shrink does not slow the others). ``descriptors(cfg)``, when given, makes the leading TMA
    arguments, whose block shapes follow the tile."""
    key = (kernel, cfg, tuple(sorted(meta.items())), tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    first = cfg
    cfg = _SMALLER.get(key, cfg)
    while True:
        try:
            lead = descriptors(cfg) if descriptors is not None else ()
            kernel[grid_of(cfg)](*lead, *args, **meta, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                 GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            break
        except OutOfResources:
            smaller = shrink(cfg)
            if smaller is None:
                raise
            cfg = smaller
    if cfg != first:
        log.info("%s: tile %s did not fit in shared memory, launched as %s", kernel, first, cfg)
    _SMALLER[key] = cfg


_SMALLER: dict = {}


def _grid(max_blocks: int, n: int, cfg) -> tuple[int]:
    # sized for the worst-case padded total, so no host sync: programs past the device-side total exit at once
    return (triton.cdiv(max_blocks, cfg.group_m) * cfg.group_m * triton.cdiv(n, cfg.block_n),)


TMA_BOX = 256  # the largest tile side a TMA descriptor copies


def _tma_ready(t: torch.Tensor) -> bool:
    """A TMA descriptor over ``t`` viewed as [rows, last]: contiguous, 16-byte aligned base and row stride."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0


def use_tma(cfg, *tensors: torch.Tensor) -> bool:
    """Whether these tiles go through the TMA kernels (knob ``MOECC_TRITON_TMA``): by default on Hopper or newer
    for row blocks of 64 and more, where the K loop is long enough to pay for the descriptors."""
    mode = knobs.TRITON_TMA.get()
    if mode == "off" or not all(_tma_ready(t) for t in tensors):
        return False
    if mode == "on":
        return True
    x = tensors[0]
    return cfg.block_m >= 64 and x.is_cuda and not INTERPRET and sm90_or_newer(device_index(x))


WS_AUTO_MIN_K = 4096  # see _warp_specialized


def _warp_specialized(cfg, which: int, k: int, a: torch.Tensor, *weights: torch.Tensor,
                      rows_per_expert: float = math.inf, **shape) -> bool:
    """Whether GEMM ``which`` (1 or 2) over ``k`` goes through the warp-specialized Gluon kernels (``ws_gemm``;
    knob ``MOECC_TRITON_WS``, 128-row blocks on sm_90 GPUs). ``auto`` takes them for GEMM 1 from 128 pairs per
    expert on average (``rows_per_expert``; knob ``MOECC_TRITON_WS_GEMM1_MIN_ROWS``), and for GEMM 2 with K loops
    of 4096 and more. On an H100 (``benchmarks/knob_ab.py``, session 14): once its loader zero-filled the padding
    rows, GEMM 1 on them made the layer 1-3 % faster at Mixtral T=2048, 3.5-4 % at 4096, 2 % at 16384, 3 % at
    Qwen3 T=16384 and 2 % at GPT-OSS T=4096, where it had been 23 % slower at Mixtral T=512 (session 10); GEMM 2
    gained 6 % at Mixtral T=4096 (``benchmarks/ws_ab.py``) and tied at 16384, while Qwen3's short K loops lost up
    to 15 %. On an H200 (session 38), taking GEMM 1 from 128 pairs per expert instead of 512 made the layer 2-3 %
    faster in most cells of 128 to 511 pairs per expert (Mixtral T=512 and 1024, Qwen3 T=2048, OLMoE, Phi-3.5-MoE
    sized) and 13 % at GPT-OSS T=2048; the worst cell, 128 pairs at DBRX's size, was 2 % slower (noise 3 %).
    ``on`` takes them for both GEMMs wherever they apply."""
    mode = knobs.TRITON_WS.get()
    if mode == "off" or INTERPRET or not a.is_cuda or cfg.block_m != 128:
        return False
    min_rows = knobs.TRITON_WS_GEMM1_MIN_ROWS.get()
    if mode == "auto" and (rows_per_expert < min_rows if which == 1 else k < WS_AUTO_MIN_K):
        return False
    from moecc.codegen.triton import ws_gemm

    return ws_gemm.usable(cfg.block_m, a, *weights, **shape)


def _descriptor(w: torch.Tensor, rows: int, block_k: int) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(w.reshape(-1, w.shape[-1]), [rows, block_k])


def gemm1(x, w_up, shared_up, b_up, aligned, n_pairs: int, top_k: int, gated: bool, activation: str, alpha: float,
          limit: float, cfg, interleaved: bool = False) -> torch.Tensor:
    """h [rows, I]: act(x[token] @ gate^T) * (x[token] @ up^T) per aligned row (``aligned`` from ``align``).
    ``interleaved``: gated weights (and bias) in the ``oi_gu`` layout, gate and up rows alternating."""
    sorted_ids, block_expert, total = aligned
    num_routed, up_rows, hidden = w_up.shape
    inter = up_rows // 2 if gated else up_rows
    interleaved = interleaved and gated
    num_experts = num_routed + (shared_up.shape[0] if shared_up is not w_up else 0)
    if (interleaved or not gated) and _warp_specialized(cfg, 1, hidden, x, w_up, shared_up,
                                                       rows_per_expert=n_pairs / num_experts, gathered_k=hidden,
                                                       row_elems=(hidden, inter)):
        from moecc.codegen.triton import ws_gemm

        return ws_gemm.gemm1(x, w_up, shared_up, b_up, aligned, n_pairs, top_k, gated, activation, alpha, limit,
                             cfg.group_m)
    h = torch.empty((sorted_ids.numel(), inter), dtype=x.dtype, device=x.device)
    cfg = within_registers(_fit(cfg, x, 2 if gated else 1), 2 if gated else 1)
    common = dict(ACT=ACT_IDS[activation], HAS_BIAS=b_up is not None, CLAMP=clamps(activation, limit),
                  PRECISION=_precision(x), **dependent_launch.chained(x))
    bias = b_up if b_up is not None else w_up
    if (2 * cfg.block_n if interleaved else cfg.block_n) <= TMA_BOX and use_tma(cfg, x, w_up, shared_up):
        def launch(c):
            rows = 2 * c.block_n if interleaved else c.block_n
            return (_descriptor(w_up, rows, c.block_k), _descriptor(shared_up, rows, c.block_k))

        _launch(_gemm1_tma_kernel, lambda c: _grid(block_expert.numel(), inter, c), cfg, launch,
                x, bias, h, sorted_ids, block_expert, total, n_pairs, top_k, num_routed, inter, hidden, x.stride(0),
                b_up.stride(0) if b_up is not None else 0, h.stride(0), float(alpha), float(limit), GATED=gated,
                INTERLEAVED=interleaved, HAS_SHARED=shared_up is not w_up, EVEN_K=hidden % cfg.block_k == 0, **common)
        return h
    _launch(
        _gemm1_kernel, lambda c: _grid(block_expert.numel(), inter, c), cfg, None,
        x, w_up, shared_up, bias, h, sorted_ids, block_expert, total, n_pairs, top_k,
        num_routed, inter, hidden, x.stride(0), w_up.stride(0), w_up.stride(1), w_up.stride(2),
        b_up.stride(0) if b_up is not None else 0, h.stride(0), float(alpha), float(limit), GATED=gated,
        INTERLEAVED=interleaved, **common)
    return h


def gemm2(h, w_down, shared_down, b_down, weights, aligned, n_pairs: int, cfg) -> torch.Tensor:
    """pairs [T*k, H]: weight * (h @ down^T + bias), each aligned row written to its pair's row."""
    sorted_ids, block_expert, total = aligned
    num_routed, hidden, inter = w_down.shape
    if _warp_specialized(cfg, 2, inter, h, w_down, shared_down, row_elems=(inter,)):
        from moecc.codegen.triton import ws_gemm

        return ws_gemm.gemm2(h, w_down, shared_down, b_down, weights, aligned, n_pairs, cfg.group_m)
    pairs = torch.empty((n_pairs, hidden), dtype=h.dtype, device=h.device)
    cfg = within_registers(_fit(cfg, h, 1), 1)
    bias = b_down if b_down is not None else w_down
    if use_tma(cfg, h, w_down, shared_down):
        def launch(c):
            return (TensorDescriptor.from_tensor(h, [c.block_m, c.block_k]),
                    _descriptor(w_down, c.block_n, c.block_k), _descriptor(shared_down, c.block_n, c.block_k))

        _launch(_gemm2_tma_kernel, lambda c: _grid(block_expert.numel(), hidden, c), cfg, launch,
                bias, pairs, weights, sorted_ids, block_expert, total, n_pairs, num_routed, hidden, inter,
                b_down.stride(0) if b_down is not None else 0, pairs.stride(0), HAS_BIAS=b_down is not None,
                HAS_SHARED=shared_down is not w_down, PRECISION=_precision(h), **dependent_launch.chained(h))
        return pairs
    _launch(
        _gemm2_kernel, lambda c: _grid(block_expert.numel(), hidden, c), cfg, None,
        h, w_down, shared_down, bias, pairs, weights, sorted_ids, block_expert,
        total, n_pairs, num_routed, hidden, inter, h.stride(0), w_down.stride(0), w_down.stride(1),
        w_down.stride(2), b_down.stride(0) if b_down is not None else 0, pairs.stride(0),
        HAS_BIAS=b_down is not None, PRECISION=_precision(h), **dependent_launch.chained(h))
    return pairs


def combine(pairs: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """out [T, H]: the sum over each token's k pair rows, in slot order (deterministic); null/dropped add 0."""
    t, k = ids.shape
    hidden = pairs.shape[1]
    out = torch.empty((t, hidden), dtype=pairs.dtype, device=pairs.device)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _combine_kernel[(t, triton.cdiv(hidden, block_h))](pairs, ids, out, num_experts, hidden, K=k, BLOCK_H=block_h,
                                                       **dependent_launch.chained(pairs))
    return out
