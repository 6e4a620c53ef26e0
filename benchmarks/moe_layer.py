"""Time one MoE layer per token count against the baselines, measured in the same run.

    python benchmarks/moe_layer.py                 # CUDA when present (bf16), else CPU (fp32)
    python benchmarks/moe_layer.py --tokens 1 64 --shapes qwen3_moe
    python benchmarks/moe_layer.py --shapes qwen3_moe@mish   # experts of another activation (HF ``hidden_act``)

On CUDA it times HF eager, HF grouped_mm, torch.compile of the HF grouped_mm block (and mode="reduce-overhead"
for T <= 64), a vLLM-style Triton fused MoE with vLLM's H100 tile tables (``vllm_style.py``; replayed from a CUDA
graph for T <= 64, as vLLM serves decode), and moecc's Triton backend; it measures copy bandwidth and bf16 matmul
throughput in the same run and prints the roofline floor = max(active-expert bytes / bandwidth, FLOPs / peak). On
CPU it times HF eager, HF grouped_mm and moecc's torch backend."""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time

import torch
import transformers as tf

import moecc

try:  # the vLLM-style baseline needs Triton
    from vllm_style import VllmStyleMoE  # beside this file
except ImportError:
    VllmStyleMoE = None

SHAPES = {
    "mixtral": ("mixtral", "MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                                num_experts_per_tok=2), "MixtralSparseMoeBlock"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                                     num_experts_per_tok=8, norm_topk_prob=True),
                  "Qwen3MoeSparseMoeBlock"),
    # Llama 4 Scout: top-1 with the routing weight on the expert's input, a shared expert; HF runs every expert
    # on every token (no experts_implementation to switch)
    "llama4": ("llama4", "Llama4TextConfig", dict(hidden_size=5120, intermediate_size=8192, num_local_experts=16,
                                                 num_experts_per_tok=1), "Llama4TextMoe"),
    # layers of other families at their released sizes, for coverage (no issue names them)
    "deepseek_v3": ("deepseek_v3", "DeepseekV3Config", dict(hidden_size=7168, moe_intermediate_size=2048,
                                                           n_routed_experts=256, num_experts_per_tok=8, n_group=8,
                                                           topk_group=4, n_shared_experts=1,
                                                           routed_scaling_factor=2.5, norm_topk_prob=True),
                    "DeepseekV3MoE"),
    # DeepSeek-V2 (236B): groups kept by each group's best score (group_limited_greedy), two shared experts
    "deepseek_v2": ("deepseek_v2", "DeepseekV2Config", dict(hidden_size=5120, moe_intermediate_size=1536,
                                                           n_routed_experts=160, num_experts_per_tok=6, n_group=8,
                                                           topk_group=3, topk_method="group_limited_greedy",
                                                           n_shared_experts=2, routed_scaling_factor=16.0),
                    "DeepseekV2Moe"),
    "gpt_oss": ("gpt_oss", "GptOssConfig", dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32,
                                               num_experts_per_tok=4), "GptOssMLP"),
    "olmoe": ("olmoe", "OlmoeConfig", dict(hidden_size=2048, intermediate_size=1024, num_experts=64,
                                          num_experts_per_tok=8), "OlmoeSparseMoeBlock"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeConfig", dict(hidden_size=2048, moe_intermediate_size=1408, num_experts=60,
                                                     num_experts_per_tok=4, shared_expert_intermediate_size=5632,
                                                     norm_topk_prob=False), "Qwen2MoeSparseMoeBlock"),
    # long GEMM 2 K loops (the warp-specialized GEMM 2, split K): Mixtral's structure at other released sizes
    "mixtral_8x22b": ("mixtral", "MixtralConfig", dict(hidden_size=6144, intermediate_size=16384, num_local_experts=8,
                                                      num_experts_per_tok=2), "MixtralSparseMoeBlock"),
    "dbrx_sized": ("mixtral", "MixtralConfig", dict(hidden_size=6144, intermediate_size=10752, num_local_experts=16,
                                                   num_experts_per_tok=4), "MixtralSparseMoeBlock"),
    "phimoe_sized": ("mixtral", "MixtralConfig", dict(hidden_size=4096, intermediate_size=6400, num_local_experts=16,
                                                     num_experts_per_tok=2), "MixtralSparseMoeBlock"),
    # a size no released model has (no shipped tiles): what a user's own model gets untuned
    "custom": ("qwen3_moe", "Qwen3MoeConfig", dict(hidden_size=3072, moe_intermediate_size=1024, num_experts=96,
                                                  num_experts_per_tok=6, norm_topk_prob=True),
               "Qwen3MoeSparseMoeBlock"),
    # smaller CPU-friendly shapes with the same structure
    "mixtral_cpu": ("mixtral", "MixtralConfig", dict(hidden_size=1024, intermediate_size=3584, num_local_experts=8,
                                                    num_experts_per_tok=2), "MixtralSparseMoeBlock"),
    "qwen3_moe_cpu": ("qwen3_moe", "Qwen3MoeConfig", dict(hidden_size=1024, moe_intermediate_size=384, num_experts=64,
                                                         num_experts_per_tok=8, norm_topk_prob=True),
                      "Qwen3MoeSparseMoeBlock"),
}


INPUT_SETS = 4  # inputs cycled through while timing


def make_block(shape, device, dtype):
    """``shape`` is a key of ``SHAPES``, or one followed by ``@`` and a Hugging Face ``hidden_act`` for its experts
    (``qwen3_moe@quick_gelu``)."""
    name, _, act = shape.partition("@")
    family, cfg_cls, kwargs, cls = SHAPES[name]
    cfg = getattr(tf, cfg_cls)(**kwargs, **({"hidden_act": act} if act else {}))
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    torch.manual_seed(0)
    with torch.device(device):
        block = getattr(module, cls)(cfg).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block.eval(), cfg


def has_impls(block) -> bool:
    return hasattr(block.experts, "config")


def set_impl(block, impl):
    if has_impls(block):
        block.experts.config._experts_implementation = impl


WARMUP_S = 0.25


def cuda_time(fns, iters: int = 30, batches: int = 3) -> float:
    """Mean device time per call of back-to-back calls (as layers run in a model: the host may run ahead), cycling
    through ``fns`` (one per input set, so that routing and cache contents vary); the median of ``batches``. The
    warm-up runs for ``WARMUP_S`` at least: the first cell of a process, right after its compiles, once measured
    a host-bound layer at twice its time after a few calls of warm-up."""
    fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
    until = time.perf_counter() + WARMUP_S
    while True:
        for f in fns * 2:
            f()
        torch.cuda.synchronize()
        if time.perf_counter() >= until:
            break
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            fns[i % len(fns)]()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def cpu_time(fn, iters=5):
    fn()
    times = []
    for _ in range(iters):
        s = time.perf_counter()
        fn()
        times.append((time.perf_counter() - s) * 1e3)
    return statistics.median(times)


SUSTAIN_S = 3.0  # seconds of back-to-back matmuls before the sustained peak is read


def roofline():
    """(bytes/ms, flop/ms, sustained flop/ms) measured here: a large device-to-device copy, a large bf16 matmul
    in a burst of 30 calls (the peak the floor uses), and the same matmul after SUSTAIN_S seconds of back-to-back
    calls, which is what a board capped on power holds through a long run of large layers."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), 10)
    bw = 2 * src.numel() / ms
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 8192 ** 3
    peak = flops / cuda_time(lambda: a @ b, 10)
    calls = max(30, int(SUSTAIN_S * peak / flops * 1e3))
    for _ in range(calls):
        a @ b
    return bw, peak, flops / cuda_time(lambda: a @ b, 30)


def _shared_experts(block) -> list:
    """The block's shared-expert modules (Qwen2-MoE and Llama 4 name theirs ``shared_expert``, DeepSeek
    ``shared_experts``)."""
    return [getattr(block, name) for name in ("shared_expert", "shared_experts") if hasattr(block, name)]


def _routed_ids(block, cfg, x2):
    """The expert ids the block routes ``x2`` [T, H] to: what it hands its experts module, else (Llama 4, whose
    experts take every token) the top-k of its Linear router's logits."""
    seen = []
    hook = block.experts.register_forward_hook(lambda mod, args, out: seen.append(args))
    try:
        block(x2[None])
    finally:
        hook.remove()
    if len(seen[0]) >= 2:
        return seen[0][1]
    return torch.nn.functional.linear(x2, block.router.weight).topk(cfg.num_experts_per_tok, -1).indices


def floor_ms(block, cfg, x, bw, peak):
    """max(bytes / bandwidth, FLOPs / peak) of the active experts, the shared experts if the block has them, and
    the input and output."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h)
    with torch.no_grad():
        ids = _routed_ids(block, cfg, x2)
    active = ids.unique().numel()
    experts = list(block.experts.parameters())
    per_expert = sum(p.numel() for p in experts) // experts[0].shape[0]
    shared = sum(p.numel() for module in _shared_experts(block) for p in module.parameters())
    t, k = ids.shape
    size = x.element_size()
    bytes_ = (active * per_expert + shared) * size + 2 * t * h * size
    flops = 2 * t * (k * per_expert + shared)
    return max(bytes_ / bw, flops / peak)


def first(out):
    """The hidden states of a block that also returns its router logits (Llama 4's)."""
    return out[0] if isinstance(out, tuple) else out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_cuda(shapes, tokens, with_compile, copy_expert_weights=None, dtype=torch.bfloat16):
    bw, peak, sustained = roofline()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{importlib.import_module('triton').__version__}; copy {bw / 1e9:.2f} TB/s, bf16 matmul "
          f"{peak / 1e9:.0f} TFLOP/s in a burst, {sustained / 1e9:.0f} after {SUSTAIN_S:g} s (measured here); "
          f"times in ms per call of back-to-back calls cycling {INPUT_SETS} inputs, median of 3 batches; "
          "'% sust.': the floor at the sustained peak" + (f"; {dtype}: the floors take bf16's peak"
                                                          if dtype != torch.bfloat16 else ""))
    cols = ["floor", "hf eager", "hf grouped_mm", "compile", "c+graphs", "vllm-style", "moecc torch", "moecc"]
    print(f"{'shape':10} {'T':>6} " + " ".join(f"{c:>13}" for c in cols) + "  x best   % floor  % sust.  err")
    rows = []
    for shape in shapes:
        block, cfg = make_block(shape, "cuda", dtype)
        cm = moecc.compile(block, backend="triton", verify=False, copy_expert_weights=copy_expert_weights)
        cm_torch = moecc.compile(block, backend="torch", verify=False, copy_expert_weights=copy_expert_weights)
        with torch.no_grad():
            cm(torch.randn(1, 2, cfg.hidden_size, device="cuda", dtype=dtype))
        layouts = {str(n.args[-1]) for n in cm._entries[-1].gm.graph.nodes if "fused_moe" in str(n.target)}
        print(f"# {shape}: moecc's expert weight layout {', '.join(sorted(layouts))}")
        compiled, graphs = None, None
        # Mixtral-style blocks (a router returning (logits, weights, ids), SiLU experts in gate_up_proj/down_proj)
        vllm = None
        if (VllmStyleMoE is not None and dtype != torch.float32 and hasattr(block, "gate")
                and hasattr(block.experts, "gate_up_proj") and not _shared_experts(block)):
            vllm = VllmStyleMoE(block)
        if with_compile:
            set_impl(block, "grouped_mm")
            compiled = torch.compile(block)
            graphs = torch.compile(block, mode="reduce-overhead")
        for t in tokens:
            xs = [torch.randn(1, t, cfg.hidden_size, device="cuda", dtype=dtype) for _ in range(INPUT_SETS)]
            x = xs[0]
            times = {"floor": floor_ms(block, cfg, x, bw, peak)}
            floor_sustained = floor_ms(block, cfg, x, bw, sustained)
            with torch.no_grad():
                for impl in ("eager", "grouped_mm") if has_impls(block) else ("eager",):
                    set_impl(block, impl)
                    try:
                        times[f"hf {impl}"] = cuda_time([lambda b=block, x=x: b(x) for x in xs])
                    except Exception as exc:  # noqa: BLE001
                        times[f"hf {impl}"] = float("nan")
                        print("  ", impl, "failed:", str(exc)[:100])
                set_impl(block, "grouped_mm")
                ref = first(block(x))
                if compiled is not None:
                    try:
                        times["compile"] = cuda_time([lambda c=compiled, x=x: c(x) for x in xs])
                    except Exception as exc:  # noqa: BLE001
                        times["compile"] = float("nan")
                        print("   compile failed:", str(exc)[:100])
                    if t <= 64:
                        try:
                            times["c+graphs"] = cuda_time([lambda g=graphs, x=x: first(g(x)).clone() for x in xs])
                        except Exception as exc:  # noqa: BLE001
                            print("   reduce-overhead failed:", str(exc)[:100])
                if vllm is not None:
                    runner = vllm.replayed if t <= 64 else vllm.run
                    vllm_err = rel(runner(x), ref)
                    times["vllm-style"] = cuda_time([lambda v=runner, x=x: v(x) for x in xs])
                    if vllm_err > 2e-2:
                        print(f"   vllm-style differs from HF by {vllm_err:.1e}")
                err = rel(first(cm(x)), ref)
                times["moecc"] = cuda_time([lambda c=cm, x=x: c(x) for x in xs])
                times["moecc torch"] = cuda_time([lambda c=cm_torch, x=x: c(x) for x in xs])
            base = [v for k, v in times.items() if k not in ("floor", "moecc", "moecc torch") and v == v]
            best = min(base)
            cells = [f"{times.get(c, float('nan')):13.3f}" for c in cols]
            print(f"{shape:10} {t:6d} " + " ".join(cells) +
                  f"  {best / times['moecc']:5.2f}x  {100 * times['floor'] / times['moecc']:5.0f}%  "
                  f"{100 * floor_sustained / times['moecc']:5.0f}%  {err:.1e}", flush=True)
            rows.append({"shape": shape, "T": t, **times, "floor sustained": floor_sustained, "err": err})
        block = cm = cm_torch = compiled = graphs = vllm = None
        torch.cuda.empty_cache()
    return rows


def bench_cpu(shapes, tokens):
    print(f"# cpu, torch {torch.__version__}, threads {torch.get_num_threads()}, fp32; times in ms")
    cols = ["hf eager", "hf grouped_mm", "moecc torch"]
    print(f"{'shape':14} {'T':>5} " + " ".join(f"{c:>13}" for c in cols) + "  x best HF")
    for shape in shapes:
        block, cfg = make_block(shape, "cpu", torch.float32)
        cm = moecc.compile(block, backend="torch", verify=False)
        for t in tokens:
            x = torch.randn(1, t, cfg.hidden_size)
            times = {}
            with torch.no_grad():
                for impl in ("eager", "grouped_mm"):
                    set_impl(block, impl)
                    times[f"hf {impl}"] = cpu_time(lambda b=block, x=x: b(x))
                cm(x)
                times["moecc torch"] = cpu_time(lambda c=cm, x=x: c(x))
            best = min(times["hf eager"], times["hf grouped_mm"])
            print(f"{shape:14} {t:5d} " + " ".join(f"{times[c]:13.3f}" for c in cols) +
                  f"  {best / times['moecc torch']:8.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+")
    ap.add_argument("--shapes", nargs="+")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="the layer's dtype on CUDA (the CPU table is fp32)")
    ap.add_argument("--copy-expert-weights", choices=["auto", "yes", "no"], default="auto",
                    help="moecc.compile's copy_expert_weights: auto (moecc's default: copy the block's expert "
                         "weights into the kernels' layout when the copies fit the memory budget), yes, no")
    a = ap.parse_args()
    if torch.cuda.is_available():
        rows = bench_cuda(a.shapes or ["mixtral", "qwen3_moe"], a.tokens or [1, 8, 64, 512, 4096, 16384],
                          not a.no_compile, {"auto": None, "yes": True, "no": False}[a.copy_expert_weights],
                          getattr(torch, a.dtype))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
    else:
        bench_cpu(a.shapes or ["mixtral_cpu", "qwen3_moe_cpu"], a.tokens or [1, 16, 128, 512])


if __name__ == "__main__":
    main()
