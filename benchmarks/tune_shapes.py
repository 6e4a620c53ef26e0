"""Tune the Triton MoE tiles for MoE shapes given as ExHxIxk, at the given token counts (GPU).

    python benchmarks/tune_shapes.py 32x2880x2880x4 64x2048x1024x8 --tokens 1 64 512 4096

Results go to the user cache (``$MOECC_CACHE_DIR/triton_configs.json``), which the runtime reads before the shipped
table; ``benchmarks/ship_configs.py`` merges such a cache into the shipped table. A block's shared experts count as
experts here, each always selected: Qwen1.5-MoE (60 experts, top 4, a shared expert of 4 x 1408) is 64x2048x1408x8.
"""

from __future__ import annotations

import argparse
import time

import torch

from moecc import knobs
from moecc.codegen.triton.tune import tune


def shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected ExHxIxk, e.g. 128x2048x768x8")
    return tuple(int(p) for p in parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shapes", type=shape, nargs="+", help="experts x hidden x intermediate x top-k")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096, 16384])
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tuning times kernels on a GPU; none is visible")
    start = time.perf_counter()
    results = tune(a.shapes, a.tokens, getattr(torch, a.dtype))
    print(f"# {torch.cuda.get_device_name()}, {a.dtype}, tuned in {time.perf_counter() - start:.0f} s; "
          f"cache {knobs.cache_dir() / 'triton_configs.json'}")
    for (e, h, i, k, t), (c1, c2, ms) in results.items():
        print(f"E{e} H{h} I{i} k{k} T{t}: {ms:.3f} ms  gemm1 {c1}  gemm2 {c2}")


if __name__ == "__main__":
    main()
