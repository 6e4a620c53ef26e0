"""Time one MoE layer: HF eager, HF grouped_mm and moecc (torch backend), per token count.

    python benchmarks/moe_layer.py [--tokens 1 16 128 512] [--dtype float32]

Runs on CUDA when present, else on CPU. Prints a table with moecc's ratio to the best HF baseline."""

from __future__ import annotations

import argparse
import importlib
import time

import torch
import transformers as tf

import moecc

SHAPES = {
    "mixtral": lambda: tf.MixtralConfig(hidden_size=1024, intermediate_size=3584, num_local_experts=8,
                                        num_experts_per_tok=2),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                           num_experts_per_tok=8, norm_topk_prob=True),
}
BLOCKS = {"mixtral": "MixtralSparseMoeBlock", "qwen3_moe": "Qwen3MoeSparseMoeBlock"}


def timeit(fn, device, reps):
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, dtype {a.dtype}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'shape':10} {'T':>6} {'HF eager':>10} {'HF grouped':>11} {'moecc':>9} {'x best HF':>10}")
    for shape in a.shapes:
        cfg = SHAPES[shape]()
        torch.manual_seed(0)
        module = importlib.import_module(f"transformers.models.{shape}.modeling_{shape}")
        block = getattr(module, BLOCKS[shape])(cfg)
        for p in block.parameters():
            p.data.normal_(0, 0.02)
        block = block.to(device, dtype).eval()
        for t in a.tokens:
            x = torch.randn(1, t, cfg.hidden_size, device=device, dtype=dtype)
            times = {}
            with torch.no_grad():
                for impl in ("eager", "grouped_mm"):
                    block.experts.config._experts_implementation = impl
                    times[impl] = timeit(lambda b=block, x=x: b(x), device, a.reps)
                cm = moecc.compile(block, backend="torch", verify=False)
                cm(x)
                times["moecc"] = timeit(lambda c=cm, x=x: c(x), device, a.reps)
            best = min(times["eager"], times["grouped_mm"])
            print(f"{shape:10} {t:6d} {times['eager']:10.3f} {times['grouped_mm']:11.3f} {times['moecc']:9.3f} "
                  f"{best / times['moecc']:10.2f}")


if __name__ == "__main__":
    main()
