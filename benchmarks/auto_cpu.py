"""CPU: what ``backend="auto"`` picks for models whose MoE blocks ONNX Runtime's MoE op cannot run, against both.

    python benchmarks/auto_cpu.py [--forms gelu:16:4 gelu:8:4 silu:16:4] [--tokens 1 16 128 512]
    python benchmarks/auto_cpu.py --family deepseek_v2 llama4_text --forms silu:16:2 --eager

A 4-layer model per family and form ``act:E:k``, random weights, hidden 1024, expert width 512, 16 heads:
Qwen3-MoE's by default; DeepSeek-V2's (latent attention) and Llama 4's compute their rotary embeddings in complex
numbers. Gated experts of another activation than SiLU have no com.microsoft.MoE form, so ONNX Runtime decomposes
them into every expert on every token. Each backend is timed in a process of its own (ONNX Runtime's threads spin
after a run and slow torch work in the same process); ms per forward, median of 5, one sequence of T tokens.
``--eager`` adds the model run by transformers itself."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r'''
import json, statistics, sys, time
import torch, transformers
import moecc
family, act, experts, top_k, backend, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    sys.argv[5], sys.argv[6]
common = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, vocab_size=2000, hidden_act=act,
              num_experts_per_tok=top_k)
if family == "qwen3_moe":
    cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=2816, moe_intermediate_size=512,
                                      num_key_value_heads=4, head_dim=64, num_experts=experts)
elif family == "deepseek_v2":
    cfg = transformers.DeepseekV2Config(**common, intermediate_size=2816, moe_intermediate_size=512,
                                        num_key_value_heads=16, n_routed_experts=experts, n_shared_experts=1,
                                        first_k_dense_replace=0, kv_lora_rank=256, q_lora_rank=None,
                                        qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64)
elif family == "llama4_text":
    cfg = transformers.Llama4TextConfig(**common, intermediate_size=512, intermediate_size_mlp=2816,
                                        num_key_value_heads=4, head_dim=64, num_local_experts=experts,
                                        interleave_moe_layer_step=1)
else:
    raise SystemExit(f"unknown family {family}")
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
torch.set_grad_enabled(False)
start = time.perf_counter()
if backend == "eager":
    cm = model
    model(torch.randint(0, 2000, (1, 8)))
    ran = "eager"
else:
    cm = moecc.compile(model, backend=backend, verify=False)
    cm(torch.randint(0, 2000, (1, 8)))
    ran = cm._entries[0].backend
result = {"compile_s": time.perf_counter() - start, "ran": ran, "ms": {}}
for t in map(int, tokens.split(",")):
    x = torch.randint(0, 2000, (1, t))
    cm(x)
    times = []
    for _ in range(5):
        s = time.perf_counter()
        cm(x)
        times.append(time.perf_counter() - s)
    result["ms"][t] = statistics.median(times) * 1e3
print("RESULT", json.dumps(result))
'''


def _run(family: str, form: str, backend: str, tokens: list[int]) -> dict:
    act, experts, top_k = form.split(":")
    out = subprocess.run([sys.executable, "-c", _CHILD, family, act, experts, top_k, backend,
                          ",".join(map(str, tokens))],
                         capture_output=True, text=True, env={**os.environ, "MOECC_LOGS": "error"})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{family} {form} on {backend} failed:\n{out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forms", nargs="+", default=["gelu:8:4", "gelu:16:4", "gelu:64:4", "silu:16:4"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    ap.add_argument("--family", nargs="+", default=["qwen3_moe"], choices=["qwen3_moe", "deepseek_v2", "llama4_text"])
    ap.add_argument("--eager", action="store_true", help="also time the model run by transformers")
    args = ap.parse_args()
    width = 32 if args.eager else 22
    print("ms per forward; 'auto / best': auto's pick against the faster of the two in this run")
    print(f"{'family':>12} {'form':>10} {'auto ran':>12} " + " ".join(f"{'T=' + str(t):>{width}}" for t in args.tokens))
    for family in args.family:
        for form in args.forms:
            backends = ("torch", "onnxruntime", "eager") if args.eager else ("torch", "onnxruntime")
            runs = {b: _run(family, form, b, args.tokens) for b in backends}
            picked = _run(family, form, "auto", [args.tokens[0]])["ran"]
            cells = []
            for t in args.tokens:
                torch_ms, ort_ms = runs["torch"]["ms"][str(t)], runs["onnxruntime"]["ms"][str(t)]
                ratio = runs[picked]["ms"][str(t)] / min(torch_ms, ort_ms)
                eager = f" / {runs['eager']['ms'][str(t)]:7.1f}" if args.eager else ""
                cells.append(f"{torch_ms:7.1f} / {ort_ms:7.1f}{eager} x{ratio:.2f}")
            print(f"{family:>12} {form:>10} {picked:>12} " + " ".join(f"{c:>{width}}" for c in cells), flush=True)
    eager = " / transformers" if args.eager else ""
    print(f"cells: torch / onnxruntime{eager} ms, then auto's pick over the faster of the first two (1.00: it "
          "picked the faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
