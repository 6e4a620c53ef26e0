import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from user_modules import USER_BLOCKS, TinyModel

import moecc


@pytest.fixture(autouse=True)
def _ort_moe_op(monkeypatch):
    """These tests check where ONNX Runtime's com.microsoft.MoE runs a block, or is handed its routing: the op is
    taken only with MOECC_ORT_MOE_OP on (the faster default, the sorted form in plain ops: test_sorted_experts)."""
    monkeypatch.setenv("MOECC_ORT_MOE_OP", "1")


def _device(backend: str) -> str:
    """Where a test of ``backend`` runs: Triton on the GPU, else in its interpreter on the CPU."""
    if backend != "triton":
        return "cpu"
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"


def compiled_on(backend: str, block):
    """The one MoE layer of ``TinyModel(block)`` compiled for ``backend`` where it runs (``_device``), after
    checking the compiled model against eager on fresh ids."""
    device = _device(backend)
    model = TinyModel(block).eval().to(device)
    cm, layer = compile_on_ids(model, backend=backend, device=device)
    x = torch.randint(0, 50, (3, 11), device=device)
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
    return layer


ORT_ROUTED = "routed in plain ONNX ops, a MatMul per expert on its sorted rows: "
SWIGLU_MISMATCH = "the installed onnxruntime's com.microsoft.MoE(swiglu) does not match on probe data"


def _ort_swiglu_lowering(normalize: bool, num_experts: int, top_k: int = 2) -> str:
    """How the ORT backend lowers a gated-silu block without biases: an onnxruntime whose com.microsoft.MoE
    computes otherwise gets its experts routed in plain ONNX ops; one before 1.32 hands the op moecc's routing where
    the block does not renormalise."""
    from moecc.codegen.onnx.lower import unnormalized_moe_refused, unnormalized_moe_trusted
    from moecc.codegen.onnx.ort_moe import ort_computes_same

    if not ort_computes_same("swiglu", normalize, top_k, False, 1.0, 0.0, 0.0, num_experts):
        return ORT_ROUTED + SWIGLU_MISMATCH
    if normalize or unnormalized_moe_trusted():
        return "com.microsoft.MoE"
    return f"com.microsoft.MoE given moecc's routing ({unnormalized_moe_refused()})"


def compile_on_ids(model, low=0, device="cpu", **options):
    """(compiled model, its one MoE layer) after a first call on token ids from ``low`` up."""
    cm = moecc.compile(model, **options)
    cm(torch.randint(low, 50, (2, 16), device=device))
    (layer,) = cm.moe_layers
    return cm, layer


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("kind", sorted(USER_BLOCKS))
def test_user_block_fused_and_exact_on_fresh_shapes(kind, backend):
    """Each user block, fused, on fresh shapes down to one token (its own capture, and on Triton the pair-wise
    GEMVs: weights an einsum reads as transposed views were wrong there)."""
    device = _device(backend)
    torch.manual_seed(0)
    model = TinyModel(USER_BLOCKS[kind]()).eval().to(device)
    cm, layer = compile_on_ids(model, device=device, backend=backend)
    assert layer.fused, layer.reason
    for shape in ((3, 11), (1, 7), (4, 32), (1, 1)):
        x = torch.randint(0, 50, shape, device=device)
        ref, got = model(x), cm(x)
        assert ((got - ref).norm() / ref.norm()).item() < (1e-4 if device == "cuda" else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_experts_activation_is_the_one_that_fits_best_in_low_precision(dtype):
    """At the pre-activations small initial weights give (a few tenths) silu and gelu differ by less than bf16's
    tolerance: the probe spreads them out, and the activation that fits best is taken, not the first that fits."""
    from user_modules import SequentialGeluMoE

    torch.manual_seed(0)
    model = TinyModel(SequentialGeluMoE()).eval().to(dtype)
    cm, layer = compile_on_ids(model, backend="torch")
    assert layer.fused and layer.activation == "gelu +bias", (layer.activation, layer.reason)
    x = torch.randint(0, 50, (4, 33))
    ref, got = model(x).float(), cm(x).float()
    assert ((got - ref).norm() / ref.norm()).item() < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("act,gated,expected", [("gelu", False, "gelu"), ("relu", False, "relu"),
                                                ("gelu", True, "gated-gelu"), ("silu", True, "gated-silu")])
def test_stacked_experts_activation_is_refit_on_spread_probes_in_bf16(act, gated, expected):
    """Stacked experts no module can be probed through are proven by the block's unit probes, where initial weights
    leave pre-activations of a few hundredths: bf16 took gelu and relu for silu. The activation is chosen again on
    probes scaled to spread them (the routing, which those saturate, is kept)."""
    from user_modules import SmallStackedMoE

    torch.manual_seed(0)
    model = TinyModel(SmallStackedMoE(getattr(F, act), gated)).eval().to(torch.bfloat16)
    cm, layer = compile_on_ids(model, backend="torch")
    assert layer.fused and layer.activation == expected and layer.routing == "softmax->top2", layer


@pytest.mark.parametrize("backend,bias", [("torch", False), ("onnxruntime", False), ("triton", False),
                                          ("torch", True), ("triton", True)])
def test_experts_kept_as_one_list_per_projection_are_one_bank(backend, bias, monkeypatch):
    """``w1[e]``, ``w3[e]``, ``w2[e]`` in three lists of Linears: a list of bare Linears is no list of experts (its
    Linears are not MLPs), and the lists stacked are a bank like ``[E, ., .]`` weights, each read as the ``[out,
    in]`` a Linear stores (trying transposed readings too took 2.7 s per block), with its list's biases."""
    from user_modules import ProjectionListsMoE

    from moecc.passes.recognize import block as recognize_block

    checks = []
    verify = recognize_block._verify
    monkeypatch.setattr(recognize_block, "_verify", lambda *a, **k: checks.append(1) or verify(*a, **k))
    device = _device(backend)
    torch.manual_seed(0)
    model = TinyModel(ProjectionListsMoE(bias=bias)).eval().to(device)
    cm, layer = compile_on_ids(model, backend=backend, device=device)
    assert layer.fused and layer.routing == "softmax->top1", layer
    assert layer.activation == ("gated-silu +bias" if bias else "gated-silu"), layer.activation
    assert len(checks) < 50, len(checks)
    for shape in ((3, 11), (1, 1), (2, 70)):
        x = torch.randint(0, 50, shape, device=device)
        ref, got = model(x), cm(x)
        assert ((got - ref).norm() / ref.norm()).item() < (1e-4 if device == "cuda" else 1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
def test_weights_on_the_experts_inputs_are_told_apart_from_weights_on_outputs(backend):
    """A gated expert of a scaled input is not the scaled expert of the input: recognition proves which one the
    block computes, and every backend runs the pairs as rows of their own."""
    from user_modules import InputScaledMoE, LoopMoE

    device = _device(backend)
    torch.manual_seed(0)
    for block, on_inputs in ((InputScaledMoE(), True), (LoopMoE(), False)):
        model = TinyModel(block).eval().to(device)
        cm = moecc.compile(model, backend=backend)
        cm(torch.randint(0, 50, (2, 16), device=device))
        (layer,) = cm.moe_layers
        assert layer.fused and ("weights-on-inputs" in layer.routing) == on_inputs, (layer.routing, layer.reason)
        for shape in ((3, 11), (1, 7), (2, 300)):
            x = torch.randint(0, 50, shape, device=device)
            torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


def test_gshard_capacity_formula_is_symbolic():
    torch.manual_seed(0)
    cm = moecc.compile(TinyModel(USER_BLOCKS["gshard"]()).eval())
    cm(torch.randint(0, 50, (2, 16)))
    assert cm.moe_layers[0].capacity == "C = ceiling(T/4)"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("capacity_factor", [1.25, 2.0])
def test_a_capacity_rounded_down_is_told_from_one_rounded_up(capacity_factor, backend):
    """nanoMoE's ``floor(k * cf * T / E)``, slot-major: at an even token count a ceiling gives the same capacity
    (2 * 2 * 16 / 8), so the probes take odd lengths, and tokens whose top-k changes order tell the priority."""
    from user_modules import FloorCapacityMoE

    device = _device(backend)
    torch.manual_seed(0)
    model = TinyModel(FloorCapacityMoE(capacity_factor=capacity_factor)).eval().to(device)
    cm, layer = compile_on_ids(model, backend=backend, device=device)
    assert layer.fused and layer.capacity == f"C = floor({'5*T/16' if capacity_factor == 1.25 else 'T/2'})", layer
    for shape in ((3, 11), (1, 9), (5, 33)):
        x = torch.randint(0, 50, shape, device=device)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


class SparseMixerLike(torch.nn.Module):
    """A router no pattern knows (a masked, jittered double softmax): must run exactly as written."""

    def __init__(self, hidden=24, num_experts=4):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, num_experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(hidden, 16), torch.nn.ReLU(),
                                                               torch.nn.Linear(16, hidden)) for _ in range(4))

    def forward(self, x):
        logits = self.gate(x)
        top = logits.max(-1, keepdim=True).values
        w = torch.softmax(logits.masked_fill((top - logits) > 0.3 * top.abs(), -1e9), -1)
        idx = w.argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            sel = idx == e
            out = out + torch.where(sel[..., None], expert(x) * w[..., e:e + 1] ** 0.5, 0)
        return out


def test_unknown_router_runs_as_written_and_says_why():
    torch.manual_seed(0)
    model = TinyModel(SparseMixerLike()).eval()
    cm = moecc.compile(model)
    x = torch.randint(0, 50, (2, 9))
    cm(x)
    (layer,) = cm.moe_layers
    assert not layer.fused and layer.reason
    x2 = torch.randint(0, 50, (3, 5))
    torch.testing.assert_close(cm(x2), model(x2), rtol=1e-5, atol=1e-6)


def test_block_bias_is_found_as_the_selection_bias():
    torch.manual_seed(0)
    _, layer = compile_on_ids(TinyModel(USER_BLOCKS["block_bias"]()).eval(), backend="reference")
    assert layer.fused and "sigmoid" in layer.routing and "selection-bias" in layer.routing, layer.routing


def test_unknown_router_called_with_block_arguments_runs_as_written():
    """A router no pattern matches, called on [B, S, H] with the block's bias as an argument: exported with that
    call's rank and arguments, its (weights, ids) feed the fused experts."""
    from user_modules import BlockBiasMoE

    torch.manual_seed(0)
    model = TinyModel(BlockBiasMoE(temperature=0.7)).eval()
    cm, layer = compile_on_ids(model, backend="reference")
    assert layer.fused and "router kept as its own graph ops" in layer.routing, (layer.routing, layer.reason)
    for shape in ((3, 11), (1, 7)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_stack_of_layers_is_no_moe_block():
    """A ModuleList of identical layers looks like an expert list; a weight with one row per layer inside one of
    the layers (DeepSeek-V3.2's indexer has an [n_heads, H] projection) is no router for it."""
    from torch import nn

    from moecc.discover import find_moe_blocks

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(24, 24)
            self.heads = nn.Linear(24, 2)

    model = nn.Module()
    model.layers = nn.ModuleList([Layer(), Layer()])
    assert find_moe_blocks(model) == []


def test_low_precision_recognition_takes_the_closest_candidate_not_the_first_that_passes():
    """In bf16 a block's own rounding (and its near-tied experts) needs a loose bound, which weights on the
    experts' outputs also meet when the block puts them on their inputs and they are near 1 (a sigmoid top-1
    over large logits, as in Llama 4): about 9 % apart here. The candidate within bf16's rounding must win."""
    import transformers as tf
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    from moecc.passes.recognize.block import analyze_block

    torch.manual_seed(0)
    cfg = tf.Llama4TextConfig(hidden_size=256, intermediate_size=512, num_local_experts=16, num_experts_per_tok=1)
    block = Llama4TextMoe(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
        block.router.weight.mul_(4.5)  # logits of std 1.4: the chosen expert's weight is about 0.9
    result = analyze_block(block, torch.empty(1, 2, 256, dtype=torch.bfloat16))
    assert result and result.value.routing.weights_on_inputs, result.reason or result.value.routing.describe()
    cm = moecc.compile(block, backend="reference")
    x = torch.randn(1, 40, 256, dtype=torch.bfloat16)
    # equal up to bf16's rounding (the other candidate is 9 % off): the block's bmm over every expert and the
    # reference lowering's per-expert matmuls gave equal bits on earlier CI machines, and on an AVX2-only CPU 7 of
    # 10240 outputs one last bit apart
    torch.testing.assert_close(cm(x)[0], block(x)[0], rtol=2 ** -7, atol=2 ** -12)


@pytest.mark.parametrize("hidden,inter,top_k", [(128, 64, 1), (96, 48, 2)])
def test_a_bank_called_on_rows_grouped_by_expert_is_probed_alone(monkeypatch, hidden, inter, top_k):
    """Llama 4's experts take every token once per expert, ``[E * T, H]``, and nothing else, so no probe called
    them alone: their layouts were searched jointly with the routing, on the block's outputs. Where gate-and-up is
    square (2I == H) the stored and the transposed readings both fit its shape, and from about H=96 the search ran
    out of time before the right one (Llama 4 at H 1024, I 512 was left as written). Probed on rows grouped by
    expert, the bank's layout is found first, in a fraction of the search's budget."""
    import transformers as tf
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    from moecc.passes.recognize.bank import grouped_rows_probe

    monkeypatch.setenv("MOECC_RECOGNIZE_SEARCH_S", "2")
    torch.manual_seed(0)
    cfg = tf.Llama4TextConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=16,
                              num_experts_per_tok=top_k)
    block = Llama4TextMoe(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    probe = grouped_rows_probe(block.experts, hidden, torch.empty(0), 16)
    x = torch.randn(3, hidden)
    rows = torch.zeros(16 * 3, hidden)
    rows[9:12] = x
    torch.testing.assert_close(probe(3, x), block.experts(rows)[9:12])
    assert grouped_rows_probe(block, hidden, torch.empty(0), 16) is None  # the block returns a tuple
    cm = moecc.compile(block, backend="torch")
    x = torch.randn(2, 7, hidden)
    with torch.no_grad():
        torch.testing.assert_close(cm(x)[0], block(x)[0], rtol=1e-5, atol=1e-6)
    (layer,) = cm.moe_layers
    assert layer.fused and "weights-on-inputs" in layer.routing, layer.reason


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("kind,fused", [("ignores_ids", True), ("pad_masked", False), ("hash_routed", True)])
def test_a_block_handed_other_arguments_is_lifted_when_it_ignores_them_or_its_router_reads_them(kind, fused,
                                                                                                   device):
    """The canonical ops read the hidden states only; a router kept as written may read the token ids too."""
    from user_modules import HashRoutedMoE, IdsModel, IgnoresIdsMoE, PadMaskedMoE

    block = {"ignores_ids": IgnoresIdsMoE, "pad_masked": PadMaskedMoE, "hash_routed": HashRoutedMoE}[kind]
    torch.manual_seed(0)
    model = IdsModel(block()).eval().to(device)
    cm, layer = compile_on_ids(model, low=1, device=device)
    assert layer.fused == fused, layer.reason
    if not fused:
        assert "input_ids" in layer.reason, layer.reason
    if kind == "hash_routed":
        assert "router kept as its own graph ops" in layer.routing, layer.routing
    for shape in ((3, 11), (1, 7), (4, 32)):
        x = torch.randint(0, 50, shape, device=device)
        ref, got = model(x), cm(x)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_experts_without_a_router_run_as_written_and_say_why():
    from user_modules import MLPRoutedMoE

    torch.manual_seed(0)
    model = TinyModel(MLPRoutedMoE()).eval()
    cm, layer = compile_on_ids(model)
    assert layer.name == "moe" and not layer.fused
    assert layer.reason == "no router: no [E=6, H=24] weight outside the experts", layer.reason
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


def test_a_block_with_nan_weights_runs_as_written_and_says_why():
    """A module built without initializing its weights (``torch.empty``) may hold NaN: its probes mean nothing, so
    the block stays as written, with the parameter named."""
    from user_modules import LoopMoE

    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval()
    with torch.no_grad():
        model.moe.experts[3].w2.weight[0, 0] = float("nan")
    cm, layer = compile_on_ids(model)
    assert not layer.fused and "experts.3.w2.weight holds NaN or inf" in layer.reason, layer.reason
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x), equal_nan=True)


def test_a_block_called_channels_first_runs_as_written_and_says_where_its_hidden_size_is():
    from user_modules import ChannelsFirstModel, ChannelsFirstMoE

    torch.manual_seed(0)
    model = ChannelsFirstModel(ChannelsFirstMoE()).eval()
    cm, layer = compile_on_ids(model, backend="torch")
    assert not layer.fused
    assert "holds 24 at dim 1: moecc fuses blocks whose input holds the hidden size last" in layer.reason, \
        layer.reason
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_finds_each_non_finite_value_and_no_other(dtype):
    from moecc.passes.recognize.block import all_finite

    t = torch.randn(64, 33).to(dtype)
    assert all_finite(t) and all_finite(t[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[5, 7] = bad
        assert not all_finite(u)
    both = t.clone()
    both[0, 0], both[1, 1] = float("inf"), -float("inf")  # a NaN sum
    assert not all_finite(both)
    big = torch.full((64, 33), torch.finfo(dtype).max / 2, dtype=dtype)  # its sum overflows, its values are finite
    assert not torch.isfinite(big.sum()) and all_finite(big)


def test_a_gate_over_the_whole_output_runs_as_written_and_says_it_found_no_shared_expert():
    from user_modules import OutputGateMoE

    torch.manual_seed(0)
    model = TinyModel(OutputGateMoE()).eval()
    cm, layer = compile_on_ids(model)
    assert not layer.fused and "'out_gate' (Linear 24 -> 1) read as gates" in layer.reason, layer.reason
    assert "holds no shared expert" in layer.reason, layer.reason
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_block_that_adds_its_input_to_its_output_is_fused_with_the_addition(backend):
    from user_modules import ResidualInsideMoE

    torch.manual_seed(0)
    layer = compiled_on(backend, ResidualInsideMoE())
    assert layer.fused and layer.residual, layer


def test_a_norm_of_the_blocks_output_is_recorded_and_inlined():
    from user_modules import PostNormMoE

    torch.manual_seed(0)
    _, layer = compile_on_ids(TinyModel(PostNormMoE()).eval())
    assert layer.fused and layer.output_module == "LayerNorm", (layer.output_module, layer.reason)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
def test_a_post_norm_residual_inside_the_block_is_fused_with_both(backend):
    from user_modules import PostNormResidualMoE

    torch.manual_seed(0)
    layer = compiled_on(backend, PostNormResidualMoE())
    assert layer.fused and layer.residual and layer.output_module == "LayerNorm", layer


@pytest.mark.parametrize("split,bias", [("first_half", False), ("second_half", True), ("even", False),
                                        ("odd", True)])
def test_experts_with_one_projection_for_gate_and_up_are_fused(split, bias):
    from user_modules import FusedGateUpMoE

    torch.manual_seed(0)
    model = TinyModel(FusedGateUpMoE(split, bias)).eval()
    cm, layer = compile_on_ids(model, backend="torch")
    assert layer.fused and layer.activation == "gated-silu" + (" +bias" if bias else ""), layer
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("gated", [True, False])
def test_experts_of_different_widths_are_padded_with_zero_units(backend, gated):
    from user_modules import UnevenWidthMoE

    torch.manual_seed(0)
    layer = compiled_on(backend, UnevenWidthMoE(gated=gated))
    assert layer.fused and layer.intermediate_size == 40, layer
    assert layer.activation == ("gated-silu" if gated else "gelu +bias"), layer


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("pass_input", [True, False])
def test_experts_past_the_bank_that_compute_nothing(backend, pass_input):
    """A router over more experts than the bank holds, whose last ones compute nothing: identity experts pass their
    input on scaled by their weight, zero experts add nothing. Ids past the bank do no compute in the expert ops,
    and the check proves which of the two the block computes."""
    from user_modules import IdentityExpertsMoE

    torch.manual_seed(0)
    layer = compiled_on(backend, IdentityExpertsMoE(pass_input=pass_input))
    assert layer.fused and layer.num_experts == 6 and layer.top_k == 3, layer
    assert layer.routing.endswith(f"+3 {'identity' if pass_input else 'zero'} experts"), layer
    if backend == "onnxruntime":  # com.microsoft.MoE routes over the bank's experts only
        assert "no experts that compute nothing" in layer.lowering, layer


@pytest.mark.parametrize("swap", ["other_activation", "no_mlp"])
def test_a_swapped_in_expert_the_bank_cannot_hold_runs_its_block_as_written_and_says_why(swap):
    """One expert of another activation, or of another type that no MLP form reads (it clamps its output: the
    block was not found before, as its list was no bank, and torch.export refused the whole model). The block runs
    as written, the rest of the model is compiled, and the reason says which."""
    from user_modules import ClampedMLP, GeluMLP, LoopMoE, UnevenWidthMoE

    torch.manual_seed(0)
    block, index, expert, why = (UnevenWidthMoE(), 2, GeluMLP(24, 24), "differ in activation") \
        if swap == "other_activation" else (LoopMoE(), 3, ClampedMLP(24, 40), "expert 3: ClampedMLP")
    block.experts[index] = expert
    model = TinyModel(block).eval()
    cm, layer = compile_on_ids(model, backend="torch")
    assert not layer.fused and why in layer.reason, layer
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("layer_scale,only", [(False, None), (True, None), (False, 5), (True, 0)])
def test_an_experts_output_scale_is_folded_into_its_down_projection(backend, layer_scale, only):
    """Experts that scale their output by a constant or a learned per-feature scale, all of them or one swapped in
    among plain experts: the scale is folded into each one's down projection."""
    from user_modules import ScaledExpertsMoE

    torch.manual_seed(0)
    layer = compiled_on(backend, ScaledExpertsMoE(layer_scale, only))
    assert layer.fused and layer.num_experts == 6, layer


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("kind", [{}, {"matmul": True}, {"gated": False, "bias": True}, {"matmul": True, "bias": True}])
def test_experts_of_bare_parameters_are_a_bank(backend, kind):
    """Experts that hold their weights as parameters (``F.linear(x, self.w)`` or ``x @ self.w``), no Linear: their
    list is stacked like a stacked bank and read in either orientation. Such a block was not found before, and
    torch.export refused the whole model."""
    from user_modules import ParameterExpertsMoE

    torch.manual_seed(0)
    layer = compiled_on(backend, ParameterExpertsMoE(**kind))
    assert layer.fused and layer.num_experts == 6 and layer.intermediate_size == 40, layer
    gated = kind.get("gated", True)
    assert layer.activation.startswith("gated-silu" if gated else "gelu"), layer
    assert ("+bias" in layer.activation) == kind.get("bias", False), layer


@pytest.mark.parametrize("bank", ["modules", "projection_lists", "bare_parameters"])
def test_router_slots_that_share_an_expert_are_fused_with_its_weights_in_each_slot(bank):
    """Experts merged after training: a list holds one module at several entries. ``children()`` lists it once,
    which read five experts for a six-way router, and the block ran as written with a reason that named no cause.
    The slots take the shared weights, and an update of them after the compile reaches every slot."""
    from user_modules import MergedExpertsMoE, ParameterExpertsMoE, ProjectionListsMoE, tie_experts

    torch.manual_seed(0)
    if bank == "modules":
        block = MergedExpertsMoE()
        shared = block.experts[1].w1.weight
    elif bank == "projection_lists":
        block = ProjectionListsMoE()
        tie_experts([block.w1, block.w3, block.w2], {3: 1, 5: 0})
        shared = block.w1[1].weight
    else:
        block = ParameterExpertsMoE()
        tie_experts([block.experts], {3: 1, 5: 0})
        shared = block.experts[1].w_in
    model = TinyModel(block).eval()
    cm, layer = compile_on_ids(model, backend="torch")
    assert layer.fused and layer.num_experts == 6, layer
    x = torch.randint(0, 50, (4, 32))
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
        shared.mul_(1.5)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale,shift,after_topk", [(1 / 0.7, False, False), (1.0, True, False), (0.5, True, False),
                                                    (1 / 0.7, False, True), (3.0, False, True)])
def test_logits_the_block_scales_or_shifts_before_scoring_are_folded_into_the_router(scale, shift, after_topk, dtype):
    """A temperature or shift before scoring, or a temperature on the k logits a top-k kept (Mixtral's
    top-k-then-softmax with a temperature). In bf16 a routing without the temperature passes the loose bound too
    (three times bf16 eager's error against the fp32 model): the folded router is tried there as well, and wins."""
    import copy

    from user_modules import ScaledLogitsMoE

    torch.manual_seed(0)
    reference = TinyModel(ScaledLogitsMoE(scale, shift, after_topk=after_topk)).eval()
    model = copy.deepcopy(reference).to(dtype)
    cm, layer = compile_on_ids(model, backend="torch")
    assert layer.fused and layer.routing.startswith("softmax->top2 renorm"), layer
    assert ("router-bias" in layer.routing) == shift, layer.routing
    x = torch.randint(0, 50, (4, 64))
    tol = {} if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(cm(x), model(x), **tol)
    if dtype != torch.float32:
        error = lambda y: ((y.double() - reference(x).double()).norm() / reference(x).double().norm()).item()  # noqa: E731
        assert error(cm(x)) < 1.5 * error(model(x)), (error(cm(x)), error(model(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_router_modules_own_bias_may_bias_the_selection_only(dtype):
    from user_modules import ReferenceGateMoE

    torch.manual_seed(0)
    model = TinyModel(ReferenceGateMoE()).eval().to(dtype)
    cm, layer = compile_on_ids(model, backend="torch")
    assert layer.fused, layer.reason
    if dtype == torch.float32:  # in bf16 the gate adds its bias in bf16: near ties may keep it as written
        assert layer.routing == "sigmoid->top2 renorm selection-bias groups 2/4 x2.5", layer.routing
    x = torch.randint(0, 50, (3, 11))
    tol = {} if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(cm(x), model(x), **tol)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("routing", ["router_module", "inline"])
def test_a_routers_per_expert_scale_of_its_weights_is_fitted_and_fused(backend, routing):
    """Gemma 4's router multiplies each chosen weight by its expert's learned factor: the fit reads which of the
    router's [E] parameters it is (from a router module's outputs, or by search where the block routes in its own
    code), and every backend applies it: the route on torch and Triton (the gating kernel), the copy of each
    expert's down projection that ONNX Runtime's com.microsoft.MoE reads."""
    from user_modules import ExpertScaledMoE, InlineExpertScaledMoE

    device = _device(backend)
    torch.manual_seed(0)
    block = ExpertScaledMoE() if routing == "router_module" else InlineExpertScaledMoE()
    model = TinyModel(block).eval().to(device)
    cm, layer = compile_on_ids(model, backend=backend, device=device)
    assert layer.fused and layer.routing == "softmax->top2 renorm per-expert-scale", (layer.reason, layer.routing)
    if backend == "onnxruntime":
        from moecc.codegen.onnx.ort_moe import ort_computes_same

        assert layer.lowering == ("com.microsoft.MoE" if ort_computes_same("swiglu", True, 2, False, 1.0, 0.0, 0.0, 6)
                                  else ORT_ROUTED + SWIGLU_MISMATCH), layer.lowering
    for shape in ((3, 11), (1, 1)):
        x = torch.randint(0, 50, shape, device=device)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # ones (the factor at init) fit as no factor at all
        getattr(block, "router", block).per_expert_scale.fill_(1.0)
    _, layer = compile_on_ids(model, backend="torch", device=device)
    assert layer.routing == "softmax->top2 renorm", layer.routing


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_per_expert_scales_travel_in_an_exported_artifact(backend, tmp_path):
    """The factors are a routing parameter of the program (torch) or folded into the down projection that
    com.microsoft.MoE reads (ONNX): either way the artifact holds them."""
    from user_modules import ExpertScaledMoE

    torch.manual_seed(0)
    model = TinyModel(ExpertScaledMoE()).eval()
    path = moecc.export(model, (torch.randint(0, 50, (2, 7)),), tmp_path / "artifact", backend=backend)
    loaded = moecc.load(path)
    (layer,) = loaded.moe_layers
    assert layer["fused"] and layer["routing"] == "softmax->top2 renorm per-expert-scale", layer
    for shape in ((3, 9), (1, 1)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_group_limited_routing_written_with_constants_is_found_from_the_choices(backend):
    from user_modules import InlineGroupsMoE

    torch.manual_seed(0)
    model = TinyModel(InlineGroupsMoE()).eval()
    cm, layer = compile_on_ids(model, backend=backend)
    assert layer.fused and layer.routing == "softmax->top4 groups 2/4 by top-1", (layer.routing, layer.reason)
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


def test_plain_top_k_is_not_taken_for_group_limited():
    from moecc.passes.recognize.router import observed_groups

    g = torch.Generator().manual_seed(0)
    plain = torch.randn(256, 16, generator=g).topk(4, dim=-1).indices
    assert observed_groups(plain, 16) == []
    grouped = torch.randn(256, 16, generator=g).view(256, 4, 4)
    grouped[:, 1:3] -= 100  # only groups 0 and 3 ever chosen
    assert (4, 2) in observed_groups(grouped.flatten(1).topk(4, dim=-1).indices, 16)


def test_a_long_failed_search_is_reused_for_blocks_of_the_same_structure(monkeypatch):
    from user_modules import MLPRoutedMoE

    import moecc.passes.recognize as recognize

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 24)
            self.blocks = torch.nn.ModuleList([MLPRoutedMoE(), MLPRoutedMoE(), MLPRoutedMoE(inter=32)])

        def forward(self, ids):
            h = self.embed(ids)
            for block in self.blocks:
                h = h + block(h)
            return h

    analyzed = []
    analyze = recognize._analyze
    monkeypatch.setattr(recognize, "_analyze", lambda block, node: analyzed.append(block) or analyze(block, node))
    monkeypatch.setattr(recognize, "REUSE_FAILURES_AFTER_S", 0.0)
    torch.manual_seed(0)
    model = Stack().eval()
    cm = moecc.compile(model, backend="torch")
    x = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(cm(x), model(x))
    first, second, third = cm.moe_layers
    assert len(analyzed) == 2 and analyzed[0] is model.blocks[0] and analyzed[1] is model.blocks[2], analyzed
    assert second.reason == f"{first.reason} (as blocks.0, the same module over the same shapes)", second.reason
    assert not third.reason.endswith("same shapes)"), third.reason


def test_an_error_inside_recognition_leaves_the_block_as_written_with_the_reason(monkeypatch):
    import moecc.passes.recognize as recognize

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(recognize, "analyze_block", broken)
    torch.manual_seed(0)
    model = TinyModel(USER_BLOCKS["loop"]()).eval()
    cm, layer = compile_on_ids(model, backend="torch")
    assert not layer.fused and layer.reason.startswith("recognition raised RuntimeError: boom"), layer.reason
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


def test_a_block_handed_its_hidden_states_by_keyword():
    from user_modules import HashRoutedMoE, KeywordIdsModel

    torch.manual_seed(0)
    model = KeywordIdsModel(HashRoutedMoE()).eval()
    cm, layer = compile_on_ids(model, low=1)
    assert layer.fused, layer.reason
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("read,fused", [("y", True), ("probs", True), ("aux", False)])
def test_extra_block_outputs_need_reproducing_only_where_the_model_reads_them(read, fused):
    """A block returning ``(y, (probs, aux_loss))``: outputs the model drops need no canonical counterpart, router
    probabilities have one, and a loss the model reads keeps the block as written; reading a leaf of the nested
    outputs works either way (a block left as written is read through ``output_leaves``)."""
    from user_modules import AuxModel, AuxOutputsMoE

    torch.manual_seed(0)
    model = AuxModel(AuxOutputsMoE(), read).eval()
    cm = moecc.compile(model, backend="torch")
    cm(torch.randint(0, 50, (2, 16)))
    (layer,) = cm.moe_layers
    assert layer.fused == fused, layer.reason
    if not fused:
        assert "no canonical form reproduces" in layer.reason
    for shape in ((3, 11), (1, 7)):
        x = torch.randint(0, 50, shape)
        ref, got = model(x), cm(x)
        for r, g in zip(torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(got)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_a_failed_onnx_export_prints_no_graph(capfd):
    """torch.export prints the whole partial graph to stderr on a data-dependent error; moecc reports the failure
    in one warning and falls back, so the graph goes to the debug log instead."""
    from user_modules import AuxModel, AuxOutputsMoE

    torch.manual_seed(0)
    model = AuxModel(AuxOutputsMoE(), "aux").eval()  # its block stays as written: an expert loop ONNX cannot trace
    cm = moecc.compile(model)
    cm(torch.randint(0, 50, (2, 16)))
    assert not cm.moe_layers[0].fused
    assert cm.moe_layers[0].lowering.startswith("torch, between ONNX Runtime graphs (moe does not export to ONNX alone")
    assert "def forward" not in capfd.readouterr().err


def test_export_of_a_block_left_as_written_says_why_it_cannot(tmp_path):
    """An artifact holds no model code: a block left as written is traced into it, which its expert loop
    defeats; export says so, naming the block and why it was left, instead of torch.export's own error."""
    from user_modules import AuxModel, AuxOutputsMoE

    torch.manual_seed(0)
    model = AuxModel(AuxOutputsMoE(), "aux").eval()
    with pytest.raises(moecc.ArtifactError, match=r"left as written \(moe\).*no canonical form reproduces"):
        moecc.export(model, (torch.randint(0, 50, (2, 16)),), tmp_path / "artifact", backend="torch")


@pytest.mark.parametrize("read_aux", [False, True])
def test_a_none_beside_the_block_outputs_stays_none(read_aux):
    """A block that returns None beside its tensors is kept as a leaf (capture refused it, so the whole model
    failed to compile, as ZAYA's attention did): fused when the model drops its loss, as written when it reads it."""
    from user_modules import NoneBesideModel, NoneBesideMoE

    torch.manual_seed(0)
    model = NoneBesideModel(NoneBesideMoE(), read_aux).eval()
    cm = moecc.compile(model, backend="torch")
    cm(torch.randint(0, 50, (2, 16)))
    (layer,) = cm.moe_layers
    assert layer.fused != read_aux, layer.reason
    x = torch.randint(0, 50, (3, 11))
    for r, g in zip(torch.utils._pytree.tree_leaves(model(x)), torch.utils._pytree.tree_leaves(cm(x))):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_float64_blocks_run_as_written_and_say_why():
    """The canonical ops route and combine in float32: a float64 block is left exact, with the reason."""
    torch.manual_seed(0)
    model = TinyModel(USER_BLOCKS["loop"]()).eval().double()
    cm, layer = compile_on_ids(model, backend="torch")
    assert not layer.fused and "float64" in layer.reason, layer.reason
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("weight_scale", [1.0, 0.05])  # the clamp acts on ordinary inputs; only on amplified probes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_openai_reference_mlp_block_is_fused_with_its_pre_norm_and_default_clamp(weight_scale, dtype):
    """The block normalizes its own input (found by what its gate Linear reads) and calls a swiglu whose alpha and
    limit are function defaults (GPT-OSS's published constants, proven on probes that pass the clamp)."""
    from user_modules import ReferenceMLPBlock

    torch.manual_seed(0)
    model = TinyModel(ReferenceMLPBlock(weight_scale=weight_scale)).eval().to(dtype)
    model.moe.norm.float()  # the reference keeps its norm's scale in fp32
    cm, layer = compile_on_ids(model, backend="torch")
    assert layer.fused and layer.input_module == "ReferenceRMSNorm" and layer.residual, layer
    assert layer.activation == "gated-swiglu_oai clamp 7 +bias", layer.activation
    tol = {} if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for shape in ((3, 11), (1, 7)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), **tol)


@pytest.mark.parametrize("limit", [10.0, float("inf")])
def test_a_swiglu_clamped_elsewhere_than_gpt_oss_is_left_as_written(limit):
    """Unit probes never reach the clamp here, so GPT-OSS's limit of 7 fits them; the probes that pass it refute
    it, and the block runs as written, saying why."""
    import functools

    from user_modules import ReferenceMLPBlock, oai_swiglu

    torch.manual_seed(0)
    model = TinyModel(ReferenceMLPBlock(swiglu=functools.partial(oai_swiglu, limit=limit), weight_scale=0.05)).eval()
    cm, layer = compile_on_ids(model, backend="torch")
    assert not layer.fused and "clamp at 7 does not fit" in layer.reason, layer.reason
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("limit", [7.0, 5.0])
def test_a_default_clamp_is_proven_for_a_block_called_with_other_arguments(limit):
    """The probes that pass the clamp call the block with its other arguments drawn anew, as recognition does."""
    import functools

    from user_modules import IdsModel, IdsReferenceMLPBlock, oai_swiglu

    torch.manual_seed(0)
    block = IdsReferenceMLPBlock(swiglu=functools.partial(oai_swiglu, limit=limit), weight_scale=0.05)
    model = IdsModel(block).eval()
    cm, layer = compile_on_ids(model, backend="torch")
    if limit == 7.0:
        assert layer.fused and "clamp 7" in layer.activation, layer
    else:  # unit probes fit 7 as well; the probes that pass the clamp do not
        assert not layer.fused and "does not fit probes that pass it" in layer.reason, layer.reason
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("backend", ["onnxruntime", "triton"])
def test_openai_reference_mlp_block_runs_fused_on_the_other_backends(backend):
    from user_modules import ReferenceMLPBlock

    torch.manual_seed(0)
    layer = compiled_on(backend, ReferenceMLPBlock())
    assert layer.fused and layer.input_module == "ReferenceRMSNorm", layer


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_norm_of_the_blocks_own_input_runs_first_in_the_canonical_form(residual, dtype):
    from user_modules import PreNormMoE

    torch.manual_seed(0)
    model = TinyModel(PreNormMoE(residual)).eval().to(dtype)
    cm, layer = compile_on_ids(model, backend="torch")
    assert layer.fused and layer.input_module == "LayerNorm" and layer.residual == residual, layer
    x = torch.randint(0, 50, (3, 11))
    tol = {} if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(cm(x), model(x), **tol)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("bank", ["modules", "stacked"])
def test_a_norm_of_the_routers_input_alone_runs_before_the_router_only(backend, bank):
    """The router reads norm(x), the experts x: what the expert modules are handed tells which (rows of the
    block's input), and a stacked bank, whose calls show nothing, is tried both ways. ONNX Runtime's MoE op
    then scores the normed tokens and runs its experts on the block's input."""
    from user_modules import RouterNormBmmMoE, RouterNormMoE

    device = _device(backend)
    torch.manual_seed(0)
    block = RouterNormMoE() if bank == "modules" else RouterNormBmmMoE()
    model = TinyModel(block).eval().to(device)
    cm, layer = compile_on_ids(model, backend=backend, device=device)
    norm = type(block.router_norm).__name__
    assert layer.fused and layer.input_module == f"{norm} (router only)", (layer.reason, layer.input_module)
    if backend == "onnxruntime":
        assert layer.lowering == _ort_swiglu_lowering(bank == "stacked", len(block.w_gate) if bank == "stacked"
                                                      else len(block.experts)), layer.lowering
    for shape in ((3, 11), (1, 1)):
        x = torch.randint(0, 50, shape, device=device)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("kind,width,returns", [("mlp", 16, "logits"), ("mlp", 24, "logits"), ("mlp", 24, "routing"),
                                                ("cosine", 8, "logits")])
def test_a_router_module_that_scores_by_code_of_its_own_feeds_canonical_routing(backend, kind, width, returns):
    """A router MLP (its last layer ``[E, 16]``, or ``[E, H]`` at width H, which reads no hidden states) or a
    cosine router: the module's scores, kept as its own graph ops, feed the canonical route. A router whose last
    op is a Linear then fuses with the route (``fused_route`` over that layer's input, which flattens the module's
    [B, S, F]); ONNX Runtime's MoE op scores those features."""
    from user_modules import ScoringModuleMoE

    device = _device(backend)
    torch.manual_seed(0)
    model = TinyModel(ScoringModuleMoE(kind, width, returns)).eval().to(device)
    cm, layer = compile_on_ids(model, backend=backend, device=device)
    assert layer.fused, layer.reason
    assert layer.routing == ("softmax->top2 renorm" if returns == "routing" else "softmax->top2"), layer.routing
    if backend == "onnxruntime":  # a route fused with the router's last Linear: com.microsoft.MoE where it computes
        # the cosine router's scores are no softmax: ONNX Runtime is handed moecc's routing
        op_computes = _ort_swiglu_lowering(False, 6).startswith("com.microsoft.MoE")
        expected = _ort_swiglu_lowering(returns == "routing", 6) if kind == "mlp" else \
            "com.microsoft.MoE given moecc's routing" if op_computes else "routed in plain ONNX ops"
        assert layer.lowering.startswith(expected), layer.lowering
    for shape in ((3, 11), (1, 1), (2, 33)):
        x = torch.randint(0, 50, shape, device=device)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_router_module_scored_by_code_of_its_own_fuses_with_the_route_and_travels_in_an_artifact(tmp_path):
    from user_modules import ScoringModuleMoE

    torch.manual_seed(0)
    model = TinyModel(ScoringModuleMoE("mlp", 24)).eval()
    cm, _ = compile_on_ids(model, backend="torch", dump_dir=str(tmp_path / "dumps"))
    fused = (tmp_path / "dumps" / "003_fuse_gating.py").read_text()
    assert "moecc.fused_route" in fused and "moecc.route." not in fused
    loaded = moecc.load(moecc.export(model, (torch.randint(0, 50, (2, 7)),), tmp_path / "a", backend="onnxruntime"))
    x = torch.randint(0, 50, (3, 9))
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_a_block_computes_in_its_own_code_without_a_router_module_say_why(dtype):
    from user_modules import InlineCosineMoE

    torch.manual_seed(0)
    model = TinyModel(InlineCosineMoE()).eval().to(dtype)
    cm, layer = compile_on_ids(model, backend="torch")
    assert not layer.fused and "expert_embeddings in its own code, and no module of it computes the scores" in \
        layer.reason, layer.reason
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
def test_a_gate_kept_in_fp32_in_a_half_precision_model_routes_in_fp32(backend):
    """The block's probes take the dtype it is handed, not its first parameter's (the fp32 gate's): the experts
    were probed in fp32 and the block could not be called."""
    from user_modules import Fp32GateMoE

    device = _device(backend)
    dtype = torch.bfloat16 if device == "cuda" or backend == "torch" else torch.float16
    torch.manual_seed(0)
    model = TinyModel(Fp32GateMoE()).eval().to(device=device, dtype=dtype)
    model.moe.keep_gate_fp32()
    cm, layer = compile_on_ids(model, backend=backend, device=device)
    assert layer.fused and layer.routing == "softmax->top2 renorm", layer.reason
    for shape in ((3, 11), (1, 1)):
        x = torch.randint(0, 50, shape, device=device)
        torch.testing.assert_close(cm(x), model(x), rtol=2e-2, atol=2e-2)


def test_a_norm_of_the_routers_input_alone_travels_in_an_onnx_artifact(tmp_path):
    from user_modules import RouterNormMoE

    torch.manual_seed(0)
    model = TinyModel(RouterNormMoE()).eval()
    loaded = moecc.load(moecc.export(model, (torch.randint(0, 50, (2, 7)),), tmp_path / "a", backend="onnxruntime"))
    (layer,) = loaded.moe_layers
    assert layer["lowering"] == _ort_swiglu_lowering(False, 6), layer
    assert layer["input_module"] == "LayerNorm (router only)", layer
    x = torch.randint(0, 50, (3, 9))
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_pre_norm_before_a_router_weight_the_block_holds_itself_is_found_by_what_the_experts_read(backend):
    from user_modules import PreNormBareRouterMoE

    torch.manual_seed(0)
    model = TinyModel(PreNormBareRouterMoE()).eval()
    cm, layer = compile_on_ids(model, backend=backend)
    assert layer.fused and layer.input_module == "LayerNorm" and layer.residual, layer
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
def test_a_vmap_outside_the_blocks_survives_the_passes(backend, monkeypatch):
    """torch.export traces a ``torch.vmap`` into the program as calls that open and close a vmap level, which have
    no users: dead-code elimination dropped them, and the program failed in the vmap's batching ops (a family of
    transformers 5.24 builds its attention masks so)."""
    from user_modules import LoopMoE, VmapModel

    monkeypatch.setenv("MOECC_CAPTURE_CACHE", "0")
    torch.manual_seed(0)
    device = _device(backend)
    model = VmapModel(LoopMoE()).eval().to(device)
    cm, layer = compile_on_ids(model, backend=backend, device=device)
    assert layer.fused and cm._entries[0].backend == backend, layer
    for shape in ((3, 11), (1, 5)):
        x = torch.randint(0, 50, shape, device=device)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
def test_a_shared_expert_with_a_clamped_swiglu_is_fused(backend):
    """A shared expert applying GPT-OSS's clamped swiglu at the limit it names (MiniMax-M3's): the dense MLP is read
    with the clamp, as stacked experts are; it was left as written ("activation is none of ...")."""
    from user_modules import ClampedSharedMoE

    torch.manual_seed(0)
    layer = compiled_on(backend, ClampedSharedMoE())
    assert layer.fused and layer.shared_experts == 1, layer


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("stacked", [False, True])
def test_a_soft_capped_swiglu_is_fused(backend, stacked):
    """Experts whose SwiGLU soft-caps its gate factor and up at caps a module names (Inkling 2's): the canonical
    ``swiglu_softcap``, in dense MLP experts and in a stacked bank. Both were left as written."""
    from user_modules import SoftcappedMoE, SoftcappedStackedMoE

    torch.manual_seed(0)
    layer = compiled_on(backend, SoftcappedStackedMoE() if stacked else SoftcappedMoE())
    assert layer.fused and layer.activation == "gated-swiglu_softcap caps 0.6/0.4", layer


@pytest.mark.parametrize("user_dict", [False, True])
def test_blocks_handed_one_dict_share_a_fresh_one_on_every_call(user_dict):
    """Two blocks handed one dict (or a ``UserDict``) that the first writes into and the second reads, as Gemma 4's
    layers share their keys and values. The graph made the dict a literal: fx handed a plain one to the block
    read-only, which failed; a ``UserDict`` kept the tensors of every call and broke the graph's printed code."""
    from user_modules import SharedNotesModel

    torch.manual_seed(0)
    model = SharedNotesModel(user_dict).eval()
    cm = moecc.compile(model)
    for shape in ((2, 9), (3, 5), (2, 9)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x))
    assert len(cm.moe_layers) == 2 and "need its other arguments" in cm.moe_layers[0].reason
    for entry in cm._entries:
        entry.gm.recompile()  # its code prints no tensors an earlier call left in a literal
    torch.testing.assert_close(cm(x), model(x))


def test_a_program_that_export_made_but_that_does_not_run_is_an_export_error():
    """Whatever else makes torch.export return a program that fails on its own example inputs, capture says so
    (an ExportError: compile then runs the model as written, each MoE block compiled alone)."""
    from moecc.capture import _runs
    from moecc.errors import ExportError

    def broken(x):
        return x.view(-1, 7)

    gm = torch.fx.symbolic_trace(broken)
    with pytest.raises(ExportError, match="fails to run on the inputs it was made from"):
        _runs(gm, [torch.ones(2, 3)], torch.nn.Identity(), broken)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
def test_a_block_called_twice_is_lifted_once_and_holds_its_weights_once(backend):
    """Both calls of one block read one canonical block: its expert bank is stacked and laid out once."""
    from user_modules import LoopMoE, ReusedBlockModel

    torch.manual_seed(0)
    device = _device(backend)
    model = ReusedBlockModel(LoopMoE()).eval().to(device)
    cm, layer = compile_on_ids(model, backend=backend, device=device)
    assert layer.fused, layer
    x = torch.randint(0, 50, (3, 11), device=device)
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
    if backend != "onnxruntime":  # its session holds the weights (the export test counts them in the file)
        banks = [n for n, _ in cm._entries[-1].gm.named_parameters() if "w_up" in n]
        assert len(banks) == 1, banks


def test_a_block_called_on_two_lengths_is_lifted_once():
    """The two calls' inputs have sizes of their own (two symbols): still one canonical block, one bank."""
    from user_modules import LoopMoE, SharedAcrossLengthsModel

    torch.manual_seed(0)
    model = SharedAcrossLengthsModel(LoopMoE()).eval()
    cm = moecc.compile(model, backend="torch")
    cm(torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (2, 4)))
    (layer,) = cm.moe_layers
    assert layer.fused, layer
    assert len([n for n, _ in cm._entries[-1].gm.named_parameters() if "w_up" in n]) == 1
    ids, decoder_ids = torch.randint(0, 50, (3, 9)), torch.randint(0, 50, (3, 5))
    torch.testing.assert_close(cm(ids, decoder_ids), model(ids, decoder_ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("reused", [True, False])
def test_export_of_blocks_that_share_their_weights(backend, reused, tmp_path):
    """A block called twice, or two blocks of one router and bank: their canonical weights are one memory, which
    the artifact stores once (safetensors refused the torch program's weights)."""
    from user_modules import LoopMoE, ReusedBlockModel, SharedRoutingModel

    torch.manual_seed(0)
    model = (ReusedBlockModel(LoopMoE()) if reused else SharedRoutingModel()).eval()
    path = moecc.export(model, (torch.randint(0, 50, (2, 7)),), tmp_path / "artifact", backend=backend)
    loaded = moecc.load(path)
    assert all(layer["fused"] for layer in loaded.moe_layers), loaded.moe_layers
    x = torch.randint(0, 50, (3, 9))
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    if reused and backend == "onnxruntime":
        import onnx

        graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
        banks = [t.name for t in graph.initializer if "fc1" in t.name or "w_up" in t.name]
        assert len(banks) == 1, banks


def _routed_experts(kind: str):
    from user_modules import (
        FlatRoutedExperts,
        InlineRoutedLayer,
        InputWeightedRoutedExperts,
        StackedRoutedExperts,
        UnweightedRoutedExperts,
    )

    torch.manual_seed(0)
    experts = {"list": None, "int32_ids": None, "stacked": StackedRoutedExperts, "flat": FlatRoutedExperts,
               "on_inputs": InputWeightedRoutedExperts, "unweighted": UnweightedRoutedExperts}[kind]
    return InlineRoutedLayer(None if experts is None else experts(),
                             ids_dtype=torch.int32 if kind == "int32_ids" else torch.long)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("kind", ["list", "stacked", "int32_ids", "on_inputs", "flat"])
def test_experts_routed_by_their_caller_are_fused_alone(kind, backend):
    """A layer that mixes tokens and routes inline is no canonical MoE block; the experts it calls as
    ``experts(x, ids, weights)`` are captured alone, its routing runs as graph ops, and the experts are fused.
    Flat ``[E*F, H]`` experts are counted by their settings, there being no router beside them."""
    device = _device(backend)
    model = TinyModel(_routed_experts(kind)).eval().to(device)
    cm, layer = compile_on_ids(model, backend=backend, device=device)
    assert layer.fused and layer.name == "moe.experts" and layer.block == "moe", (layer.name, layer.reason)
    assert (layer.num_experts, layer.top_k) == (6, 2)
    assert layer.activation == ("gated-gelu" if kind == "stacked" else "gated-silu")
    assert layer.routing.endswith("weights-on-inputs") == (kind == "on_inputs"), layer.routing
    for shape in ((3, 11), (1, 1), (2, 5)):
        x = torch.randint(0, 50, shape, device=device)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


def test_experts_routed_by_their_caller_left_as_written_say_why_both_were():
    model = TinyModel(_routed_experts("unweighted")).eval()
    cm, layer = compile_on_ids(model, backend="torch")
    assert not layer.fused and layer.name == "moe.experts" and layer.block == "moe"
    assert "differs from UnweightedRoutedExperts on fresh routing" in layer.reason, layer.reason
    assert "; its block moe: " in layer.reason, layer.reason
    x = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(cm(x), model(x))


def test_routing_arguments_are_told_by_dtype_and_shape():
    from moecc.passes.recognize.routed import routing_positions

    x, ids, w = torch.randn(5, 8), torch.zeros(5, 2, dtype=torch.long), torch.rand(5, 2)
    assert routing_positions(((x, ids, w), {})) == (1, 0)
    assert routing_positions(((x,), {"weights": w, "ids": ids})) == (0, 1)
    assert routing_positions(((x, ids, w, torch.ones(5)), {})) is None  # a third tensor: not routing alone
    assert routing_positions(((x, ids, ids), {})) is None
    assert routing_positions(((x, ids[:4], w[:4]), {})) is None  # not one row per token
    # the tokens flattened for routing beside hidden states [B, S, H] (DBRX's experts are called so)
    assert routing_positions(((x.reshape(1, 5, 8), ids, w), {})) == (1, 0)
    assert routing_positions(((torch.randn(2, 5, 8), ids, w), {})) is None
    assert routing_positions(((x, ids.bool(), w), {})) is None


def test_experts_are_read_once_for_their_search_and_their_analysis(monkeypatch):
    """The search for a block's experts (first capture) and their analysis (second capture) read the same bank: the
    second reuses the first's reading. Nothing is kept past the compile (a reading may hold a copy of the weights),
    so a later compile of a changed model reads it afresh."""
    import moecc.passes.recognize.routed as routed

    reads = []
    read = routed._read_experts

    def counted(bank, *args):
        found = read(bank, *args)
        reads.append(bool(found))
        return found

    monkeypatch.setattr(routed, "_read_experts", counted)
    torch.manual_seed(0)
    model = TinyModel(_routed_experts("list")).eval()
    _, layer = compile_on_ids(model, backend="torch")
    assert layer.fused and reads == [True] and not routed._READ, (layer.reason, reads)
    with torch.no_grad():
        model.moe.experts.experts[0].w2.weight.mul_(2.0)
    cm, layer = compile_on_ids(model, backend="torch")
    assert layer.fused and reads == [True, True], reads
    x = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(cm(x), model(x))


def test_experts_that_cannot_fuse_cost_no_second_capture(monkeypatch):
    """Experts whose function is no canonical expert (each normalizes its own output) leave the block as written
    with the block's reason, and the model is not captured again for them."""
    from user_modules import InlineRoutedLayer, RoutedExperts

    import moecc.runtime.compiled as compiled

    class NormedOutputMLP(torch.nn.Module):
        def __init__(self, hidden, inter):
            super().__init__()
            self.up = torch.nn.Linear(hidden, inter)
            self.down = torch.nn.Linear(inter, hidden)
            self.norm = torch.nn.LayerNorm(hidden)

        def forward(self, x):
            return self.norm(self.down(F.relu(self.up(x))))

    captures = []
    capture = compiled.capture
    monkeypatch.setattr(compiled, "capture", lambda *a, **k: captures.append(1) or capture(*a, **k))
    torch.manual_seed(0)
    model = TinyModel(InlineRoutedLayer(RoutedExperts(mlp=NormedOutputMLP))).eval()
    cm, layer = compile_on_ids(model, backend="torch")
    assert not layer.fused and layer.name == "moe" and len(captures) == 1, (layer.name, layer.reason)
    x = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_block_handed_a_container_no_leaf_can_rebuild_fuses_its_experts_alone(backend):
    """A block called with a container whose unflattening reads its tensors (a DynamicCache; DiffusionGemma's
    layers are handed one) cannot be a graph leaf: it is traced as written, and its experts alone fuse."""
    from user_modules import NotebookModel

    torch.manual_seed(0)
    model = NotebookModel().eval()
    cm = moecc.compile(model, backend=backend)
    for shape in ((2, 16), (3, 7)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
    (layer,) = cm.moe_layers
    assert layer.fused and layer.name == "moe.experts", (layer.name, layer.reason)


def test_a_search_no_candidate_fits_stops_at_its_budget(monkeypatch):
    """A routed bank whose per-expert output norm weight is shaped like a router ([E, H], Ergo's) and whose routing
    arguments have defaults, so that it is taken for a MoE block and the weight for its router: every routing of
    that decoy fails against every expert form, which took minutes to try in full. The search stops at
    ``MOECC_RECOGNIZE_SEARCH_S`` and the bank runs as written, with the reason."""
    from user_modules import DefaultedNormedRoutedExperts, InlineRoutedLayer, NormedRoutedExperts

    monkeypatch.setenv("MOECC_RECOGNIZE_SEARCH_S", "1")
    torch.manual_seed(0)
    model = TinyModel(InlineRoutedLayer(DefaultedNormedRoutedExperts(), routing="softmax")).eval()
    start = time.monotonic()
    cm, layer = compile_on_ids(model, backend="torch")
    assert time.monotonic() - start < 60
    assert not layer.fused and "the search stopped after 1 s (MOECC_RECOGNIZE_SEARCH_S)" in layer.reason
    x = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(cm(x), model(x))
    # needing its routing, the same bank is no block: no decoy router, no search, and the reason is its experts'
    torch.manual_seed(0)
    model = TinyModel(InlineRoutedLayer(NormedRoutedExperts(), routing="softmax")).eval()
    cm, layer = compile_on_ids(model, backend="torch")
    assert not layer.fused and "NormedRoutedExperts: the expert function matches no canonical expert" in layer.reason


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("routing,described", [("softmax", "softmax->top2 renorm"),
                                               ("sigmoid_bias", "sigmoid->top2 renorm selection-bias x2.5"),
                                               ("softmax_expert_scale", "softmax->top2 renorm per-expert-scale"),
                                               ("softmax_fp32", "softmax->top2 renorm")])
def test_routing_written_beside_routed_experts_is_lifted_into_moecc_ops(routing, described, backend):
    """The layer routes in its own code, which becomes graph ops beside the experts it calls: where those ops
    compute a canonical routing of one router matmul's input, ``lift_routing`` proves it on probes and feeds the
    experts from ``linear`` + ``moecc.route`` (fused with the experts' routing on every backend: ONNX Runtime's
    com.microsoft.MoE takes a softmax)."""
    from user_modules import InlineRoutedLayer

    device = _device(backend)
    torch.manual_seed(0)
    model = TinyModel(InlineRoutedLayer(routing=routing)).eval().to(device)
    cm, layer = compile_on_ids(model, backend=backend, device=device)
    assert layer.fused and layer.routing == f"{described}, lifted from the model's own routing ops", layer.routing
    if backend == "onnxruntime":
        from moecc.codegen.onnx.ort_moe import ort_computes_same
        from moecc.codegen.onnx.ort_routed import ort_takes_weights_as_logits

        # an onnxruntime whose com.microsoft.MoE computes otherwise gets them routed in plain ONNX ops
        ort_moe = "com.microsoft.MoE" if ort_computes_same("swiglu", True, 2, False, 1.0, 0.0, 0.0, 6) else \
            ORT_ROUTED + SWIGLU_MISMATCH
        # a sigmoid routing is handed to it
        given = "com.microsoft.MoE given moecc's routing" if ort_takes_weights_as_logits(
            "swiglu", 2, False, 1.0, 0.0, 0.0, 6) else ""
        assert layer.lowering == {
            "softmax": ort_moe,
            "sigmoid_bias": f"{given} (com.microsoft.MoE routes with softmax, this block with sigmoid)"
                            if given else ORT_ROUTED + "com.microsoft.MoE routes with softmax, this block with "
                            "sigmoid; the installed onnxruntime's com.microsoft.MoE(swiglu) does not match when "
                            "handed the routing weights as logits",
            "softmax_expert_scale": ort_moe,  # each expert's factor folds into its copy of the down projection
            "softmax_fp32": ort_moe,
        }[routing], layer.lowering
    for shape in ((3, 11), (1, 1), (2, 5)):
        x = torch.randint(0, 50, shape, device=device)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


def test_lifted_routing_leaves_the_model_its_own_ops_where_it_reads_them(tmp_path):
    from user_modules import RoutingReturnedLayer

    torch.manual_seed(0)
    model = TinyModel(torch.nn.Identity()).eval()
    model.moe = RoutingReturnedLayer(routing="softmax")

    class ReadsIds(TinyModel):
        def forward(self, ids):
            h = self.embed(ids)
            y, chosen = self.moe(self.norm(h))
            return self.head(h + y), chosen

    model.__class__ = ReadsIds
    cm = moecc.compile(model, backend="torch", dump_dir=tmp_path)
    x = torch.randint(0, 50, (2, 9))
    cm(x)
    (layer,) = cm.moe_layers
    assert layer.fused and "lifted" in layer.routing, layer.routing
    for shape in ((3, 7), (1, 1)):
        x = torch.randint(0, 50, shape)
        got, ref = cm(x), model(x)
        torch.testing.assert_close(got[0], ref[0])
        assert torch.equal(got[1], ref[1])  # the model's own ids, in the model's own order
    code = (tmp_path / "002_lift_routing.py").read_text()
    assert "moecc.route" in code and "aten.topk" in code
    run = subprocess.run([sys.executable, "-m", "moecc.cli", "inspect", str(tmp_path)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)})
    assert run.returncode == 0 and "moe.experts (in moe)" in run.stdout and "lift_routing" in run.stdout, run.stdout


def test_routing_no_canonical_form_fits_stays_as_written_and_says_why(tmp_path):
    import json

    torch.manual_seed(0)
    model = TinyModel(_routed_experts("list")).eval()  # square roots of the top-k probabilities
    cm = moecc.compile(model, backend="torch", dump_dir=tmp_path)
    cm(torch.randint(0, 50, (2, 16)))
    (layer,) = cm.moe_layers
    assert layer.fused and "lifted" not in layer.routing, layer.routing
    passes = {p["pass"]: p for p in json.loads((tmp_path / "passes.json").read_text())["passes"]}
    assert passes["lift_routing"]["stats"] == {
        "lifted": 0, "kept": ["moe_block_0_moe: the routing ops match no canonical routing"]}


def test_experts_alone_that_cannot_be_captured_leave_their_block_as_written():
    """The routing a block's leaf hid may be code torch.export cannot trace (Python control flow on values): the
    second capture fails, and the compile keeps the first, with the block as written and both reasons."""
    from user_modules import DataDependentRoutedLayer

    torch.manual_seed(0)
    model = TinyModel(DataDependentRoutedLayer()).eval()
    cm, layer = compile_on_ids(model, backend="torch")
    assert not layer.fused and layer.name == "moe", (layer.name, layer.reason)
    assert "its experts alone could not be captured" in layer.reason, layer.reason
    x = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
@pytest.mark.parametrize("per_expert,project", [(True, False), (False, True)])
def test_experts_with_a_post_expert_norm_fuse(per_expert, project, backend):
    """A bank that puts each pair's expert output through a module of its own before weighting it (a post-expert
    norm: Ergo's RMSNorm with a weight per expert, called with the rows' expert ids; Muse Spark's scale-then-
    normalize) fuses: the fused experts compute one unweighted row per (token, slot) pair, the module runs on those
    rows as graph ops, and the rows are weighted and summed after it. The bank's [E, H] norm weight is no router,
    and a block whose experts read a projection of its input fuses its experts alone."""
    from user_modules import PostNormedMoE

    device = _device(backend)
    torch.manual_seed(0)
    model = TinyModel(PostNormedMoE(per_expert=per_expert, project=project)).eval().to(device)
    cm, layer = compile_on_ids(model, backend=backend, device=device)
    assert layer.fused and layer.name == "moe.experts" and layer.block == "moe", (layer.name, layer.reason)
    norm = "ExpertOutputNorm per expert" if per_expert else "ScaleThenNorm"
    assert layer.activation == f"relu2, then {norm} on each expert's output", layer.activation
    # the block's routing ops lift into moecc's route, which then feeds the pair rows and their weighting
    assert layer.routing == "sigmoid->top2 renorm, lifted from the model's own routing ops", layer.routing
    for shape in ((3, 11), (1, 1), (2, 5)):
        x = torch.randint(0, 50, shape, device=device)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


def test_an_expert_bank_handed_its_routing_is_no_moe_block():
    """A bank that holds its experts' weights and is called with its routing is not a MoE block, even with an
    [E, H] weight inside (Ergo's per-expert norm is shaped like a router): discovery takes the block around it."""
    from user_modules import PostNormedMoE, PostNormedRoutedExperts

    from moecc.discover import find_moe_blocks
    from moecc.passes.recognize.bank import is_moe_block

    assert not is_moe_block(PostNormedRoutedExperts())
    model = TinyModel(PostNormedMoE(project=False))
    assert [name for name, _ in find_moe_blocks(model)] == ["moe"]


@pytest.mark.parametrize("name", ["NoisyGateMoE", "SwitchedOffSharedMoE", "LegacyRouterMoE"])
def test_a_sub_module_the_block_never_reads_takes_no_part(name):
    """A child whose parameters no call of the block reads (training-only noise, a shared expert switched off, a
    leftover router) was taken for a shared expert or the router: the noise Linear failed as a shared expert ("1
    Linear layers"), the unused MLP was added to every candidate and no candidate fit, the leftover router was
    found first. Calls of the block on random tokens now show which children it reads."""
    import user_modules

    torch.manual_seed(0)
    model = TinyModel(getattr(user_modules, name)()).eval()
    cm, layer = compile_on_ids(model)
    assert layer.fused and layer.shared_experts == 0, layer
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


def test_a_sub_module_read_only_past_many_tokens_is_no_sub_module_to_leave_out():
    """The probes run on 16 tokens; a shared expert the block adds only past 100 tokens is still found read (a
    wider call looks again), so the block, which no canonical form reproduces at every size, is not fused without
    it and the numbers stay eager's at both sizes."""
    from user_modules import ManyTokensSharedMoE

    torch.manual_seed(0)
    model = TinyModel(ManyTokensSharedMoE()).eval()
    cm, layer = compile_on_ids(model)
    assert not layer.fused, layer
    for shape in [(3, 11), (2, 60)]:
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x))


def test_a_shared_expert_read_only_through_its_weights_still_counts():
    """Reads are of parameters, not module calls: a shared expert whose weights the block passes to ``F.linear``
    itself is read, and fused as a shared expert."""
    from user_modules import MLP, LoopMoE

    class InlineSharedMoE(LoopMoE):
        def __init__(self):
            super().__init__()
            self.shared = MLP(24, 40)

        def forward(self, x):
            s = self.shared
            shared = F.linear(F.silu(F.linear(x, s.w1.weight)) * F.linear(x, s.w3.weight), s.w2.weight)
            return super().forward(x) + shared

    torch.manual_seed(0)
    model = TinyModel(InlineSharedMoE()).eval()
    cm, layer = compile_on_ids(model)
    assert layer.fused and layer.shared_experts == 1, layer
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))
