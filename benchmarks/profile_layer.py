"""Where one moecc Triton MoE layer spends its GPU time: per-kernel device time from torch.profiler.

    python benchmarks/profile_layer.py --shapes mixtral qwen3_moe --tokens 1 512 4096

Prints, per (shape, T), each kernel's mean device time per call, the sum, and the wall time per call with and
without CUDA graphs, so that launch gaps (wall minus kernel sum) and the slowest kernel are both visible."""

from __future__ import annotations

import argparse
import io
import pstats
import time
from collections import defaultdict

import torch
from host_path import cprofiled  # beside this file
from moe_layer import cuda_time, make_block
from torch.profiler import ProfilerActivity, profile

import moecc


def device_events(fn, calls: int, warmup: int = 1) -> list:
    """The profiler's device events (kernels, copies) of ``calls`` back-to-back calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]


def kernel_times(fn, calls: int = 10) -> dict[str, float]:
    per = defaultdict(float)
    for ev in device_events(fn, calls):
        per[ev.name[:60]] += ev.device_time / calls / 1e3
    return dict(per)


def timeline(fn, calls: int = 30) -> None:
    """Back-to-back calls under the profiler: the span of the kernels, the time the GPU sat idle between them (and
    the largest gaps, with the kernels around them) and each kernel's mean time in this sustained run, to tell
    launch gaps from clocks that drop under sustained load (the kernels then just take longer)."""
    kernels = sorted((ev.time_range.start, ev.time_range.end, ev.name[:40]) for ev in device_events(fn, calls, 3))
    if not kernels:
        return
    gaps, reach = [], kernels[0][1]
    for (_, _, prev), (start, end, name) in zip(kernels, kernels[1:]):
        if start > reach:
            gaps.append((start - reach, prev, name))
        reach = max(reach, end)
    span = (kernels[-1][1] - kernels[0][0]) / 1e3 / calls
    idle = sum(g for g, _, _ in gaps) / 1e3 / calls
    per = defaultdict(float)
    for start, end, name in kernels:
        per[name] += (end - start) / 1e3 / calls
    clock = ""
    try:
        clock = f", SM clock now {torch.cuda.clock_rate()} MHz"
    except Exception:  # noqa: BLE001 - pynvml may be missing
        pass
    print(f"   timeline of {calls} calls: {span:.3f} ms per call, GPU idle {idle:.3f} ms per call{clock}")
    for g, prev, name in sorted(gaps, reverse=True)[:3]:
        print(f"     gap {g / 1e3:.3f} ms: {prev} -> {name}")
    for name, ms in sorted(per.items(), key=lambda kv: -kv[1])[:4]:
        print(f"     {ms:8.4f}  {name}")


def host_profile(fn, calls: int = 50) -> float:
    """Host seconds per call (launches only: the device queue absorbs them), then the top Python costs."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    per_call = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(cprofiled(fn, calls), stream=buf).sort_stats("tottime").print_stats(18)
    print("\n".join(line for line in buf.getvalue().splitlines()[6:] if line.strip()))
    return per_call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["mixtral", "qwen3_moe"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512, 4096])
    ap.add_argument("--host", type=int, nargs="*", default=[], help="also profile host time at these T")
    ap.add_argument("--timeline", action="store_true", help="also profile 30 back-to-back calls (gaps, clocks)")
    a = ap.parse_args()
    for shape in a.shapes:
        block, cfg = make_block(shape, "cuda", torch.bfloat16)
        plain = moecc.compile(block, backend="triton", verify=False, cuda_graphs=False)
        graphs = moecc.compile(block, backend="triton", verify=False)
        graphs(torch.randn(1, 2, cfg.hidden_size, device="cuda", dtype=torch.bfloat16))
        for layer in graphs.moe_layers:
            print(f"== {shape}: {layer.routing}; fused={layer.fused} {layer.reason}")
        for t in a.tokens:
            x = torch.randn(1, t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                per = kernel_times(lambda x=x, m=plain: m(x))
                wall = cuda_time(lambda x=x, m=plain: m(x))
                wall_g = cuda_time(lambda x=x, m=graphs: m(x))
            print(f"== {shape} T={t}: kernels {sum(per.values()):.3f} ms, wall {wall:.3f} ms, "
                  f"with graphs {wall_g:.3f} ms")
            for name, ms in sorted(per.items(), key=lambda kv: -kv[1]):
                print(f"   {ms:8.4f}  {name}")
            if a.timeline:
                with torch.no_grad():
                    timeline(lambda x=x, m=plain: m(x))
            if t in a.host:
                with torch.no_grad():
                    host = host_profile(lambda x=x, m=plain: m(x))
                    print(f"== {shape} T={t}: host {host * 1e3:.3f} ms per call (no CUDA graphs)")
                    host = host_profile(lambda x=x, m=graphs: m(x))
                    print(f"== {shape} T={t}: host {host * 1e3:.3f} ms per call (CUDA graphs where they apply)")
        block = plain = graphs = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
