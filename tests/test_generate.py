"""Generation with a KV cache through a compiled model: ``cm.generate`` and forward calls that pass a cache."""

import inspect

import pytest
import torch
from hf_models import make_model

import moecc
from moecc.errors import ArtifactError, MoeccError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _left_padded(batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : seq // 3] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_generate_matches_eager_with_one_capture_per_phase(family):
    """The prompt and the decode steps are two captures; the cache length is symbolic, so every later step, and a
    second prompt of another length, reuse them. Left padding exercises the padded-position check."""
    model = make_model(family)
    cm = moecc.compile(model, backend="torch")
    ids, mask = _left_padded(2, 6)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    got = cm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert cm.captures == 2
    assert cm.moe_layers and all(layer.fused for layer in cm.moe_layers)
    ids, mask = _left_padded(2, 9, seed=1)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(cm.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), expected,
                               rtol=0, atol=0)
    assert cm.captures == 2
    assert "forward" not in vars(model)  # the model's own forward is back


def test_generate_on_onnxruntime():
    model = make_model("qwen3_moe")
    cm = moecc.compile(model, backend="onnxruntime")
    ids, mask = _left_padded(2, 5)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(cm.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), expected,
                               rtol=0, atol=0)
    assert {entry.backend for entry in cm._entries} == {"onnxruntime"}


def test_generate_on_triton_backend():
    model = make_model("mixtral").to(DEVICE)
    cm = moecc.compile(model, backend="triton")
    ids, mask = (t.to(DEVICE) for t in _left_padded(2, 5))
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(cm.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), expected,
                               rtol=0, atol=0)
    assert cm.captures == 2 and all(layer.fused for layer in cm.moe_layers)
    # decode: the whole program's shapes grow with the cache, its MoE op calls replay graphs of their own
    decode = cm._entries[-1]
    calls = [n.target.graphed for n in decode.op_graphs.graph.nodes if hasattr(n.target, "graphed")]
    assert len(calls) >= 2  # one per MoE layer at least
    if DEVICE == "cuda":
        assert all(call.graphs.graphs for call in calls)
        cm.options["cuda_graphs"] = False  # the option turns them off, with the same tokens
        decode.op_graphs = None
        again = cm.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        torch.testing.assert_close(again, expected, rtol=0, atol=0)
        assert decode.op_graphs is None


def _cache_keyword(model) -> str:
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def test_a_call_with_a_cache_updates_it_in_place():
    """As eager does: the caller's cache object holds the new keys and values after the call, and is the one the
    output returns (``generate`` keeps using the object it passed)."""
    from transformers import DynamicCache

    model = make_model("mixtral")
    cm = moecc.compile(model, backend="torch")
    name = _cache_keyword(model)
    ids, _ = _left_padded(2, 6)
    eager_cache, compiled_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    for step, chunk in enumerate((ids, ids[:, :1], ids[:, 1:2])):
        ref = model(input_ids=chunk, use_cache=True, **{name: eager_cache})
        out = cm(input_ids=chunk, use_cache=True, **{name: compiled_cache})
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
        assert out[name] is compiled_cache
        for mine, theirs in zip(compiled_cache.layers, eager_cache.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-6)
        assert compiled_cache.get_seq_length() == 6 + step
    assert cm.captures == 2


def test_a_sliding_window_cache_runs_uncompiled_and_says_why(moecc_warnings):
    """GPT-OSS's sliding-window layers count the tokens they have seen in a Python int their tensors do not carry:
    a call with such a cache is refused with the reason, and generate runs as the model's own."""
    from transformers import DynamicCache

    model = make_model("gpt_oss")
    cm = moecc.compile(model, backend="torch")
    ids, mask = _left_padded(2, 5)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    got = cm.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert "DynamicSlidingWindowLayer" in moecc_warnings.text and "uncompiled" in moecc_warnings.text
    assert cm.captures == 0
    with pytest.raises(MoeccError, match="sliding window"):
        cm(input_ids=ids, use_cache=True, **{_cache_keyword(model): DynamicCache(config=model.config)})
    torch.testing.assert_close(cm(ids).logits, model(ids, use_cache=False).logits, rtol=1e-5, atol=1e-6)


def test_export_refuses_a_cache(tmp_path):
    model = make_model("qwen3_moe")
    ids = torch.randint(0, 97, (2, 6))
    with pytest.raises(ArtifactError, match="use_cache=False"):
        moecc.export(model, (ids,), tmp_path / "art", kwargs={"use_cache": True}, backend="torch")



def test_bf16_check_of_a_call_with_a_cache():
    """In bf16 a disagreement is weighed against the model's rounding sensitivity, measured by another eager call
    with the MoE inputs jittered: that call must get a cache of its own, not the one the reference call already
    extended (it then failed on mismatched lengths instead of judging the program)."""
    from transformers import DynamicCache

    from moecc.runtime.verify import check_fresh

    model = make_model("mixtral").to(torch.bfloat16)
    cm = moecc.compile(model, backend="torch")
    ids, mask = _left_padded(2, 6)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    got = cm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert cm.captures == 2 and torch.equal(got[:, :6], ids)
    assert (got == expected).float().mean().item() >= 0.75  # bf16 near ties may pick another token
    cm(input_ids=ids, use_cache=True, **{_cache_keyword(model): DynamicCache(config=model.config)})
    entry = cm._entries[-1]
    program = entry.runner
    entry.runner = lambda *a: tuple(o * 1.5 if o.is_floating_point() else o for o in program(*a))  # a wrong program
    with pytest.raises(MoeccError, match="rounding sensitivity"):
        check_fresh(model, entry)


def test_an_encoder_decoder_cache_runs_uncompiled_and_says_why(moecc_warnings):
    """An encoder-decoder's cache is no pytree node: a capture would hold it as a constant, so it is refused."""
    model = make_model("switch_transformers")
    cm = moecc.compile(model, backend="torch")
    ids = torch.randint(3, 97, (2, 6))
    kwargs = dict(max_new_tokens=3, do_sample=False, decoder_start_token_id=0)
    expected = model.generate(ids, **kwargs)
    got = cm.generate(ids, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert "EncoderDecoderCache" in moecc_warnings.text and cm.captures == 0
