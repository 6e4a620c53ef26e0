import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moecc  # noqa: F401
import moecc.codegen.torch.moe  # noqa: F401
from moecc.experts import WEIGHT_LAYOUTS, from_canonical, interleave_gate_up, to_canonical
from moecc.routing import SCORES, route_reference


def _moe_args(t=6, h=8, inter=5, e=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    w, ids = route_reference(torch.randn(t, e, generator=g), None, k, "softmax", False, True, 1, 1, 1.0)
    w_up = torch.randn(e, 2 * inter, h, generator=g)
    w_down = torch.randn(e, h, inter, generator=g)
    return x, w, ids, w_up, w_down


def _naive(x, w, ids, w_up, w_down, act="silu"):
    """Dense per-token reference, written independently of moecc's ops."""
    out = torch.zeros_like(x)
    e = w_up.shape[0]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            i = int(ids[t, j])
            if i >= e:
                continue
            h = w_up[i] @ x[t]
            g, u = h.chunk(2)
            out[t] += w[t, j] * (w_down[i] @ (torch.nn.functional.silu(g) * u))
    return out


OPCHECK_CASES = {
    "route": lambda: (torch.randn(5, 6), torch.randn(6), 2, "sigmoid", False, True, 3, 2, 1.5),
    "fused_route": lambda: (torch.randn(5, 8), torch.randn(6, 8), torch.randn(6), None, 2, "softmax", True, False,
                            1, 1, 1.0, True),
    "dispatch": lambda: (torch.randn(5, 8), torch.randint(0, 4, (5, 2)), 4, -1, 0.0, 0, 0, "token"),
    "expert_ffn": lambda: (torch.randn(6, 8), torch.tensor([0, 2, 2, 5, 6, 6]), torch.randn(4, 10, 8),
                           torch.randn(4, 8, 5), None, None, "gelu", True, 1.0, 0.0),
    "combine": lambda: (torch.randn(6, 8), torch.randperm(6), torch.rand(3, 2)),
    "fused_moe": lambda: (*_moe_args(), None, None, "silu", True, 1.0, 0.0, -1, 0.0, 0, 0, "token", "oi"),
    "fused_moe_torch": lambda: (*_moe_args(), None, None, "silu", True, 1.0, 0.0, -1, 1.0, 1, 0, "slot", "oi"),
    "shared_ffn": lambda: (torch.randn(5, 8), torch.randn(1, 10, 8), torch.randn(1, 8, 5), None, None,
                           torch.randn(1, 8), "silu", True, 1.0, 0.0),
}


@pytest.mark.parametrize("name", sorted(OPCHECK_CASES))
def test_opcheck(name):
    op = getattr(torch.ops.moecc, name).default
    torch.library.opcheck(op, OPCHECK_CASES[name](), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", ["route", "fused_route"])
def test_per_expert_scale_multiplies_each_chosen_weight_last(name):
    """``expert_scale`` [E]: each chosen weight times its expert's factor, after renormalisation and the scale."""
    args = OPCHECK_CASES[name]()
    scale = torch.rand(6) + 0.5
    op = getattr(torch.ops.moecc, name).default
    torch.library.opcheck(op, (*args, 2, scale), test_utils=("test_schema", "test_faketensor"))
    w, ids = op(*args)
    ws, ids_s = op(*args, 2, scale)
    assert torch.equal(ids, ids_s)
    torch.testing.assert_close(ws, w * scale[ids])


def test_fused_equals_naive_and_unfused():
    x, w, ids, w_up, w_down = _moe_args(t=9, seed=3)
    ref = _naive(x, w, ids, w_up, w_down)
    fused = torch.ops.moecc.fused_moe(x, w, ids, w_up, w_down, None, None, "silu", True, 1.0, 0.0, -1, 0.0, 0, 0,
                                      "token", "oi")
    xs, order, offs = torch.ops.moecc.dispatch(x, ids, 4, -1, 0.0, 0, 0, "token")
    ys = torch.ops.moecc.expert_ffn(xs, offs, w_up, w_down, None, None, "silu", True, 1.0, 0.0)
    unfused = torch.ops.moecc.combine(ys, order, w)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unfused, ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(t=st.integers(0, 9), e=st.sampled_from([1, 3, 5, 7, 8]), k=st.integers(1, 8), mode=st.sampled_from(
    ["random", "ties", "negative", "one_expert"]), null=st.booleans(), seed=st.integers(0, 2**16),
    score=st.sampled_from(SCORES), topk_first=st.booleans(), renorm=st.booleans())
def test_routing_and_dispatch_fuzz(t, e, k, mode, null, seed, score, topk_first, renorm):
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    h, inter = 6, 4
    logits = torch.randn(t, e, generator=g)
    if mode == "ties":
        logits = torch.round(logits)
    elif mode == "negative":
        logits = -logits.abs() - 5
    elif mode == "one_expert":
        logits = torch.full((t, e), -3.0)
        logits[:, 0] = 3.0
    w, ids = torch.ops.moecc.route(logits, None, k, score, topk_first, renorm, 1, 1, 1.0)
    assert w.shape == (t, k) and ids.shape == (t, k)
    assert torch.isfinite(w).all()
    assert ((ids >= 0) & (ids < e)).all()
    if t:
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all(), "an expert chosen twice for one token"
    if null and t:
        ids = torch.where(torch.rand(t, k, generator=g) < 0.3, e, ids)  # null experts: no compute
    x = torch.randn(t, h, generator=g)
    w_up = torch.randn(e, 2 * inter, h, generator=g)
    w_down = torch.randn(e, h, inter, generator=g)
    ref = _naive(x, w, ids, w_up, w_down)
    args = (x, w, ids, w_up, w_down, None, None, "silu", True, 1.0, 0.0, -1, 0.0, 0, 0, "token")
    torch.testing.assert_close(torch.ops.moecc.fused_moe(*args, "oi"), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.ops.moecc.fused_moe_torch(*args, "oi"), ref, rtol=1e-4, atol=1e-4)
    io = (x, w, ids, w_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()) + args[5:]
    torch.testing.assert_close(torch.ops.moecc.fused_moe_torch(*io, "io"), ref, rtol=1e-4, atol=1e-4)
    gu = (x, w, ids, interleave_gate_up(w_up)) + args[4:]
    torch.testing.assert_close(torch.ops.moecc.fused_moe(*gu, "oi_gu"), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.ops.moecc.fused_moe_torch(*gu, "oi_gu"), ref, rtol=1e-4, atol=1e-4)


def test_weight_layouts_round_trip():
    g = torch.Generator().manual_seed(1)
    w_up, w_down, b_up = torch.randn(3, 8, 5, generator=g), torch.randn(3, 5, 4, generator=g), torch.randn(3, 8)
    for layout in WEIGHT_LAYOUTS:
        placed = from_canonical(w_up, w_down, b_up, layout)
        assert all(t.is_contiguous() for t in placed)
        for a, b in zip(to_canonical(*placed, layout), (w_up, w_down, b_up)):
            assert torch.equal(a, b)
    gu = interleave_gate_up(w_up)
    assert torch.equal(gu[:, 0], w_up[:, 0]) and torch.equal(gu[:, 1], w_up[:, 4]) and torch.equal(gu[:, 7], w_up[:, 7])


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 12), e=st.sampled_from([2, 3, 5]), k=st.integers(1, 3), cap=st.integers(0, 4),
       priority=st.sampled_from(["token", "slot"]), seed=st.integers(0, 2**16))
def test_capacity_drops_match_naive(t, e, k, cap, priority, seed):
    from moecc.routing import apply_capacity

    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    kept = apply_capacity(ids, e, cap, 0.0, 0, 0, priority)
    order = [(i, j) for i in range(t) for j in range(k)] if priority == "token" else [
        (i, j) for j in range(k) for i in range(t)]
    used = [0] * e
    for i, j in order:
        expert = int(ids[i, j])
        expect = expert if used[expert] < cap else e
        used[expert] += expect != e
        assert int(kept[i, j]) == expect


@pytest.mark.parametrize("rounding", ["ceil", "floor"])
def test_a_capacity_factor_rounds_as_told_in_every_implementation(rounding):
    """k * T * cf / E = 2 * 7 * 1.0 / 4 = 3.5 pairs per expert: 4 rounded up, 3 down. The reference, the torch
    backend, ONNX's decomposition and the sympy formula agree."""
    import sympy

    from moecc.codegen.onnx.decompose import fused_moe as decomposed
    from moecc.passes.specialize_capacity import T, capacity_formula
    from moecc.routing import apply_capacity

    ids = torch.zeros(7, 2, dtype=torch.int64)
    ids[:, 1] = 1
    kept = apply_capacity(ids, 4, -1, 1.0, 0, 0, "token", rounding)
    expected = 4 if rounding == "ceil" else 3
    assert int((kept[:, 0] == 0).sum()) == expected
    assert capacity_formula(2, 4, -1, 1.0, 0, False, rounding).subs(T, 7) == sympy.Integer(expected)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 6, generator=g), torch.rand(7, 2, generator=g)
    w_up, w_down = torch.randn(4, 10, 6, generator=g), torch.randn(4, 6, 5, generator=g)
    args = (x, w, ids, w_up, w_down, None, None, "silu", True, 1.0, 0.0, -1, 1.0, 0, 0, "token", "oi", rounding)
    ref = torch.ops.moecc.fused_moe(*args)
    torch.testing.assert_close(torch.ops.moecc.fused_moe_torch(*args), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decomposed(*args), ref, rtol=1e-5, atol=1e-5)
    other = torch.ops.moecc.fused_moe(*args[:-1], "floor" if rounding == "ceil" else "ceil")
    assert not torch.allclose(other, ref)


@pytest.mark.parametrize("priority", ["token", "slot"])
def test_ids_of_no_expert_take_no_place_in_a_capacity(priority):
    """The export-friendly capacity mask (``kept_pairs``, read by ONNX's decompositions and the routing handed to
    com.microsoft.MoE) keeps the pairs the reference keeps. It counted a negative id (no expert) toward expert 0's
    capacity, dropping a pair of expert 0 that the reference kept."""
    from moecc.codegen.onnx.decompose import kept_pairs
    from moecc.routing import apply_capacity

    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        ids = torch.randint(-1, 5, (8, 2), generator=g)
        capacity = int(torch.randint(1, 4, (), generator=g))
        for args in ((capacity, 0.0, 0), (-1, 1.5, 1)):
            kept = apply_capacity(ids, 4, *args, 0, priority)
            assert torch.equal(kept_pairs(ids, 4, *args, 0, priority), (kept >= 0) & (kept < 4)), ids
