"""Quantized experts in the sorted form: a com.microsoft.MatMulNBits per expert on its sorted rows
(``moecc.codegen.onnx.grouped_nbits``), any activation, any input size."""

import onnx
import pytest
import torch
from hf_models import make_inputs, make_model
from test_sorted_experts import Block, _rel, _routing

import moecc
from moecc.codegen.onnx.grouped_nbits import grouped_matmul_nbits, matmul_nbits_computes_same
from moecc.codegen.onnx.lower import ROUTED_QUANTIZED, OrtModule, decompose, to_onnx, use_ort_moe
from moecc.codegen.onnx.quant import QuantSpec, dequantize, nbits_block, pack_nbits, quantize, unpack_nbits
from moecc.codegen.onnx.sorted_experts import sort_experts
from moecc.passes.graph_utils import op_arguments


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(8), QuantSpec(4, 32), QuantSpec(8, 16, True)])
@pytest.mark.parametrize("k", [64, 48, 33, 130])
def test_pack_nbits_holds_the_codes_of_quantize_and_pads_the_last_block(spec, k):
    """Where QMoE's packing applies (blocks tile the input, int4 pairs), MatMulNBits' dequantizes to the same
    weights; elsewhere the last block is padded with zeros, which take no part in its scale."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(10, k, generator=g)
    packed, scales = pack_nbits(w, spec)
    block = nbits_block(spec, k)
    assert packed.dtype == torch.uint8 and packed.shape == (10, -(-k // block), block * spec.bits // 8)
    got = unpack_nbits(packed, scales, spec.bits, k)
    if k % 2 == 0 and (not spec.block_size or k % spec.block_size == 0):
        q, s = quantize(w[None], spec)
        assert torch.equal(got, dequantize(q, s, spec, k)[0])
    padded = torch.nn.functional.pad(w, (0, -k % block))
    want = QuantSpec(spec.bits, block)  # per block of the padded weight, each scale from its own values
    q, s = quantize(padded[None], want)
    if spec.block_size or k % block == 0:
        assert torch.allclose(got, dequantize(q, s, want, padded.shape[1])[0][:, :k]) or not spec.block_size
    assert _rel(got, w) < (0.2 if spec.bits == 4 else 0.01)


class GroupedNbits(torch.nn.Module):
    def __init__(self, weights, spec, gather):
        super().__init__()
        self.count, self.gather, self.spec = len(weights), gather, spec
        for e, w in enumerate(weights):
            q, s = pack_nbits(w, spec)
            self.register_buffer(f"q{e}", q)
            self.register_buffer(f"s{e}", s)

    def forward(self, x, offsets, rows):
        return grouped_matmul_nbits(x, offsets, [getattr(self, f"q{e}") for e in range(self.count)],
                                    [getattr(self, f"s{e}") for e in range(self.count)], self.spec.bits,
                                    4 if self.spec.int8_activations else 0, rows if self.gather else None)


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(8), QuantSpec(4, 16), QuantSpec(8, 0, True)])
@pytest.mark.parametrize("gather", [False, True])
def test_grouped_matmul_nbits_exported_gives_each_experts_rows_times_its_weight(spec, gather, tmp_path):
    """Empty experts, rows of no expert (zeros), rows gathered or in place, an input size of 40 (a padded block
    per channel), from one export whose row count is dynamic; with int8 activations ORT rounds them, within 3 %."""
    g = torch.Generator().manual_seed(0)
    k, n = 40, 24
    weights = [torch.randn(n, k, generator=g) for _ in range(4)]
    module = GroupedNbits(weights, spec, gather)

    def case(counts, unrouted):
        rows_n = sum(counts) + unrouted
        x = torch.randn(max(rows_n // 2, 2) if gather else rows_n, k, generator=g)
        rows = torch.randint(0, x.shape[0], (rows_n,), generator=g)
        offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
        return x, offsets, rows

    example = case([2, 1, 1, 2], 2)
    rows_dim, x_dim = torch.export.Dim("n", min=2), torch.export.Dim("m", min=2)
    dims = ({0: x_dim}, None, {0: rows_dim}) if gather else ({0: rows_dim}, None, {0: rows_dim})
    gm = torch.export.export(module, example, dynamic_shapes=dims).module()
    path = to_onnx(gm, list(example), str(tmp_path / "nbits.onnx"))
    assert [n.op_type for n in onnx.load(path).graph.node].count("MatMulNBits") == 4
    ort = OrtModule(path)
    for counts, unrouted in (([3, 0, 4, 1], 3), ([0, 0, 9, 0], 0), ([1, 1, 1, 1], 5)):
        x, offsets, rows = case(counts, unrouted)
        want = gm(x, offsets, rows)
        xs = x[rows] if gather else x
        bounds = offsets.tolist()
        for e, w in enumerate(weights):  # the reference: each expert's rows times its dequantized weight
            deq = unpack_nbits(*pack_nbits(w, spec), spec.bits, k)
            torch.testing.assert_close(want[bounds[e]:bounds[e + 1]], xs[bounds[e]:bounds[e + 1]] @ deq.t())
        got = ort(x, offsets, rows)[0]
        assert (got[sum(counts):] == 0).all()
        assert _rel(got, want) < (3e-2 if spec.int8_activations else 1e-5), counts


def _dequantized_block(block, spec):
    """``block`` (layout "oi") with its expert weights replaced by their quantized values."""
    for name in ("w_up", "w_down"):
        w = getattr(block, name)
        setattr(block, name, torch.stack([unpack_nbits(*pack_nbits(w[e], spec), spec.bits, w.shape[-1])
                                          for e in range(w.shape[0])]))
    return block


@pytest.mark.parametrize("activation,gated,bias,spec,capacity_args", [
    ("gelu_tanh", True, False, QuantSpec(4), (-1, 0.0, 0, 0, "token")),
    ("relu2", False, True, QuantSpec(8, 16), (-1, 0.0, 0, 0, "token")),
    ("silu", True, False, QuantSpec(4, 32), (3, 0.0, 0, 0, "token")),
])
def test_the_quantized_sorted_form_equals_fused_moe_of_the_quantized_weights(activation, gated, bias, spec,
                                                                            capacity_args, tmp_path):
    """In torch and on ONNX Runtime, at token counts other than the traced one; a hidden size of 12 and an
    intermediate one of 10 tile no MatMulNBits block (padded)."""
    g = torch.Generator().manual_seed(4)
    experts, k, hidden = 6, 2, 12
    block = Block(experts, hidden, 10, activation, gated, bias, "oi", capacity_args, g)
    x = torch.randn(9, hidden, generator=g)
    weights, ids = _routing(9, experts, k, g)
    tokens = torch.export.Dim("tokens", min=2)
    gm = torch.export.export(block, (x, weights, ids),
                             dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens})).module()
    moe = next(n for n in gm.graph.nodes if n.target is torch.ops.moecc.fused_moe.default)
    assert sort_experts(gm, moe, op_arguments(moe), spec)
    gm.recompile()
    want_block = _dequantized_block(block, spec)
    for t in (9, 1, 300):
        xt = torch.randn(t, hidden, generator=g)
        wt, it = _routing(t, experts, k, g)
        torch.testing.assert_close(gm(xt, wt, it), want_block(xt, wt, it), rtol=1e-5, atol=1e-5)
    decompose(gm)
    path = to_onnx(gm, [x, weights, ids], str(tmp_path / "sorted_nbits.onnx"))
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("MatMulNBits") == 2 * experts and "MatMul" not in ops, ops
    ort = OrtModule(path)
    for t in (1, 7, 300):
        xt = torch.randn(t, hidden, generator=g)
        wt, it = _routing(t, experts, k, g)
        torch.testing.assert_close(ort(xt, wt, it)[0], want_block(xt, wt, it), rtol=1e-4, atol=1e-5)


def test_the_probe_finds_matmul_nbits_for_each_bit_width_and_block():
    for bits in (4, 8):
        for block in (16, 32, 128):
            assert matmul_nbits_computes_same(bits, block, 0), (bits, block)
        assert matmul_nbits_computes_same(bits, 32, 4), bits


def _quantized(model, family, **options):
    cm = moecc.compile(model, backend="onnxruntime", **options)
    with torch.no_grad():
        fresh = make_inputs(family, 3, 5, seed=1)
        err = _rel(cm(**fresh).logits, model(**fresh).logits)
    return cm, err


def test_int4_and_int8_activations_take_the_sorted_form_whatever_the_activation():
    """Gated gelu has no com.microsoft.QMoE activation: such blocks stayed float. Now int4 (and int8 with int8
    activations) experts of any activation run as a MatMulNBits per expert, quantized as asked."""
    model = make_model("qwen3_moe", hidden_act="gelu", num_experts=8, num_experts_per_tok=2)
    for options, described in (({"quantize": "int4"}, "int4 per-channel"),
                               ({"quantize": "int8", "quant_int8_activations": True},
                                "int8 per-channel, int8 activations")):
        cm, err = _quantized(model, "qwen3_moe", **options)
        assert [(la.lowering, la.quantization) for la in cm.moe_layers] == [(ROUTED_QUANTIZED, described)] * len(
            cm.moe_layers)
        assert err < 0.1, (options, err)


def test_int8_weights_with_float_activations_take_qmoe_first_else_the_sorted_form():
    """ONNX Runtime's int8 MatMulNBits has no float-activation kernel: com.microsoft.QMoE goes first where it
    computes the block (a SiLU Mixtral), and a block it cannot run (gated gelu) is still quantized, in the sorted
    form, the lowering naming why QMoE did not take it."""
    mixtral = make_model("mixtral")
    cm, err = _quantized(mixtral, "mixtral", quantize="int8")
    assert [(la.lowering, la.quantization) for la in cm.moe_layers] == [("com.microsoft.QMoE", "int8 per-channel")] * \
        len(cm.moe_layers)
    assert err < 0.01
    gelu = make_model("qwen3_moe", hidden_act="gelu", num_experts=8, num_experts_per_tok=2)
    cm, err = _quantized(gelu, "qwen3_moe", quantize="int8")
    for layer in cm.moe_layers:
        assert layer.quantization == "int8 per-channel"
        assert layer.lowering.startswith(ROUTED_QUANTIZED + ": no com.microsoft.MoE activation computes gated gelu"), \
            layer.lowering
    assert err < 0.01


def test_a_block_of_computed_weights_stays_float_and_says_why():
    """No form reads weights the graph computes as initializers, quantized or not: one reason, not each form's."""
    from test_dense_work import _pipeline_result

    model = make_model("qwen3_moe", hidden_act="gelu", num_experts=8, num_experts_per_tok=2)
    gm = _pipeline_result(model, computed_weights=True)
    lowering = use_ort_moe(gm, QuantSpec(4))
    assert list(lowering.values()) == ["decomposed into every expert on every token (its expert weights (w_up) are "
                                       "computed in the graph)"] * model.config.num_hidden_layers


def test_a_quantized_sorted_artifact_loads_and_gives_the_compiled_numbers(tmp_path):
    """The packed weights and scales travel as the artifact's initializers; the loaded program computes what the
    compiled one does."""
    model = make_model("qwen3_moe", hidden_act="gelu", num_experts=8, num_experts_per_tok=2)
    example = make_inputs("qwen3_moe", 2, 8)
    path = moecc.export(model, (), tmp_path / "int4.moecc", kwargs=example, backend="onnxruntime", quantize="int4",
                        quant_block_size=16)
    loaded = moecc.load(path)
    assert [layer["quantization"] for layer in loaded.moe_layers] == ["int4 block 16"] * len(loaded.moe_layers)
    cm = moecc.compile(model, backend="onnxruntime", quantize="int4", quant_block_size=16)
    fresh = make_inputs("qwen3_moe", 3, 5, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**fresh).logits, cm(**fresh).logits, rtol=1e-5, atol=1e-6)
