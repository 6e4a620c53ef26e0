"""Quality cost of quantized experts on a model with trained weights and learned, skewed routing.

    python benchmarks/quality_tiny_moe.py [--batches 40]

Held-out perplexity of ../shared/models/tiny-moe-stdlib: eager fp32, moecc ORT fp32, int8 and int4 experts."""

import argparse
import os
import time

import torch
from transformers import MixtralForCausalLM

import moecc
from moecc.quality import perplexity

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "tiny-moe-stdlib")
VARIANTS = {
    "moecc ort fp32": {},
    "moecc ort int8": {"quantize": "int8"},
    "moecc ort int8 int8-act": {"quantize": "int8", "quant_int8_activations": True},
    "moecc ort int4": {"quantize": "int4"},
    "moecc ort int4 block32": {"quantize": "int4", "quant_block_size": 32},
    "moecc ort int4 block32 int8-act": {"quantize": "int4", "quant_block_size": 32, "quant_int8_activations": True},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--model", default=MODEL)
    a = ap.parse_args()
    torch.set_grad_enabled(False)  # moecc programs are for inference; eager gets the same footing
    model = MixtralForCausalLM.from_pretrained(a.model).eval()
    example = torch.randint(0, 256, (16, 128))
    rows = [("eager fp32", perplexity(lambda x: model(input_ids=x, use_cache=False).logits, a.batches), 0.0, "")]
    for name, opts in VARIANTS.items():
        cm = moecc.compile(model, backend="onnxruntime", **opts)
        cm(input_ids=example, use_cache=False)
        forms = sorted({layer.lowering.split(":")[0] for layer in cm.moe_layers})
        start = time.perf_counter()
        ppl = perplexity(lambda x, cm=cm: cm(input_ids=x, use_cache=False).logits, a.batches)
        rows.append((name, ppl, time.perf_counter() - start, "; ".join(forms)))
        del cm
    base = rows[0][1]
    print(f"{'variant':34} {'perplexity':>10} {'change':>8} {'eval s':>7}  lowering")
    for name, ppl, secs, forms in rows:
        print(f"{name:34} {ppl:10.4f} {100 * (ppl / base - 1):7.2f}% {secs:7.1f}  {forms}")


if __name__ == "__main__":
    main()
