"""torch.compile(model, backend="moecc"): the MoE blocks dynamo traced into its graphs are fused."""

from __future__ import annotations

import logging

import pytest
import torch
from hf_models import make_inputs, make_model
from user_modules import BmmMoE, GShardMoE, LoopMoE, TinyModel

import moecc
import moecc.dynamo
from moecc.discover import find_moe_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# a static graph, dynamo's recompile for batch 1, then one graph with symbolic batch and sequence for the rest
SHAPES = [(2, 8), (1, 5), (3, 11), (3, 13), (4, 6)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs_since(before: list) -> list:
    return [g for g in moecc.dynamo.compiled_graphs() if all(g is not b for b in before)]


def _on(inputs: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("family,backend", [("mixtral", "torch"), ("deepseek_v3", "torch"), ("gpt_oss", "torch"),
                                            ("qwen2_moe", "auto"), ("mixtral", "triton")])
def test_hf_blocks_are_fused_in_every_graph_dynamo_hands_over(family, backend):
    before = moecc.dynamo.compiled_graphs()
    torch.manual_seed(0)
    model = make_model(family).to(DEVICE).eval()
    compiled = torch.compile(model, backend="moecc", options={"backend": backend})
    for b, s in SHAPES[:3] if backend == "triton" else SHAPES:
        inputs = _on(make_inputs(family, b, s, seed=b * s))
        with torch.no_grad():
            got, ref = compiled(**inputs).logits, model(**inputs).logits
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    graphs = _graphs_since(before)
    assert graphs, "no graph reached moecc"
    blocks = len(find_moe_blocks(model))
    for g in graphs:
        assert g.captures == 1  # a new size in a graph with symbolic sizes reuses its program
        assert len(g.moe_layers) == blocks and all(layer.fused for layer in g.moe_layers), g.moe_layers
        assert all(layer.name.startswith("model.layers.") for layer in g.moe_layers)
    if backend == "auto" and DEVICE == "cpu":
        assert {g._entries[-1].backend for g in graphs} == {"onnxruntime"}


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_experts_of_a_block_that_routes_beside_other_work_are_fused_alone(backend):
    """Gemma 4's decoder layer routes beside attention: its traced ops read more than its hidden states, so it
    runs as dynamo traced it, but for its experts, whose calls read their hidden states, ids and weights alone.
    Those calls get the experts module back, as under ``moecc.compile``: the experts are fused, and the routing
    ops beside them lifted into moecc's route."""
    before = moecc.dynamo.compiled_graphs()
    torch.manual_seed(0)
    model = make_model("gemma4").eval()
    compiled = torch.compile(model, backend="moecc", options={"backend": backend})
    for b, s in SHAPES[:3]:
        inputs = make_inputs("gemma4", b, s, seed=b * s)
        with torch.no_grad():
            got, ref = compiled(**inputs).logits, model(**inputs).logits
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    graphs = _graphs_since(before)
    assert graphs, "no graph reached moecc"
    for g in graphs:
        assert [(layer.name, layer.block) for layer in g.moe_layers] == [
            (f"model.layers.{i}.experts", f"model.layers.{i}") for i in range(2)]
        assert all(layer.fused and layer.routing == "softmax->top2 renorm per-expert-scale, lifted from the "
                   "model's own routing ops" for layer in g.moe_layers), g.moe_layers


@pytest.mark.parametrize("block", [BmmMoE, GShardMoE])
def test_user_blocks_traced_whole_are_fused(block):
    before = moecc.dynamo.compiled_graphs()
    torch.manual_seed(0)
    model = TinyModel(block()).eval()
    compiled = torch.compile(model, backend="moecc", options={"backend": "torch"})
    for shape in SHAPES:
        x = torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    layers = [layer for g in _graphs_since(before) for layer in g.moe_layers]
    assert layers and all(layer.fused and layer.name == "moe" for layer in layers)


def test_graphs_without_a_whole_block_run_as_traced():
    """An expert loop over torch.where makes dynamo break the block into pieces: no graph holds it whole, so no
    graph goes through moecc, and the model computes what it computes eagerly."""
    before = moecc.dynamo.compiled_graphs()
    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval()
    compiled = torch.compile(model, backend="moecc")
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert _graphs_since(before) == []


def test_recorded_router_logits_keep_their_blocks_as_traced_and_say_why(caplog, monkeypatch):
    monkeypatch.setenv("MOECC_LOGS", "warning")  # each graph's compile sets moecc's log level from it
    torch.manual_seed(0)
    model = make_model("mixtral").eval()
    compiled = torch.compile(model, backend="moecc", options={"backend": "torch"})
    inputs = make_inputs("mixtral", 2, 8)
    logger = logging.getLogger("moecc")
    logger.addHandler(caplog.handler)
    try:
        with torch.no_grad():
            got = compiled(**inputs, output_router_logits=True)
            ref = model(**inputs, output_router_logits=True)
    finally:
        logger.removeHandler(caplog.handler)
    torch.testing.assert_close(got.logits, ref.logits)
    for a, b in zip(got.router_logits, ref.router_logits):
        torch.testing.assert_close(a, b)
    assert "runs as dynamo traced it" in caplog.text and "router_logits" in caplog.text


def test_generate_with_a_compiled_forward():
    before = moecc.dynamo.compiled_graphs()
    torch.manual_seed(0)
    model = make_model("mixtral").eval()
    ids = make_inputs("mixtral", 1, 8)["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=5, do_sample=False)
        model.forward = torch.compile(model.forward, backend="moecc", options={"backend": "torch"})
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, ref)
    graphs = _graphs_since(before)
    # the prompt, the first decode step, then every later one (the cache length symbolic): one capture each
    assert len(graphs) == 3 and all(g.captures == 1 for g in graphs)
    assert all(layer.fused for g in graphs for layer in g.moe_layers)


def test_options_are_moecc_compile_options():
    model = TinyModel(BmmMoE()).eval()
    x = torch.randint(0, 50, (2, 8))
    with pytest.raises(Exception, match="unknown option 'tile'"):
        torch.compile(model, backend="moecc", options={"tile": 64})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="takes no mode"):
        torch.compile(model, backend="moecc", mode="max-autotune")(x)


def test_a_source_tree_without_the_entry_point_registers_the_backend_itself(monkeypatch):
    import importlib.metadata
    from types import SimpleNamespace

    registered = []
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: SimpleNamespace(names=set()))
    monkeypatch.setattr(torch._dynamo, "register_backend", lambda fn, name: registered.append((fn, name)))
    moecc.dynamo.register_unless_installed()
    assert registered == [(moecc.dynamo.moecc_backend, "moecc")]


def test_weights_are_attributes_of_the_graph_and_followed_when_replaced():
    """Dynamo passes weights as inputs; the compiled graph reads them as attributes (CUDA graph replays and the
    check on fresh inputs take activations only), bound anew when the model holds another tensor."""
    before = moecc.dynamo.compiled_graphs()
    torch.manual_seed(0)
    model = make_model("mixtral").eval()
    compiled = torch.compile(model, backend="moecc", options={"backend": "torch"})
    inputs = make_inputs("mixtral", 2, 8)
    with torch.no_grad():
        compiled(**inputs)
        (graph,) = _graphs_since(before)
        assert [type(t) for t in graph._entries[-1].example_inputs] == [torch.Tensor]  # the token ids
        attn = model.model.layers[0].self_attn.q_proj
        attn.weight = torch.nn.Parameter(attn.weight * 2)
        experts = model.model.layers[1].mlp.experts
        experts.down_proj = torch.nn.Parameter(experts.down_proj * 2)
        model.model.norm.weight.mul_(3)
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits)


def test_dynamic_true_takes_python_numbers_as_constants():
    """With dynamic=True dynamo passes float attributes (attention scaling) as 0-d tensors whose value the graph
    reads; the compiled graph takes them as numbers."""
    before = moecc.dynamo.compiled_graphs()
    torch.manual_seed(0)
    model = make_model("qwen3_moe").eval()
    compiled = torch.compile(model, backend="moecc", dynamic=True, options={"backend": "torch"})
    for b, s in [(2, 8), (3, 11), (4, 5)]:
        inputs = make_inputs("qwen3_moe", b, s)
        with torch.no_grad():
            torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits)
    graphs = _graphs_since(before)
    assert len(graphs) == 1 and graphs[0].captures == 1 and all(layer.fused for layer in graphs[0].moe_layers)


class _CalledTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = TinyModel(BmmMoE())

    def forward(self, ids):
        h = self.inner.embed(ids)
        h = h + self.inner.moe(self.inner.norm(h))
        return self.inner.head(h + self.inner.moe(h * 0.5))


def test_a_block_called_twice_is_put_back_at_each_call():
    before = moecc.dynamo.compiled_graphs()
    torch.manual_seed(0)
    model = _CalledTwice().eval()
    compiled = torch.compile(model, backend="moecc", options={"backend": "torch"})
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    (graph,) = _graphs_since(before)
    assert graph.original_model.code.count("self.inner.moe(") == 2
    assert [layer.name for layer in graph.moe_layers] == ["inner.moe"] and graph.moe_layers[0].fused


def test_a_graph_moecc_cannot_compile_runs_as_traced_with_a_warning(caplog, monkeypatch):
    import moecc.runtime.compiled as runtime

    def refuse(*args, **kwargs):
        raise moecc.CaptureError("refused for the test")

    monkeypatch.setattr(runtime, "capture", refuse)
    monkeypatch.setenv("MOECC_LOGS", "warning")
    torch.manual_seed(0)
    model = make_model("mixtral").eval()
    compiled = torch.compile(model, backend="moecc", options={"backend": "torch"})
    logger = logging.getLogger("moecc")
    logger.addHandler(caplog.handler)
    try:
        with torch.no_grad():
            for seed in range(2):
                inputs = make_inputs("mixtral", 2, 8, seed=seed)
                torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits)
    finally:
        logger.removeHandler(caplog.handler)
    assert caplog.text.count("runs as dynamo traced it from now on: refused for the test") == 1
