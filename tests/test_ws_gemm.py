"""The warp-specialized Gluon GEMMs (``moecc/codegen/triton/ws_gemm.py``): they compile for sm_90 anywhere (CPU CI
included, with the ptxas that ships with Triton), and on a Hopper GPU they match the reference op."""

from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
gluon_language = pytest.importorskip("triton.experimental.gluon.language")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from moecc.activations import MORE_ACTIVATIONS, TRITON_IDS  # noqa: E402
from moecc.codegen.triton import ws_gemm  # noqa: E402
from moecc.codegen.triton.configs import TileConfig  # noqa: E402
from moecc.codegen.triton.moe import run_experts  # noqa: E402
from moecc.experts import from_canonical  # noqa: E402
from moecc.routing import route_reference  # noqa: E402

gl = gluon_language


def _desc(block, dtype):
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if dtype == "bf16" else gl.float16)
    return f"tensordesc<{dtype}[{block[0]}, {block[1]}],{layout!r}>"


def _compile(kernel, signature, constexprs, aligned):
    names = list(signature)
    # what the launcher's specialization tells the compiler about 16-byte aligned pointers and sizes
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = GluonASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": ws_gemm.CONSUMER_WARPS})


def _compiled_gemm1(gated, bias, shared, dtype, act, pdl=False):
    out_n = ws_gemm.TILE_B // 2 if gated else ws_gemm.TILE_B
    sig = dict(h_desc=_desc([128, out_n], dtype), w_desc=_desc([256, 64], dtype), ws_desc=_desc([256, 64], dtype),
               x_ptr=f"*{dtype}", b_ptr=f"*{dtype}", sorted_ptr="*i32", block_expert_ptr="*i32", total_ptr="*i32",
               n_pairs="i32", top_k="i32", num_routed="i32", N="i32", K="i32", stride_xm="i32", stride_be="i32",
               alpha="fp32", limit="fp32", GATED="constexpr", ACT="constexpr", HAS_BIAS="constexpr",
               CLAMP="constexpr", HAS_SHARED="constexpr", STAGES="constexpr", GROUP="constexpr", PDL="constexpr",
               num_warps="constexpr")
    constexprs = dict(GATED=gated, ACT=act, HAS_BIAS=bias, CLAMP=bias, HAS_SHARED=shared,
                      STAGES=ws_gemm.GEMM1_STAGES[gated], GROUP=8, PDL=pdl, num_warps=ws_gemm.CONSUMER_WARPS)
    return _compile(ws_gemm._gemm1_ws_kernel, sig, constexprs,
                    ("x_ptr", "b_ptr", "sorted_ptr", "block_expert_ptr", "total_ptr", "N", "K"))


@pytest.mark.parametrize("gated,bias,shared,dtype,act,pdl", [
    (True, False, False, "bf16", 0, True), (False, True, True, "fp16", 4, False), (True, True, True, "bf16", 4, False),
    (True, False, False, "bf16", 6, False)])  # act 6: the soft-capped swiglu
def test_gemm1_compiles_for_hopper(gated, bias, shared, dtype, act, pdl):
    kernel = _compiled_gemm1(gated, bias, shared, dtype, act, pdl)
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async" in ptx and "setmaxnreg" in ptx
    # a programmatic dependent launch waits for the kernel ahead and releases the next (dependent_launch)
    assert ("griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx) == pdl
    assert kernel.metadata.shared <= 227 * 1024  # an H100's shared memory per block


@pytest.mark.parametrize("act", MORE_ACTIVATIONS)
def test_gemm1_compiles_each_activation(act):
    assert "wgmma.mma_async" in _compiled_gemm1(True, False, False, "bf16", TRITON_IDS[act]).asm["ptx"]


@pytest.mark.parametrize("bias,shared,dtype,pdl", [(False, False, "bf16", False), (True, True, "fp16", True)])
def test_gemm2_compiles_for_hopper(bias, shared, dtype, pdl):
    sig = dict(h_desc=_desc([128, 64], dtype), w_desc=_desc([256, 64], dtype), ws_desc=_desc([256, 64], dtype),
               b_ptr=f"*{dtype}", out_ptr=f"*{dtype}", weights_ptr="*fp32", sorted_ptr="*i32",
               block_expert_ptr="*i32", total_ptr="*i32", n_pairs="i32", num_routed="i32", N="i32", K="i32",
               stride_be="i32", stride_om="i32", HAS_BIAS="constexpr", HAS_SHARED="constexpr", STAGES="constexpr",
               GROUP="constexpr", PDL="constexpr", num_warps="constexpr")
    constexprs = dict(HAS_BIAS=bias, HAS_SHARED=shared, STAGES=ws_gemm.GEMM2_STAGES, GROUP=16, PDL=pdl,
                      num_warps=ws_gemm.CONSUMER_WARPS)
    kernel = _compile(ws_gemm._gemm2_ws_kernel, sig, constexprs,
                      ("b_ptr", "out_ptr", "weights_ptr", "sorted_ptr", "block_expert_ptr", "total_ptr"))
    assert "wgmma.mma_async" in kernel.asm["ptx"] and kernel.metadata.shared <= 227 * 1024
    assert ("griddepcontrol.wait" in kernel.asm["ptx"]) == pdl


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
CASES = [  # T, E, k, H, I, gated, activation, bias, limit, shared experts, dtype
    (1000, 8, 2, 512, 1024, True, "silu", False, 0.0, 0, torch.bfloat16),
    (700, 64, 8, 256, 200, True, "silu", False, 0.0, 0, torch.bfloat16),  # I not a multiple of the tile
    (300, 5, 3, 192, 136, True, "swiglu_oai", True, 7.0, 0, torch.float16),
    (513, 16, 4, 320, 96, False, "gelu", True, 0.0, 0, torch.bfloat16),
    (1, 4, 2, 128, 64, True, "silu", False, 0.0, 0, torch.bfloat16),
    (400, 16, 2, 256, 128, True, "silu", False, 0.0, 2, torch.bfloat16),
    (300, 8, 2, 256, 128, False, "relu2", False, 0.0, 0, torch.bfloat16),
    (300, 8, 2, 256, 128, True, "swiglu_softcap", True, 3.0, 0, torch.bfloat16),  # caps 1.702 and 3.0
]


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_on_hopper(case, monkeypatch):
    t, e, k, h, inter, gated, act, bias, limit, n_shared, dtype = case
    monkeypatch.setenv("MOECC_TRITON_WS", "on")  # both GEMMs, also on these short K loops
    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "0")  # the grouped path also at T=1
    calls = []
    for name in ("gemm1", "gemm2"):
        fn = getattr(ws_gemm, name)
        monkeypatch.setattr(ws_gemm, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    g = torch.Generator().manual_seed(t + e)
    x = torch.randn(t, h, generator=g)
    w, ids = route_reference(torch.randn(t, e, generator=g), None, k, "softmax", False, True, 1, 1, 1.0)
    if t > 3:
        ids[1, 0] = e + n_shared  # null expert
    u = 2 * inter if gated else inter
    w_up, w_down = torch.randn(e, u, h, generator=g) * 0.1, torch.randn(e, h, inter, generator=g) * 0.1
    b_up = torch.randn(e, u, generator=g) if bias else None
    b_down = torch.randn(e, h, generator=g) if bias else None
    s_up = torch.randn(n_shared, u, h, generator=g) * 0.1
    s_down = torch.randn(n_shared, h, inter, generator=g) * 0.1
    all_ids = torch.cat([ids, torch.arange(e, e + n_shared).expand(t, n_shared)], 1)
    all_w = torch.cat([w, torch.full((t, n_shared), 0.5)], 1)
    tail = [act, gated, 1.702, limit, -1, 0.0, 0, 0, "token", "oi"]
    ref = torch.ops.moecc.fused_moe(x.double(), all_w, all_ids, torch.cat([w_up, s_up]).double(),
                                    torch.cat([w_down, s_down]).double(),
                                    None if b_up is None else torch.cat([b_up, torch.zeros(n_shared, u)]).double(),
                                    None if b_down is None else torch.cat([b_down, torch.zeros(n_shared, h)]).double(),
                                    *tail).float()
    layout = "oi_gu" if gated else "oi"

    def placed(wu, wd, bu):
        p = from_canonical(wu, wd, bu, layout)
        return [None if a is None else a.cuda().to(dtype).contiguous() for a in p]

    pu, pd, pb = placed(w_up, w_down, b_up)
    su, sd, _ = placed(s_up, s_down, None) if n_shared else (None, None, None)
    cfg = TileConfig(128, 128, 64, 8, 8, 3)
    got = run_experts(x.cuda().to(dtype), all_w.cuda().contiguous(), all_ids.cuda().contiguous(), pu, pd, pb,
                      None if b_down is None else b_down.cuda().to(dtype), act, gated, 1.702, limit, cfg, cfg,
                      su, sd, interleaved=gated).float().cpu()
    assert calls == ["gemm1", "gemm2"]
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
def test_experts_at_the_edges_of_row_blocks_match_the_reference_on_hopper(gated, bias, monkeypatch):
    """Experts of 1, 63, 64, 65, 127, 128, 129 and 192 pairs and one of none (k=1): last row blocks with one pair,
    with half their rows, full, and one row past full."""
    monkeypatch.setenv("MOECC_TRITON_WS", "on")
    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "0")
    counts = [1, 63, 64, 65, 0, 127, 128, 129, 192]
    e, h, inter = len(counts), 256, 192
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])[torch.randperm(sum(counts), generator=g)]
    ids = ids[:, None]
    t = ids.shape[0]
    x = torch.randn(t, h, generator=g)
    w = torch.rand(t, 1, generator=g) + 0.5
    u = 2 * inter if gated else inter
    w_up, w_down = torch.randn(e, u, h, generator=g) * 0.1, torch.randn(e, h, inter, generator=g) * 0.1
    b_up = torch.randn(e, u, generator=g) if bias else None
    b_down = torch.randn(e, h, generator=g) if bias else None
    act = "silu" if gated else "gelu"
    ref = torch.ops.moecc.fused_moe(x.double(), w, ids, w_up.double(), w_down.double(),
                                    None if b_up is None else b_up.double(),
                                    None if b_down is None else b_down.double(),
                                    act, gated, 1.702, 0.0, -1, 0.0, 0, 0, "token", "oi").float()
    layout = "oi_gu" if gated else "oi"
    pu, pd, pb = (None if a is None else a.cuda().to(torch.bfloat16).contiguous()
                  for a in from_canonical(w_up, w_down, b_up, layout))
    cfg = TileConfig(128, 128, 64, 8, 8, 3)
    got = run_experts(x.cuda().bfloat16(), w.cuda(), ids.cuda(), pu, pd, pb,
                      None if b_down is None else b_down.cuda().bfloat16(), act, gated, 1.702, 0.0, cfg, cfg,
                      interleaved=gated).float().cpu()
    for i in range(e):  # each expert's rows on their own: a wrong half tile shows at its expert
        rows = ids[:, 0] == i
        if rows.any():
            assert ((got[rows] - ref[rows]).norm() / ref[rows].norm()).item() < 2e-2, (i, counts[i])


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_knob_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("MOECC_TRITON_WS", "off")
    for name in ("gemm1", "gemm2"):
        monkeypatch.setattr(ws_gemm, name, lambda *a, **kw: pytest.fail("warp-specialized kernel ran"))
    t, e, k, h, inter = 300, 4, 2, 128, 64
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w, ids = route_reference(torch.randn(t, e, device="cuda"), None, k, "softmax", False, True, 1, 1, 1.0)
    w_up = torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16)
    w_down = torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16)
    cfg = TileConfig(128, 128, 64, 8, 8, 3)
    run_experts(x, w, ids, w_up, w_down, None, None, "silu", True, 1.0, 0.0, cfg, cfg, interleaved=True)


def test_auto_takes_long_loops_and_gemm1_from_a_tile_of_rows_per_expert(monkeypatch):
    from moecc.codegen.triton import grouped_gemm

    monkeypatch.setenv("MOECC_TRITON_WS", "auto")
    monkeypatch.setattr(grouped_gemm, "INTERPRET", False)
    monkeypatch.setattr(ws_gemm, "usable", lambda *a, **kw: True)  # as if on an sm_90 GPU
    x = SimpleNamespace(is_cuda=True)
    cfg = TileConfig(128, 128, 64, 8, 8, 3)
    assert grouped_gemm._warp_specialized(cfg, 2, 14336, x)
    assert not grouped_gemm._warp_specialized(cfg, 2, 768, x)
    assert grouped_gemm._warp_specialized(cfg, 1, 4096, x, rows_per_expert=1024)
    assert grouped_gemm._warp_specialized(cfg, 1, 4096, x, rows_per_expert=128)  # Mixtral at T=512
    assert not grouped_gemm._warp_specialized(cfg, 1, 4096, x, rows_per_expert=64)  # Mixtral at T=256
    assert grouped_gemm._warp_specialized(cfg, 1, 2048, x, rows_per_expert=1024)  # Qwen3-30B-A3B at T=16384
    monkeypatch.setenv("MOECC_TRITON_WS_GEMM1_MIN_ROWS", "512")
    assert not grouped_gemm._warp_specialized(cfg, 1, 4096, x, rows_per_expert=128)
    monkeypatch.delenv("MOECC_TRITON_WS_GEMM1_MIN_ROWS")
    assert not grouped_gemm._warp_specialized(TileConfig(64, 128, 64), 2, 14336, x)
    monkeypatch.setenv("MOECC_TRITON_WS", "on")
    assert grouped_gemm._warp_specialized(cfg, 1, 4096, x, rows_per_expert=128)
    monkeypatch.setenv("MOECC_TRITON_WS", "sometimes")
    with pytest.raises(ValueError, match="MOECC_TRITON_WS"):
        grouped_gemm._warp_specialized(cfg, 1, 4096, x)
