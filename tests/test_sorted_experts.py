"""MoE blocks that ONNX Runtime's MoE op cannot run, exported routed: pairs sorted by expert, a MatMul per expert
(``moecc.codegen.onnx.sorted_experts``), not every expert on every token."""

import onnx
import pytest
import torch
from hf_models import make_inputs, make_model

import moecc
from moecc.activations import ACTIVATIONS
from moecc.codegen.onnx.lower import OrtModule, decompose, to_onnx
from moecc.codegen.onnx.sorted_experts import grouped_matmul, sort_experts
from moecc.experts import from_canonical
from moecc.passes.graph_utils import op_arguments


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


class GroupedMatmul(torch.nn.Module):
    def __init__(self, weights, gather):
        super().__init__()
        self.count, self.gather = len(weights), gather
        for e, w in enumerate(weights):
            self.register_buffer(f"w{e}", w)

    def forward(self, x, offsets, rows):
        return grouped_matmul(x, offsets, [getattr(self, f"w{e}") for e in range(self.count)],
                              rows if self.gather else None)


@pytest.mark.parametrize("counts", [[3, 0, 4, 1], [0, 0, 8, 0], [1, 0, 0, 0], [2, 2, 2, 2], [0, 0, 0, 0]])
@pytest.mark.parametrize("unrouted", [0, 3])
@pytest.mark.parametrize("gather", [False, True])
def test_grouped_matmul_exported_gives_each_experts_rows_times_its_weight(counts, unrouted, gather, tmp_path):
    """Empty experts, one expert with every row, rows of no expert at the end (zeros), rows read in place or
    gathered from another tensor (repeated, in any order), all from one export whose row count is dynamic; widths
    that are no multiple of anything."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(5, 7, generator=g) for _ in counts]
    module = GroupedMatmul(weights, gather)

    def case(counts, unrouted):
        n = sum(counts) + unrouted
        x = torch.randn(max(n // 2, 1) if gather else n, 5, generator=g)
        rows = torch.randint(0, max(x.shape[0], 1), (n,), generator=g)
        xs = x[rows] if gather else x
        offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
        want = torch.zeros(n, 7)
        for e, w in enumerate(weights):
            want[offsets[e]:offsets[e + 1]] = xs[offsets[e]:offsets[e + 1]] @ w
        return x, offsets, rows, want

    x, offsets, rows, want = case([2, 1, 1, 2], 2)
    n, m = torch.export.Dim("n", min=2), torch.export.Dim("m", min=2)
    dims = ({0: m}, None, {0: n}) if gather else ({0: n}, None, {0: n})
    gm = torch.export.export(module, (x, offsets, rows), dynamic_shapes=dims).module()
    torch.testing.assert_close(gm(x, offsets, rows), want)  # the op's reference
    ort = OrtModule(to_onnx(gm, [x, offsets, rows], str(tmp_path / "gmm.onnx")))
    x, offsets, rows, want = case(counts, unrouted)
    if want.shape[0] == 0:
        return  # ONNX Runtime refuses empty inputs (moecc runs them on torch)
    got = ort(x, offsets, rows)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[sum(counts):] == 0).all()


class Block(torch.nn.Module):
    """One fused_moe call on weights held as buffers, as the pipeline leaves a block ORT's MoE op does not run."""

    def __init__(self, experts, hidden, inter, activation, gated, bias, layout, capacity_args, g):
        super().__init__()
        up = inter * (2 if gated else 1)
        w_up, w_down = torch.randn(experts, up, hidden, generator=g) * 0.3, torch.randn(experts, hidden, inter,
                                                                                          generator=g) * 0.3
        b_up = torch.randn(experts, up, generator=g) * 0.1 if bias else None
        w_up, w_down, b_up = from_canonical(w_up, w_down, b_up, layout)
        self.register_buffer("w_up", w_up.contiguous())
        self.register_buffer("w_down", w_down.contiguous())
        self.register_buffer("b_up", b_up)
        self.register_buffer("b_down", torch.randn(experts, hidden, generator=g) * 0.1 if bias else None)
        self.args = (activation, gated, 0.8 if activation == "swiglu_softcap" else 1.3,
                     7.0 if gated else 0.0, *capacity_args, layout, "ceil")

    def forward(self, x, weights, ids):
        return torch.ops.moecc.fused_moe(x, weights, ids, self.w_up, self.w_down, self.b_up, self.b_down,
                                         *self.args)


def _routing(t, experts, k, g):
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(t)])
    if t > 4:
        ids[1, -1] = experts  # a slot of no expert
        ids[2] = -1  # a token of none
    return torch.rand(t, k, generator=g) + 0.1, ids


def _sorted_program(block, t, hidden, experts, k, g):
    x = torch.randn(t, hidden, generator=g)
    weights, ids = _routing(t, experts, k, g)
    tokens = torch.export.Dim("tokens", min=2)
    gm = torch.export.export(block, (x, weights, ids), dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens})).module()
    moe = next(n for n in gm.graph.nodes if n.target is torch.ops.moecc.fused_moe.default)
    assert sort_experts(gm, moe, op_arguments(moe))
    gm.recompile()
    return gm, (x, weights, ids)


CASES = [  # activation, gated, bias, layout, (capacity, factor, min, group, priority)
    ("gelu_tanh", True, False, "oi", (-1, 0.0, 0, 0, "token")),
    ("relu2", False, True, "io", (-1, 0.0, 0, 0, "token")),
    ("swiglu_oai", True, True, "oi_gu", (-1, 0.0, 0, 0, "token")),
    ("silu", True, False, "oi", (3, 0.0, 0, 0, "token")),
    ("gelu", True, True, "io", (-1, 1.25, 2, 0, "slot")),
    ("swiglu_softcap", True, False, "oi", (-1, 0.0, 0, 0, "token")),
]


@pytest.mark.parametrize("activation,gated,bias,layout,capacity_args", CASES)
def test_the_sorted_form_equals_fused_moe_in_torch_and_on_onnx_runtime(activation, gated, bias, layout,
                                                                       capacity_args, tmp_path):
    """Each activation kind, biases, the three weight layouts, a capacity and a capacity factor (pairs dropped),
    slots and tokens of no expert: the rewritten graph in torch, and its ONNX export run by ONNX Runtime at token
    counts other than the traced one, equal ``moecc::fused_moe``."""
    g = torch.Generator().manual_seed(1)
    experts, k = 6, 2
    block = Block(experts, 12, 10, activation, gated, bias, layout, capacity_args, g)
    gm, example = _sorted_program(block, 9, 12, experts, k, g)
    assert not any(n.target is torch.ops.moecc.fused_moe.default for n in gm.graph.nodes)
    for t in (9, 1, 7, 300):
        x = torch.randn(t, 12, generator=g)
        weights, ids = _routing(t, experts, k, g)
        torch.testing.assert_close(gm(x, weights, ids), block(x, weights, ids), rtol=1e-5, atol=1e-5)
    decompose(gm)
    path = to_onnx(gm, list(example), str(tmp_path / "sorted.onnx"))
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("MatMul") == 2 * experts and ops.count("Split") == 2 and ops.count("Gather") >= experts, ops
    ort = OrtModule(path)
    for t in (1, 7, 300):
        x = torch.randn(t, 12, generator=g)
        weights, ids = _routing(t, experts, k, g)
        torch.testing.assert_close(ort(x, weights, ids)[0], block(x, weights, ids), rtol=1e-4, atol=1e-5)


def test_every_expert_activation_exports_in_the_sorted_form(tmp_path):
    """The activation runs once over all sorted rows in the ops torch.onnx writes for it: each activation moecc
    knows exports and runs on ONNX Runtime."""
    g = torch.Generator().manual_seed(2)
    for activation in ACTIVATIONS:
        gated = activation != "relu2"
        block = Block(4, 8, 6, activation, gated, False, "oi", (-1, 0.0, 0, 0, "token"), g)
        gm, example = _sorted_program(block, 5, 8, 4, 2, g)
        decompose(gm)
        ort = OrtModule(to_onnx(gm, list(example), str(tmp_path / f"{activation}.onnx")))
        x = torch.randn(11, 8, generator=g)
        weights, ids = _routing(11, 4, 2, g)
        assert _rel(ort(x, weights, ids)[0], block(x, weights, ids)) < 1e-5, activation


def test_a_model_of_gated_gelu_experts_runs_routed_on_onnx_runtime():
    """Each block is routed in plain ONNX ops (the default, whatever the activation: gated gelu has no
    com.microsoft.MoE activation), equal to eager on fresh shapes, and says so."""
    model = make_model("qwen3_moe", hidden_act="gelu", num_experts=16, num_experts_per_tok=2)
    cm = moecc.compile(model, backend="onnxruntime")
    with torch.no_grad():
        cm(**make_inputs("qwen3_moe", 2, 8))
        for shape in ((3, 5), (1, 1), (2, 40)):
            fresh = make_inputs("qwen3_moe", *shape, seed=1)
            torch.testing.assert_close(cm(**fresh).logits, model(**fresh).logits, rtol=1e-4, atol=1e-5)
    for layer in cm.moe_layers:
        assert layer.fused
        assert layer.lowering == "routed in plain ONNX ops, a MatMul per expert on its sorted rows", layer.lowering


def test_with_the_moe_op_on_a_block_it_cannot_run_is_routed_and_says_why(monkeypatch):
    """``MOECC_ORT_MOE_OP=1`` takes com.microsoft.MoE where it computes a block; gated gelu it does not, and the
    block is routed in plain ops, its lowering naming the reason."""
    monkeypatch.setenv("MOECC_ORT_MOE_OP", "1")
    model = make_model("qwen3_moe", hidden_act="gelu", num_experts=8, num_experts_per_tok=2)
    cm = moecc.compile(model, backend="onnxruntime")
    with torch.no_grad():
        fresh = make_inputs("qwen3_moe", 3, 5, seed=1)
        torch.testing.assert_close(cm(**fresh).logits, model(**fresh).logits, rtol=1e-4, atol=1e-5)
    assert [layer.lowering for layer in cm.moe_layers] == [
        "routed in plain ONNX ops, a MatMul per expert on its sorted rows: no com.microsoft.MoE activation computes "
        "gated gelu"] * len(cm.moe_layers)


def test_int32_expert_ids_are_sorted_too():
    """Ids of another integer dtype than int64 (a model's own routing may give int32) count and sort alike."""
    g = torch.Generator().manual_seed(3)
    block = Block(5, 8, 6, "silu", True, False, "oi", (-1, 0.0, 0, 0, "token"), g)
    gm, _ = _sorted_program(block, 6, 8, 5, 2, g)
    x = torch.randn(9, 8, generator=g)
    weights, ids = _routing(9, 5, 2, g)
    torch.testing.assert_close(gm(x, weights, ids.int()), block(x, weights, ids), rtol=1e-5, atol=1e-5)
