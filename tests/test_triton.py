"""Triton kernels against the reference ops (interpreter on CPU: fp32/fp16, its bf16 dot is broken)."""

import itertools

import pytest
import torch
from hf_models import make_inputs, make_model

import moecc
from moecc.experts import from_canonical
from moecc.routing import route_reference

triton = pytest.importorskip("triton")
import moecc.codegen.triton.align as align_module  # noqa: E402
import moecc.codegen.triton.gating as gating_module  # noqa: E402
from moecc.codegen.triton.align import align  # noqa: E402
from moecc.codegen.triton.gating import gating  # noqa: E402
from moecc.codegen.triton.moe import fused_moe_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUTINGS = [  # score, topk_first, renorm, n_group, topk_group, selection bias, scale
    ("softmax", False, True, 1, 1, False, 1.0), ("softmax", False, False, 1, 1, False, 1.0),
    ("softmax", True, False, 1, 1, False, 1.0), ("sigmoid", False, True, 4, 2, True, 2.5),
    ("sigmoid", False, False, 1, 1, True, 1.0), ("sqrtsoftplus", False, True, 1, 1, True, 1.5),
    ("sqrtsoftplus", True, False, 1, 1, False, 1.0), ("sigmoid", True, True, 1, 1, True, 1.0),
    ("softmax", True, False, 1, 1, True, 1.0)]


def _check_gating(t, e, k, routing):
    score, topk_first, renorm, n_group, topk_group, with_bias, scale = routing
    if e % n_group or (n_group > 1 and e < 4):
        n_group, topk_group = 1, 1
    g = torch.Generator().manual_seed(t * 131 + e)
    logits = torch.randn(t, e, generator=g).to(DEVICE)
    bias = (torch.randn(e, generator=g) * 0.1).to(DEVICE) if with_bias else None
    k = min(k, e)
    rw, ri = route_reference(logits, bias, k, score, topk_first, renorm, n_group, topk_group, scale)
    gw, gi = gating(logits, bias, k, score, topk_first, renorm, n_group, topk_group, scale)
    order_r, order_g = ri.argsort(-1), gi.argsort(-1)
    assert torch.equal(ri.gather(1, order_r), gi.gather(1, order_g))
    torch.testing.assert_close(gw.gather(1, order_g), rw.gather(1, order_r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t,e,k,routing", [(t, e, k, r) for (t, e, k), r in itertools.product(
    [(0, 8, 2), (1, 3, 1), (7, 8, 2), (300, 64, 8), (7, 64, 8), (300, 3, 2)], ROUTINGS)])
def test_gating_matches_route(t, e, k, routing):
    _check_gating(t, e, k, routing)


@pytest.mark.parametrize("t,tiles", [(0, False), (1, False), (7, False), (300, False), (300, True)])
@pytest.mark.parametrize("fused", [False, True])
def test_gating_applies_each_experts_scale(t, tiles, fused, monkeypatch):
    """A per-expert scale of the chosen weights (Gemma 4's), in the gating kernel and in the fused GEMV one; with
    ``tiles`` several tokens a program."""
    from moecc.codegen.triton.gating import fused_gating

    if tiles:
        monkeypatch.setattr(gating_module, "MIN_PROGRAMS", 4)
    g = torch.Generator().manual_seed(t + 5)
    e, h, k = 12, 40, 3
    x, w = torch.randn(t, h, generator=g).to(DEVICE), torch.randn(e, h, generator=g).to(DEVICE)
    sel = (torch.randn(e, generator=g) * 0.1).to(DEVICE)
    per_expert = (torch.rand(e, generator=g) + 0.5).to(DEVICE)
    rw, ri = torch.ops.moecc.fused_route(x, w, None, sel, k, "sigmoid", False, True, 1, 1, 2.5, True, 2, per_expert)
    if fused:
        gw, gi = fused_gating(x, w, None, sel, k, "sigmoid", False, True, 1, 1, 2.5, expert_scale=per_expert)
    else:
        gw, gi = gating(x @ w.t(), sel, k, "sigmoid", False, True, 1, 1, 2.5, expert_scale=per_expert)
    order_r, order_g = ri.argsort(-1), gi.argsort(-1)
    assert torch.equal(ri.gather(1, order_r), gi.gather(1, order_g))
    torch.testing.assert_close(gw.gather(1, order_g), rw.gather(1, order_r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_top,with_bias", [(1, False), (1, True), (2, False)])
@pytest.mark.parametrize("fused", [False, True])
def test_groups_scored_by_their_best_one_or_two_choices(group_top, with_bias, fused):
    """DeepSeek-V2's group_limited_greedy keeps the groups of the best single scores, DeepSeek-V3 the groups of
    the best two summed; either with or without a selection bias."""
    from moecc.codegen.triton.gating import fused_gating

    g = torch.Generator().manual_seed(group_top + 2 * with_bias)
    t, e, h = 37, 32, 24
    x, w = torch.randn(t, h, generator=g).to(DEVICE), torch.randn(e, h, generator=g).to(DEVICE)
    bias = (torch.randn(e, generator=g) * 0.1).to(DEVICE) if with_bias else None
    rw, ri = route_reference(x @ w.t(), bias, 4, "softmax", False, False, 8, 3, 2.0, group_top)
    if fused:
        gw, gi = fused_gating(x, w, None, bias, 4, "softmax", False, False, 8, 3, 2.0, group_top=group_top)
    else:
        gw, gi = gating(x @ w.t(), bias, 4, "softmax", False, False, 8, 3, 2.0, group_top)
    order_r, order_g = ri.argsort(-1), gi.argsort(-1)
    assert torch.equal(ri.gather(1, order_r), gi.gather(1, order_g))
    torch.testing.assert_close(gw.gather(1, order_g), rw.gather(1, order_r), rtol=1e-5, atol=1e-6)
    other, _ = route_reference(x @ w.t(), bias, 4, "softmax", False, False, 8, 3, 2.0, 3 - group_top)
    assert not torch.equal(other, rw)  # the two group scores choose differently on these tokens


@pytest.mark.parametrize("topk_first", [False, True])
def test_sqrtsoftplus_scores_keep_their_precision_far_from_zero(topk_first):
    """Logits of -30 to 30: softplus through log(1 + exp(v)) would give 0 below about -17 in fp32."""
    logits = torch.linspace(-30, 30, 8 * 16).reshape(16, 8)[:, torch.randperm(8)].contiguous().to(DEVICE)
    logits[:, :3] -= 40  # every token also chooses among scores of 1e-9 .. 1e-13
    rw, ri = route_reference(logits, None, 6, "sqrtsoftplus", topk_first, False, 1, 1, 1.0)
    gw, gi = gating(logits, None, 6, "sqrtsoftplus", topk_first, False, 1, 1, 1.0)
    order_r, order_g = ri.argsort(-1), gi.argsort(-1)
    assert torch.equal(ri.gather(1, order_r), gi.gather(1, order_g))
    torch.testing.assert_close(gw.gather(1, order_g), rw.gather(1, order_r), rtol=1e-5, atol=0)


@pytest.mark.parametrize("t,e,k,routing", [(t, e, k, r) for (t, e, k), r in itertools.product(
    [(300, 64, 8), (37, 8, 2), (300, 3, 2)], ROUTINGS)])
def test_gating_selects_for_tiles_of_tokens(t, e, k, routing, monkeypatch):
    """Past ``MIN_PROGRAMS`` tokens a program selects for a tile of them (here from 4 tokens on: tiles of 32, 16
    and 128 tokens, the last one partial)."""
    monkeypatch.setattr(gating_module, "MIN_PROGRAMS", 4)
    assert gating_module.tokens_per_program(t, e) > 1
    _check_gating(t, e, k, routing)


@pytest.mark.parametrize("placement", ["scan", "rank"])
@pytest.mark.parametrize("t,e,k", [(0, 8, 2), (1, 3, 1), (7, 8, 2), (300, 64, 8), (300, 3, 2), (2900, 8, 2),
                                   (300, 128, 8), (700, 256, 8)])
def test_align_sorts_and_pads(t, e, k, placement, monkeypatch):
    monkeypatch.setattr(align_module, "RANK_FROM", 0 if placement == "rank" else 1 << 62)
    monkeypatch.setattr(align_module, "RANK_BINS_OFF", 0)
    # 2900*2 pairs: scan units of two chunks, rank units of 12 steps; the last one short either way
    monkeypatch.setattr(align_module, "MAX_SCAN_UNITS", 4)
    monkeypatch.setattr(align_module, "MAX_RANK_UNITS", 4)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]) if t else torch.empty(0, k, dtype=torch.long)
    if t > 2:
        ids[0, 0] = e  # a null expert does no compute
        ids[1, 0] = -1  # nor does any id outside [0, E)
    block_m = 16
    sorted_ids, block_expert, total = align(ids.to(DEVICE), e, block_m)
    sorted_ids, block_expert, total = sorted_ids.cpu(), block_expert.cpu(), int(total.item())
    flat = ids.reshape(-1)
    counts = torch.bincount(flat[(flat >= 0) & (flat < e)], minlength=e)
    padded = (counts + block_m - 1) // block_m * block_m
    assert total == int(padded.sum())
    start = 0
    for expert in range(e):
        rows = sorted_ids[start:start + int(padded[expert])]
        real = rows[rows < t * k]
        assert torch.equal(real, torch.nonzero(flat == expert).flatten().to(real.dtype))
        assert (block_expert[start // block_m:(start + int(padded[expert])) // block_m] == expert).all()
        start += int(padded[expert])


CASES = [  # T, E, k, H, I, gated, activation, bias, limit
    (0, 8, 2, 40, 24, True, "silu", False, 0.0), (1, 3, 1, 20, 12, False, "gelu", True, 0.0),
    (7, 8, 2, 40, 24, True, "silu", False, 0.0), (7, 64, 8, 24, 20, True, "silu", False, 0.0),
    (300, 3, 2, 36, 28, True, "gelu_tanh", False, 0.0), (33, 5, 3, 24, 20, True, "swiglu_oai", True, 7.0),
    (300, 64, 8, 24, 12, False, "relu", True, 0.0), (21, 8, 2, 24, 20, False, "relu2", False, 0.0),
    (29, 6, 2, 24, 20, True, "swiglu_softcap", True, 3.0)]  # caps 1.702 (gate) and 3.0 (up)


def _moe_args(case, seed: int, null_from: int = 3) -> list:
    """``moecc::fused_moe`` arguments for a case of ``CASES`` (``oi`` layout); from ``null_from`` tokens on, the
    second token's first slot is a null expert."""
    t, e, k, h, inter, gated, act, bias, limit = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    w, ids = route_reference(torch.randn(t, e, generator=g), None, k, "softmax", False, True, 1, 1, 1.0)
    if t > null_from:
        ids[1, 0] = e
    u = 2 * inter if gated else inter
    w_up, w_down = torch.randn(e, u, h, generator=g) * 0.2, torch.randn(e, h, inter, generator=g) * 0.2
    b_up = torch.randn(e, u, generator=g) if bias else None
    b_down = torch.randn(e, h, generator=g) if bias else None
    return [x, w, ids, w_up, w_down, b_up, b_down, act, gated, 1.702, limit, -1, 0.0, 0, 0, "token", "oi"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_matches_reference(case, dtype, monkeypatch):
    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "0")  # the grouped kernels at every T
    t = case[0]
    args = _moe_args(case, case[0] + case[1])
    ref = torch.ops.moecc.fused_moe(*args)
    dev = [a.to(DEVICE, dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and i != 1 else
           a.to(DEVICE) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    got = fused_moe_triton(*dev).float().cpu()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if t:
        assert ((got - ref).norm() / ref.norm()).item() < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp32 takes three TF32 products on CUDA only")
@pytest.mark.parametrize("tma", ["off", "on"])
def test_fp32_on_the_gpu_keeps_fp32_accuracy(tma, monkeypatch):
    """fp32 dots as three TF32 products stay as close to a float64 reference as fp32 arithmetic (one TF32 product
    would be about 1e-3 off)."""
    monkeypatch.setenv("MOECC_TRITON_TMA", tma)
    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "0")
    args = _moe_args((300, 8, 2, 256, 192, True, "silu", True, 0.0), 7)
    ref = torch.ops.moecc.fused_moe(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                      for a in args])
    got = fused_moe_triton(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args]).double().cpu()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[5], CASES[6]])
@pytest.mark.parametrize("tma,layout", [("off", "oi_gu"), ("on", "oi_gu"), ("on", "oi")])
def test_interleaved_layout_and_tma_kernels(case, tma, layout, monkeypatch):
    """The oi_gu layout (one gate+up tile in GEMM 1) on the pointer kernels, and the TMA kernels that the GPU
    takes for large row blocks (forced on in the interpreter) on both layouts."""
    monkeypatch.setenv("MOECC_TRITON_TMA", tma)
    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "0")
    _check_layout(_moe_args(case, case[0] + case[1] + 1, null_from=0), layout)


def _check_layout(args: list, layout: str, dtype=torch.float32) -> None:
    """fused_moe_triton on the weights of ``args`` placed in ``layout`` (``oi`` for ungated) against the
    reference; the tensors but the routing weights in ``dtype``."""
    ref = torch.ops.moecc.fused_moe(*args)
    x, w, ids, w_up, w_down, b_up, b_down, act, gated, *tail, _ = args
    layout = layout if gated else "oi"
    placed = from_canonical(w_up, w_down, b_up, layout)
    args = [x, w, ids, placed[0], placed[1], placed[2], b_down, act, gated, *tail, layout]
    got = fused_moe_triton(*[a.to(DEVICE, dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and i != 1
                             else a.to(DEVICE) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((got.float().cpu() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("tma", ["off", "on"])
def test_groups_of_row_blocks_cover_every_tile(tma, monkeypatch):
    """Groups of 3 row blocks share each weight tile, whatever their experts (the expert most tokens pick spans
    several groups, an expert without rows none, the last group is short): every tile is computed once."""
    from moecc.codegen.triton import moe as moe_module
    from moecc.codegen.triton.configs import TileConfig

    monkeypatch.setenv("MOECC_TRITON_TMA", tma)
    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "0")
    monkeypatch.setattr(moe_module, "pick_configs", lambda *a: (TileConfig(16, 32, 32, 3, 1, 1),) * 2)
    t, e, k = 150, 8, 2
    args = _moe_args((t, e, k, 40, 24, True, "silu", False, 0.0), 5)
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(t, e, generator=g)
    logits[:, 0] += 4.0  # about ten blocks of 16 rows
    logits[:, 5] -= 20.0  # an expert with no rows
    args[1], args[2] = route_reference(logits, None, k, "softmax", False, True, 1, 1, 1.0)
    _check_layout(args, "oi_gu")


def test_gemm1_stores_zeros_in_padding_rows(monkeypatch):
    """GEMM 1's TMA kernel reads zeros for padding rows and stores them, so both GEMMs multiply zero rows there:
    at large T on an H100, where the power limit sets the clock, that was 2-7 % faster than multiplying copies of
    token 0 (benchmarks/RESULTS.md, session 14)."""
    from moecc.codegen.triton.configs import TileConfig
    from moecc.codegen.triton.grouped_gemm import gemm1

    monkeypatch.setenv("MOECC_TRITON_TMA", "on")
    t, e, k, hidden, inter = 20, 4, 2, 32, 24
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(t, hidden, generator=g) + 3.0).to(DEVICE)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEVICE)
    w_up = torch.randn(e, 2 * inter, hidden, generator=g).to(DEVICE)
    aligned = align(ids, e, 16)
    h = gemm1(x, w_up, w_up, None, aligned, t * k, k, True, "silu", 1.0, 0.0, TileConfig(16, 32, 32, 1, 1, 1))
    total = int(aligned[2].item())
    padding = (aligned[0][:total] >= t * k).cpu()
    rows = h[:total].cpu()
    assert padding.any() and (rows[padding] == 0).all() and (rows[~padding] != 0).any(1).all()


DECODE_CASES = [c for c in CASES if 0 < c[0] <= 33] + [(4, 64, 8, 40, 24, True, "silu", True, 0.0)]


@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("layout,dtype", [("oi", torch.float32), ("oi_gu", torch.float32), ("oi_gu", torch.float16)])
def test_decode_gemvs_match_reference(case, layout, dtype, monkeypatch):
    """The pair-wise GEMVs that take few tokens (``decode``), here up to 33: null experts, biases, the clamp,
    every activation, both layouts, column counts that are no multiple of the blocks."""
    from moecc.codegen.triton import decode

    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "64")
    monkeypatch.setattr(decode, "MAX_REREADS", float("inf"))  # also where the pairs share experts
    assert decode.use_decode(case[0], case[2], case[1])
    _check_layout(_moe_args(case, case[0] * 7 + case[1], null_from=1), layout, dtype)


def _strided(t: torch.Tensor | None) -> torch.Tensor | None:
    """The same values as a non-contiguous view: the last two dims stored transposed (an einsum's ``[E, in, out]``
    weights read as ``oi``), a bias stored ``[N, E]``."""
    return None if t is None else t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("tokens", [1, 2, 7, 300])
@pytest.mark.parametrize("case", [(8, 2, 40, 24, True, "silu", True, 0.0), (6, 2, 24, 40, False, "gelu", False, 0.0)])
def test_experts_read_weights_that_are_views(tokens, case, monkeypatch):
    """Weights and biases that are non-contiguous views give the reference's numbers on every path: the
    pair-wise GEMVs (one token read its weights with stride one along K, and an einsum-written block whose weights
    were transposed views was wrong there) and the grouped kernels."""
    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "4")
    args = _moe_args((tokens, *case), tokens + 11, null_from=1)
    ref = torch.ops.moecc.fused_moe(*args)
    args[3:7] = [_strided(a) for a in args[3:7]]
    assert not args[3].is_contiguous() and not args[4].is_contiguous()
    got = fused_moe_triton(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args])
    assert ((got.cpu() - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("tokens", [1, 9])
def test_shared_experts_beside_routed_weights_that_are_views(tokens):
    """Routed weights that are views and shared experts that are contiguous: one set of strides addresses both
    in the kernels, so they are made contiguous together."""
    from moecc.codegen.triton.moe import fused_moe_shared_triton

    g = torch.Generator().manual_seed(tokens)
    t, e, k, h, inter, m = tokens, 6, 2, 24, 16, 2
    x = torch.randn(t, h, generator=g)
    w, ids = route_reference(torch.randn(t, e, generator=g), None, k, "softmax", False, True, 1, 1, 1.0)
    up, down, s_up, s_down = (torch.randn(*shape, generator=g) * 0.2 for shape in
                              ((e, 2 * inter, h), (e, h, inter), (m, 2 * inter, h), (m, h, inter)))
    all_ids = torch.cat([ids, torch.arange(e, e + m).expand(t, m)], 1)
    all_w = torch.cat([w, torch.ones(t, m)], 1)
    ref = torch.ops.moecc.fused_moe(x, all_w, all_ids, torch.cat([up, s_up]), torch.cat([down, s_down]), None, None,
                                    "silu", True, 1.0, 0.0, -1, 0.0, 0, 0, "token", "oi")
    got = fused_moe_shared_triton(*(a.to(DEVICE) for a in (x, w, ids, _strided(up), _strided(down))), "silu", True,
                                  1.0, 0.0, s_up.to(DEVICE), s_down.to(DEVICE), None, "oi")
    assert ((got.cpu() - ref).norm() / ref.norm()).item() < 1e-4


def test_decode_is_the_default_for_few_tokens(monkeypatch):
    from moecc.codegen.triton import decode

    assert decode.use_decode(1) and not decode.use_decode(0) and not decode.use_decode(512)
    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "0")
    assert not decode.use_decode(1)


@pytest.mark.parametrize("tokens,top_k,routed,shared,gemvs", [
    (1, 2, 8, 0, True), (1, 4, 60, 4, True),  # one token: no expert is read twice
    (4, 8, 128, 0, True), (2, 8, 64, 0, True),  # many experts, few pairs: few read twice
    (3, 2, 8, 0, False), (4, 4, 32, 0, False), (3, 8, 64, 0, False),  # few experts: many pairs read one twice
    (2, 4, 60, 4, False),  # shared experts: every token reads them
])
def test_decode_takes_few_tokens_whose_pairs_share_few_experts(tokens, top_k, routed, shared, gemvs):
    """The GEMVs read an expert once per pair; the grouped kernels once per expert (``MAX_REREADS``)."""
    from moecc.codegen.triton import decode

    assert decode.use_decode(tokens, top_k, routed, shared) == gemvs
    assert decode.expected_rereads(1, top_k, routed, shared) == pytest.approx(1.0)


@pytest.mark.parametrize("k,step", [(768, 256), (2048, 512), (1408, 512), (640, 128), (2880, 1024), (4096, 2048),
                                    (14336, 2048)])
def test_decode_k_step_is_long_and_masks_little(k, step):
    """The GEMVs' K step: as long as allowed (512 up to K = 2048, else 2048) unless its last step would be mostly
    masked (Qwen3's 768 in steps of 256: 40.4 against 45.0 us for GEMV 2 in steps of 512 on an H100)."""
    from moecc.codegen.triton.decode import _blocks, _k_step

    assert _k_step(k) == step
    assert -k % step * 8 <= k
    assert _blocks(8, k, 4096)[1] == step


def test_capacity_mode():
    g = torch.Generator().manual_seed(3)
    t, e, k, h, inter = 12, 4, 2, 16, 8
    x = torch.randn(t, h, generator=g)
    w, ids = route_reference(torch.randn(t, e, generator=g), None, k, "softmax", False, True, 1, 1, 1.0)
    w_up, w_down = torch.randn(e, 2 * inter, h, generator=g), torch.randn(e, h, inter, generator=g)
    for capacity, cf, group, priority in ((2, 0.0, 0, "token"), (-1, 1.0, 6, "slot")):
        args = [x, w, ids, w_up, w_down, None, None, "silu", True, 1.0, 0.0, capacity, cf, 0, group, priority, "oi"]
        ref = torch.ops.moecc.fused_moe(*args)
        got = fused_moe_triton(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]).cpu()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "deepseek_v2", "gpt_oss", "cohere2_moe", "afmoe",
                                    "dbrx", "llama4_text"])
def test_whole_model_on_triton_backend(family):
    model = make_model(family).to(DEVICE)
    cm = moecc.compile(model, backend="triton")
    cm(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in make_inputs(family, 2, 8).items()})
    assert all(layer.fused for layer in cm.moe_layers)
    fresh = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in make_inputs(family, 3, 5, 1).items()}
    ref, got = model(**fresh).logits, cm(**fresh).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_model_weights_are_copied_only_when_allowed_and_cheap(monkeypatch):
    """HF Mixtral's stacked experts are the canonical weights themselves: the interleaved layout is a second copy
    of them. By default it is made only when it takes at most a quarter of the free memory."""
    import moecc.passes.place_experts as place

    model = make_model("mixtral").to(DEVICE)
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in make_inputs("mixtral", 2, 8).items()}
    ref = model(**inputs).logits
    free = place._free_bytes
    for copy, free_bytes, layout in ((False, None, "oi"), (True, 0, "oi_gu"), (None, None, "oi_gu"), (None, 1, "oi")):
        monkeypatch.setattr(place, "_free_bytes", free if free_bytes is None else lambda device, b=free_bytes: b)
        cm = moecc.compile(model, backend="triton", copy_expert_weights=copy, verify=False)  # compared below
        got = cm(**inputs).logits
        assert {layer.placement["layout"] for layer in cm.moe_layers} == {layout}
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [257, 3])  # the grouped kernels, the decode GEMVs
def test_bf16_on_gpu(t):
    g = torch.Generator().manual_seed(0)
    e, k, h, inter = 16, 4, 512, 384
    x = torch.randn(t, h, generator=g)
    w, ids = route_reference(torch.randn(t, e, generator=g), None, k, "softmax", False, True, 1, 1, 1.0)
    w_up, w_down = torch.randn(e, 2 * inter, h, generator=g) * 0.05, torch.randn(e, h, inter, generator=g) * 0.05
    args = [x, w, ids, w_up, w_down, None, None, "silu", True, 1.0, 0.0, -1, 0.0, 0, 0, "token", "oi"]
    ref = torch.ops.moecc.fused_moe(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                      for a in args]).float()
    dev = [a.cuda().bfloat16() if isinstance(a, torch.Tensor) and a.is_floating_point() and i != 1 else
           a.cuda() if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    got = fused_moe_triton(*dev).float().cpu()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs sm_90")
@pytest.mark.parametrize("t,e,k,ws", [
    (2, 64, 8, "auto"),  # decode: gating -> GEMV 1 -> GEMV 2
    (48, 64, 8, "auto"),  # prefill on small row blocks (pointer kernels)
    (1024, 64, 8, "off"),  # prefill on the TMA kernels
    (2048, 8, 2, "on"),  # prefill on the warp-specialized Gluon kernels
])
def test_dependent_launches_match_plain_launches(t, e, k, ws, monkeypatch):
    """The kernels after gating as programmatic dependent launches (decode: GEMV 2 reads its ids, routing weights
    and first weight step before it waits; prefill: align, both GEMMs and the combine wait first thing): eagerly
    and replayed from a CUDA graph on fresh inputs, the plain launches' bits."""
    from moecc.codegen.triton import dependent_launch
    from moecc.codegen.triton.gating import gating
    from moecc.codegen.triton.moe import fused_moe_triton

    monkeypatch.setenv("MOECC_AUTOTUNE", "0")
    monkeypatch.setenv("MOECC_TRITON_WS", ws)
    g = torch.Generator(device="cuda").manual_seed(0)
    h, inter = 1024, 768
    w_up = torch.randn(e, 2 * inter, h, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    w_down = torch.randn(e, h, inter, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    x = torch.empty(t, h, device="cuda", dtype=torch.bfloat16)
    logits = torch.empty(t, e, device="cuda")

    def fresh_inputs():
        x.copy_(torch.randn(t, h, device="cuda", generator=g))
        logits.copy_(torch.randn(t, e, device="cuda", generator=g))

    def run():
        w, ids = gating(logits, None, k, "softmax", False, True, 1, 1, 1.0)
        return fused_moe_triton(x, w, ids, w_up, w_down, None, None, "silu", True, 1.0, 0.0, -1, 0.0, 0, 0,
                                "token", "oi_gu")

    def plain():
        monkeypatch.setenv("MOECC_TRITON_PDL", "0")
        try:
            return run().clone()
        finally:
            monkeypatch.setenv("MOECC_TRITON_PDL", "1")

    monkeypatch.setenv("MOECC_TRITON_PDL", "1")
    assert dependent_launch.enabled(x)
    fresh_inputs()
    assert torch.equal(run(), plain())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # allocations and compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(3):
        fresh_inputs()
        graph.replay()
        assert torch.equal(out, plain())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (8.5 minutes in the interpreter)")
def test_64k_tokens_on_gpu():
    """The largest token count the issue names, on the large-tile (TMA on Hopper) kernels, in bf16."""
    g = torch.Generator().manual_seed(2)
    t, e, k, h, inter = 65536, 8, 2, 1024, 512
    x = torch.randn(t, h, generator=g).cuda()
    w, ids = route_reference(torch.randn(t, e, generator=g).cuda(), None, k, "softmax", False, True, 1, 1, 1.0)
    w_up = torch.randn(e, 2 * inter, h, generator=g).cuda() * 0.05
    w_down = torch.randn(e, h, inter, generator=g).cuda() * 0.05
    tail = [None, None, "silu", True, 1.0, 0.0, -1, 0.0, 0, 0, "token"]
    ref = torch.ops.moecc.fused_moe_torch(x, w, ids, w_up, w_down, *tail, "oi")
    placed = from_canonical(w_up.bfloat16(), w_down.bfloat16(), None, "oi_gu")
    got = fused_moe_triton(x.bfloat16(), w, ids, placed[0], placed[1], *tail, "oi_gu").float()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2


def test_shared_chunks_sum_to_the_shared_ffn():
    from moecc.codegen.triton.fold_shared import chunk_shared

    g = torch.Generator().manual_seed(5)
    h, i_s, inter = 16, 40, 12  # 40 is not a multiple of 12: the last chunk is zero-padded
    x = torch.randn(9, h, generator=g)
    s_up, s_down = torch.randn(1, 2 * i_s, h, generator=g), torch.randn(1, h, i_s, generator=g)
    ref = torch.ops.moecc.shared_ffn(x, s_up, s_down, None, None, None, "silu", True, 1.0, 0.0)
    up, down = chunk_shared(s_up, s_down, inter, True)
    assert up.shape == (4, 2 * inter, h) and down.shape == (4, h, inter)
    got = sum(torch.ops.moecc.shared_ffn(x, up[j:j + 1], down[j:j + 1], None, None, None, "silu", True, 1.0, 0.0)
              for j in range(4))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,tma", [("qwen2_moe", "auto"), ("deepseek_v3", "auto"), ("deepseek_v3", "on")])
def test_shared_experts_fold_into_the_grouped_gemm(family, tma, monkeypatch):
    monkeypatch.setenv("MOECC_TRITON_TMA", tma)
    model = make_model(family).to(DEVICE)
    cm = moecc.compile(model, backend="triton")
    cm(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in make_inputs(family, 2, 8).items()})
    program = cm._entries[-1].gm
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.moecc.fused_moe_shared_triton.default in targets
    assert torch.ops.moecc.shared_ffn.default not in targets
    fresh = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in make_inputs(family, 3, 5, 1).items()}
    ref, got = model(**fresh).logits, cm(**fresh).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_a_shrunk_tile_is_remembered_for_its_own_specialization_only():
    """A tile that one kernel variant cannot fit (here: the shared-expert one) is retried smaller for that variant;
    the others keep the tile as chosen. One memo per (kernel, tile) once made the shrink of the shared-expert
    variant the tile of every later launch in the process."""
    from triton.runtime.errors import OutOfResources

    from moecc.codegen.triton import grouped_gemm
    from moecc.codegen.triton.configs import TileConfig

    launched = []

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, HAS_SHARED, num_stages, **meta):
                if HAS_SHARED and num_stages > 2:
                    raise OutOfResources(1, 0, "shared memory")
                launched.append((HAS_SHARED, num_stages))
            return run

    kernel, cfg, x = Kernel(), TileConfig(128, 128, 64, 8, 8, 4), torch.empty(2)
    for shared in (True, False, True):
        grouped_gemm._launch(kernel, lambda c: (1,), cfg, None, x, HAS_SHARED=shared)
    assert launched == [(True, 2), (False, 4), (True, 2)]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="the TMA kernels' shared memory is a Hopper question")
def test_shared_experts_keep_the_shipped_pipeline():
    """Folded shared experts run in the same K loop as routed ones: Qwen3-30B-A3B's shipped 4-stage tiles fit, as
    they do without shared experts (a loop per weight tensor needed two rings of shared memory and ran in 2
    stages, 1.7x slower at Qwen1.5-MoE's layer)."""
    from moecc.codegen.triton import grouped_gemm
    from moecc.codegen.triton.moe import fused_moe_shared_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    t, e, k, h, inter, m = 4096, 128, 8, 2048, 768, 2
    x = torch.randn(t, h, device="cuda", generator=g, dtype=torch.bfloat16)
    w, ids = route_reference(torch.randn(t, e, device="cuda", generator=g), None, k, "softmax", False, True, 1, 1,
                             1.0)
    up, down, s_up, s_down = (torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05 for shape in
                              ((e, 2 * inter, h), (e, h, inter), (m, 2 * inter, h), (m, h, inter)))
    grouped_gemm._SMALLER.clear()
    got = fused_moe_shared_triton(x, w, ids, up, down, "silu", True, 1.0, 0.0, s_up, s_down, None, "oi")
    assert all(first == used for (_, first, *_), used in grouped_gemm._SMALLER.items())
    all_ids = torch.cat([ids, torch.arange(e, e + m, device="cuda").expand(t, m)], 1)
    all_w = torch.cat([w, torch.ones(t, m, device="cuda")], 1)
    ref = fused_moe_triton(x, all_w, all_ids, torch.cat([up, s_up]), torch.cat([down, s_down]), None, None, "silu",
                           True, 1.0, 0.0, -1, 0.0, 0, 0, "token", "oi")
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("t,tile", [(1, None), (7, None), (64, None), (1, 128), (7, 128)])
def test_fused_gemv_gating_matches_fused_route(routing, t, tile, monkeypatch):
    """One program per token (the default at this size), and eight (``tile``: two experts a program), the last of
    which selects."""
    from moecc.codegen.triton.gating import fused_gating

    if tile is not None:
        monkeypatch.setattr(gating_module, "ROUTER_TILE_ELEMENTS", tile)

    score, topk_first, renorm, n_group, topk_group, with_bias, scale = routing
    g = torch.Generator().manual_seed(t)
    e, h = 16, 40  # H not a multiple of the GEMV block
    x, w = torch.randn(t, h, generator=g).to(DEVICE), torch.randn(e, h, generator=g).to(DEVICE)
    router_bias = torch.randn(e, generator=g).to(DEVICE)
    sel = (torch.randn(e, generator=g) * 0.1).to(DEVICE) if with_bias else None
    rw, ri = torch.ops.moecc.fused_route(x, w, router_bias, sel, 4, score, topk_first, renorm, n_group, topk_group,
                                         scale, True)
    gw, gi = fused_gating(x, w, router_bias, sel, 4, score, topk_first, renorm, n_group, topk_group, scale)
    order_r, order_g = ri.argsort(-1), gi.argsort(-1)
    assert torch.equal(ri.gather(1, order_r), gi.gather(1, order_g))
    torch.testing.assert_close(gw.gather(1, order_g), rw.gather(1, order_r), rtol=1e-5, atol=1e-6)


def test_fused_gemv_gating_leaves_its_counters_at_zero_for_the_next_launch(monkeypatch):
    """A graph's counters are zeroed once (``scratch``): each launch must set them back, or the next one's last
    program would never see the count it waits for and no token would be selected."""
    from moecc.codegen.triton.gating import fused_gating
    from moecc.codegen.triton.scratch import GraphScratch, graph_scratch

    monkeypatch.setattr(gating_module, "ROUTER_TILE_ELEMENTS", 128)  # several programs per token count arrivals
    g = torch.Generator().manual_seed(0)
    e, h, t = 16, 40, 3
    w = torch.randn(e, h, generator=g).to(DEVICE)
    scratch = GraphScratch()
    with graph_scratch(scratch):
        for call in range(3):
            x = torch.randn(t, h, generator=g).to(DEVICE)
            scratch.rewind()
            gw, gi = fused_gating(x, w, None, None, 4, "softmax", False, True, 1, 1, 1.0)
            rw, ri = torch.ops.moecc.fused_route(x, w, None, None, 4, "softmax", False, True, 1, 1, 1.0, True)
            assert torch.equal(ri.sort(-1).values, gi.sort(-1).values), call
            torch.testing.assert_close(gw.sort(-1).values, rw.sort(-1).values, rtol=1e-5, atol=1e-6)
    (counters,) = scratch.buffers  # one buffer, allocated by the first call and reused
    assert counters.numel() == t and not counters.any()


@pytest.mark.parametrize("t", [1, 5])
def test_fused_gemv_gating_rounds_low_precision_logits_as_the_eager_gemm(t, monkeypatch):
    """fp16 logits (the router's eager GEMM returns them in the model's dtype): the fused launch rounds its fp32
    sums once, bias added, and selects what ``moecc::fused_route`` selects from the fp16 GEMM's logits; with the
    knob off such routers take the GEMM and the gating launch."""
    from moecc.codegen.triton import gating as gating_mod
    from moecc.codegen.triton import moe

    g = torch.Generator().manual_seed(t)
    e, h = 16, 40
    # logits several fp16 ulps apart, so no pair of them ties after rounding in either order of summation
    x = torch.randn(t, h, generator=g).half().to(DEVICE)
    w = (torch.randn(e, h, generator=g) * 0.3).half().to(DEVICE)
    router_bias = torch.randn(e, generator=g).half().to(DEVICE)
    rw, ri = torch.ops.moecc.fused_route(x, w, router_bias, None, 4, "softmax", False, True, 1, 1, 1.0, False)
    calls = []
    fused = gating_mod.fused_gating
    monkeypatch.setattr(moe, "fused_gating", lambda *a, **kw: calls.append(kw) or fused(*a, **kw))
    for knob, expect in (("1", [True]), ("0", [])):
        monkeypatch.setenv("MOECC_TRITON_ROUTER_GEMV", knob)
        calls.clear()
        gw, gi = moe.fused_route_triton(x, w, router_bias, None, 4, "softmax", False, True, 1, 1, 1.0, False)
        assert [kw["round_logits"] for kw in calls] == expect
        assert torch.equal(ri.sort(-1).values, gi.sort(-1).values)
        torch.testing.assert_close(gw.sort(-1).values, rw.sort(-1).values, rtol=1e-5, atol=1e-6)


def test_triton_artifact_loads_in_a_fresh_process(tmp_path):
    """A Triton program exports like the torch one (program.pt2 + weights) and loads without the model's code."""
    import json
    import os
    import subprocess
    import sys

    model = make_model("mixtral").to(DEVICE)
    def to_device(kw):
        return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}

    kwargs = to_device(make_inputs("mixtral", 2, 8))
    path = moecc.export(model, (), tmp_path / "art", kwargs=kwargs, backend="triton")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["backend"] == "triton" and manifest["device"] == torch.device(DEVICE).type
    fresh = to_device(make_inputs("mixtral", 3, 5, seed=7))
    with torch.no_grad():
        ref = model(**fresh).logits.cpu()
    torch.save((make_inputs("mixtral", 3, 5, seed=7), ref), tmp_path / "check.pt")
    (tmp_path / "check.py").write_text(
        "import sys, torch, moecc\n"
        "m = moecc.load(sys.argv[1])\n"
        "kwargs, ref = torch.load(sys.argv[2], weights_only=False)\n"
        f"kwargs = {{k: v.to('{DEVICE}') if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}}\n"
        "got = m(**kwargs).logits.cpu()\n"
        "assert 'transformers' not in sys.modules\n"
        "print('ERR', ((got.double() - ref.double()).norm() / ref.double().norm()).item())\n")
    env = {"PATH": "/usr/bin:/bin", **({"TRITON_INTERPRET": "1"} if DEVICE == "cpu" else {})}
    env.update({k: v for k, v in os.environ.items() if k.startswith(("CUDA", "LD_LIBRARY", "PYTHONPATH"))})
    run = subprocess.run([sys.executable, "check.py", str(path), "check.pt"], cwd=tmp_path, capture_output=True,
                         text=True, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert float(run.stdout.split("ERR")[1]) < 1e-4


def test_triton_on_cpu_tensors_without_the_interpreter_says_what_to_do(monkeypatch):
    """On a CUDA machine a model left on the CPU gets a clear error, not a Triton launcher's 'cpu tensor?'."""
    from user_modules import LoopMoE, TinyModel

    import moecc.codegen.triton.configs as triton_configs

    monkeypatch.setattr(triton_configs, "INTERPRET", False)
    monkeypatch.setattr("moecc.codegen.triton.available", lambda: (True, ""))
    torch.manual_seed(0)
    cm = moecc.compile(TinyModel(LoopMoE()).eval(), backend="triton")
    with pytest.raises(moecc.BackendError, match="runs on CUDA tensors.*TRITON_INTERPRET=1"):
        cm(torch.randint(0, 50, (2, 5)))
