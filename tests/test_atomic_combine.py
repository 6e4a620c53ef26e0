"""GEMM 2 adding each weighted row into its token's fp32 row (``MOECC_TRITON_COMBINE=atomic``) instead of writing
pair rows for a combine launch: against the reference op on every GEMM 2 kernel (pointer and TMA in the
interpreter, the warp-specialized Gluon kernel compiled for sm_90 here and run on a Hopper GPU), with null experts,
pairs dropped by a capacity, biases, shared experts and k = 1; both GPU kernels' reductions compiled for sm_90."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hf_models import make_inputs, make_model

import moecc
from moecc import knobs
from moecc.experts import from_canonical
from moecc.routing import route_reference

triton = pytest.importorskip("triton")
from moecc.codegen.triton import moe as moe_module  # noqa: E402
from moecc.codegen.triton.moe import fused_moe_shared_triton, fused_moe_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # T, E, k, H, I, gated, activation, bias, capacity
    (40, 8, 2, 40, 24, True, "silu", False, -1),
    (33, 5, 3, 24, 20, True, "swiglu_oai", True, -1),
    (64, 16, 4, 24, 12, False, "gelu", True, -1),
    (50, 4, 2, 16, 8, True, "silu", False, 12),  # the capacity drops pairs: they add nothing
    (37, 6, 1, 24, 16, True, "silu", True, -1),  # k = 1: one row per token, nothing to sum
]


def _args(case, seed: int) -> list:
    t, e, k, h, inter, gated, act, bias, capacity = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    w, ids = route_reference(torch.randn(t, e, generator=g), None, k, "softmax", False, True, 1, 1, 1.0)
    ids[1, 0] = e  # a null expert
    u = 2 * inter if gated else inter
    w_up, w_down = torch.randn(e, u, h, generator=g) * 0.2, torch.randn(e, h, inter, generator=g) * 0.2
    b_up = torch.randn(e, u, generator=g) if bias else None
    b_down = torch.randn(e, h, generator=g) if bias else None
    return [x, w, ids, w_up, w_down, b_up, b_down, act, gated, 1.702, 7.0 if act == "swiglu_oai" else 0.0,
            capacity, 0.0, 0, 0, "token", "oi"]


def _on_device(args: list, dtype=torch.float32) -> list:
    return [a.to(DEVICE, dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and i != 1
            else a.to(DEVICE) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]


def _placed(args: list, layout: str) -> list:
    x, w, ids, w_up, w_down, b_up, b_down, act, gated, *tail, _ = args
    layout = layout if gated else "oi"
    up, down, bias_up = from_canonical(w_up, w_down, b_up, layout)
    return [x, w, ids, up, down, bias_up, b_down, act, gated, *tail, layout]


@pytest.fixture
def no_combine_launch(monkeypatch):
    """Atomic mode must not launch the pair-row combine."""
    def refuse(*a, **kw):
        raise AssertionError("the combine launch ran in atomic mode")

    monkeypatch.setattr(moe_module, "combine", refuse)
    monkeypatch.setenv("MOECC_TRITON_COMBINE", "atomic")
    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "0")  # the grouped kernels at every T


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tma,layout", [("off", "oi"), ("on", "oi_gu")])
def test_atomic_rows_sum_to_the_reference(case, tma, layout, no_combine_launch, monkeypatch):
    monkeypatch.setenv("MOECC_TRITON_TMA", tma)
    args = _args(case, case[0] + case[1])
    ref = torch.ops.moecc.fused_moe(*args)
    got = fused_moe_triton(*_on_device(_placed(args, layout))).cpu()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_atomic_rows_come_back_in_the_activations_dtype(no_combine_launch):
    args = _args(CASES[0], 3)
    ref = torch.ops.moecc.fused_moe(*args)
    got = fused_moe_triton(*_on_device(args, torch.float16))
    assert got.dtype == torch.float16
    assert ((got.float().cpu() - ref).norm() / ref.norm()).item() < 2e-2


def test_atomic_rows_of_shared_experts(no_combine_launch):
    """Shared experts folded into the grouped GEMM add their rows like routed ones."""
    g = torch.Generator().manual_seed(11)
    t, e, k, h, inter, m = 30, 8, 2, 24, 16, 2
    x = torch.randn(t, h, generator=g)
    w, ids = route_reference(torch.randn(t, e, generator=g), None, k, "softmax", False, True, 1, 1, 1.0)
    up, down = torch.randn(e, 2 * inter, h, generator=g) * 0.2, torch.randn(e, h, inter, generator=g) * 0.2
    s_up, s_down = torch.randn(m, 2 * inter, h, generator=g) * 0.2, torch.randn(m, h, inter, generator=g) * 0.2
    all_ids = torch.cat([ids, torch.arange(e, e + m).expand(t, m)], 1)
    all_w = torch.cat([w, torch.ones(t, m)], 1)
    ref = torch.ops.moecc.fused_moe(x, all_w, all_ids, torch.cat([up, s_up]), torch.cat([down, s_down]), None, None,
                                    "silu", True, 1.0, 0.0, -1, 0.0, 0, 0, "token", "oi")
    dev = [a.to(DEVICE) for a in (x, w, ids, up, down, s_up, s_down)]
    got = fused_moe_shared_triton(*dev[:5], "silu", True, 1.0, 0.0, dev[5], dev[6], None, "oi").cpu()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_an_unknown_combine_mode_is_refused(monkeypatch):
    monkeypatch.setenv("MOECC_TRITON_COMBINE", "sorted")
    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "0")
    with pytest.raises(ValueError, match="MOECC_TRITON_COMBINE must be pairs or atomic"):
        fused_moe_triton(*_on_device(_args(CASES[0], 1)))


def test_warp_specialized_gemm2_adds_its_rows_atomically():
    """The Gluon GEMM 2 compiles for sm_90 with the atomic epilogue (reductions in the accumulator's layout) within
    an H100's shared memory."""
    gluon_language = pytest.importorskip("triton.experimental.gluon.language")
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from moecc.codegen.triton import ws_gemm

    def desc(block):
        layout = gluon_language.NVMMASharedLayout.get_default_for(block, gluon_language.bfloat16)
        return f"tensordesc<bf16[{block[0]}, {block[1]}],{layout!r}>"

    sig = dict(h_desc=desc([128, 64]), w_desc=desc([256, 64]), ws_desc=desc([256, 64]), b_ptr="*bf16",
               out_ptr="*fp32", weights_ptr="*fp32", sorted_ptr="*i32", block_expert_ptr="*i32", total_ptr="*i32",
               n_pairs="i32", num_routed="i32", top_k="i32", N="i32", K="i32", stride_be="i32", stride_om="i32",
               ATOMIC="constexpr", HAS_BIAS="constexpr", HAS_SHARED="constexpr", STAGES="constexpr",
               GROUP="constexpr", num_warps="constexpr")
    constexprs = dict(ATOMIC=True, HAS_BIAS=True, HAS_SHARED=False, STAGES=ws_gemm.GEMM2_STAGES, GROUP=8,
                      num_warps=ws_gemm.CONSUMER_WARPS)
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("b_ptr", "out_ptr", "weights_ptr", "sorted_ptr")}
    src = GluonASTSource(ws_gemm._gemm2_ws_kernel, sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": ws_gemm.CONSUMER_WARPS})
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and ("red.global" in ptx or "atom.global" in ptx)
    assert kernel.metadata.shared <= 227 * 1024


_COMPILE_TMA_GEMM2 = textwrap.dedent("""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from moecc.codegen.triton import grouped_gemm

    bm, bn, warps, stages, atomic = map(int, sys.argv[1:])
    sig = dict(h_desc=f"tensordesc<bf16[{bm}, 64]>", w_desc=f"tensordesc<bf16[{bn}, 64]>",
               ws_desc=f"tensordesc<bf16[{bn}, 64]>", b_ptr="*bf16", out_ptr="*fp32" if atomic else "*bf16",
               weights_ptr="*fp32",
               sorted_ptr="*i32", block_expert_ptr="*i32", total_ptr="*i32", n_pairs="i32", num_routed="i32",
               top_k="i32", N="i32", K="i32", stride_be="i32", stride_om="i32", ATOMIC="constexpr",
               HAS_BIAS="constexpr", HAS_SHARED="constexpr", PRECISION="constexpr", BLOCK_M="constexpr",
               BLOCK_N="constexpr", BLOCK_K="constexpr", GROUP_M="constexpr")
    constexprs = dict(ATOMIC=bool(atomic), HAS_BIAS=True, HAS_SHARED=True, PRECISION="tf32", BLOCK_M=bm,
                      BLOCK_N=bn, BLOCK_K=64, GROUP_M=8)
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in ("out_ptr", "weights_ptr", "sorted_ptr", "N", "K", "stride_om")}
    kernel = triton.compile(ASTSource(grouped_gemm._gemm2_tma_kernel, sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = kernel.asm["ptx"]
    print(json.dumps(dict(v4="red.global.gpu.relaxed.add.v4.f32" in ptx, reds="red.global" in ptx,
                          stores="st.global" in ptx, shared=kernel.metadata.shared)))
""")


@pytest.mark.parametrize("atomic", [True, False])
@pytest.mark.parametrize("tile", [(64, 128, 4, 4), (64, 256, 8, 3), (128, 256, 8, 4)])  # m, n, warps, stages
def test_tma_gemm2_compiles_for_hopper_with_either_combine(tile, atomic):
    """The ``tl.dot`` TMA GEMM 2 (Qwen3-MoE's at every T) compiles for sm_90 within an H100's shared memory at the
    tiles the shipped configs use: adding its rows as ``red.global...add.v4.f32``, or storing pair rows. Compiled in
    a process of its own: the tests' interpreter (``TRITON_INTERPRET=1``) has no compiler."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(moecc.__file__).parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _COMPILE_TMA_GEMM2, *map(str, tile), str(int(atomic))],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["shared"] <= 227 * 1024
    assert (got["v4"], got["stores"]) == (True, False) if atomic else (got["reds"], got["stores"]) == (False, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ws", ["off", "on"])
@pytest.mark.parametrize("t", [257, 4096])
def test_atomic_rows_in_bf16_on_the_gpu(t, ws, monkeypatch):
    """bf16 on every GEMM 2 the GPU takes (``ws`` on: the Gluon kernel where the GPU is an sm_90): atomic mode against
    a float64 reference and against the pair rows' combine, which rounds each pair row to bf16 first."""
    monkeypatch.setenv("MOECC_TRITON_WS", ws)
    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "0")
    args = _args((t, 32, 4, 512, 384, True, "silu", False, -1), t)
    ref = torch.ops.moecc.fused_moe(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                      for a in args]).float()
    dev = _placed(_on_device(args, torch.bfloat16), "oi_gu")
    monkeypatch.setenv("MOECC_TRITON_COMBINE", "pairs")
    pairs = fused_moe_triton(*dev).float().cpu()
    monkeypatch.setenv("MOECC_TRITON_COMBINE", "atomic")
    atomic = fused_moe_triton(*dev).float().cpu()
    assert ((atomic - ref).norm() / ref.norm()).item() < 1e-2
    assert ((atomic - pairs).norm() / ref.norm()).item() < 1e-2
    assert knobs.TRITON_COMBINE.get() == "atomic"


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])  # many experts; shared experts folded in
def test_whole_model_with_atomic_rows(family, no_combine_launch):
    model = make_model(family).to(DEVICE)
    cm = moecc.compile(model, backend="triton")
    on_device = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in make_inputs(family, 2, 8).items()}
    cm(**on_device)
    assert all(layer.fused for layer in cm.moe_layers)
    fresh = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in make_inputs(family, 3, 5, 1).items()}
    ref, got = model(**fresh).logits, cm(**fresh).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
