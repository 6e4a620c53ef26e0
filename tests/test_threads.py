"""Calls of one compiled model, or one loaded artifact, from several threads (a server's worker pool): they take
turns to find (or capture) their program, so the first calls' concurrent captures make one program, and every call
gets its own inputs' outputs; programs that share nothing (ONNX Runtime, torch on the CPU) then run at once.
(CUDA graph replays from several threads and streams: ``test_cudagraphs.py``.)"""

import threading

import pytest
import torch
from concurrency import call_together
from hf_models import make_inputs, make_model
from user_modules import LoopMoE, StepScaledModel

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


class _Meeting:
    """A program wrapped so that each call waits, up to a timeout, for as many calls as ``parties`` to be inside
    it at once: calls that take turns never meet. ``most`` counts the calls found inside together."""

    def __init__(self, program, parties: int, timeout: float = 20.0) -> None:
        self.program, self.barrier, self.timeout = program, threading.Barrier(parties), timeout
        self.inside = self.most = 0
        self.count = threading.Lock()

    def __call__(self, *tensors):
        with self.count:
            self.inside += 1
            self.most = max(self.most, self.inside)
        try:
            self.barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            pass
        finally:
            with self.count:
                self.inside -= 1
        return self.program(*tensors)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_calls_of_a_compiled_program_that_shares_nothing_run_at_once(backend):
    """An ONNX Runtime session and a torch program on the CPU run outside the lock: two threads are inside the
    program together (with the lock held throughout, the second waited for the first, whose wait timed out)."""
    model = make_model("mixtral")
    cm = moecc.compile(model, backend=backend)
    inputs = [make_inputs("mixtral", 2, 6, seed=seed)["input_ids"] for seed in (1, 2)]
    with torch.no_grad():
        cm(input_ids=inputs[0])
        entry = cm._entries[0]
        entry.runner = meeting = _Meeting(entry.runner, 2)
        got = call_together(lambda ids: cm(input_ids=ids).logits, inputs)
        assert meeting.most == 2 and not meeting.barrier.broken
        for ids, out in zip(inputs, got):
            torch.testing.assert_close(out, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_calls_of_a_program_that_writes_the_models_buffers_take_turns():
    """A program that counts steps in a buffer runs under the lock: each call's count is its own."""
    model = StepScaledModel(LoopMoE()).eval()
    cm = moecc.compile(model, backend="torch")
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        cm(ids)
        entry = cm._entries[0]
        assert entry.writes
        entry.runner = meeting = _Meeting(entry.runner, 2, timeout=0.5)
        call_together(lambda _: cm(ids), [0, 1])
    assert meeting.most == 1 and model.steps.item() == 3


def test_calls_of_a_loaded_onnx_runtime_artifact_run_at_once(tmp_path):
    model = make_model("mixtral")
    example = make_inputs("mixtral", 2, 6)
    moecc.export(model, (), tmp_path / "artifact", kwargs=example, backend="onnxruntime")
    loaded = moecc.load(tmp_path / "artifact")
    loaded.program = meeting = _Meeting(loaded.program, 2)
    inputs = [make_inputs("mixtral", 2, 6, seed=seed) for seed in (1, 2)]
    got = call_together(lambda kwargs: loaded(**kwargs).logits, inputs)
    assert meeting.most == 2 and not meeting.barrier.broken
    with torch.no_grad():
        for kwargs, out in zip(inputs, got):
            torch.testing.assert_close(out, model(**kwargs).logits, rtol=1e-4, atol=1e-4)

