"""Calls of one compiled model, or one loaded artifact, from several threads (a server's worker pool): they run one
at a time, so the first calls' concurrent captures make one program, and every call gets its own inputs' outputs.
(CUDA graph replays from several threads and streams: ``test_cudagraphs.py``.)"""

import pytest
import torch
from concurrency import call_together
from hf_models import make_inputs, make_model

import moecc


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_first_calls_from_several_threads_share_one_capture(backend):
    model = make_model("mixtral")
    cm = moecc.compile(model, backend=backend)
    inputs = [make_inputs("mixtral", 2, seq, seed=seq)["input_ids"] for seq in (5, 6, 7, 9)]

    def call(ids):
        with torch.no_grad():
            return cm(input_ids=ids).logits

    got = call_together(call, inputs)
    with torch.no_grad():
        for ids, out in zip(inputs, got):
            assert isinstance(out, torch.Tensor), out
            torch.testing.assert_close(out, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert cm.captures == 1 and cm.blockwise is None  # the sequence length is symbolic: one capture serves all
    assert all(layer.fused for layer in cm.moe_layers)


def test_a_compiled_model_with_its_lock_can_be_deep_copied():
    import copy

    model = make_model("mixtral")
    cm = moecc.compile(model, backend="torch")
    ids = make_inputs("mixtral", 1, 5)["input_ids"]
    with torch.no_grad():
        cm(input_ids=ids)
        copied = copy.deepcopy(cm)
        got = call_together(lambda m: m(input_ids=ids).logits, [cm, copied])
        for out in got:
            torch.testing.assert_close(out, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_a_loaded_artifact_called_from_several_threads(tmp_path):
    model = make_model("mixtral")
    example = make_inputs("mixtral", 2, 6)
    moecc.export(model, (), tmp_path / "artifact", kwargs=example)
    loaded = moecc.load(tmp_path / "artifact")
    inputs = [make_inputs("mixtral", 2, seq, seed=seq) for seq in (5, 6, 7, 9)]
    got = call_together(lambda kwargs: loaded(**kwargs).logits, inputs)
    with torch.no_grad():
        for kwargs, out in zip(inputs, got):
            assert isinstance(out, torch.Tensor), out
            torch.testing.assert_close(out, model(**kwargs).logits, rtol=1e-4, atol=1e-4)


def test_generates_from_several_threads_take_turns_and_leave_the_model_as_it_was():
    """``cm.generate`` routes ``model.forward`` through the compiled model while it runs: two at once restored each
    other's patch (the model stayed patched) and ran the model's own forward during the other's capture."""
    model = make_model("mixtral")
    cm = moecc.compile(model, backend="torch")
    prompts = [make_inputs("mixtral", 1, seq, seed=seq)["input_ids"] for seq in (5, 6)]

    def generate(ids):
        with torch.no_grad():
            return cm.generate(ids, max_new_tokens=3, do_sample=False)

    got = call_together(generate, prompts)
    assert "forward" not in vars(model)
    with torch.no_grad():
        for ids, out in zip(prompts, got):
            assert isinstance(out, torch.Tensor), out
            torch.testing.assert_close(out, model.generate(ids, max_new_tokens=3, do_sample=False))
