"""Align/sort: per-expert counts, prefix sums, and block-padded sorted pair ids plus per-block expert ids.

Two launches and no host synchronisation: sizes are static upper bounds (``T*k + E*(BLOCK_M-1)`` rows) and the
real padded total stays on the device, where the GEMMs read it. Order inside an expert is the pair order, so the
result is deterministic."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, n_pairs, CHUNK: tl.constexpr):
    e = tl.program_id(0)
    total = tl.zeros([CHUNK], tl.int32)
    for start in range(0, n_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=-1)
        total += (ids == e).to(tl.int32)
    tl.store(counts_ptr + e, tl.sum(total, 0))


@triton.jit
def _scatter_kernel(ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, total_ptr, n_pairs, num_experts,
                    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    e = tl.program_id(0)
    eo = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + eo, mask=eo < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(eo < e, padded, 0), 0)
    mine = tl.sum(tl.where(eo == e, padded, 0), 0)
    count = tl.sum(tl.where(eo == e, counts, 0), 0)
    if e == 0:
        tl.store(total_ptr, tl.sum(padded, 0))
    for b in range(0, mine // BLOCK_M):
        tl.store(block_expert_ptr + start // BLOCK_M + b, e)
    pad = tl.arange(0, BLOCK_M)
    tl.store(sorted_ptr + start + count + pad, n_pairs, mask=count + pad < mine)
    seen = 0
    for base in range(0, n_pairs, CHUNK):
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
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(triton.cdiv(max_rows, block_m), dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    chunk = 1024 if n_pairs > 1024 else max(16, triton.next_power_of_2(max(n_pairs, 1)))
    _count_kernel[(num_experts,)](flat, counts, n_pairs, CHUNK=chunk)
    _scatter_kernel[(num_experts,)](flat, counts, sorted_ids, block_expert, total, n_pairs, num_experts,
                                    BLOCK_M=block_m, E_PAD=triton.next_power_of_2(num_experts), CHUNK=chunk)
    return sorted_ids, block_expert, total
