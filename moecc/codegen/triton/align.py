"""Align/sort: per-expert counts, prefix sums, and block-padded sorted pair ids plus per-block expert ids.

Two launches and no host synchronisation: sizes are static upper bounds (``T*k + E*(BLOCK_M-1)`` rows) and the
real padded total stays on the device, where the GEMMs read it. The pairs are cut into units; the first launch
counts each unit's pairs per expert, the second places them, finding where each unit's pairs of an expert start
from those counts. Two placements, chosen by the size of the problem (measured on an H100 from 8 to 256 experts):

- **scan**: one program per expert and unit, which reads its unit's ids and keeps those of its expert. Few
  programs' latency, but every id is read once per expert: the cheaper one for few experts or few pairs.
- **rank**: one program per unit, which places its pairs ``SUB`` at a time; a pair's rank among the step's pairs of
  its expert comes from comparing the step's ids with each other. Every id is read once whatever E: at Qwen3's
  E=128 and 32k pairs it takes half the time of the scan, at E=256 and 512k pairs a third
  (``benchmarks/align_bench.py``).

Order inside an expert is the pair order either way, so the result is deterministic."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moecc.codegen.triton import dependent_launch
from moecc.codegen.triton.dependent_launch import follow_previous

CHUNK = 1024  # pair ids a scan program reads at a time
MAX_SCAN_UNITS = 32  # units of the scan
# The scan reads every id once per expert, the rank once but at a higher cost per id; on an H100 they tie at
# 64 experts and 131k pairs, 128 experts and 12k pairs, 256 experts and 6k pairs, and 32 experts still favour the
# scan at 262k pairs. The rank placement is taken from pairs x (bins - RANK_BINS_OFF) >= RANK_FROM.
RANK_FROM = 1 << 22
RANK_BINS_OFF = 64
SUB = 128  # pairs the rank placement places at a time at most: their ranks come from a SUB x SUB comparison
MAX_RANK_UNITS = 1024  # units of the rank placement
COUNT_READS = 1 << 23  # counts read by all rank programs together at most (each reads the whole table)
COUNT_READ = 4096  # counts a rank program reads at a time
SHARE = 16  # block experts, or experts' padding rows, a rank program writes at a time


@triton.jit
def _bins(ids, num_experts, E_PAD: tl.constexpr):
    """Each pair's histogram bin: its expert, or bin E_PAD-1 (>= E) for ids outside [0, E), which do no compute."""
    return tl.where((ids >= 0) & (ids < num_experts), ids, E_PAD - 1).to(tl.int32)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, n_pairs, num_experts, UNIT: tl.constexpr, CHUNK: tl.constexpr,
                  E_PAD: tl.constexpr, PDL: tl.constexpr):
    """counts[u, e]: pairs of unit ``u`` per bin (``_bins``)."""
    follow_previous(PDL)
    u = tl.program_id(0)
    hist = tl.zeros([E_PAD], tl.int32)
    for base in range(u * UNIT, u * UNIT + UNIT, CHUNK):
        offs = base + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=-1)
        bins = _bins(ids, num_experts, E_PAD)
        hist += tl.histogram(bins, E_PAD)
    tl.store(counts_ptr + u * E_PAD + tl.arange(0, E_PAD), hist)


@triton.jit
def _scan_kernel(ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, total_ptr, n_pairs, num_experts, num_units,
                 BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, U_PAD: tl.constexpr, UNIT: tl.constexpr,
                 CHUNK: tl.constexpr, PDL: tl.constexpr):
    follow_previous(PDL)
    e = tl.program_id(0)
    u = tl.program_id(1)
    eo = tl.arange(0, E_PAD)
    uo = tl.arange(0, U_PAD)
    per_unit = tl.load(counts_ptr + uo[:, None] * E_PAD + eo[None, :],
                       mask=(uo[:, None] < num_units) & (eo[None, :] < num_experts), other=0)
    counts = tl.sum(per_unit, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(eo < e, padded, 0), 0)
    mine = tl.sum(tl.where(eo == e, padded, 0), 0)
    count = tl.sum(tl.where(eo == e, counts, 0), 0)
    if u == 0:
        if e == 0:
            tl.store(total_ptr, tl.sum(padded, 0))
        for b in range(0, mine // BLOCK_M):
            tl.store(block_expert_ptr + start // BLOCK_M + b, e)
        pad = tl.arange(0, BLOCK_M)
        tl.store(sorted_ptr + start + count + pad, n_pairs, mask=count + pad < mine)
    # this expert's pairs in earlier units come first
    seen = tl.sum(tl.sum(tl.where((uo[:, None] < u) & (eo[None, :] == e), per_unit, 0), 1), 0)
    for base in range(u * UNIT, u * UNIT + UNIT, CHUNK):
        offs = base + tl.arange(0, CHUNK)
        hit = (tl.load(ids_ptr + offs, mask=offs < n_pairs, other=-1) == e).to(tl.int32)
        pos = seen + tl.cumsum(hit, 0) - 1
        tl.store(sorted_ptr + start + pos, offs, mask=hit > 0)
        seen += tl.sum(hit, 0)


@triton.jit
def _rank_kernel(ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, total_ptr, n_pairs, num_experts, num_units,
                 BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, UNIT: tl.constexpr, SUB: tl.constexpr,
                 ROWS: tl.constexpr, SHARE: tl.constexpr, PDL: tl.constexpr):
    follow_previous(PDL)
    u = tl.program_id(0)
    eo = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], tl.int32)
    earlier = tl.zeros([E_PAD], tl.int32)  # this expert's pairs in earlier units come first
    for r0 in range(0, num_units, ROWS):
        r = r0 + tl.arange(0, ROWS)
        c = tl.load(counts_ptr + r[:, None] * E_PAD + eo[None, :], mask=r[:, None] < num_units, other=0)
        counts += tl.sum(c, 0)
        earlier += tl.sum(tl.where(r[:, None] < u, c, 0), 0)
    counts = tl.where(eo < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    if u == 0:
        tl.store(total_ptr, tl.sum(padded, 0))
    # this program's share of the block experts: a block's expert is the number of experts that end before it
    share = tl.arange(0, SHARE)
    num_blocks = tl.sum(padded, 0) // BLOCK_M
    for b0 in range(u * SHARE, num_blocks, num_units * SHARE):
        b = b0 + share
        expert = tl.sum((end[None, :] <= b[:, None] * BLOCK_M).to(tl.int32), 1)
        tl.store(block_expert_ptr + b, expert, mask=b < num_blocks)
    # and of the experts' padding rows
    pad = tl.arange(0, BLOCK_M)
    for e0 in range(u * SHARE, num_experts, num_units * SHARE):
        e = tl.minimum(e0 + share, E_PAD - 1)
        first = tl.gather(start + counts, e, 0)
        last = tl.gather(end, e, 0)
        rows = first[:, None] + pad[None, :]
        tl.store(sorted_ptr + rows, n_pairs, mask=(rows < last[:, None]) & (e0 + share < num_experts)[:, None])
    nxt = start + earlier  # the next row of each expert for this unit's pairs
    step = tl.arange(0, SUB)
    for base in range(u * UNIT, u * UNIT + UNIT, SUB):
        offs = base + step
        ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=-1)
        bins = _bins(ids, num_experts, E_PAD)
        ahead = (bins[:, None] == bins[None, :]) & (step[None, :] < step[:, None])
        rank = tl.sum(ahead.to(tl.int32), 1)
        tl.store(sorted_ptr + tl.gather(nxt, bins, 0) + rank, offs, mask=bins < num_experts)
        nxt += tl.histogram(bins, E_PAD)


def align(ids: torch.Tensor, num_experts: int, block_m: int):
    """ids [T, k] (ids outside [0, E) do no compute) -> (sorted pair ids [max_rows] int32, block experts
    [max_blocks] int32, padded total [1] int32). Padding rows hold ``T*k``; rows and blocks past the total are
    not written (the GEMMs stop at the total)."""
    n_pairs = ids.numel()
    max_rows = n_pairs + num_experts * (block_m - 1)
    dev = ids.device
    flat = ids.reshape(-1)  # read as stored (int64 from routing): no conversion launch
    e_pad = triton.next_power_of_2(num_experts + 1)  # one bin past the experts for ids that do no compute
    n = max(n_pairs, 1)
    rank = n_pairs * (e_pad - RANK_BINS_OFF) >= RANK_FROM
    if rank:
        # steps as short as keeps 64 programs busy: a step's comparison grows with its square
        chunk = min(SUB, max(16, triton.next_power_of_2(triton.cdiv(n, 64))))
        max_units = max(1, min(MAX_RANK_UNITS, math.isqrt(COUNT_READS // e_pad)))
    else:
        chunk = CHUNK if n_pairs > CHUNK else max(16, triton.next_power_of_2(n))
        max_units = MAX_SCAN_UNITS
    unit = chunk * triton.cdiv(triton.cdiv(n, chunk), max_units)
    num_units = triton.cdiv(n, unit)
    counts = torch.empty((num_units, e_pad), dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(triton.cdiv(max_rows, block_m), dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    launch = dependent_launch.chained(ids)
    _count_kernel[(num_units,)](flat, counts, n_pairs, num_experts, UNIT=unit, CHUNK=chunk, E_PAD=e_pad, **launch)
    if rank:
        _rank_kernel[(num_units,)](flat, counts, sorted_ids, block_expert, total, n_pairs, num_experts, num_units,
                                   BLOCK_M=block_m, E_PAD=e_pad, UNIT=unit, SUB=chunk,
                                   ROWS=max(1, COUNT_READ // e_pad), SHARE=SHARE, **launch)
    else:
        _scan_kernel[(num_experts, num_units)](
            flat, counts, sorted_ids, block_expert, total, n_pairs, num_experts, num_units, BLOCK_M=block_m,
            E_PAD=e_pad, U_PAD=triton.next_power_of_2(num_units), UNIT=unit, CHUNK=chunk, **launch)
    return sorted_ids, block_expert, total
