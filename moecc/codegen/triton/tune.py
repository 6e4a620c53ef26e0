"""Autotune the grouped GEMM tiles for one MoE shape and token bucket; results persist in the cache dir.

Each row-block height is tried with its own tile list: GEMM 1 and GEMM 2 are timed separately over the same
aligned rows (they must share block_m), and the pair with the least total time wins. Token counts that the
runtime replays from CUDA graphs are timed from CUDA graphs too: timed by events around each launch, a decode
GEMM of 20 us measured the host's 60–70 us launch path instead (on an H100, re-tuned that way, the shipped
decode tiles still held within 1 %, Qwen3 T=1 excepted).

The tiles are searched on the `tl.dot` kernels (``MOECC_TRITON_WS=off`` while they are timed): at 128-row blocks
the runtime may run a GEMM on the warp-specialized Gluon kernels instead, which take none of a tile's sizes but its
rows, so timing those picked among equal times by noise, and such a pick (a gated 128 x 256 tile) later served a
`tl.dot` GEMM 1 that spilled its registers. Each row height is then compared on the kernels the runtime will run."""

from __future__ import annotations

import logging

import torch

from moecc import knobs
from moecc.codegen.triton import configs
from moecc.codegen.triton.align import align
from moecc.codegen.triton.grouped_gemm import gemm1, gemm2
from moecc.codegen.triton.moe import _device_name

log = logging.getLogger("moecc.codegen.triton")


def _bench(fn, graph_timer=None) -> float:
    """Device ms per call of ``fn`` with a cold L2; with a ``graph_timer`` (``_graph_timer``) replayed from a CUDA
    graph, as the runtime runs small token counts, so that the host's launch time (longer than a decode kernel)
    is not what gets timed."""
    import triton.testing

    try:
        if graph_timer is not None:
            return graph_timer(fn)
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - e.g. a tile that needs more shared memory than the GPU has
        log.debug("tile failed: %s", exc)
        return float("inf")


GRAPH_CALLS = 20


def _graph_timer(flush_l2: bool = True):
    """A function giving the median device ms per call of ``fn`` over graph replays of ``GRAPH_CALLS`` calls. With
    ``flush_l2`` each call follows a write of twice the L2 (a decode step's weights are not L2-resident in a model)
    and the same replay without ``fn`` (timed once, here) is subtracted."""
    flush = None
    if flush_l2:
        l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
        flush = torch.empty(2 * max(l2, 1 << 20), dtype=torch.uint8, device="cuda")

    def replay_ms(fn) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                if flush is not None:
                    flush.zero_()
                if fn is not None:
                    fn()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / GRAPH_CALLS)
        return sorted(times)[2]

    flush_ms = replay_ms(None) if flush_l2 else 0.0

    def graph_ms(fn) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # compiles and fills the allocator's pools outside the capture
        torch.cuda.current_stream().wait_stream(side)
        return max(replay_ms(fn) - flush_ms, 1e-4)

    return graph_ms


def _fastest(run, cands: list[configs.TileConfig], progress, graph_timer=None) -> tuple[configs.TileConfig, float]:
    best, best_ms = cands[0], float("inf")
    for cfg in cands:
        ms = _bench(lambda cfg=cfg: run(cfg), graph_timer)
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
    timer = _graph_timer() if knobs.CUDA_GRAPHS.get() and tokens <= knobs.CUDA_GRAPH_MAX_TOKENS.get() else None
    best = (None, None, float("inf"))
    for block_m in configs.block_m_candidates(n_pairs / num_experts):
        aligned = align(ids, num_experts, block_m)

        def run1(cfg, al=aligned):
            return gemm1(x, w_up, w_up, None, al, n_pairs, top_k, gated, "silu", 1.0, 0.0, cfg, gated)

        with knobs.TRITON_WS.overridden("off"):
            c1, _ = _fastest(run1, configs.CANDIDATES[block_m], progress, timer)
        ms1 = _bench(lambda c=c1: run1(c), timer)  # on the kernel the runtime takes at this height
        h = run1(c1)

        def run2(cfg, h=h, al=aligned):
            return gemm2(h, w_down, w_down, None, w, al, n_pairs, cfg)

        with knobs.TRITON_WS.overridden("off"):
            c2, _ = _fastest(run2, configs.CANDIDATES[block_m], progress, timer)
        ms2 = _bench(lambda c=c2: run2(c), timer)
        log.info("E%d H%d I%d T%d block_m %d: %.3f + %.3f ms", num_experts, hidden, inter, tokens, block_m, ms1, ms2)
        if ms1 + ms2 < best[2]:
            best = (c1, c2, ms1 + ms2)
    if best[0] is None:
        raise RuntimeError(f"no tile config ran for E={num_experts} H={hidden} I={inter} T={tokens}")
    name = _device_name(x)
    bucket = configs.token_bucket(tokens)
    # stored as launched: a tile over the shared memory limit runs shrunk (``grouped_gemm._fit``)
    limit = configs.shared_memory_limit(configs.device_index(x))
    best = (configs.fit_shared_memory(best[0], x.element_size(), 2 if gated else 1, limit),
            configs.fit_shared_memory(best[1], x.element_size(), 1, limit), best[2])
    configs.store(name, dtype, num_experts, inter, hidden, bucket, "gemm1", best[0], top_k)
    configs.store(name, dtype, num_experts, hidden, inter, bucket, "gemm2", best[1], top_k)
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
