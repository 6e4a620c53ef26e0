"""Where the host time of one moecc Triton MoE layer goes, without CUDA graphs.

    python benchmarks/host_path.py --shapes qwen3_moe mixtral --tokens 4096

The GPU is kept busy (``torch.cuda._sleep``) while the layer is called, so that no launch waits for the device
and every number is host work. Prints the host time per call of the compiled layer, then of each step inside it
(timed by wrapping moecc's own functions), and of one bare Triton launch for scale."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict

import torch
from moe_layer import make_block  # the layer benchmark's helpers, beside this file

import moecc
from moecc.codegen.triton import grouped_gemm, moe

CALLS = 40
SPENT: dict[str, float] = defaultdict(float)


def timed(module, name: str) -> None:
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start

    setattr(module, name, wrapper)


def host_ms(fn, calls: int = CALLS) -> float:
    """Host milliseconds per call of ``fn`` while the GPU is still busy with an earlier sleep."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time at ~2 GHz: longer than the loop
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    ms = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    return ms


def cprofiled(fn, calls: int) -> cProfile.Profile:
    """cProfile of ``calls`` calls of ``fn``, then a sync."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    return prof


def profile_calls(fn, top: int, calls: int = CALLS) -> None:
    """cProfile of ``calls`` calls with the GPU busy: each function's own time and count per call."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)
    stats = pstats.Stats(cprofiled(fn, calls)).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"   cProfile, own time per call (us), calls per call, function (profiled total "
          f"{sum(v[2] for v in stats.values()) / calls * 1e6:.0f} us per call):")
    for (path, line, name), (_, ncalls, tottime, _, _) in rows:
        where = f"{path.rsplit('/', 2)[-2:][-1] if '/' in path else path}:{line}"
        print(f"   {tottime / calls * 1e6:8.1f} {ncalls / calls:6.1f}  {name} ({where})")


def dispatch_cost(hidden: int, t: int, e: int = 16, inter: int = 256, k: int = 2) -> None:
    """Host time of one ``moecc::fused_moe_triton`` call through torch's dispatcher against a direct call of its
    Python body, same arguments (small experts, so that the kernels stay short)."""
    x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
    weights, ids = torch.randn(t, e, device="cuda").softmax(-1).topk(k, -1)
    w_up = torch.randn(e, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    w_down = torch.randn(e, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.02
    args = (x, weights, ids, w_up, w_down, None, None, "silu", True, 1.0, 0.0, -1, 0.0, 0, 0, "token", "oi_gu")
    with torch.no_grad():
        op = host_ms(lambda: torch.ops.moecc.fused_moe_triton(*args), 200)
        body = host_ms(lambda: moe.fused_moe_triton._init_fn(*args), 200)
    print(f"== fused_moe_triton through the dispatcher {op * 1e3:.1f} us, its body called directly {body * 1e3:.1f} us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["qwen3_moe", "mixtral"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="also print the N functions of most own host time (cProfile), per call")
    a = ap.parse_args()
    for name in ("run_experts", "pick_configs", "_maybe_tune", "align", "gemm1", "gemm2", "combine", "gating",
                 "fused_gating", "router_logits"):
        timed(moe, name)
    for name in ("_descriptor", "use_tma", "_fit"):
        timed(grouped_gemm, name)
    for shape in a.shapes:
        block, cfg = make_block(shape, "cuda", torch.bfloat16)
        cm = moecc.compile(block, backend="triton", verify=False, cuda_graphs=False)
        for t in a.tokens:
            x = torch.randn(1, t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                cm(x)
                SPENT.clear()
                total = host_ms(lambda x=x, cm=cm: cm(x))
                per = {k: v / (CALLS + 1) * 1e3 for k, v in SPENT.items()}
            print(f"== {shape} T={t}: host {total:.3f} ms per call (no CUDA graphs)")
            for k, ms in sorted(per.items(), key=lambda kv: -kv[1]):
                print(f"   {ms:8.4f} ms  {k}")
            if a.cprofile:
                with torch.no_grad():
                    profile_calls(lambda x=x, cm=cm: cm(x), a.cprofile)
        dispatch_cost(cfg.hidden_size, t)
        pairs = torch.zeros(t * 2, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        ids = torch.zeros(t, 2, device="cuda", dtype=torch.int64)
        bare = host_ms(lambda p=pairs, i=ids: grouped_gemm.combine(p, i, 8), 200)
        print(f"== one bare Triton launch (combine): {bare * 1e3:.1f} us")
        block = cm = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
