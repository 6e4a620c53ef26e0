"""Autotune the grouped GEMM tiles for one MoE shape and token bucket; results persist in the cache dir.

Each row-block height is tried with its own tile list: GEMM 1 and GEMM 2 are timed separately over the same
aligned rows (they must share block_m), and the pair with the least total time wins."""

from __future__ import annotations

import logging

import torch

from moecc.codegen.triton import configs
from moecc.codegen.triton.align import align
from moecc.codegen.triton.grouped_gemm import gemm1, gemm2
from moecc.codegen.triton.moe import _device_name

log = logging.getLogger("moecc.codegen.triton")


def _bench(fn) -> float:
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - e.g. a tile that needs more shared memory than the GPU has
        log.debug("tile failed: %s", exc)
        return float("inf")


def _fastest(run, cands: list[configs.TileConfig], progress) -> tuple[configs.TileConfig, float]:
    best, best_ms = cands[0], float("inf")
    for cfg in cands:
        ms = _bench(lambda cfg=cfg: run(cfg))
        if ms < best_ms:
            best, best_ms = cfg, ms
        if progress:
            progress()
    return best, best_ms


def tune_shape(num_experts: int, hidden: int, inter: int, top_k: int, tokens: int, dtype=torch.bfloat16,
               gated: bool = True, progress=None) -> tuple[configs.TileConfig, configs.TileConfig, float]:
    """Search GEMM tiles for this shape on the current GPU; store and return the best (gemm1, gemm2, ms)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=g)
    w, ids = torch.topk(torch.softmax(torch.randn(tokens, num_experts, device=dev, generator=g), -1), top_k, -1)
    w = (w / w.sum(-1, keepdim=True)).float().reshape(-1)
    # GEMM 1 is timed on interleaved (oi_gu) weights when gated, the layout the Triton lowering places when it may
    # copy the experts; the tiles also serve the gate-first (oi) kernels, which need the same shared memory
    w_up = torch.randn(num_experts, 2 * inter if gated else inter, hidden, device=dev, dtype=dtype, generator=g) * 0.02
    w_down = torch.randn(num_experts, hidden, inter, device=dev, dtype=dtype, generator=g) * 0.02
    n_pairs = ids.numel()
    best = (None, None, float("inf"))
    for block_m in configs.block_m_candidates(n_pairs / num_experts):
        aligned = align(ids, num_experts, block_m)
        c1, ms1 = _fastest(lambda cfg, al=aligned: gemm1(x, w_up, w_up, None, al, n_pairs, top_k, gated, "silu", 1.0,
                                                         0.0, cfg, gated), configs.CANDIDATES[block_m], progress)
        h = gemm1(x, w_up, w_up, None, aligned, n_pairs, top_k, gated, "silu", 1.0, 0.0, c1, gated)
        c2, ms2 = _fastest(lambda cfg, h=h, al=aligned: gemm2(h, w_down, w_down, None, w, al, n_pairs, cfg),
                           configs.CANDIDATES[block_m], progress)
        log.info("E%d H%d I%d T%d block_m %d: %.3f + %.3f ms", num_experts, hidden, inter, tokens, block_m, ms1, ms2)
        if ms1 + ms2 < best[2]:
            best = (c1, c2, ms1 + ms2)
    if best[0] is None:
        raise RuntimeError(f"no tile config ran for E={num_experts} H={hidden} I={inter} T={tokens}")
    name = _device_name(x)
    bucket = configs.token_bucket(tokens)
    configs.store(name, dtype, num_experts, inter, hidden, bucket, "gemm1", best[0])
    configs.store(name, dtype, num_experts, hidden, inter, bucket, "gemm2", best[1])
    return best


def tune(shapes: list[tuple[int, int, int, int]], token_counts: list[int], dtype=torch.bfloat16,
         gated: bool = True) -> dict:
    """Tune every (E, H, I, k) shape at every token count, with a progress bar."""
    from rich.progress import Progress

    jobs = [(s, t) for s in shapes for t in token_counts]
    steps = sum(2 * len(configs.CANDIDATES[m]) for (e, _, _, k), t in jobs
                for m in configs.block_m_candidates(t * k / e))
    results = {}
    with Progress() as bar:
        task = bar.add_task("moecc: tuning MoE kernels", total=steps)
        for (e, h, i, k), t in jobs:
            results[(e, h, i, k, t)] = tune_shape(e, h, i, k, t, dtype, gated, progress=lambda: bar.advance(task))
    return results
