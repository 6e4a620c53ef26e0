"""End-to-end and compile-time measurements on Mixtral-shaped models (CUDA, bf16).

    python benchmarks/model_e2e.py e2e               # 4 layers, HF (grouped_mm) against moecc (triton), also
                                                     # through torch.compile(backend="moecc")
    python benchmarks/model_e2e.py compile-time      # 32 layers: time of the first call (capture .. kernels)
    python benchmarks/model_e2e.py compile-time --dynamo   # the same through torch.compile(backend="moecc")
    python benchmarks/model_e2e.py compile-time --generate # the first cm.generate: two captures
    python benchmarks/model_e2e.py generate          # 4 layers, greedy generate with a KV cache: HF against moecc
    python benchmarks/model_e2e.py blockwise         # 4 layers behind an input check torch.export refuses: each
                                                     # block compiled alone, against the whole model compiled
    python benchmarks/model_e2e.py gemma4            # 4 Gemma-4-style layers (routing beside attention, per-expert
                                                     # scales): experts fused alone, by moecc.compile and through
                                                     # torch.compile(backend="moecc")

Compile time counts capture, recognition, passes, lowering, the check on fresh inputs and kernel compilation.
The 32 layers share one set of expert weights so that the model fits one GPU: every block is still captured,
recognized and checked on its own."""

from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers as tf
from moe_layer import cuda_time  # the layer benchmark's timer, beside this file

import moecc

H, INTER, E, K = 4096, 14336, 8, 2


def mixtral(layers: int, shared_experts: bool):
    cfg = tf.MixtralConfig(hidden_size=H, intermediate_size=16 if shared_experts else INTER, num_hidden_layers=layers,
                           num_attention_heads=32, num_key_value_heads=8, num_local_experts=E,
                           num_experts_per_tok=K, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.MixtralForCausalLM(cfg).to(torch.bfloat16).eval()
    if shared_experts:
        gate_up = torch.nn.Parameter(torch.randn(E, 2 * INTER, H, device="cuda", dtype=torch.bfloat16) * 0.02)
        down = torch.nn.Parameter(torch.randn(E, H, INTER, device="cuda", dtype=torch.bfloat16) * 0.02)
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj = gate_up
            layer.mlp.experts.down_proj = down
            layer.mlp.experts.intermediate_dim = INTER
    model.set_experts_implementation("grouped_mm")
    return model


def _cells(model):
    """(batch, seq, token ids, HF's fp32 logits) of the end-to-end table's cells."""
    for b, s in ((1, 1), (8, 1), (1, 512), (4, 1024)):
        ids = torch.randint(0, 32000, (b, s), device="cuda")
        yield b, s, ids, model(input_ids=ids, use_cache=False).logits.float()


def _header(note: str, columns: str) -> None:
    print(f"# {torch.cuda.get_device_name()}: 4-layer Mixtral-shaped model, bf16, ms per forward; {note}")
    print(f"{'batch x seq':>12} {'HF grouped_mm':>14} {columns}")


def _rel_err(logits: torch.Tensor, ref: torch.Tensor) -> float:
    return ((logits.float() - ref).norm() / ref.norm()).item()


def _errors_and_times(ids: torch.Tensor, ref: torch.Tensor, *models) -> tuple[list[float], list[float]]:
    """Each model's logits error against ``ref`` on ``ids``, and its ms per forward."""
    errors = [_rel_err(m(input_ids=ids, use_cache=False).logits, ref) for m in models]
    return errors, [cuda_time(lambda m=m: m(input_ids=ids, use_cache=False)) for m in models]


def e2e():
    model = mixtral(4, shared_experts=False)
    cm = moecc.compile(model, backend="triton")
    dyn = torch.compile(model, backend="moecc", options={"backend": "triton"})
    _header("'dynamo' is torch.compile(model, backend='moecc', options={'backend': 'triton'})",
            f"{'moecc triton':>13} {'speed-up':>9} {'logits err':>11} {'dynamo':>8} {'speed-up':>9} {'logits err':>11}")
    with torch.no_grad():
        for b, s, ids, ref in _cells(model):
            (_, err, dyn_err), (hf, mc, dy) = _errors_and_times(ids, ref, model, cm, dyn)
            print(f"{b:>5} x {s:<5} {hf:14.3f} {mc:13.3f} {hf / mc:8.2f}x {err:11.1e} {dy:8.3f} {hf / dy:8.2f}x "
                  f"{dyn_err:11.1e}", flush=True)


GEMMA4 = dict(hidden_size=2816, num_experts=128, top_k_experts=8, moe_intermediate_size=704, intermediate_size=2112)


def gemma4_model(layers: int, device: str = "cuda", **sizes):
    """Gemma-4-style decoder layers (the decoder layer routes and calls its experts beside attention and a dense
    MLP) at ``GEMMA4``'s sizes unless ``sizes`` says otherwise, per-expert scales drawn in U(0.5, 1.5) as a trained
    model's (they are ones at init)."""
    dims = {**GEMMA4, **sizes}
    cfg = tf.Gemma4TextConfig(vocab_size=32000, num_hidden_layers=layers, num_attention_heads=16,
                              num_key_value_heads=8, head_dim=256, global_head_dim=256,
                              enable_moe_block=True, sliding_window=512, hidden_size_per_layer_input=0,
                              layer_types=["sliding_attention", "full_attention"] * (layers // 2) +
                              ["sliding_attention"] * (layers % 2), max_position_embeddings=4096, **dims)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.Gemma4ForCausalLM(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("per_expert_scale"):
                p.uniform_(0.5, 1.5)
    model.set_experts_implementation("grouped_mm")
    return model


def gemma4():
    """Errors are against the same model in fp32: random Gemma-4-style layers amplify rounding (about tenfold a
    layer), so HF's own bf16 logits are far from its fp32 ones, and against those bf16 ones the compiled models'
    errors would say nothing about them."""
    model = gemma4_model(4)
    reference = copy.deepcopy(model).float()
    cm = moecc.compile(model, backend="triton")
    dyn = torch.compile(model, backend="moecc", options={"backend": "triton"})
    print(f"# {torch.cuda.get_device_name()}: 4 Gemma-4-style layers {GEMMA4}, bf16, ms per forward; 'dynamo' is "
          "torch.compile(model, backend='moecc', options={'backend': 'triton'}); errors against the fp32 model")
    print(f"{'batch x seq':>12} {'HF grouped_mm':>14} {'HF err':>8} {'moecc triton':>13} {'speed-up':>9} "
          f"{'err':>8} {'dynamo':>8} {'speed-up':>9} {'err':>8}")
    before = moecc.dynamo.compiled_graphs()
    with torch.no_grad():
        for b, s in ((1, 1), (8, 1), (1, 512), (4, 1024)):
            ids = torch.randint(0, 32000, (b, s), device="cuda")
            ref = reference(input_ids=ids, use_cache=False).logits.float()
            (hf_err, err, dyn_err), (hf, mc, dy) = _errors_and_times(ids, ref, model, cm, dyn)
            print(f"{b:>5} x {s:<5} {hf:14.3f} {hf_err:8.1e} {mc:13.3f} {hf / mc:8.2f}x {err:8.1e} {dy:8.3f} "
                  f"{hf / dy:8.2f}x {dyn_err:8.1e}", flush=True)
    graphs = [g for g in moecc.dynamo.compiled_graphs() if all(g is not b for b in before)]
    through_dynamo = [x for g in graphs for x in g.moe_layers]
    for name, layers in (("moecc.compile", cm.moe_layers), ("torch.compile", through_dynamo)):
        print(f"{name}: {sum(x.fused for x in layers)}/{len(layers)} fused; routing: "
              f"{sorted({x.routing for x in layers})}")


def compile_time(layers: int, via_dynamo: bool = False, generating: bool = False):
    """Seconds of the first call: one capture; with ``generating``, the first ``cm.generate`` of 4 new tokens, two
    captures (the prompt's and a decode step's)."""
    model = mixtral(layers, shared_experts=True)
    ids = torch.randint(0, 32000, (1, 16), device="cuda")
    before = moecc.dynamo.compiled_graphs()
    start = time.perf_counter()
    if via_dynamo:
        cm = torch.compile(model, backend="moecc", options={"backend": "triton"})
    else:
        cm = moecc.compile(model, backend="triton")
    with torch.no_grad():
        if generating:
            cm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                        do_sample=False, pad_token_id=0)
        else:
            cm(input_ids=ids, use_cache=False)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    if via_dynamo:
        graphs = [g for g in moecc.dynamo.compiled_graphs() if all(g is not b for b in before)]
        layers_seen = [layer for g in graphs for layer in g.moe_layers]
    else:
        layers_seen = cm.moe_layers
    assert len(layers_seen) == layers and all(layer.fused for layer in layers_seen)
    print(f"compile-time layers={layers} via={'torch.compile' if via_dynamo else 'moecc.compile'} "
          f"{'first-generate' if generating else 'first-call'} seconds={first:.1f}", flush=True)


def _timed_generate(generate, ids, new_tokens: int, rounds: int = 3) -> tuple[float, torch.Tensor]:
    """(median seconds of a greedy generate of exactly ``new_tokens``, its tokens)."""
    times, out = [], None
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def generate(new_tokens: int = 64):
    """Greedy generation with a KV cache: the prompt and each decode step through ``cm.generate`` (two captures,
    made before timing), against the model's own ``generate`` with grouped_mm experts. "same tokens" is the share
    of positions where both chose the same token: with random weights the logits are near ties, and after the first
    bf16 tie broken the other way the two continuations differ."""
    model = mixtral(4, shared_experts=False)
    cm = moecc.compile(model, backend="triton")
    print(f"# {torch.cuda.get_device_name()}: 4-layer Mixtral-shaped model, bf16, greedy generate, {new_tokens} new "
          "tokens, ms per new token (prompt included)")
    print(f"{'batch x prompt':>15} {'HF grouped_mm':>14} {'moecc triton':>13} {'speed-up':>9} {'same tokens':>12}")
    with torch.no_grad():
        for b, s in ((1, 128), (8, 128), (32, 512)):
            ids = torch.randint(0, 32000, (b, s), device="cuda")
            # the two captures, then the MoE ops' CUDA graphs and the allocator's pools, outside the timing
            _timed_generate(cm.generate, ids, new_tokens, rounds=2)
            _timed_generate(model.generate, ids, new_tokens, rounds=1)
            hf, ref = _timed_generate(model.generate, ids, new_tokens)
            mc, got = _timed_generate(cm.generate, ids, new_tokens)
            same = (got == ref).float().mean().item()
            print(f"{b:>6} x {s:<6} {hf * 1e3 / new_tokens:14.3f} {mc * 1e3 / new_tokens:13.3f} {hf / mc:8.2f}x "
                  f"{same:12.1%}", flush=True)


class CheckedIds(torch.nn.Module):
    """A model behind a check of its token ids, as serving code writes it: control flow on tensor values, which
    torch.export refuses, so that ``moecc.compile`` runs it blockwise (``moecc/runtime/blockwise.py``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        if (ids >= self.model.config.vocab_size).any():
            raise ValueError("token id out of range")
        return self.model(input_ids=ids, use_cache=False).logits


def blockwise():
    model = mixtral(4, shared_experts=False)
    checked = CheckedIds(model)
    whole = moecc.compile(checked.model, backend="triton")
    apart = moecc.compile(checked, backend="triton")
    _header("'blockwise' is the model behind an id check torch.export refuses, each MoE block compiled alone",
            f"{'moecc whole':>12} {'blockwise':>10} {'blockwise/whole':>16} {'logits err':>11}")
    with torch.no_grad():
        for b, s, ids, ref in _cells(model):
            err = _rel_err(apart(ids), ref)
            hf = cuda_time(lambda ids=ids: model(input_ids=ids, use_cache=False))
            wh = cuda_time(lambda ids=ids: whole(input_ids=ids, use_cache=False))
            bw = cuda_time(lambda ids=ids: apart(ids))
            print(f"{b:>5} x {s:<5} {hf:14.3f} {wh:12.3f} {bw:10.3f} {bw / wh:15.2f}x {err:11.1e}", flush=True)
    assert apart.blockwise is not None and all(layer.fused for layer in apart.moe_layers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["e2e", "compile-time", "generate", "blockwise", "gemma4"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dynamo", action="store_true", help="compile-time: through torch.compile(backend='moecc')")
    ap.add_argument("--generate", action="store_true", help="compile-time: the first cm.generate (two captures)")
    a = ap.parse_args()
    if a.what == "e2e":
        e2e()
    elif a.what == "generate":
        generate()
    elif a.what == "blockwise":
        blockwise()
    elif a.what == "gemma4":
        gemma4()
    else:
        compile_time(a.layers, a.dynamo, a.generate)


if __name__ == "__main__":
    main()
