"""One MoE layer across many token counts, to find cliffs between the counts the layer table times (CUDA).

    python benchmarks/token_sweep.py --shapes mixtral qwen3_moe --tokens 2 3 6 12 24 48 96 192 384 768 1536 3072

Prints ms per call and us per token for each count, and flags a count that takes longer than the next larger one
(beyond 10 %): the time of a layer should not fall as its tokens grow. Session 24 found Mixtral at 768 and 1024
tokens 5x slower than at 2048 this way (a tile config picked from another shape)."""

from __future__ import annotations

import argparse
import sys

import torch
from moe_layer import INPUT_SETS, cuda_time, make_block  # the layer benchmark's helpers, beside this file

import moecc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["mixtral", "qwen3_moe"])
    ap.add_argument("--tokens", type=int, nargs="+",
                    default=[2, 3, 6, 12, 24, 48, 96, 192, 384, 768, 1024, 1536, 3072, 6144])
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}: ms per call (us per token)")
    for shape in args.shapes:
        block, cfg = make_block(shape, "cuda", dtype)
        cm = moecc.compile(block, backend="triton", verify=False)
        times = {}
        with torch.no_grad():
            for t in sorted(args.tokens):
                xs = [torch.randn(1, t, cfg.hidden_size, device="cuda", dtype=dtype)
                      for _ in range(INPUT_SETS)]
                times[t] = cuda_time([lambda x=x, m=cm: m(x) for x in xs], iters=10, batches=3)
        counts = sorted(times)
        cliffs = [a for a, b in zip(counts, counts[1:]) if times[a] > 1.1 * times[b]]
        cells = " ".join(f"{t}:{times[t]:.3f}({1e3 * times[t] / t:.1f})" for t in counts)
        print(f"{shape:<12} {cells}")
        print(f"{'':<12} cliffs at {cliffs}" if cliffs else f"{'':<12} no cliffs", flush=True)
        block = cm = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
