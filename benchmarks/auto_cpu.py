"""CPU: what ``backend="auto"`` picks for models whose MoE blocks ONNX Runtime's MoE op cannot run, against both.

    python benchmarks/auto_cpu.py [--forms gelu:16:4 gelu:8:4 silu:16:4] [--tokens 1 16 128 512]

A 4-layer Qwen3-MoE-shaped model (hidden 1024, expert width 512, 16 heads) per form ``act:E:k``, random weights.
Gated experts of another activation than SiLU have no com.microsoft.MoE form, so ONNX Runtime decomposes them into
every expert on every token. Each backend is timed in a process of its own (ONNX Runtime's threads spin after a
run and slow torch work in the same process); ms per forward, median of 5, one sequence of T tokens."""

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
act, experts, top_k, backend, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
cfg = transformers.Qwen3MoeConfig(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                                  num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                                  num_experts=experts, num_experts_per_tok=top_k, vocab_size=2000, hidden_act=act)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
torch.set_grad_enabled(False)
start = time.perf_counter()
cm = moecc.compile(model, backend=backend, verify=False)
cm(torch.randint(0, 2000, (1, 8)))
result = {"compile_s": time.perf_counter() - start, "ran": cm._entries[0].backend, "ms": {}}
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


def _run(form: str, backend: str, tokens: list[int]) -> dict:
    act, experts, top_k = form.split(":")
    out = subprocess.run([sys.executable, "-c", _CHILD, act, experts, top_k, backend, ",".join(map(str, tokens))],
                         capture_output=True, text=True, env={**os.environ, "MOECC_LOGS": "error"})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{form} on {backend} failed:\n{out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forms", nargs="+", default=["gelu:8:4", "gelu:16:4", "gelu:64:4", "silu:16:4"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    args = ap.parse_args()
    print("ms per forward; 'auto / best': auto's pick against the faster of the two in this run")
    print(f"{'form':>10} {'auto ran':>12} " + " ".join(f"{'T=' + str(t):>22}" for t in args.tokens))
    for form in args.forms:
        runs = {b: _run(form, b, args.tokens) for b in ("torch", "onnxruntime")}
        picked = _run(form, "auto", [args.tokens[0]])["ran"]
        cells = []
        for t in args.tokens:
            torch_ms, ort_ms = runs["torch"]["ms"][str(t)], runs["onnxruntime"]["ms"][str(t)]
            ratio = runs[picked]["ms"][str(t)] / min(torch_ms, ort_ms)
            cells.append(f"{torch_ms:7.1f} / {ort_ms:7.1f} x{ratio:.2f}")
        print(f"{form:>10} {picked:>12} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    print("cells: torch / onnxruntime ms, then auto's pick over the faster (1.00: it picked the faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
