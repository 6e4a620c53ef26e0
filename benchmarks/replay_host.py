"""Host time of one CUDA-graph-replayed call of a compiled MoE layer, and of each part of it (CUDA, bf16).

    python benchmarks/replay_host.py --shape qwen3_moe --tokens 1

At decode sizes a replayed layer needs less device time than the host takes to call it, so the host decides the
layer's time. Prints host microseconds per call of the whole call and of its parts (input copy, replay, the
output clone the runtime no longer makes, the liveness check and alias it makes instead, pytree and guards, the
locks and stream check that let callers in several threads and on several streams take turns),
and the device time of back-to-back replays for comparison."""

from __future__ import annotations

import argparse
import time

import torch
from moe_layer import make_block  # the layer benchmark's helpers, beside this file
from torch.utils import _pytree as pytree

import moecc
from moecc.runtime.cudagraphs import replays


def host_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    spent = time.perf_counter() - start
    torch.cuda.synchronize()
    return spent / calls * 1e6


def _turns(*locks) -> None:
    for lock in locks:
        with lock:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3_moe")
    ap.add_argument("--tokens", type=int, default=1)
    args = ap.parse_args()
    block, cfg = make_block(args.shape, "cuda", torch.bfloat16)
    cm = moecc.compile(block, backend="triton", verify=False)
    x = torch.randn(1, args.tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        cm(x)
        entry = cm._entries[-1]
        inst = next(iter(entry.graphs.graphs.values()))[0]
        flat, spec = pytree.tree_flatten(((x,), {}))
        parts = {
            "whole call": lambda: cm(x),
            "input copy": lambda: inst.static_in[0].copy_(x),
            "graph replay": lambda: inst.graph.replay(),
            "output clone (not made)": lambda: inst.outputs[0].clone(),
            "liveness check + alias": lambda: (inst.free(), inst.outputs[0].detach()),
            "pytree flatten (skipped)": lambda: pytree.tree_flatten(((x,), {})),
            "guards, flattened": lambda: entry.matches(flat, spec),
            "guards, positional": lambda: entry.matches_tensors([x]),
            "replays()": lambda: replays("triton", [x], None),
            "turns: call and graph locks": lambda: _turns(cm._lock, entry.graphs.lock),
            "turns: stream check": lambda: entry.graphs._follow_stream(x.get_device()),
        }
        print(f"{torch.cuda.get_device_name()}: {args.shape} T={args.tokens}, host us per call")
        for name, fn in parts.items():
            print(f"  {name:<26} {host_us(fn):7.1f}")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            inst.graph.replay()
        end.record()
        torch.cuda.synchronize()
        print(f"  {'device, replays back to back':<26} {start.elapsed_time(end) / 200 * 1e3:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
