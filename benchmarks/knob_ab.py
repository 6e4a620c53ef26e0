"""One knob's settings against each other on the whole MoE layer, interleaved (CUDA, bf16).

    python benchmarks/knob_ab.py --knob MOECC_TRITON_WS --values auto on off --tokens 4096 16384 --rounds 5

Each round times every setting once, back to back as ``moe_layer.py`` times a layer (so at the clocks of a GPU
under sustained load, which on an H100 fall from 1980 to about 1400 MHz at these sizes); the table shows each
setting's median over rounds and its ratio to the first setting, and the spread (max/min over rounds) of each, so
that a difference can be read against the noise. The knob must be one read at call time (``MOECC_TRITON_*``)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from moe_layer import INPUT_SETS, cuda_time, make_block  # the layer benchmark's helpers, beside this file

import moecc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--knob", required=True)
    ap.add_argument("--values", nargs="+", required=True)
    ap.add_argument("--shapes", nargs="+", default=["mixtral", "qwen3_moe"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    before = os.environ.get(args.knob)
    print(f"{torch.cuda.get_device_name()}: {args.knob} in {args.values}, {args.rounds} interleaved rounds, ms")
    print(f"{'shape':<10} {'T':>6} " + " ".join(f"{v:>16}" for v in args.values))
    for shape in args.shapes:
        block, cfg = make_block(shape, "cuda", torch.bfloat16)
        # one program per setting: a CUDA graph captured under one setting would replay it under the others
        programs = {v: moecc.compile(block, backend="triton", verify=False) for v in args.values}
        for t in args.tokens:
            xs = [torch.randn(1, t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16) for _ in range(INPUT_SETS)]
            times: dict[str, list[float]] = {v: [] for v in args.values}
            with torch.no_grad():
                for _ in range(args.rounds):
                    for value in args.values:
                        os.environ[args.knob] = value
                        times[value].append(cuda_time([lambda x=x, m=programs[value]: m(x) for x in xs]))
            first = statistics.median(times[args.values[0]])
            cells = []
            for value in args.values:
                med = statistics.median(times[value])
                spread = max(times[value]) / min(times[value])
                cells.append(f"{med:7.3f} {med / first:4.2f}x ±{(spread - 1) * 50:.0f}%")
            print(f"{shape:<10} {t:>6} " + " ".join(f"{c:>16}" for c in cells), flush=True)
        block = programs = None
        torch.cuda.empty_cache()
    if before is None:
        os.environ.pop(args.knob, None)
    else:
        os.environ[args.knob] = before
    return 0


if __name__ == "__main__":
    sys.exit(main())
