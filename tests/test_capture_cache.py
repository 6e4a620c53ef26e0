"""The capture cache: a second compile of the same model skips torch.export and gets the same graph."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from hf_models import make_inputs, make_model
from torch.utils import _pytree as pytree

import moecc
from moecc import capture_cache
from moecc.capture import capture
from moecc.capture_key import fingerprint, parts
from moecc.discover import find_moe_blocks


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path))
    return tmp_path


def _export_calls(monkeypatch) -> list:
    calls = []
    real = torch.export.export

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


def _key(model, inputs) -> str:
    flat, spec = pytree.tree_flatten(((), inputs))
    return fingerprint(model, flat, spec, [n for n, _ in find_moe_blocks(model)])


def _parts(model, inputs) -> list[str]:
    flat, spec = pytree.tree_flatten(((), inputs))
    return [repr(p) for p in parts(model, flat, spec, [n for n, _ in find_moe_blocks(model)])]


def _noop_hook(*args):
    return None


_KEY_IN_A_SUBPROCESS = """
import sys, torch
sys.path.insert(0, {tests!r})
from hf_models import make_inputs, make_model
from test_capture_cache import _key, _noop_hook
model = make_model("mixtral")
model.model.layers[0].register_forward_hook(_noop_hook)
print(_key(model, make_inputs("mixtral", 2, 7)))
"""


def test_key_is_the_same_in_another_process():
    model = make_model("mixtral")
    model.model.layers[0].register_forward_hook(_noop_hook).remove()  # hook handle ids are per process
    model.model.layers[0].register_forward_hook(_noop_hook)
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    out = subprocess.run([sys.executable, "-c", _KEY_IN_A_SUBPROCESS.format(tests=os.path.dirname(__file__))],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == _key(model, make_inputs("mixtral", 2, 7))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "switch_transformers"])
def test_warm_capture_is_the_same_graph_without_export(family, monkeypatch):
    model = make_model(family)
    inputs = make_inputs(family, 2, 7)
    calls = _export_calls(monkeypatch)
    cold = capture(model, (), inputs)
    after_cold = _parts(model, inputs)
    warm = capture(model, (), inputs)
    assert _parts(model, inputs) == after_cold
    assert len(calls) == 1
    assert warm.gm.code == cold.gm.code
    assert dict(warm.gm.named_parameters()).keys() == dict(cold.gm.named_parameters()).keys()
    assert dict(warm.gm.named_buffers()).keys() == dict(cold.gm.named_buffers()).keys()
    assert warm.blocks == cold.blocks
    where = [n.meta.get("moecc_module") for n in cold.gm.graph.nodes]
    assert [n.meta.get("moecc_module") for n in warm.gm.graph.nodes] == where  # error messages name modules
    assert any(w and "embed" in w for w in where), where
    with torch.no_grad():
        for a, b in zip(cold.gm(*cold.tensor_inputs), warm.gm(*warm.tensor_inputs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    placeholders = [n for n in warm.gm.graph.nodes if n.op == "placeholder"]
    assert all(not isinstance(d, int) for d in placeholders[0].meta["val"].shape)  # token dims stay symbolic


def test_a_hit_binds_the_new_models_weights_and_compiles_the_same(monkeypatch):
    first, second = make_model("qwen3_moe", seed=0), make_model("qwen3_moe", seed=1)
    inputs = make_inputs("qwen3_moe", 2, 9)
    calls = _export_calls(monkeypatch)
    moecc.compile(first, backend="reference")(**inputs)
    compiled = moecc.compile(second, backend="reference")
    out = compiled(**inputs)  # the fresh-input check runs on the cached graph too
    assert len(calls) == 1
    assert all(layer.fused for layer in compiled.moe_layers)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, second(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_key_follows_code_structure_and_example_but_not_weight_values():
    model = make_model("mixtral")
    inputs = make_inputs("mixtral", 2, 7)
    key = _key(model, inputs)
    assert _key(make_model("mixtral", seed=3), inputs) == key
    assert _key(model, make_inputs("mixtral", 2, 8)) != key  # shapes
    assert _key(model, {**inputs, "input_ids": inputs["input_ids"].int()}) != key  # dtypes
    other = make_model("mixtral")
    other.set_attn_implementation("eager" if other.config._attn_implementation != "eager" else "sdpa")
    assert _key(other, inputs) != key  # a config field
    model.model.layers[0].self_attn.scaling = 0.5
    assert _key(model, inputs) != key  # a plain attribute
    model = make_model("mixtral")
    handle = model.model.layers[1].register_forward_hook(lambda *a: None)
    assert _key(model, inputs) != key  # a hook
    handle.remove()
    model.model.layers[1].mlp.forward = lambda x: x
    assert _key(model, inputs) != key  # a forward patched on one module
    model = make_model("mixtral")
    model.lm_head.weight = model.model.embed_tokens.weight
    assert _key(model, inputs) != key  # tying


def _block_class(body: str) -> type:
    scope = {"torch": torch}
    exec(f"class Block(torch.nn.Module):\n    def forward(self, x):\n        return {body}\n", scope)  # no file
    return scope["Block"]


def test_key_follows_methods_of_classes_without_a_source_file():
    x = {"x": torch.randn(2, 3)}
    same, again, other = (_key(_block_class(body)(), x) for body in ("x + 1", "x + 1", "x * 2"))
    assert same == again != other


def test_key_follows_values_of_plain_tensor_attributes():
    x = {"x": torch.randn(2, 3)}
    block = _block_class("x * self.scale")()
    keys = []
    for value in (torch.tensor(2.0), torch.tensor(2.0), torch.tensor(3.0)):
        block.scale = value  # a 0-dim tensor that is no buffer: export bakes its value into the graph
        keys.append(_key(block, x))
    assert keys[0] == keys[1] != keys[2]


def test_knob_off_stores_nothing(cache_dir, monkeypatch):
    monkeypatch.setenv("MOECC_CAPTURE_CACHE", "0")
    calls = _export_calls(monkeypatch)
    model, inputs = make_model("olmoe"), make_inputs("olmoe", 1, 5)
    capture(model, (), inputs)
    capture(model, (), inputs)
    assert len(calls) == 2
    assert not (cache_dir / "captures").exists()


def test_a_damaged_entry_is_ignored_with_a_warning(cache_dir, monkeypatch, caplog):
    model, inputs = make_model("olmoe"), make_inputs("olmoe", 1, 5)
    capture(model, (), inputs)
    (entry,) = (cache_dir / "captures").glob("*.json")
    entry.write_text(entry.read_text()[:-100])
    calls = _export_calls(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="moecc.capture"):
        cap = capture(model, (), inputs)
    assert len(calls) == 1 and "ignoring the capture cache entry" in caplog.text
    with torch.no_grad():
        cap.gm(*cap.tensor_inputs)


class _Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda y: self.lin(y), lambda y: -y, (x,))


def test_a_graph_the_format_cannot_hold_is_not_cached(cache_dir, caplog):
    model = _Branchy().eval()
    with caplog.at_level(logging.INFO, logger="moecc.capture"):
        cap = capture(model, (torch.randn(3, 4),), {})
    assert "capture not cached" in caplog.text
    assert not list((cache_dir / "captures").glob("*.json")) if (cache_dir / "captures").exists() else True
    with torch.no_grad():
        x = -torch.ones(3, 4)
        torch.testing.assert_close(cap.gm(x)[0], model(x))


def test_the_oldest_entries_go_first(cache_dir, monkeypatch):
    monkeypatch.setattr(capture_cache, "MAX_ENTRIES", 2)
    model = make_model("olmoe")
    for seq in (3, 4, 5):
        capture(model, (), make_inputs("olmoe", 1, seq))
    capture(model, (), make_inputs("olmoe", 1, 4))  # a hit: now the newest
    capture(model, (), make_inputs("olmoe", 1, 6))
    calls = _export_calls(monkeypatch)
    capture(model, (), make_inputs("olmoe", 1, 4))
    capture(model, (), make_inputs("olmoe", 1, 6))
    assert not calls
    assert len(list((cache_dir / "captures").glob("*.json"))) == 2


class _WithTable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.table = torch.randn(4)  # a plain attribute (its values are in the key)

    def forward(self, x):
        # a tensor made from Python data: export lifts it as a constant, which the cache stores
        return self.lin(x) * self.table + torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_tensor_constants_round_trip_and_large_ones_are_not_cached(cache_dir, monkeypatch, caplog):
    model, x = _WithTable().eval(), torch.randn(3, 4)
    calls = _export_calls(monkeypatch)
    capture(model, (x,), {})
    warm = capture(model, (x,), {})
    assert len(calls) == 1 and list((cache_dir / "captures").glob("*.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(warm.gm(x)[0], model(x))
    monkeypatch.setattr(capture_cache, "MAX_CONSTANT_BYTES", 8)
    model.table = torch.randn(4)  # new values: a new key
    with caplog.at_level(logging.INFO, logger="moecc.capture"):
        capture(model, (x,), {})
    assert "capture not cached: the graph holds 0.0 MiB of tensor constants" in caplog.text


def test_value_info_reads_like_the_exported_value():
    info = capture_cache._decode_value(capture_cache._encode_value(torch.empty(2, 3, dtype=torch.float16)))
    assert info.shape == (2, 3) and info.dtype == torch.float16 and info.dim() == 2
    assert str(capture_cache.SymbolicDim("s0*7")) == "s0*7"


def test_a_method_digest_does_not_follow_reference_counts():
    """``marshal.dumps`` writes a constant held elsewhere in the process as a back-reference, so a method's bytes
    changed once another model's module held the same string: the key of a warm capture then missed."""
    from moecc.capture_key import _code_digest

    namespace: dict = {}
    exec("def f(x):\n    return (x, 'a constant string 1', 'another constant string 2', {'a', 'b', 'c'})\n",
         namespace)
    before = _code_digest(namespace["f"])
    held = list(namespace["f"].__code__.co_consts) * 3
    assert _code_digest(namespace["f"]) == before and held
