"""Autotune the grouped GEMM tiles for one MoE shape and token bucket; results persist in the cache dir."""

from __future__ import annotations

import logging

import torch

from moecc.codegen.triton import configs
from moecc.codegen.triton.moe import _device_name, run_experts

log = logging.getLogger("moecc.codegen.triton")


def _bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def tune_shape(num_experts: int, hidden: int, inter: int, top_k: int, tokens: int, dtype=torch.bfloat16,
               gated: bool = True, progress=None) -> tuple[configs.TileConfig, configs.TileConfig, float]:
    """Search GEMM tiles for this shape on the current GPU; store and return the best (gemm1, gemm2, ms)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=g)
    logits = torch.randn(tokens, num_experts, device=dev, generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), top_k, -1)
    w = (w / w.sum(-1, keepdim=True)).float()
    u = 2 * inter if gated else inter
    w_up = torch.randn(num_experts, u, hidden, device=dev, dtype=dtype, generator=g) * 0.02
    w_down = torch.randn(num_experts, hidden, inter, device=dev, dtype=dtype, generator=g) * 0.02

    def run(c1, c2):
        return lambda: run_experts(x, w, ids, w_up, w_down, None, None, "silu", gated, 1.0, 0.0, c1, c2)

    best = (None, None, float("inf"))
    for cfg in configs.CANDIDATES:
        try:
            ms = _bench(run(cfg, cfg))
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this tile
            log.debug("config %s failed: %s", cfg, exc)
            ms = float("inf")
        if ms < best[2]:
            best = (cfg, cfg, ms)
        if progress:
            progress()
    c1 = best[0]
    for cfg in configs.CANDIDATES:
        if cfg.block_m != c1.block_m or cfg == c1:
            continue
        try:
            ms = _bench(run(c1, cfg))
        except Exception:  # noqa: BLE001
            ms = float("inf")
        if ms < best[2]:
            best = (c1, cfg, ms)
    name = _device_name(x)
    bucket = configs.token_bucket(tokens)
    configs.store(name, dtype, num_experts, inter, hidden, bucket, "gemm1", best[0])
    configs.store(name, dtype, num_experts, hidden, inter, bucket, "gemm2", best[1])
    return best


def tune(shapes: list[tuple[int, int, int, int]], token_counts: list[int], dtype=torch.bfloat16,
         gated: bool = True) -> dict:
    """Tune every (E, H, I, k) shape at every token count, with a progress bar."""
    from rich.progress import Progress

    results = {}
    with Progress() as bar:
        task = bar.add_task("moecc: tuning MoE kernels", total=len(shapes) * len(token_counts) *
                            len(configs.CANDIDATES))
        for (e, h, i, k), t in [(s, t) for s in shapes for t in token_counts]:
            results[(e, h, i, k, t)] = tune_shape(e, h, i, k, t, dtype, gated, progress=lambda: bar.advance(task))
    return results
