"""When ``GraphCache`` captures a shape (CPU: the capture itself is replaced; the CUDA cases are in
test_cudagraphs.py)."""

import pytest
import torch

from moecc.runtime import cudagraphs
from moecc.runtime.cudagraphs import GraphCache


class _Replayed:
    def free(self):
        return True

    def run(self, tensors):
        return ("replayed",)


def _cache(monkeypatch):
    captured = []

    def capture(self, tensors):
        captured.append(cudagraphs.token_count(tensors))
        return _Replayed()

    monkeypatch.setattr(GraphCache, "_capture", capture)
    return GraphCache(lambda x: ("launched",)), captured


def test_small_shapes_are_captured_at_once_larger_ones_from_their_second_call(monkeypatch):
    monkeypatch.setenv("MOECC_CUDA_GRAPH_MAX_TOKENS", "512")
    monkeypatch.setenv("MOECC_CUDA_GRAPH_REPEAT_MAX_TOKENS", "4096")
    monkeypatch.setenv("MOECC_CUDA_GRAPH_PROBE_MAX_TOKENS", "0")
    cache, captured = _cache(monkeypatch)
    small, medium, large = torch.zeros(1, 512, 8), torch.zeros(2, 1000, 8), torch.zeros(1, 4097, 8)
    assert cache([small]) == ("replayed",) and captured == [512]
    assert cache([medium]) == ("launched",)  # a prompt length seen once pays no capture
    assert cache([medium]) == ("replayed",) and captured == [512, 2000]
    assert cache([medium]) == ("replayed",) and captured == [512, 2000]
    assert [cache([large]) for _ in range(3)] == [("launched",)] * 3 and captured == [512, 2000]


def test_shapes_seen_once_are_forgotten_oldest_first(monkeypatch):
    monkeypatch.setenv("MOECC_CUDA_GRAPH_MAX_TOKENS", "0")
    monkeypatch.setattr(cudagraphs, "SEEN", 2)
    cache, captured = _cache(monkeypatch)
    a, b, c = (torch.zeros(n, 8) for n in (10, 20, 30))
    for t in (a, b, c):
        assert cache([t]) == ("launched",)
    assert cache([a]) == ("launched",)  # forgotten when c came
    assert cache([c]) == ("replayed",) and captured == [30]


def test_replays_admits_the_repeat_and_probe_ranges_outside_a_capture_of_the_callers(monkeypatch):
    monkeypatch.setenv("MOECC_CUDA_GRAPH_MAX_TOKENS", "512")
    monkeypatch.setenv("MOECC_CUDA_GRAPH_REPEAT_MAX_TOKENS", "4096")
    monkeypatch.setenv("MOECC_CUDA_GRAPH_PROBE_MAX_TOKENS", "8192")
    x = torch.zeros(1, 2048, 8)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    with torch.no_grad():
        assert cudagraphs.replays("triton", [x])
        assert cudagraphs.replays("triton", [torch.zeros(1, 8192, 8)])
        assert not cudagraphs.replays("triton", [torch.zeros(1, 8193, 8)])
        assert not cudagraphs.replays("triton", [x], enabled=False)
        capturing[0] = True  # the caller's graph records moecc's launches
        assert not cudagraphs.replays("triton", [x])


def _probed(monkeypatch, verdicts: dict[int, list]):
    """``host_bound_call`` replaced: the program runs, its verdicts are ``verdicts[tokens]`` in turn; returns the
    (token count, GPU sleep) of each such call."""
    timed = []

    def host_bound_call(program, tensors, sleep_s):
        timed.append((cudagraphs.token_count(tensors), sleep_s))
        return program(*tensors), verdicts[timed[-1][0]].pop(0)

    monkeypatch.setattr(cudagraphs, "host_bound_call", host_bound_call)
    return timed


def test_shapes_above_the_repeat_range_are_captured_once_timed_calls_find_the_host_the_bound(monkeypatch):
    monkeypatch.setenv("MOECC_CUDA_GRAPH_MAX_TOKENS", "512")
    monkeypatch.setenv("MOECC_CUDA_GRAPH_REPEAT_MAX_TOKENS", "2048")
    monkeypatch.setenv("MOECC_CUDA_GRAPH_PROBE_MAX_TOKENS", "8192")
    cache, captured = _cache(monkeypatch)
    # 6000 tokens: the first sleep ran out before the launches did (0.05 s of them), so it is timed again behind
    # a longer one
    timed = _probed(monkeypatch, {4096: [True], 8192: [False], 6000: [0.05, True]})
    host_bound, device_bound, retried = torch.zeros(1, 4096, 8), torch.zeros(8192, 8), torch.zeros(6000, 8)
    beyond = torch.zeros(8193, 8)
    assert [cache([host_bound]) for _ in range(2)] == [("launched",)] * 2 and not captured
    assert [t for t, _ in timed] == [4096] and 1e-3 <= timed[0][1] < 0.01  # sized by the first call's host time
    assert [cache([host_bound]) for _ in range(2)] == [("replayed",)] * 2 and captured == [4096]
    # kernels that outlast the launches: timed, then launched as they are
    assert [cache([device_bound]) for _ in range(4)] == [("launched",)] * 4 and [t for t, _ in timed] == [4096, 8192]
    assert [cache([retried]) for _ in range(3)] == [("launched",)] * 3
    assert timed[-1] == (6000, cudagraphs.SLEEP_MAX_S)  # 2 x 0.05 s + 1 ms, at most SLEEP_MAX_S
    assert cache([retried]) == ("replayed",) and captured == [4096, 6000]
    assert [cache([beyond]) for _ in range(3)] == [("launched",)] * 3 and len(timed) == 4


@pytest.mark.parametrize(("ran_out", "device_s", "sleep_s", "verdict"), [
    (False, 0.01, 0.05, True),  # 20 ms of launching, 10 ms of kernels
    (False, 0.04, 0.05, False),
    (True, 0.0, 0.05, "host"),  # timed again behind a longer sleep
    (True, 0.0, cudagraphs.SLEEP_MAX_S, False),
])
def test_a_host_bound_call_takes_the_host_about_as_long_to_launch_as_its_kernels_take(
        monkeypatch, ran_out, device_s, sleep_s, verdict):
    """``host_bound_call`` with stand-ins for the stream, its events and the GPU sleep."""
    import time

    slept = []

    class _Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            pass

        def query(self):
            return ran_out

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return device_s * 1e3

    def program(x):
        time.sleep(0.02)
        return (x + 1,)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "_sleep", slept.append)
    x = torch.zeros(3)
    out, state = cudagraphs.host_bound_call(program, [x], sleep_s)
    assert torch.equal(out[0], x + 1) and slept == [int(sleep_s * cudagraphs.SLEEP_CYCLES_PER_S)]
    if verdict == "host":
        assert isinstance(state, float) and 0.02 <= state < 0.2
    else:
        assert state is verdict


class _Program:
    def __init__(self):
        self.weight = [1.0]

    def __call__(self, x):
        return ("launched", self.weight[0])


def test_a_deep_copy_of_the_cache_has_no_graphs_and_the_copied_program():
    """A graph replays the buffers and weights of the program it was captured from: a copy captures its own."""
    import copy

    cache = GraphCache(_Program())
    cache.graphs[("shape",)] = ["a graph of the original program"]
    copied = copy.deepcopy(cache)
    assert not copied.graphs and not copied.failed
    assert copied.program is not cache.program and copied.program(None) == ("launched", 1.0)
    copied.program.weight[0] = 2.0
    assert cache.program(None) == ("launched", 1.0)


def test_a_graphs_input_buffers_are_no_inference_tensors():
    """A capture under ``torch.inference_mode()`` must leave buffers that a later call outside it can fill in place
    (an inference tensor refuses that)."""
    with torch.inference_mode():
        x = torch.randn(4, 8)
        (buffer,) = cudagraphs.static_copies([x])
    assert x.is_inference() and not buffer.is_inference()
    with torch.no_grad():
        buffer.copy_(torch.ones(4, 8))
    torch.testing.assert_close(buffer, torch.ones(4, 8))
