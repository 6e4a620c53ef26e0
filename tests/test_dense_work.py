"""backend='auto' on the CPU weighs ONNX Runtime's program against torch's where ORT would decompose MoE blocks into
every expert on every token (``moecc.codegen.onnx.dense_work``)."""

import logging

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


def test_auto_runs_torch_where_ort_would_run_every_expert_on_every_token(monkeypatch):
    """Gated gelu experts have no com.microsoft.MoE activation: ORT would run all 16 experts for each token where
    torch runs its 2. auto says so and takes the torch program, which agrees with eager on fresh inputs."""
    model = make_model("qwen3_moe", hidden_act="gelu", num_experts=16, num_experts_per_tok=2)
    monkeypatch.setenv("MOECC_LOGS", "info")  # each compile sets the moecc logger's level from it
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("moecc").addHandler(handler)
    try:
        cm = _compiled(model, "qwen3_moe")
    finally:
        logging.getLogger("moecc").removeHandler(handler)
    assert [e.backend for e in cm._entries] == ["torch"]
    assert all(layer.fused for layer in cm.moe_layers)
    said = [message for message in said if "ONNX Runtime would run every expert" in message]
    assert said and "8.0x their routed experts' work" in said[0], said
    assert "no com.microsoft.MoE activation computes gated gelu" in said[0], said
    for layer in cm.moe_layers:
        assert "ONNX Runtime would run every expert on every token" in layer.lowering, layer.lowering
    fresh = make_inputs("qwen3_moe", 3, 5, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(cm(**fresh).logits, model(**fresh).logits, rtol=1e-4, atol=1e-5)


def test_the_knob_keeps_ort_for_decomposed_blocks():
    model = make_model("qwen3_moe", hidden_act="gelu", num_experts=16, num_experts_per_tok=2)
    with knobs.AUTO_MAX_DENSE_WORK.overridden("0"):
        cm = _compiled(model, "qwen3_moe")
    assert [e.backend for e in cm._entries] == ["onnxruntime"]
    assert all(layer.lowering.startswith("decomposed") for layer in cm.moe_layers)


@pytest.mark.parametrize("hidden_act,experts,top_k,backend", [
    ("silu", 16, 2, "onnxruntime"),  # com.microsoft.MoE runs the experts: nothing decomposed
    ("gelu", 4, 2, "onnxruntime"),  # decomposed at twice the routed work, under the limit
])
def test_auto_keeps_ort_where_its_program_reads_little_more(hidden_act, experts, top_k, backend):
    model = make_model("qwen3_moe", hidden_act=hidden_act, num_experts=experts, num_experts_per_tok=top_k)
    cm = _compiled(model, "qwen3_moe")
    assert [e.backend for e in cm._entries] == [backend]


def test_dense_work_counts_the_weights_each_program_reads_per_token():
    """The decomposed block reads E experts on ORT and k on torch; every other weight a GEMM or a moecc op reads
    (attention, the router, the LM head) counts once on both, an embedding lookup not at all."""
    from moecc.capture import capture
    from moecc.codegen.onnx.dense_work import dense_work
    from moecc.passes import PassManager, default_pipeline

    model = make_model("qwen3_moe", hidden_act="gelu", num_experts=16, num_experts_per_tok=2)
    cap = capture(model, (), make_inputs("qwen3_moe", 1, 8))
    gm = PassManager(default_pipeline("oi"))(cap.gm).graph_module
    work = dense_work(gm)
    cfg = model.config
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    rest = sum(p.numel() for name, p in model.named_parameters()
               if p.dim() >= 2 and "experts" not in name and "embed_tokens" not in name)
    layers = cfg.num_hidden_layers
    assert work.torch == rest + layers * 2 * expert
    assert work.ort == rest + layers * 16 * expert
    assert len(work.decomposed) == layers
