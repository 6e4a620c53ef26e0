"""The ONNX export cache (``moecc/codegen/onnx/export_cache.py``): a program lowered again reads its export back
instead of running torch.onnx.export, holds no second copy of the weights, and never serves another program."""

import copy

import pytest
import torch
import transformers as tf
from hf_models import make_inputs, make_model
from torch import fx

import moecc
from moecc.codegen.onnx import export_cache
from moecc.errors import BackendError


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def logits(cm, model, batch, seq, seed):
    inputs = make_inputs("mixtral", batch, seq, seed)
    with torch.no_grad():
        return cm(**inputs).logits, model(**inputs).logits


def compiled(model):
    cm = moecc.compile(model, backend="onnxruntime")
    logits(cm, model, 2, 8, 0)
    return cm


def wide_mixtral():
    """Experts large enough that the weights outweigh the graph."""
    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, intermediate_size=512,
                              num_local_experts=8, num_experts_per_tok=2)
    return tf.MixtralForCausalLM(config).eval()


def test_the_same_program_lowered_again_reads_its_export_back(exports):
    model = make_model("mixtral").eval()
    first = compiled(model)
    assert len(exports) == 1
    second = compiled(model)
    assert len(exports) == 1, "the second compile exported again"
    for batch, seq, seed in [(3, 5, 1), (1, 11, 2)]:
        got, ref = logits(second, model, batch, seq, seed)
        assert torch.equal(got, logits(first, model, batch, seq, seed)[0])
        assert rel(got, ref) < 1e-5
    assert all(layer.fused for layer in second.moe_layers)


def test_an_entry_holds_the_graph_and_not_the_weights(exports, tmp_path):
    model = wide_mixtral()
    compiled(model)
    entry, = (p for p in export_cache.folder().iterdir() if not p.name.startswith("."))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kept = (entry / "kept.bin").stat().st_size + (entry / "graph.onnx").stat().st_size
    assert kept < weights / 4, (kept, weights)


def test_other_weights_of_the_same_architecture_export_their_own(exports):
    model = make_model("mixtral").eval()
    compiled(model)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.model.layers[1].mlp.parameters():
            p.mul_(1.5)
    cm = compiled(other)
    assert len(exports) == 2
    got, ref = logits(cm, other, 3, 6, 4)
    assert rel(got, ref) < 1e-5
    assert rel(got, model(**make_inputs("mixtral", 3, 6, 4)).logits) > 1e-3


@pytest.mark.parametrize("damage", ["kept", "regions", "graph"])
def test_a_damaged_entry_is_exported_again_with_a_warning(exports, moecc_warnings, damage):
    model = wide_mixtral()
    compiled(model)
    entry, = (p for p in export_cache.folder().iterdir() if not p.name.startswith("."))
    if damage == "kept":
        (entry / "kept.bin").write_bytes(b"")
    elif damage == "regions":
        (entry / "regions.json").write_text("{")
    else:
        (entry / "graph.onnx").unlink()
    cm = moecc.compile(model, backend="onnxruntime")
    got, ref = logits(cm, model, 2, 7, 3)
    assert len(exports) == 2
    assert rel(got, ref) < 1e-5
    assert any("ignoring the ONNX export cache entry" in r.getMessage() for r in moecc_warnings.records)
    logits(moecc.compile(model, backend="onnxruntime"), model, 2, 8, 0)  # the export stored a good entry again
    assert len(exports) == 2


def test_the_knob_turns_the_cache_off(exports, monkeypatch):
    monkeypatch.setenv("MOECC_ONNX_CACHE", "0")
    model = make_model("mixtral").eval()
    compiled(model)
    compiled(model)
    assert len(exports) == 2
    assert not export_cache.folder().exists() or not any(export_cache.folder().iterdir())


def _key(gm, example):
    return export_cache.lookup(gm, example, "/x/model.onnx").key


def test_the_key_follows_what_the_export_specializes_and_calls(exports):
    def f(x):
        return torch.relu(x) * 2

    def g(x):
        return torch.sigmoid(x) * 2

    gm = fx.symbolic_trace(f)
    one, three, five = torch.randn(1, 4), torch.randn(3, 4), torch.randn(5, 4)
    # torch.export specializes a dim the example has at size 1: a batch of one is another export
    assert _key(gm, [one]) != _key(gm, [three]) == _key(gm, [five])
    assert _key(gm, [three]) != _key(gm, [three.double()])
    assert _key(gm, [three]) != _key(fx.symbolic_trace(g), [three])
    assert _key(gm, [three]) != export_cache.lookup(gm, [three], "/x/other.onnx").key

    class Scaled(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full((4,), scale))

        def forward(self, x):
            return x * self.weight

    assert _key(fx.symbolic_trace(Scaled(1.0)), [three]) != _key(fx.symbolic_trace(Scaled(2.0)), [three])
    assert _key(fx.symbolic_trace(Scaled(1.0)), [three]) == _key(fx.symbolic_trace(Scaled(1.0)), [three])


def test_a_tensor_written_into_a_call_is_keyed_by_its_values(exports):
    def graph_adding(constant):
        graph = fx.Graph()
        x = graph.placeholder("x")
        graph.output(graph.call_function(torch.add, (x, constant)))
        return fx.GraphModule(torch.nn.Module(), graph)

    big = torch.zeros(4096)
    other = big.clone()
    other[2000] = 1.0  # the two print alike: repr elides the middle of a large tensor
    assert repr(big) == repr(other)
    x = torch.randn(3, 4096)
    assert _key(graph_adding(big), [x]) != _key(graph_adding(other), [x])


def test_a_tensor_whose_bytes_are_out_of_reach_leaves_the_export_uncached():
    """A quantized tensor has no plain bytes: the cache declines to key it (the compile exports as usual) and
    the capture key names the object, so that neither ever serves another tensor's entry."""
    from moecc.capture_key import describe

    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    with pytest.raises(export_cache.Unkeyable, match="out of reach"):
        export_cache._digest(q)
    assert describe(q)[-1] == f"object {id(q)}"
    plain = torch.arange(4.0)
    assert export_cache._digest(plain) == describe(plain)[-1]


def test_exporting_whole_or_by_layers_are_two_entries(exports, monkeypatch):
    """``MOECC_ONNX_REPEATS=0`` exports whole even where an export by layers is in the cache."""
    from hf_models import make_model

    model = make_model("mixtral", num_hidden_layers=4)
    compiled(model)
    by_layers = len(exports)
    monkeypatch.setenv("MOECC_ONNX_REPEATS", "0")
    compiled(model)
    assert len(exports) == by_layers + 1


def _failing_export(monkeypatch, error):
    from moecc.codegen.onnx import lower

    calls = []

    def fail(gm, example):
        calls.append(1)
        raise error

    monkeypatch.setattr(lower, "_exported", fail)
    return calls


@pytest.mark.parametrize("error", [RuntimeError("Could not guard on data-dependent expression u0 > 0\nmore"),
                                   BackendError("the program writes into its x in place")])
def test_a_failed_export_fails_again_at_once_with_its_error(exports, monkeypatch, tmp_path, error):
    from moecc.codegen.onnx.lower import to_onnx

    gm, x = fx.symbolic_trace(lambda x: torch.relu(x) * 2), torch.randn(3, 4)
    calls = _failing_export(monkeypatch, error)
    with pytest.raises(type(error)):
        to_onnx(gm, [x], str(tmp_path / "a" / "model.onnx"))
    with pytest.raises(BackendError if isinstance(error, BackendError) else export_cache.FailedBefore,
                       match=f"^{str(error).splitlines()[0]}$"):
        to_onnx(gm, [x], str(tmp_path / "b" / "model.onnx"))
    assert len(calls) == 1, "the second lowering exported again"
    with pytest.raises(type(error)):  # another program is no failure of this one's
        to_onnx(gm, [torch.randn(3, 5, 4)], str(tmp_path / "c" / "model.onnx"))
    assert len(calls) == 2


@pytest.mark.parametrize("error", [MemoryError(), OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_errors_of_the_machine_are_not_remembered(exports, monkeypatch, tmp_path, error):
    from moecc.codegen.onnx.lower import to_onnx

    gm, x = fx.symbolic_trace(lambda x: torch.relu(x) * 2), torch.randn(3, 4)
    calls = _failing_export(monkeypatch, error)
    for attempt in range(2):
        with pytest.raises(type(error)):
            to_onnx(gm, [x], str(tmp_path / str(attempt) / "model.onnx"))
    assert len(calls) == 2


def test_a_damaged_failure_record_costs_one_export(exports, monkeypatch, tmp_path, moecc_warnings):
    from moecc.codegen.onnx.lower import to_onnx

    gm, x = fx.symbolic_trace(lambda x: torch.relu(x) * 2), torch.randn(3, 4)
    calls = _failing_export(monkeypatch, RuntimeError("no ONNX function"))
    with pytest.raises(RuntimeError):
        to_onnx(gm, [x], str(tmp_path / "a" / "model.onnx"))
    (record,) = export_cache.folder().glob("*/failed.json")
    record.write_text("{")
    with pytest.raises(RuntimeError, match="no ONNX function"):
        to_onnx(gm, [x], str(tmp_path / "b" / "model.onnx"))
    assert len(calls) == 2
    assert any("record of a failure" in r.getMessage() for r in moecc_warnings.records)


@pytest.mark.parametrize("probed", [True, False])
def test_a_program_split_at_a_block_that_does_not_export_exports_nothing_next_time(exports, monkeypatch, probed):
    """The split (``islands``) follows a failed export of the block alone (``block_probe``), or of the whole
    program where the probe passed: compiled again, the program exports neither that nor its parts, and says the
    same why."""
    from user_modules import AuxModel, AuxOutputsMoE

    from moecc.codegen.onnx import lower

    if not probed:
        monkeypatch.setattr(lower, "block_that_does_not_export", lambda *args: None)
    torch.manual_seed(0)
    model = AuxModel(AuxOutputsMoE(), "aux").eval()
    x = torch.randint(0, 50, (2, 16))
    first = moecc.compile(model, backend="onnxruntime")
    first(x)
    paid = len(exports)
    second = moecc.compile(model, backend="onnxruntime")
    with torch.no_grad():
        for r, g in zip(torch.utils._pytree.tree_leaves(model(x)), torch.utils._pytree.tree_leaves(second(x))):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert len(exports) == paid, "the second compile exported again"
    assert [layer.lowering for layer in second.moe_layers] == [layer.lowering for layer in first.moe_layers]
    why = "moe does not export to ONNX alone" if probed else "the whole export failed"
    assert second.moe_layers[0].lowering.startswith(f"torch, between ONNX Runtime graphs ({why}")
