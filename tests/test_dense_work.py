"""backend='auto' on the CPU weighs ONNX Runtime's program against torch's where ORT would decompose MoE blocks into
every expert on every token (``moecc.codegen.onnx.dense_work``): only blocks whose expert weights the graph
computes; the others ORT runs routed (``sorted_experts``)."""

import pytest
import torch
from hf_models import make_inputs, make_model

import moecc
from moecc import knobs


def _compiled(model, family):
    cm = moecc.compile(model)
    with torch.no_grad():
        cm(**make_inputs(family, 2, 8))
    return cm


def test_auto_keeps_ort_where_its_blocks_are_routed_in_plain_onnx_ops():
    """Gated gelu experts have no com.microsoft.MoE activation. They used to be decomposed into every expert on every
    token (8x the routed work here), and auto took torch; now ORT runs them routed (``sorted_experts``), reading
    the weights torch reads, and auto keeps it."""
    model = make_model("qwen3_moe", hidden_act="gelu", num_experts=16, num_experts_per_tok=2)
    cm = _compiled(model, "qwen3_moe")
    assert [e.backend for e in cm._entries] == ["onnxruntime"]
    for layer in cm.moe_layers:
        assert layer.fused and layer.lowering.startswith("routed in plain ONNX ops"), layer.lowering
    fresh = make_inputs("qwen3_moe", 3, 5, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(cm(**fresh).logits, model(**fresh).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hidden_act,experts,top_k", [("silu", 16, 2), ("gelu", 4, 2)])
def test_auto_keeps_ort_where_its_program_reads_no_more(hidden_act, experts, top_k):
    model = make_model("qwen3_moe", hidden_act=hidden_act, num_experts=experts, num_experts_per_tok=top_k)
    cm = _compiled(model, "qwen3_moe")
    assert [e.backend for e in cm._entries] == ["onnxruntime"]


def _pipeline_result(model, computed_weights: bool):
    """The pipeline's graph of ``model``; with ``computed_weights``, each bank's up projection is computed in the
    graph (as a dequantization there would be), which no initializer holds."""
    from moecc.capture import capture
    from moecc.codegen.onnx.ort_forms import param_of
    from moecc.passes import PassManager, default_pipeline

    cap = capture(model, (), make_inputs("qwen3_moe", 1, 8))
    gm = PassManager(default_pipeline("oi"))(cap.gm).graph_module
    if computed_weights:
        for moe in [n for n in gm.graph.nodes if n.target is torch.ops.moecc.fused_moe.default]:
            w_up = moe.args[3]
            with gm.graph.inserting_before(moe):
                scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (w_up, 1.0))
            scaled.meta["val"] = param_of(gm, w_up)  # its shape is what dense_work reads
            moe.update_arg(3, scaled)
        gm.recompile()
    return gm


def test_a_block_of_computed_weights_is_decomposed_and_auto_weighs_it():
    """Weights computed in the graph have no initializer to split per expert: the block is decomposed into every
    expert on every token, the lowering says why, and ``dense_work`` counts E experts on ORT against k on torch, so
    auto would run torch; ``MOECC_AUTO_MAX_DENSE_WORK=0`` keeps ORT."""
    from moecc.codegen.onnx.lower import use_ort_moe
    from moecc.runtime.compiled import _dense_on_ort

    model = make_model("qwen3_moe", hidden_act="gelu", num_experts=16, num_experts_per_tok=2)
    gm = _pipeline_result(model, computed_weights=True)
    work = _dense_on_ort(gm)
    assert work is not None and len(work.decomposed) == model.config.num_hidden_layers
    assert "8.0x their routed experts' work" in work.describe(), work.describe()
    with knobs.AUTO_MAX_DENSE_WORK.overridden("0"):
        assert _dense_on_ort(gm) is None
    lowering = use_ort_moe(gm)
    assert lowering and all(how.startswith("decomposed into every expert on every token (its expert weights (w_up) "
                                           "are computed in the graph)") for how in lowering.values()), lowering
    assert _dense_on_ort(_pipeline_result(model, computed_weights=False)) is None


def test_dense_work_counts_the_weights_each_program_reads_per_token():
    """A decomposed block (its weights computed in the graph) reads E experts on ORT and k on torch; every other
    weight a GEMM or a moecc op reads (attention, the router, the LM head) counts once on both, an embedding lookup
    not at all."""
    from moecc.codegen.onnx.dense_work import dense_work

    model = make_model("qwen3_moe", hidden_act="gelu", num_experts=16, num_experts_per_tok=2)
    gm = _pipeline_result(model, computed_weights=True)
    work = dense_work(gm)
    cfg = model.config
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    rest = sum(p.numel() for name, p in model.named_parameters()
               if p.dim() >= 2 and "experts" not in name and "embed_tokens" not in name)
    layers = cfg.num_hidden_layers
    assert work.torch == rest + layers * 2 * expert
    assert work.ort == rest + layers * 16 * expert
    assert len(work.decomposed) == layers
