"""A model with an MoE block left as written that does not export to ONNX, on the CPU.

    python benchmarks/islands_cpu.py [--tokens 1x1 1x64 4x128] [--calls 20]

Loads ../shared/models/tiny-moe-stdlib and hooks one layer's experts (the hook doubles their output), which leaves
that block as written; its experts' ops have no ONNX function. Times eager, ``backend="torch"`` (where ``auto``
went before) and ``backend="onnxruntime"``, which now runs the graph between the block's calls on ONNX Runtime
and the block on torch (``moecc/codegen/onnx/islands.py``). Prints ms per call and the error against eager."""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM

import moecc

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "tiny-moe-stdlib")


def per_call_ms(fn, ids, calls: int) -> float:
    with torch.no_grad():
        fn(input_ids=ids)
        start = time.perf_counter()
        for _ in range(calls):
            fn(input_ids=ids)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="+", default=["1x1", "1x64", "4x128"])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--layer", type=int, default=1)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    model.model.layers[args.layer].mlp.experts.register_forward_hook(lambda module, inputs, out: out * 2)
    compiled = {b: moecc.compile(model, backend=b) for b in ("torch", "onnxruntime")}
    print(f"tiny-moe-stdlib, layer {args.layer}'s experts hooked, {torch.get_num_threads()} threads, ms per call")
    print("| tokens | eager | moecc torch | moecc onnxruntime (islands) | x torch | x eager | error |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.tokens:
        batch, seq = map(int, shape.split("x"))
        ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))
        times = {"eager": per_call_ms(model, ids, args.calls)}
        times.update({b: per_call_ms(cm, ids, args.calls) for b, cm in compiled.items()})
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            err = ((compiled["onnxruntime"](input_ids=ids).logits - ref).norm() / ref.norm()).item()
        print(f"| {shape} | {times['eager']:.2f} | {times['torch']:.2f} | {times['onnxruntime']:.2f} | "
              f"{times['torch'] / times['onnxruntime']:.2f} | {times['eager'] / times['onnxruntime']:.2f} | "
              f"{err:.1e} |")
    for backend, cm in compiled.items():
        lowering = {layer.name: (layer.lowering or ("fused" if layer.fused else layer.reason))[:60]
                    for layer in cm.moe_layers}
        print(f"moecc {backend}: captures {cm.captures}, programs {[e.backend for e in cm._entries]}, {lowering}")


if __name__ == "__main__":
    main()
