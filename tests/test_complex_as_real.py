"""Complex values written in real arithmetic for the ONNX export (``moecc.codegen.onnx.complex_as_real``)."""

import json
import math

import pytest
import torch
from hf_models import make_inputs, make_model
from torch import nn
from torch.utils import _pytree as pytree
from user_modules import LoopMoE

import moecc
from moecc.codegen.onnx import complex_as_real as car
from moecc.logs import quiet_deepcopy


class Rotary(nn.Module):
    """Meta's Llama rotary embedding (a complex buffer, sliced per call) and DeepSeek-V2's (``torch.polar`` of the
    positions, scaled), then arithmetic on complex values that an attention's variants write."""

    def __init__(self, dim=8, max_len=32):
        super().__init__()
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        angles = torch.outer(torch.arange(max_len).float(), self.inv_freq)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, x):  # x [B, T, heads, dim]
        t = x.shape[1]
        table = self.freqs_cis[:t]
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        a = torch.view_as_real(z * table[None, :, None, :]).flatten(3).type_as(x)
        angles = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq
        polar = torch.polar(torch.ones_like(angles), angles) * 0.5
        w = z * polar.unsqueeze(1).unsqueeze(0)
        w = w + z.conj() / (polar.unsqueeze(1) + 2.0) - 1j * z
        w = torch.cat([w, torch.exp(z * 0.1)], dim=-1).transpose(1, 2).reshape(x.shape[0], -1, x.shape[1], 8)
        b = torch.view_as_real(w.permute(0, 2, 1, 3)).flatten(-2)
        c = torch.stack([z.real, z.imag, z.abs(), z.angle()], -1).flatten(-2)
        return a + b[..., : a.shape[-1]] + c[..., : a.shape[-1]]


def _graph(module, *args):
    return torch.export.export(module, args, dynamic_shapes=({1: torch.export.Dim("t", min=2, max=32)},)).module()


def _complex_values(gm, *args) -> list[str]:
    found = []

    class Watch(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if any(isinstance(t, torch.Tensor) and t.is_complex() for t in pytree.tree_leaves(out)):
                found.append(n.name)
            return out

    Watch(gm).run(*args)
    return found


def test_complex_values_become_real_and_the_numbers_stay():
    module = Rotary()
    gm = _graph(module, torch.randn(2, 5, 3, 8))
    before = quiet_deepcopy(gm)  # a program torch.export made: torch warns about copying its pytree specs
    done = car.complex_as_real(gm)
    assert done and done.value > 10, done.reason
    for t in (2, 7, 31):  # other lengths than the traced one
        x = torch.randn(2, t, 3, 8)
        assert _complex_values(before, x) and not _complex_values(gm, x)
        torch.testing.assert_close(gm(x), module(x), rtol=1e-5, atol=1e-5)


def test_a_complex_op_without_a_real_form_leaves_the_graph_whole():
    class Tanh(nn.Module):
        def forward(self, x):
            return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)).tanh()).flatten(-2)

    gm = _graph(Tanh(), torch.randn(2, 4, 8))
    code = gm.code
    done = car.complex_as_real(gm)
    assert not done and "no real form of aten.tanh.default" in done.reason
    assert gm.code == code


def test_a_rule_that_fails_part_way_leaves_the_graph_whole(monkeypatch):
    def broken(rw, node):
        raise ValueError("cannot")

    gm = _graph(Rotary(), torch.randn(2, 5, 3, 8))
    code, buffers = gm.code, dict(gm.named_buffers())
    monkeypatch.setitem(car.RULES, torch.ops.aten.view_as_real.default, broken)
    done = car.complex_as_real(gm)
    assert not done and "view_as_real" in done.reason and "cannot" in done.reason
    assert gm.code == code and dict(gm.named_buffers()).keys() == buffers.keys()
    x = torch.randn(2, 6, 3, 8)
    torch.testing.assert_close(gm(x), Rotary()(x))


def test_a_program_taking_a_complex_tensor_is_left_whole():
    class TakesComplex(nn.Module):
        def forward(self, z):
            return torch.view_as_real(z * 2)

    gm = torch.export.export(TakesComplex(), (torch.randn(3, 4, dtype=torch.complex64),)).module()
    done = car.complex_as_real(gm)
    assert not done and "takes a complex tensor" in done.reason


_a = torch.ops.aten
# (op, args): "Z" a complex [2, 1, 4], "R" a real [2, 1, 4], "I" int64 indices [2]
OP_CASES = [
    *[(op, ("Z",)) for op in (_a.clone.default, _a.contiguous.default, _a.alias.default, _a.detach.default,
                              _a.resolve_conj.default, _a.resolve_neg.default, _a.neg.default, _a.conj.default,
                              _a._conj.default, _a.conj_physical.default, _a.exp.default, _a.real.default,
                              _a.imag.default, _a.abs.default, _a.angle.default, _a.view_as_real.default)],
    (_a.index.Tensor, ("Z", ["I"])), (_a.unsqueeze.default, ("Z", -1)), (_a.unsqueeze.default, ("Z", 1)),
    (_a.squeeze.dim, ("Z", -2)), (_a.squeeze.dims, ("Z", [1, -3])), (_a.select.int, ("Z", -1, 2)),
    (_a.slice.Tensor, ("Z", -1, 1, 3)), (_a.slice.Tensor, ("Z",)), (_a.narrow.default, ("Z", 2, 1, 2)),
    (_a.index_select.default, ("Z", -1, "I")), (_a.sum.dim_IntList, ("Z", [-1])),
    (_a.mean.dim, ("Z", [0, -1], True)), (_a.flatten.using_ints, ("Z", 1)), (_a.flatten.using_ints, ("Z", 0, -2)),
    (_a.transpose.int, ("Z", 0, -1)), (_a.permute.default, ("Z", [-1, 0, 1])), (_a.view.default, ("Z", [2, 4])),
    (_a.reshape.default, ("Z", [-1])), (_a._unsafe_view.default, ("Z", [8])), (_a.expand.default, ("Z", [3, 2, 5, 4])),
    (_a.repeat.default, ("Z", [2, 1, 1, 2])), (_a.cat.default, (["Z", "Z"], -1)), (_a.cat.default, (["Z", "R"],)),
    (_a.stack.default, (["Z", "Z"], -1)), (_a.to.dtype, ("Z", torch.complex128)), (_a.to.dtype, ("R", torch.complex64)),
    (_a._to_copy.default, ("Z",), {"dtype": torch.float64}), (_a.to.dtype_layout, ("R",), {"dtype": torch.complex64}),
    (_a.mul.Tensor, ("Z", "R")), (_a.mul.Tensor, ("R", "Z")), (_a.mul.Tensor, ("Z", "Z")), (_a.mul.Tensor, ("Z", 2.5)),
    (_a.mul.Tensor, ("Z", 2 - 1j)), (_a.mul.Tensor, ("R", 1j)), (_a.div.Tensor, ("Z", "R")),
    (_a.div.Tensor, ("Z", "Z")), (_a.div.Tensor, ("Z", 2 + 1j)), (_a.div.Tensor, ("R", "Z")),
    (_a.add.Tensor, ("Z", "Z")), (_a.add.Tensor, ("Z", "R")), (_a.add.Tensor, ("R", "Z")), (_a.add.Tensor, ("Z", 1.5)),
    (_a.add.Tensor, ("Z", 1j)),
    (_a.add.Tensor, ("Z", "Z"), {"alpha": 2}), (_a.sub.Tensor, ("Z", "R")), (_a.sub.Tensor, ("R", "Z")),
    (_a.sub.Tensor, ("Z", 2j)), (_a.polar.default, ("R", "R")), (_a.complex.default, ("R", "R")),
]


def _op_graph(op, args, kwargs):
    """x [2, 1, 4, 2] -> Z = view_as_complex(x); y = op(...); the real form of y (or y) out. No meta, as a pass's
    nodes have none."""
    graph = torch.fx.Graph()
    x, r, i = graph.placeholder("x"), graph.placeholder("r"), graph.placeholder("i")
    z = graph.call_function(_a.view_as_complex.default, (x,))
    names = {"Z": z, "R": r, "I": i}
    bind = lambda a: [bind(b) for b in a] if isinstance(a, list) else names.get(a, a) if isinstance(a, str) else a
    y = graph.call_function(op, tuple(bind(a) for a in args), kwargs)
    out = graph.call_function(_a.view_as_real.default, (graph.call_function(_a.resolve_conj.default, (y,)),))
    graph.output((y if op in car._REAL_RESULT else out,))
    return torch.fx.GraphModule(nn.Module(), graph)


@pytest.mark.parametrize("op,args,kwargs", [(*c, {}) if len(c) == 2 else c for c in OP_CASES],
                         ids=lambda v: str(v) if isinstance(v, torch._ops.OpOverload) else "")
def test_each_rule_gives_the_complex_ops_numbers(op, args, kwargs):
    gm = _op_graph(op, args, kwargs)
    real_result = op in car._REAL_RESULT or op in car._CASTS and kwargs.get("dtype", torch.complex64).is_floating_point
    if real_result:  # a real result is returned as is
        node = next(n for n in gm.graph.nodes if n.target is op)
        gm.graph.output_node().args = ((node,),)
        gm.graph.eliminate_dead_code()
        gm.recompile()
    inputs = (torch.randn(2, 1, 4, 2, dtype=torch.float32), torch.rand(2, 1, 4) + 0.5, torch.tensor([1, 0]))
    want = gm(*inputs)
    done = car.complex_as_real(gm)
    assert done and done.value >= 2, done.reason
    assert not _complex_values(gm, *inputs), gm.code
    torch.testing.assert_close(gm(*inputs), want, rtol=1e-5, atol=1e-6)


def test_dims_of_complex_values_move_past_the_parts():
    assert [car._dim(d) for d in (0, 2, -1, -3)] == [0, 2, -2, -4]


class RotaryModel(nn.Module):
    """Embedding, a complex rotary embedding over heads, then a MoE block: a model whose MoE ONNX Runtime runs."""

    def __init__(self, hidden=24, vocab=50, op=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, 6, 2).float() / 6))
        self.moe = LoopMoE(hidden)
        self.head = nn.Linear(hidden, vocab)
        self.op = op

    def forward(self, ids):
        h = self.embed(ids)
        b, t, d = h.shape
        angles = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq
        z = torch.view_as_complex(h.reshape(b, t, 4, 3, 2)) * torch.polar(torch.ones_like(angles), angles)[:, None]
        if self.op is not None:
            z = self.op(z)
        h = torch.view_as_real(z).reshape(b, t, d)
        return self.head(h + self.moe(h))


def test_a_model_with_a_complex_rotary_embedding_runs_on_onnx_runtime():
    torch.manual_seed(0)
    model = RotaryModel().eval()
    cm = moecc.compile(model, backend="onnxruntime")
    with torch.no_grad():
        cm(torch.randint(0, 50, (2, 6)))
        for shape in ((3, 5), (1, 11)):
            ids = torch.randint(0, 50, shape)
            torch.testing.assert_close(cm(ids), model(ids), rtol=1e-4, atol=1e-5)
    assert cm._entries[-1].backend == "onnxruntime" and all(layer.fused for layer in cm.moe_layers)


def test_a_complex_op_onnx_cannot_translate_is_named_and_auto_runs_torch(tmp_path):
    torch.manual_seed(0)
    model = RotaryModel(op=torch.tanh).eval()
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(moecc.BackendError, match=r"ONNX export failed: .*complex values stayed complex: no real "
                                                 r"form of aten\.tanh"):
        moecc.export(model, (ids,), tmp_path / "ort", backend="onnxruntime")
    path = moecc.export(model, (ids,), tmp_path / "art", backend="auto")
    assert json.loads((path / "manifest.json").read_text())["backend"] == "torch"
    fresh = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(moecc.load(path)(fresh), model(fresh), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["deepseek_v2", "llama4_text"])
def test_families_with_complex_rotary_embeddings_run_on_onnx_runtime(family):
    """DeepSeek-V2 and Llama 4 compute their rotary embeddings in complex numbers; their ONNX export failed on an
    ``unsqueeze`` of one, and ``auto`` ran torch."""
    model = make_model(family)
    cm = moecc.compile(model)
    with torch.no_grad():
        cm(**make_inputs(family, 2, 8))
        for batch, seq, seed in ((3, 5, 1), (1, 13, 2)):
            kwargs = make_inputs(family, batch, seq, seed)
            ref, got = model(**kwargs).logits, cm(**kwargs).logits
            assert math.isfinite(got.sum().item())
            assert ((got.double() - ref.double()).norm() / ref.double().norm()).item() < 1e-5
    assert cm._entries[-1].backend == "onnxruntime"
    assert cm.moe_layers and all(layer.fused and layer.lowering.startswith("routed in plain ONNX ops")
                                 for layer in cm.moe_layers)
