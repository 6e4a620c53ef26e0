"""CPU benchmark of the ONNX Runtime backend: HF eager and grouped_mm against moecc ORT fp32 (the sorted form, and
com.microsoft.MoE with ``MOECC_ORT_MOE_OP=1``), int8 and int4."""

from __future__ import annotations

import importlib
import statistics
import time

import torch

SHAPES = {
    # name: (module, config factory kwargs, block class)
    "olmoe": ("olmoe", dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8),
              "OlmoeSparseMoeBlock", "OlmoeConfig"),
    "mixtral_small": ("mixtral", dict(hidden_size=1024, intermediate_size=3584, num_local_experts=8,
                                      num_experts_per_tok=2), "MixtralSparseMoeBlock", "MixtralConfig"),
    # sigmoid scores, a selection bias, group-limited top-k and a shared expert: ONNX Runtime is handed the routing
    "deepseek_small": ("deepseek_v3", dict(hidden_size=1024, moe_intermediate_size=512, n_routed_experts=64,
                                           num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=1,
                                           routed_scaling_factor=2.5), "DeepseekV3MoE", "DeepseekV3Config"),
}


def _block(shape: str):
    import transformers

    family, kwargs, cls, cfg_cls = SHAPES[shape]
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    torch.manual_seed(0)
    block = getattr(module, cls)(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
        for name, b in block.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros at init; a trained model's are not
                b.normal_(0, 0.01)
    return block.eval(), cfg


def _time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Stack(torch.nn.Module):
    """``layers`` MoE blocks with residuals: the end-to-end model of the benchmark."""

    def __init__(self, shape: str, layers: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_block(shape)[0] for _ in range(layers))
        self.norm = torch.nn.LayerNorm(self.blocks[0].gate.weight.shape[1])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(self.norm(x))
        return x


VARIANTS = {
    "ort fp32": {},
    "ort fp32 op": {"knobs": {"ORT_MOE_OP": "1"}},  # com.microsoft.MoE where it computes the block
    "ort int8": {"quantize": "int8"},
    "ort int8 op": {"quantize": "int8", "knobs": {"ORT_MOE_OP": "1"}},  # com.microsoft.QMoE where it computes
    "ort int4": {"quantize": "int4"},
    "ort int4 op": {"quantize": "int4", "knobs": {"ORT_MOE_OP": "1"}},
    "ort int8 a8": {"quantize": "int8", "quant_int8_activations": True},
    "ort int8 a8 op": {"quantize": "int8", "quant_int8_activations": True, "knobs": {"ORT_MOE_OP": "1"}},
    "ort int4 b32 a8": {"quantize": "int4", "quant_block_size": 32, "quant_int8_activations": True},
    "ort int4 b32 a8 op": {"quantize": "int4", "quant_block_size": 32, "quant_int8_activations": True,
                           "knobs": {"ORT_MOE_OP": "1"}},
}


def _variants(module, example, t_values, reps, variants):
    """Times per token count; each moecc variant is compiled, timed and released in turn (large layers)."""
    import contextlib
    import gc

    import moecc
    from moecc import knobs

    inputs = {t: torch.randn(1, t, example.shape[-1], generator=torch.Generator().manual_seed(t)) for t in t_values}
    times = {t: {} for t in t_values}
    errs = {t: {} for t in t_values}
    refs = {}
    with torch.no_grad():
        for t, x in inputs.items():
            refs[t] = module(x)
            for impl in ("eager", "grouped_mm"):
                for m in module.modules():
                    if hasattr(m, "config") and hasattr(m.config, "_experts_implementation"):
                        m.config._experts_implementation = impl
                times[t][f"hf {impl}"] = _time(lambda x=x: module(x), reps)
    compile_s = {}
    for name in variants:
        opts = dict(VARIANTS[name])
        with contextlib.ExitStack() as stack, torch.no_grad():
            # a knob holds for every call: a new token count may capture and lower again
            for knob, value in opts.pop("knobs", {}).items():
                stack.enter_context(getattr(knobs, knob).overridden(value))
            cm = moecc.compile(module, backend="onnxruntime", verify=False, **opts)
            start = time.perf_counter()
            cm(example)
            compile_s[name] = time.perf_counter() - start
            for t, x in inputs.items():
                times[t][name] = _time(lambda cm=cm, x=x: cm(x), reps)
                errs[t][name] = _rel(cm(x), refs[t])
        del cm
        gc.collect()
    return [(t, times[t], errs[t]) for t in t_values], compile_s


def run_cpu_bench(tokens=(1, 16, 128, 512), reps: int = 10, shapes=("olmoe", "mixtral_small"), layers: int = 4,
                  variants=None):
    """``variants``: names of ``VARIANTS`` (default all). ONNX Runtime's threads spin a while after each run, so
    timings meant to be compared closely are best taken one variant per process."""
    variants = list(variants or VARIANTS)
    if unknown := [v for v in variants if v not in VARIANTS]:
        raise ValueError(f"unknown variants {unknown}: pick from {list(VARIANTS)}")
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; times in ms (median of {reps})")
    cols = ["hf eager", "hf grouped_mm", *variants]
    for shape in shapes:
        block, cfg = _block(shape)
        targets = [(f"{shape} layer", block)]
        if layers:
            targets.append((f"{shape} x{layers} model", Stack(shape, layers).eval()))
        for label, module in targets:
            rows, compile_s = _variants(module, torch.randn(1, 8, cfg.hidden_size), tokens, reps, variants)
            print(f"\n{label} (H {cfg.hidden_size}); compile s: " +
                  ", ".join(f"{k} {v:.0f}" for k, v in compile_s.items()))
            print(f"{'T':>5} " + " ".join(f"{c:>16}" for c in cols))
            for t, times, errs in rows:
                best = min(times["hf eager"], times["hf grouped_mm"])
                cells = [f"{times[c]:7.2f}" + (f" x{best / times[c]:.2f} e{errs[c]:.0e}" if c in errs else "")
                         for c in cols]
                print(f"{t:5d} " + " ".join(f"{c:>16}" for c in cells))
            print("   (xN: speed-up over the best HF time; eN: relative error against the float model)")
