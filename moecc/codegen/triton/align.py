"""Align/sort: per-expert counts, prefix sums, and block-padded sorted pair ids plus per-block expert ids.

Two launches and no host synchronisation: sizes are static upper bounds (``T*k + E*(BLOCK_M-1)`` rows) and the
real padded total stays on the device, where the GEMMs read it. The pairs are cut into at most ``MAX_SLICES``
slices: the first launch counts each slice's pairs per expert (one program per slice), the second places them
(one program per expert and slice, which finds its offsets from those counts). Order inside an expert is the pair
order, so the result is deterministic."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 1024  # pair ids a program reads at a time
MAX_SLICES = 32


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, n_pairs, num_experts, SLICE: tl.constexpr, CHUNK: tl.constexpr,
                  E_PAD: tl.constexpr):
    """counts[s, e]: pairs of slice ``s`` routed to expert ``e``; ids outside [0, E) land in bin E_PAD-1 (>= E)."""
    s = tl.program_id(0)
    hist = tl.zeros([E_PAD], tl.int32)
    for base in range(s * SLICE, s * SLICE + SLICE, CHUNK):
        offs = base + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=-1)
        bins = tl.where((ids >= 0) & (ids < num_experts), ids, E_PAD - 1).to(tl.int32)
        hist += tl.histogram(bins, E_PAD)
    tl.store(counts_ptr + s * E_PAD + tl.arange(0, E_PAD), hist)


@triton.jit
def _scatter_kernel(ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, total_ptr, n_pairs, num_experts, num_slices,
                    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, S_PAD: tl.constexpr, SLICE: tl.constexpr,
                    CHUNK: tl.constexpr):
    e = tl.program_id(0)
    s = tl.program_id(1)
    eo = tl.arange(0, E_PAD)
    so = tl.arange(0, S_PAD)
    per_slice = tl.load(counts_ptr + so[:, None] * E_PAD + eo[None, :],
                        mask=(so[:, None] < num_slices) & (eo[None, :] < num_experts), other=0)
    counts = tl.sum(per_slice, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(eo < e, padded, 0), 0)
    mine = tl.sum(tl.where(eo == e, padded, 0), 0)
    count = tl.sum(tl.where(eo == e, counts, 0), 0)
    if s == 0:
        if e == 0:
            tl.store(total_ptr, tl.sum(padded, 0))
        for b in range(0, mine // BLOCK_M):
            tl.store(block_expert_ptr + start // BLOCK_M + b, e)
        pad = tl.arange(0, BLOCK_M)
        tl.store(sorted_ptr + start + count + pad, n_pairs, mask=count + pad < mine)
    # this expert's pairs in earlier slices come first
    seen = tl.sum(tl.sum(tl.where((so[:, None] < s) & (eo[None, :] == e), per_slice, 0), 1), 0)
    for base in range(s * SLICE, s * SLICE + SLICE, CHUNK):
        offs = base + tl.arange(0, CHUNK)
        hit = (tl.load(ids_ptr + offs, mask=offs < n_pairs, other=-1) == e).to(tl.int32)
        pos = seen + tl.cumsum(hit, 0) - 1
        tl.store(sorted_ptr + start + pos, offs, mask=hit > 0)
        seen += tl.sum(hit, 0)


def align(ids: torch.Tensor, num_experts: int, block_m: int):
    """ids [T, k] (ids outside [0, E) do no compute) -> (sorted pair ids [max_rows] int32, block experts
    [max_blocks] int32, padded total [1] int32). Rows past the total, and padding rows, hold ``T*k``."""
    n_pairs = ids.numel()
    max_rows = n_pairs + num_experts * (block_m - 1)
    dev = ids.device
    flat = ids.reshape(-1)  # read as stored (int64 from routing): no conversion launch
    chunk = CHUNK if n_pairs > CHUNK else max(16, triton.next_power_of_2(max(n_pairs, 1)))
    chunks = triton.cdiv(max(n_pairs, 1), chunk)
    slice_len = chunk * triton.cdiv(chunks, MAX_SLICES)
    num_slices = triton.cdiv(max(n_pairs, 1), slice_len)
    e_pad = triton.next_power_of_2(num_experts + 1)  # one bin past the experts for ids that do no compute
    counts = torch.empty((num_slices, e_pad), dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(triton.cdiv(max_rows, block_m), dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    _count_kernel[(num_slices,)](flat, counts, n_pairs, num_experts, SLICE=slice_len, CHUNK=chunk, E_PAD=e_pad)
    _scatter_kernel[(num_experts, num_slices)](
        flat, counts, sorted_ids, block_expert, total, n_pairs, num_experts, num_slices, BLOCK_M=block_m,
        E_PAD=e_pad, S_PAD=triton.next_power_of_2(num_slices), SLICE=slice_len, CHUNK=chunk)
    return sorted_ids, block_expert, total
