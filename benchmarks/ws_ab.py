"""Warp-specialized Gluon GEMMs against the ``tl.dot`` TMA kernels, interleaved so that clock drift hits both
(CUDA, Hopper, bf16).

    python benchmarks/ws_ab.py --cases mixtral:4096,qwen3:4096 --rounds 3

Each round times GEMM 1 and GEMM 2 once with ``MOECC_TRITON_WS=off`` and once with ``on`` (both GEMMs, whatever
their K), for every ``group_m`` given; the table shows the median over rounds.
Routing is random by default (softmax of normal logits), so experts get uneven row counts and padded last blocks;
``--routing`` adds patterns that separate what the grouping costs: ``strided`` (pair p to expert p mod E: equal
counts, no padding at these shapes, token rows spread over x), ``blocked`` (equal counts, each expert's tokens
contiguous) and ``single`` (every pair to expert 0: one dense problem of the same size)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import replace

import torch
from triton.testing import do_bench

from moecc.codegen.triton import configs
from moecc.codegen.triton.align import align
from moecc.codegen.triton.grouped_gemm import gemm1, gemm2
from moecc.experts import interleave_gate_up

SHAPES = {"mixtral": (8, 4096, 14336, 2), "qwen3": (128, 2048, 768, 8)}


def routing_ids(pattern: str, t: int, e: int, k: int) -> torch.Tensor:
    n = t * k
    if pattern == "random":
        return torch.randn(t, e, device="cuda").topk(k, -1).indices
    pair = torch.arange(n, device="cuda")
    if pattern == "strided":
        return (pair % e).reshape(t, k)
    if pattern == "blocked":
        return (pair * e // n).reshape(t, k)
    if pattern == "single":
        return torch.zeros(t, k, dtype=torch.int64, device="cuda")
    raise ValueError(f"unknown routing {pattern!r}")


def run_case(name: str, t: int, rounds: int, groups: list[int], routing: str = "random") -> None:
    e, hidden, inter, k = SHAPES[name]
    torch.manual_seed(0)
    x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
    w_gu = interleave_gate_up(torch.randn(e, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02)
    w_down = torch.randn(e, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.02
    ids = routing_ids(routing, t, e, k)
    weights = torch.rand(t * k, device="cuda")
    n = t * k
    cfg1, cfg2 = configs.choose(torch.cuda.get_device_name(), torch.bfloat16, e, hidden, inter, t, n)
    aligned = align(ids, e, cfg1.block_m)
    h = gemm1(x, w_gu, w_gu, None, aligned, n, k, True, "silu", 1.0, 0.0, cfg1, True)
    variants = [("tl.dot TMA", "off", None)] + [(f"Gluon WS group {g}", "on", g) for g in groups]
    times = {(label, which): [] for label, _, _ in variants for which in (1, 2)}
    for _ in range(rounds):
        for label, mode, group in variants:
            os.environ["MOECC_TRITON_WS"] = mode
            c1, c2 = (cfg1, cfg2) if group is None else (replace(cfg1, group_m=group), replace(cfg2, group_m=group))
            times[label, 1].append(do_bench(
                lambda c1=c1: gemm1(x, w_gu, w_gu, None, aligned, n, k, True, "silu", 1.0, 0.0, c1, True),
                warmup=10, rep=50, return_mode="median"))
            times[label, 2].append(do_bench(lambda c2=c2: gemm2(h, w_down, w_down, None, weights, aligned, n, c2),
                                            warmup=10, rep=50, return_mode="median"))
    os.environ.pop("MOECC_TRITON_WS", None)
    flops = {1: 2 * n * hidden * 2 * inter, 2: 2 * n * inter * hidden}
    print(f"\n## {name} T={t}, {routing} routing: {int(aligned[2])} padded rows for {n} pairs "
          f"({torch.cuda.get_device_name()})")
    print(f"{'variant':<22} {'GEMM 1 ms':>10} {'TFLOP/s':>8} {'GEMM 2 ms':>10} {'TFLOP/s':>8}")
    for label, _, _ in variants:
        m1, m2 = statistics.median(times[label, 1]), statistics.median(times[label, 2])
        print(f"{label:<22} {m1:10.3f} {flops[1] / m1 / 1e9:8.0f} {m2:10.3f} {flops[2] / m2 / 1e9:8.0f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="mixtral:4096,mixtral:16384,qwen3:4096,qwen3:16384")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--groups", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--routing", nargs="+", default=["random"], choices=["random", "strided", "blocked", "single"])
    args = ap.parse_args()
    for case in args.cases.split(","):
        name, t = case.split(":")
        for routing in args.routing:
            run_case(name, int(t), args.rounds, args.groups, routing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
