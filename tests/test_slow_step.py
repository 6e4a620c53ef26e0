"""Long compile steps say so while they run (``moecc.logs.slow_step``, knob ``MOECC_SLOW_STEP_S``): a lowering of
tens of thousands of ONNX nodes (a linear-attention model's unrolled loops) runs for minutes, and a compile that
says nothing for that long looks hung."""

import logging
import time

import torch
from hf_models import make_inputs, make_model

import moecc
from moecc.logs import slow_step

log = logging.getLogger("moecc.test")


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_long_step_warns_while_it_runs_and_when_it_ends(moecc_warnings, monkeypatch):
    monkeypatch.setenv("MOECC_SLOW_STEP_S", "0.05")
    with slow_step(log, "waiting"):
        time.sleep(0.4)
    said = _messages(moecc_warnings)
    still = [m for m in said if m.startswith("still waiting after")]
    assert 1 <= len(still) <= 4  # at 0.05, 0.1, 0.2 s (later on a busy machine): each time its time doubles
    assert said[-1].startswith("waiting: 0.")


def test_a_quick_step_says_nothing_above_info(moecc_warnings, monkeypatch):
    monkeypatch.setenv("MOECC_SLOW_STEP_S", "5")
    with slow_step(log, "blinking"):
        pass
    assert _messages(moecc_warnings) == []


def test_the_innermost_step_speaks_for_the_steps_around_it(moecc_warnings, monkeypatch):
    monkeypatch.setenv("MOECC_SLOW_STEP_S", "0.05")
    with slow_step(log, "outer"):
        with slow_step(log, "inner"):
            time.sleep(0.3)
    said = _messages(moecc_warnings)
    assert any(m.startswith("still inner after") for m in said)
    assert not any(m.startswith("still outer") for m in said) and not any(m.startswith("outer:") for m in said)


def test_zero_turns_the_warnings_off(moecc_warnings, monkeypatch):
    monkeypatch.setenv("MOECC_SLOW_STEP_S", "0")
    with slow_step(log, "waiting"):
        time.sleep(0.1)
    assert _messages(moecc_warnings) == []


def test_the_first_warning_carries_the_hint(moecc_warnings, monkeypatch):
    monkeypatch.setenv("MOECC_SLOW_STEP_S", "0.05")
    with slow_step(log, "waiting", "do something else"):
        time.sleep(0.25)
    still = [m for m in _messages(moecc_warnings) if m.startswith("still waiting")]
    assert still[0].endswith("(do something else)") and not any("do something" in m for m in still[1:])


def test_a_step_that_raises_still_ends_its_watch(moecc_warnings, monkeypatch):
    monkeypatch.setenv("MOECC_SLOW_STEP_S", "0.05")
    try:
        with slow_step(log, "failing"):
            time.sleep(0.3)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    count = len(_messages(moecc_warnings))
    time.sleep(0.2)
    assert count and len(_messages(moecc_warnings)) == count


def test_a_lowering_to_onnx_runtime_names_its_slow_stage(moecc_warnings, monkeypatch):
    monkeypatch.setenv("MOECC_SLOW_STEP_S", "0.01")
    monkeypatch.setenv("MOECC_ONNX_CACHE", "0")  # an earlier test's export of this model would be read back
    model = make_model("mixtral").eval()
    cm = moecc.compile(model, backend="onnxruntime", verify=False)
    with torch.no_grad():
        cm(**make_inputs("mixtral", 2, 8))
    said = _messages(moecc_warnings)
    still = [m for m in said if m.startswith("still exporting") and "ops to ONNX (torch.onnx.export)" in m]
    assert still and "backend='torch'" in still[0]
    assert any(m.startswith("lowering to onnxruntime: ") for m in said)
