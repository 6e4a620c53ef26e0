"""Exporting by layers (``moecc/codegen/onnx/repeated_layers.py`` and ``stitch.py``): each distinct segment of a
program is exported to ONNX once and the graph is stitched from copies, with the numbers of the whole export."""

import logging

import pytest
import torch
from hf_models import make_inputs, make_model

import moecc
from moecc.codegen.onnx import lower, repeated_layers


@pytest.fixture
def onnx_logs(caplog):
    """caplog with the ONNX lowering's debug and info lines in it (moecc's loggers do not propagate)."""
    logger = logging.getLogger("moecc.codegen.onnx")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    caplog.handler.setLevel(logging.DEBUG)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def outputs(cm, model, family, batch, seq, seed):
    inputs = make_inputs(family, batch, seq, seed)
    with torch.no_grad():
        got, want = cm(**inputs), model(**inputs)
    key = "logits" if hasattr(want, "logits") else "last_hidden_state"
    return getattr(got, key), getattr(want, key)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_a_deep_model_exports_each_distinct_segment_once(exports, monkeypatch):
    """Six Mixtral layers alike: three exports (the embedding and masks, a layer, the last layer with the head),
    the numbers of the whole export and of eager on other shapes; a second compile reads the stitched graph from
    the export cache."""
    model = make_model("mixtral", num_hidden_layers=6)
    cm = moecc.compile(model, backend="onnxruntime")
    got, want = outputs(cm, model, "mixtral", 2, 8, 0)
    assert len(exports) == 3
    assert {entry.backend for entry in cm._entries} == {"onnxruntime"}
    assert rel(got, want) < 1e-5
    for batch, seq, seed in [(3, 11, 1), (2, 5, 2)]:
        got, want = outputs(cm, model, "mixtral", batch, seq, seed)
        assert rel(got, want) < 1e-5
    stitched = got

    monkeypatch.setenv("MOECC_ONNX_REPEATS", "0")
    monkeypatch.setenv("MOECC_ONNX_CACHE", "0")
    whole = moecc.compile(model, backend="onnxruntime")
    outputs(whole, model, "mixtral", 2, 8, 0)
    assert len(exports) == 4  # the knob: one export of the whole program
    torch.testing.assert_close(outputs(whole, model, "mixtral", 2, 5, 2)[0], stitched, rtol=1e-5, atol=1e-6)

    monkeypatch.setenv("MOECC_ONNX_REPEATS", "1")
    monkeypatch.setenv("MOECC_ONNX_CACHE", "1")
    again = moecc.compile(model, backend="onnxruntime")
    torch.testing.assert_close(outputs(again, model, "mixtral", 2, 8, 0)[0], outputs(cm, model, "mixtral", 2, 8, 0)[0])
    assert len(exports) == 4


def test_layers_that_differ_are_exported_apart(exports, onnx_logs):
    """DeepSeek-V3 with one dense layer before three MoE layers: the dense layer and the MoE layer are two
    programs."""
    model = make_model("deepseek_v3", num_hidden_layers=4, first_k_dense_replace=1)
    cm = moecc.compile(model, backend="onnxruntime")
    got, want = outputs(cm, model, "deepseek_v3", 2, 8, 0)
    assert len(exports) == 4
    assert "exported 4 distinct segments for 5" in onnx_logs.text  # the last layer holds the head
    assert rel(got, want) < 1e-5
    got, want = outputs(cm, model, "deepseek_v3", 3, 7, 1)
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "switch_transformers"])
def test_stitched_segments_give_eager_numbers(family, exports, monkeypatch):
    """Every segment stitched, even where none repeats (two layers; an encoder and a decoder, two layer lists)."""
    monkeypatch.setattr(repeated_layers, "MIN_OPS_SAVED", 0)
    model = make_model(family)
    cm = moecc.compile(model, backend="onnxruntime")
    got, want = outputs(cm, model, family, 2, 8, 0)
    assert len(exports) > 2
    assert {entry.backend for entry in cm._entries} == {"onnxruntime"}
    for batch, seq, seed in [(2, 8, 0), (3, 6, 1)]:
        got, want = outputs(cm, model, family, batch, seq, seed)
        assert rel(got, want) < 1e-5


def test_generate_with_a_cache_through_stitched_segments(exports, monkeypatch):
    """The prompt and the decode step, their cache tensors crossing every segment, give eager's tokens."""
    monkeypatch.setattr(repeated_layers, "MIN_OPS_SAVED", 0)
    model = make_model("qwen3_moe", num_hidden_layers=3)
    cm = moecc.compile(model, backend="onnxruntime")
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(cm.generate(ids, max_new_tokens=5, do_sample=False), expected, rtol=0, atol=0)
    assert {entry.backend for entry in cm._entries} == {"onnxruntime"}


def test_a_shallow_model_is_exported_whole_and_says_why(exports, onnx_logs):
    model = make_model("mixtral")
    cm = moecc.compile(model, backend="onnxruntime")
    got, want = outputs(cm, model, "mixtral", 2, 8, 0)
    assert len(exports) == 1
    assert f"fewer than {repeated_layers.MIN_OPS_SAVED}" in onnx_logs.text
    assert rel(got, want) < 1e-5


def test_a_stitch_that_fails_falls_back_to_the_whole_export(exports, onnx_logs, monkeypatch):
    def broken(*args):
        raise repeated_layers.NotRepeated("a stitch broken on purpose")

    monkeypatch.setattr(lower, "stitch", broken)
    model = make_model("mixtral", num_hidden_layers=4)
    cm = moecc.compile(model, backend="onnxruntime")
    got, want = outputs(cm, model, "mixtral", 2, 8, 0)
    assert "not layer by layer: a stitch broken on purpose" in onnx_logs.text
    assert len(exports) == 3 + 1  # the distinct segments, then the whole program
    assert rel(got, want) < 1e-5


def test_an_artifact_of_a_deep_model_holds_the_stitched_graph(exports, tmp_path):
    model = make_model("olmoe", num_hidden_layers=4)
    path = moecc.export(model, (), tmp_path / "art", kwargs=make_inputs("olmoe", 2, 8), backend="onnxruntime")
    assert len(exports) == 3
    loaded = moecc.load(path)
    for batch, seq, seed in [(2, 8, 0), (3, 5, 1)]:
        inputs = make_inputs("olmoe", batch, seq, seed)
        with torch.no_grad():
            assert rel(loaded(**inputs).logits, model(**inputs).logits) < 1e-5


class SlicedLayers(torch.nn.Module):
    """Three layers alike after a slice: the layers see two tokens fewer than the input (the dim ``s - 2``), and
    each residual is code outside the layers."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        h = x[:, 2:]
        for layer in self.layers:
            h = h + layer(h).relu()
        return h


def sliced_program():
    """SlicedLayers exported as a capture has it: symbolic batch and sequence, each node's module path."""
    torch.manual_seed(0)
    dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)
    gm = torch.export.export(SlicedLayers(), (torch.randn(2, 5, 8),), dynamic_shapes=dims).module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            continue
        paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if paths:
            node.meta["moecc_module"] = paths[-1]
    gm.recompile()
    return gm


def test_code_after_a_layer_joins_it_and_the_stitched_graph_keeps_derived_dims(tmp_path, monkeypatch):
    monkeypatch.setattr(repeated_layers, "MIN_OPS_SAVED", 0)
    monkeypatch.setenv("MOECC_ONNX_CACHE", "0")
    gm = sliced_program()
    found = repeated_layers.plan(gm)
    assert [seg.key for seg in found.segments] == ["outer", *[("layers", i) for i in range(3)]]
    assert len(found.programs) == 2  # the slice, and one layer with the residual after it
    ort = lower.OrtModule(lower.to_onnx(gm, [torch.randn(2, 5, 8)], str(tmp_path / "model.onnx")))
    for shape in [(2, 5, 8), (3, 9, 8)]:
        x = torch.randn(shape)
        (got,) = ort(x)
        torch.testing.assert_close(got, gm(x), rtol=1e-5, atol=1e-6)


def test_a_segment_that_would_see_a_symbolic_dim_at_size_one_is_not_cut(monkeypatch):
    """Exported on its own, a layer would take a size of 1 for a constant, where the whole program keeps it
    symbolic (``s - 2`` at three tokens)."""
    monkeypatch.setattr(repeated_layers, "MIN_OPS_SAVED", 0)
    gm = sliced_program()
    found = repeated_layers.plan(gm)
    with pytest.raises(repeated_layers.NotRepeated, match="s.* - 2 at size 1 in this example"):
        repeated_layers.segment_examples(gm, [torch.randn(2, 3, 8)], found)


def test_a_cut_that_fails_unexpectedly_exports_whole(exports, onnx_logs, monkeypatch):
    def broken(gm, seg):
        raise RuntimeError("a cut broken on purpose")

    monkeypatch.setattr(repeated_layers, "subprogram", broken)
    model = make_model("mixtral", num_hidden_layers=4)
    cm = moecc.compile(model, backend="onnxruntime")
    got, want = outputs(cm, model, "mixtral", 2, 8, 0)
    assert "not layer by layer: a cut broken on purpose" in onnx_logs.text
    assert len(exports) == 1
    assert rel(got, want) < 1e-5
