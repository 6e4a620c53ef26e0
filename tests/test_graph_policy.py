"""When ``GraphCache`` captures a shape (CPU: the capture itself is replaced; the CUDA cases are in
test_cudagraphs.py)."""

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


def test_replays_admits_the_repeat_range(monkeypatch):
    monkeypatch.setenv("MOECC_CUDA_GRAPH_MAX_TOKENS", "512")
    monkeypatch.setenv("MOECC_CUDA_GRAPH_REPEAT_MAX_TOKENS", "4096")
    x = torch.zeros(1, 2048, 8)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        assert cudagraphs.replays("triton", [x])
        assert not cudagraphs.replays("triton", [torch.zeros(1, 4097, 8)])
        assert not cudagraphs.replays("triton", [x], enabled=False)


def test_a_failed_capture_restores_the_cuda_generators_and_runs_as_launched(monkeypatch):
    """A failed capture leaves torch's CUDA generators marked as capturing; the cache restores them before it runs
    the call as launched (the GPU case is in test_cudagraphs.py)."""
    restored = []

    def fail(self, tensors):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphCache, "_capture", fail)
    monkeypatch.setattr(cudagraphs, "restore_rng_after_failed_capture", lambda: restored.append(1))
    cache = GraphCache(lambda x: ("launched",))
    x = torch.zeros(4, 8)
    assert cache([x]) == ("launched",) and restored == [1]
    assert cache([x]) == ("launched",) and restored == [1]  # the shape is not captured again



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
