"""Warp-specialized grouped GEMMs for Hopper, written in Gluon (Triton's tile-explicit dialect).

Same contracts as GEMM 1 and GEMM 2 in ``grouped_gemm``, for the large tiles of prefill (row blocks of 128, bf16 and
fp16, sm_90). Each kernel is persistent and split into a loader partition, which fills a ring of shared-memory
stages, and a default partition of two warpgroups, which runs the asynchronous warpgroup MMAs on a 128x256 tile and
its epilogue, so the loads of the next tile overlap the epilogue of this one and the MMAs never wait on a load
issued by the same warps. Triton's ``tl.dot`` pipeliner does neither on Hopper: on an H100 a dense bf16 GEMM of
Mixtral's shapes reaches 578–624 TFLOP/s through ``tl.dot`` and 733–754 through this schedule, against cuBLAS's
739–770 (``benchmarks/gluon_gemm_probe.py``).

GEMM 1's token rows are gathered (Hopper's TMA cannot gather rows), so its loader is four warps issuing
``cp.async`` copies that arrive on the stage's barrier when they land; the weight tiles come through TMA. GEMM 2
reads both operands through TMA and scatters each row, weighted, to its pair's row."""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from moecc.codegen.triton import dependent_launch
from moecc.codegen.triton.grouped_gemm import ACT_IDS
from moecc.experts import clamps

TILE_M, TILE_B, TILE_K = 128, 256, 64
BLOCK_M = gl.constexpr(TILE_M)  # rows of a tile: two warpgroups of 64
B_ROWS = gl.constexpr(TILE_B)  # weight rows of a tile: the widest warpgroup MMA
BLOCK_K = gl.constexpr(TILE_K)
CONSUMER_WARPS = 8
LOADER_WARPS = gl.constexpr(4)  # GEMM 1's gathering loader: 128 threads, 8 copies of 16 bytes each per stage
# names that moved after Triton 3.6: the partition-wide barrier and the TMA copies
_sync_warps = getattr(gl, "thread_barrier", None) or gl.barrier
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
_gather_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


@gluon.jit
def _tile(tile, num_m, num_n, GROUP: gl.constexpr):
    """(row block, column block) of a linear tile id; GROUP row blocks (mostly one expert) share a weight tile."""
    in_group = GROUP * num_n
    first_m = tile // in_group * GROUP
    rows = gl.minimum(num_m - first_m, GROUP)
    return first_m + tile % rows, (tile % in_group) // rows


@gluon.jit
def _weight_row(block_expert_ptr, pid_m, pid_n, num_routed, rows_per_expert, HAS_SHARED: gl.constexpr):
    """(first weight row of this tile in the [E*rows, K] view, is it a shared expert's)."""
    e = gl.load(block_expert_ptr + pid_m).to(gl.int32)
    shared = HAS_SHARED & (e >= num_routed)
    e = gl.where(shared, e - num_routed, e)
    return e * rows_per_expert + pid_n * B_ROWS, shared


@gluon.jit
def _load_weights(w_desc, ws_desc, row, k, shared, bar, buf, HAS_SHARED: gl.constexpr):
    if HAS_SHARED:
        if shared:
            _tma_load(ws_desc, [row, k], bar, buf)
        else:
            _tma_load(w_desc, [row, k], bar, buf)
    else:
        _tma_load(w_desc, [row, k], bar, buf)


@gluon.jit
def _add_expert_bias(y, b_ptr, block_expert_ptr, pid_m, cols, n_cols, stride_be):
    """y + the bias row of this row block's expert at columns ``cols`` (those from ``n_cols`` on add 0)."""
    e = gl.load(block_expert_ptr + pid_m).to(gl.int64)
    return y + gl.load(b_ptr + e * stride_be + cols, mask=cols < n_cols, other=0.0)[None, :]


@gluon.jit
def _mma_tile(a_bufs, b_bufs, a_ready, b_ready, empty, acc, it, K, GATHERED: gl.constexpr):
    """acc = A tile @ B tile^T over K, consuming one ring stage per K step and handing each stage back once both
    warpgroups' MMAs on it are done. Returns (acc, the ring position after this tile)."""
    STAGES: gl.constexpr = a_bufs.shape[0]
    BK: gl.constexpr = a_bufs.shape[2]
    prev = 0
    for k in range(0, K, BK):
        s = it % STAGES
        phase = (it // STAGES) & 1
        mbarrier.wait(b_ready.index(s), phase)
        if GATHERED:
            mbarrier.wait(a_ready.index(s), phase)
            # cp.async writes through the generic proxy; the MMA reads through the async proxy
            fence_async_shared()
        acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, use_acc=k > 0, is_async=True)
        acc = warpgroup_mma_wait(1, deps=(acc,))
        if k > 0:
            _sync_warps()
            mbarrier.arrive(empty.index(prev), count=1)
        prev = s
        it += 1
    acc = warpgroup_mma_wait(0, deps=(acc,))
    _sync_warps()
    mbarrier.arrive(empty.index(prev), count=1)
    return acc, it


@gluon.jit
def _store_tile(desc, smem, value, row, col):
    """TMA store of ``value`` at [row, col], through ``smem`` once the previous tile's store has left it."""
    tma.store_wait(0)
    smem.store(value.to(desc.dtype))
    fence_async_shared()
    _tma_store(desc, [row, col], smem)


@gluon.jit
def _activate(g, ACT: gl.constexpr, alpha):
    if ACT == 0:
        return g / (1.0 + gl.exp(-g))
    elif ACT == 1:
        return 0.5 * g * (1.0 + gl.erf(g * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (2.0 / (1.0 + gl.exp(-2.0 * inner)))
    elif ACT == 3:
        return gl.maximum(g, 0.0)
    elif ACT == 4:
        return g / (1.0 + gl.exp(-alpha * g))
    elif ACT == 5:
        r = gl.maximum(g, 0.0)
        return r * r
    elif ACT == 7:  # identity
        return g
    elif ACT == 8:  # swish, beta = alpha
        return g / (1.0 + gl.exp(-alpha * g))
    elif ACT == 9:  # sigmoid
        return 1.0 / (1.0 + gl.exp(-g))
    elif ACT == 10:  # tanh(g) = 2 sigmoid(2g) - 1
        return 2.0 / (1.0 + gl.exp(-2.0 * g)) - 1.0
    elif ACT == 11:  # mish: g tanh(softplus(g)) = g (e^2s - 1) / (e^2s + 1), e^s = 1 + e^g
        sp = gl.maximum(g, 0.0) + gl.log(1.0 + gl.exp(-gl.abs(g)))
        return g * (2.0 / (1.0 + gl.exp(-2.0 * sp)) - 1.0)
    elif ACT == 12:  # relu6
        return gl.minimum(gl.maximum(g, 0.0), 6.0)
    elif ACT == 13:  # hardswish
        return g * gl.minimum(gl.maximum(g + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 14:  # softplus, overflow-free; torch returns g itself above 20, which this equals in fp32
        return gl.maximum(g, 0.0) + gl.log(1.0 + gl.exp(-gl.abs(g)))
    elif ACT == 15:  # leaky_relu, slope = alpha
        return gl.where(g >= 0.0, g, alpha * g)
    elif ACT == 16:  # elu
        return gl.where(g > 0.0, g, alpha * (gl.exp(gl.minimum(g, 0.0)) - 1.0))
    else:  # selu
        return 1.0507009873554805 * gl.where(g > 0.0, g, 1.6732632423543772 * (gl.exp(gl.minimum(g, 0.0)) - 1.0))


# ----------------------------------------------------------------------------------------------------- GEMM 1


@gluon.jit
def _gemm1_loader(x_ptr, w_desc, ws_desc, sorted_ptr, block_expert_ptr, total_ptr, a_bufs, b_bufs, a_ready, b_ready,
                  empty, n_pairs, top_k, num_routed, N, K, stride_xm, GATED: gl.constexpr, HAS_SHARED: gl.constexpr,
                  GROUP: gl.constexpr):
    STAGES: gl.constexpr = a_bufs.shape[0]
    BM: gl.constexpr = a_bufs.shape[1]
    BK: gl.constexpr = a_bufs.shape[2]
    OUT_N: gl.constexpr = B_ROWS // 2 if GATED else B_ROWS
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [LOADER_WARPS, 1], [1, 0])
    num_m = gl.cdiv(gl.load(total_ptr), BM)
    num_n = gl.cdiv(N, OUT_N)
    rows_per_expert = 2 * N if GATED else N
    offs_k = gl.arange(0, BK, layout=gl.SliceLayout(0, layout))
    it = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile(tile, num_m, num_n, GROUP)
        w_row, shared = _weight_row(block_expert_ptr, pid_m, pid_n, num_routed, rows_per_expert, HAS_SHARED)
        pair = gl.load(sorted_ptr + pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, layout)))
        # padding rows copy zeros (cp.async zero-fills where masked), as in grouped_gemm's TMA kernel; their
        # outputs, stored with the tile, are zeros too unless the experts have biases
        live = pair < n_pairs
        tok = gl.where(live, pair // top_k, 0).to(gl.int64)
        a_ptrs = x_ptr + gl.multiple_of(tok * stride_xm, BLOCK_K)[:, None] + offs_k[None, :]
        for k in range(0, K, BK):
            s = it % STAGES
            # a stage is free once the consumer handed it back; the first lap waits on the phase before the first
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(b_ready.index(s), w_desc.block_type.nbytes)
            _load_weights(w_desc, ws_desc, w_row, k, shared, b_ready.index(s), b_bufs.index(s), HAS_SHARED)
            _gather_load(a_bufs.index(s), a_ptrs + k, mask=live[:, None])
            async_copy.mbarrier_arrive(a_ready.index(s), increment_count=False)
            it += 1


@gluon.jit
def _gemm1_consumer(h_desc, b_ptr, block_expert_ptr, total_ptr, a_bufs, b_bufs, a_ready, b_ready, empty, c_smem, N, K,
                    stride_be, alpha, limit, GATED: gl.constexpr, ACT: gl.constexpr, HAS_BIAS: gl.constexpr,
                    CLAMP: gl.constexpr, GROUP: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = a_bufs.shape[1]
    OUT_N: gl.constexpr = B_ROWS // 2 if GATED else B_ROWS
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, B_ROWS, 16])
    num_m = gl.cdiv(gl.load(total_ptr), BM)
    num_n = gl.cdiv(N, OUT_N)
    acc = gl.zeros((BM, B_ROWS), gl.float32, layout)
    offs = gl.arange(0, B_ROWS, layout=gl.SliceLayout(0, layout))
    it = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile(tile, num_m, num_n, GROUP)
        acc, it = _mma_tile(a_bufs, b_bufs, a_ready, b_ready, empty, acc, it, K, True)
        y = acc
        if HAS_BIAS:
            # the bias follows the weight rows: interleaved gate/up when gated
            y = _add_expert_bias(y, b_ptr, block_expert_ptr, pid_m, pid_n * B_ROWS + offs, 2 * N if GATED else N,
                                 stride_be)
        if GATED:
            g, u = gl.split(gl.reshape(y, (BM, OUT_N, 2)))
            if CLAMP:
                g = gl.minimum(g, limit)
                u = gl.minimum(gl.maximum(u, -limit), limit)
            if ACT == 4:
                h = _activate(g, ACT, alpha) * (u + 1.0)
            elif ACT == 6:  # caps alpha (gate) and limit (up), as grouped_gemm._epilogue1
                capped_g = alpha * (2.0 / (1.0 + gl.exp(-2.0 * g / alpha)) - 1.0)
                capped_u = limit * (2.0 / (1.0 + gl.exp(-2.0 * u / limit)) - 1.0)
                h = capped_g / (1.0 + gl.exp(-g)) * capped_u
            else:
                h = _activate(g, ACT, alpha) * u
        else:
            h = _activate(y, ACT, alpha)
        _store_tile(h_desc, c_smem, h, pid_m * BM, pid_n * OUT_N)
    tma.store_wait(0)


@gluon.jit
def _gemm1_ws_kernel(h_desc, w_desc, ws_desc, x_ptr, b_ptr, sorted_ptr, block_expert_ptr, total_ptr,
                     n_pairs, top_k, num_routed, N, K, stride_xm, stride_be, alpha, limit,
                     GATED: gl.constexpr, ACT: gl.constexpr, HAS_BIAS: gl.constexpr, CLAMP: gl.constexpr,
                     HAS_SHARED: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr, PDL: gl.constexpr,
                     num_warps: gl.constexpr):
    dtype: gl.constexpr = w_desc.dtype
    a_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=dtype.primitive_bitwidth,
                                                  rank=2)
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], a_layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    c_smem = gl.allocate_shared_memory(dtype, h_desc.block_type.shape, h_desc.layout)
    a_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    b_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(a_ready.index(i), count=LOADER_WARPS * 32)  # one cp.async arrival per loader thread
        mbarrier.init(b_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    if PDL:  # see dependent_launch.follow_previous (a Gluon kernel calls no @triton.jit function)
        gdc_wait()
        gdc_launch_dependents()
    gl.warp_specialize([
        (_gemm1_consumer, (h_desc, b_ptr, block_expert_ptr, total_ptr, a_bufs, b_bufs, a_ready, b_ready, empty, c_smem,
                           N, K, stride_be, alpha, limit, GATED, ACT, HAS_BIAS, CLAMP, GROUP, num_warps)),
        (_gemm1_loader, (x_ptr, w_desc, ws_desc, sorted_ptr, block_expert_ptr, total_ptr, a_bufs, b_bufs, a_ready,
                         b_ready, empty, n_pairs, top_k, num_routed, N, K, stride_xm, GATED, HAS_SHARED, GROUP)),
    ], [LOADER_WARPS], [88])


# ----------------------------------------------------------------------------------------------------- GEMM 2


@gluon.jit
def _gemm2_loader(h_desc, w_desc, ws_desc, block_expert_ptr, total_ptr, a_bufs, b_bufs, ready, empty, num_routed,
                  N, K, HAS_SHARED: gl.constexpr, GROUP: gl.constexpr):
    STAGES: gl.constexpr = a_bufs.shape[0]
    BM: gl.constexpr = a_bufs.shape[1]
    BK: gl.constexpr = a_bufs.shape[2]
    num_m = gl.cdiv(gl.load(total_ptr), BM)
    num_n = gl.cdiv(N, B_ROWS)
    it = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile(tile, num_m, num_n, GROUP)
        w_row, shared = _weight_row(block_expert_ptr, pid_m, pid_n, num_routed, N, HAS_SHARED)
        for k in range(0, K, BK):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), h_desc.block_type.nbytes + w_desc.block_type.nbytes)
            _tma_load(h_desc, [pid_m * BM, k], ready.index(s), a_bufs.index(s))
            _load_weights(w_desc, ws_desc, w_row, k, shared, ready.index(s), b_bufs.index(s), HAS_SHARED)
            it += 1


@gluon.jit
def _gemm2_consumer(b_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, total_ptr, a_bufs, b_bufs, ready,
                    empty, n_pairs, N, K, stride_be, stride_om, HAS_BIAS: gl.constexpr, GROUP: gl.constexpr,
                    num_warps: gl.constexpr):
    BM: gl.constexpr = a_bufs.shape[1]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, B_ROWS, 16])
    # rows of 8 contiguous elements per thread for the scattered stores
    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
    num_m = gl.cdiv(gl.load(total_ptr), BM)
    num_n = gl.cdiv(N, B_ROWS)
    acc = gl.zeros((BM, B_ROWS), gl.float32, layout)
    offs_n = gl.arange(0, B_ROWS, layout=gl.SliceLayout(0, layout))
    offs_m = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    out_n = gl.arange(0, B_ROWS, layout=gl.SliceLayout(0, out_layout))
    out_m = gl.arange(0, BM, layout=gl.SliceLayout(1, out_layout))
    it = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile(tile, num_m, num_n, GROUP)
        acc, it = _mma_tile(a_bufs, b_bufs, ready, ready, empty, acc, it, K, False)
        y = acc
        if HAS_BIAS:
            y = _add_expert_bias(y, b_ptr, block_expert_ptr, pid_m, pid_n * B_ROWS + offs_n, N, stride_be)
        pair = gl.load(sorted_ptr + pid_m * BM + offs_m)
        y = y * gl.load(weights_ptr + pair, mask=pair < n_pairs, other=0.0)[:, None]
        y = gl.convert_layout(y.to(out_ptr.dtype.element_ty), out_layout)
        pair = gl.load(sorted_ptr + pid_m * BM + out_m)
        cols = pid_n * B_ROWS + out_n
        ptrs = out_ptr + pair.to(gl.int64)[:, None] * stride_om + cols[None, :]
        gl.store(ptrs, y, mask=(pair < n_pairs)[:, None] & (cols < N)[None, :])


@gluon.jit
def _gemm2_ws_kernel(h_desc, w_desc, ws_desc, b_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, total_ptr,
                     n_pairs, num_routed, N, K, stride_be, stride_om, HAS_BIAS: gl.constexpr,
                     HAS_SHARED: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr, PDL: gl.constexpr,
                     num_warps: gl.constexpr):
    dtype: gl.constexpr = w_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + h_desc.block_type.shape, h_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    gl.warp_specialize([
        (_gemm2_consumer, (b_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, total_ptr, a_bufs, b_bufs, ready,
                           empty, n_pairs, N, K, stride_be, stride_om, HAS_BIAS, GROUP, num_warps)),
        (_gemm2_loader, (h_desc, w_desc, ws_desc, block_expert_ptr, total_ptr, a_bufs, b_bufs, ready, empty,
                         num_routed, N, K, HAS_SHARED, GROUP)),
    ], [1], [40])


# ----------------------------------------------------------------------------------------------------- host side

GEMM1_STAGES = {True: 4, False: 3}  # gated: a 128x128 output tile leaves room for a fourth stage
GEMM2_STAGES = 3  # the 128x256 layout conversion of the epilogue takes the room of a fourth


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


def _descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    t = t.reshape(-1, t.shape[-1])
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, _gl_dtype(t.dtype)))


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _grid(x: torch.Tensor, max_blocks: int, tiles_n: int) -> tuple[int]:
    return (max(1, min(_num_sms(x.device.index or 0), max_blocks * tiles_n)),)


def gemm1(x, w_up, shared_up, b_up, aligned, n_pairs: int, top_k: int, gated: bool, activation: str,
          alpha: float, limit: float, group_m: int = 8) -> torch.Tensor:
    """``grouped_gemm.gemm1`` for 128-row blocks: gated weights interleaved (``oi_gu``), or not gated. ``group_m``
    row blocks share each weight tile in L2."""
    sorted_ids, block_expert, total = aligned
    num_routed, up_rows, hidden = w_up.shape
    inter = up_rows // 2 if gated else up_rows
    out_n = TILE_B // 2 if gated else TILE_B
    h = torch.empty((sorted_ids.numel(), inter), dtype=x.dtype, device=x.device)
    grid = _grid(x, block_expert.numel(), triton.cdiv(inter, out_n))
    _gemm1_ws_kernel[grid](
        _descriptor(h, [TILE_M, out_n]), _descriptor(w_up, [TILE_B, TILE_K]),
        _descriptor(shared_up, [TILE_B, TILE_K]), x, b_up if b_up is not None else x, sorted_ids, block_expert,
        total, n_pairs, top_k, num_routed, inter, hidden, x.stride(0), b_up.stride(0) if b_up is not None else 0,
        float(alpha), float(limit), GATED=gated, ACT=ACT_IDS[activation], HAS_BIAS=b_up is not None,
        CLAMP=clamps(activation, limit), HAS_SHARED=shared_up is not w_up, STAGES=GEMM1_STAGES[gated], GROUP=group_m,
        num_warps=CONSUMER_WARPS, **dependent_launch.chained(x))
    return h


def gemm2(h, w_down, shared_down, b_down, weights, aligned, n_pairs: int, group_m: int = 8) -> torch.Tensor:
    """``grouped_gemm.gemm2`` for 128-row blocks."""
    sorted_ids, block_expert, total = aligned
    num_routed, hidden, inter = w_down.shape
    pairs = torch.empty((n_pairs, hidden), dtype=h.dtype, device=h.device)
    grid = _grid(h, block_expert.numel(), triton.cdiv(hidden, TILE_B))
    _gemm2_ws_kernel[grid](
        _descriptor(h, [TILE_M, TILE_K]), _descriptor(w_down, [TILE_B, TILE_K]),
        _descriptor(shared_down, [TILE_B, TILE_K]), b_down if b_down is not None else h, pairs, weights, sorted_ids,
        block_expert, total, n_pairs, num_routed, hidden, inter, b_down.stride(0) if b_down is not None else 0,
        pairs.stride(0), HAS_BIAS=b_down is not None, HAS_SHARED=shared_down is not w_down, STAGES=GEMM2_STAGES,
        GROUP=group_m, num_warps=CONSUMER_WARPS, **dependent_launch.chained(h))
    return pairs


@functools.cache
def _is_hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def usable(block_m: int, a: torch.Tensor, *weights: torch.Tensor, gathered_k: int | None = None,
           row_elems: tuple[int, ...] = ()) -> bool:
    """Whether a GEMM can take these kernels: 128-row blocks, 16-bit types, an sm_90 GPU, contiguous operands on
    16-byte boundaries with rows of whole 16-byte units (``row_elems``), and a gathered K the loader copies whole
    (a multiple of 64)."""
    return (block_m == TILE_M and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16)
            and _is_hopper(a.device.index if a.device.index is not None else torch.cuda.current_device())
            and (gathered_k is None or gathered_k % TILE_K == 0) and all(n % 8 == 0 for n in row_elems)
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 and t.dtype == a.dtype for t in (a, *weights)))
