"""CUDA graph replay (``moecc/runtime/cudagraphs.py``): outputs are handed out without copies, and never overwritten
while the caller holds them."""

import pytest
import torch
from concurrency import call_together

from moecc.runtime import cudagraphs
from moecc.runtime.cudagraphs import GraphCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _program(x):
    return (torch.relu(x) * 2 + 1,)


def _ref(x):
    return _program(x)[0]


@pytest.mark.parametrize("tokens", [4, 64])  # in a pool of its own (no copy out), and in the shared one
def test_replays_hand_out_aliases_and_keep_held_outputs(tokens):
    cache = GraphCache(_program)
    xs = [torch.randn(tokens, 8, device="cuda") for _ in range(3)]
    first = cache([xs[0]])[0]
    view = first[1:]  # a view of a held output keeps its graph busy too
    kept = cache([xs[1]])[0]
    torch.testing.assert_close(first, _ref(xs[0]))
    torch.testing.assert_close(view, _ref(xs[0])[1:])
    torch.testing.assert_close(kept, _ref(xs[1]))
    assert len(cache.graphs[next(iter(cache.graphs))]) == 2  # a second instance served while the first was held
    del first, view, kept
    for x in xs:  # nothing held: one instance serves every call
        torch.testing.assert_close(cache([x])[0], _ref(x))
    assert len(cache.graphs[next(iter(cache.graphs))]) == 2


def test_callers_in_several_threads_take_turns():
    """An instance is chosen free, filled and replayed by one caller at a time: two callers never fill the same
    static buffers."""
    cache = GraphCache(_program)
    xs = [torch.randn(64, 8, device="cuda") for _ in range(6)]

    def call(x):
        return [cache([x])[0].clone() for _ in range(40)]  # each alias dropped at once: its instance is free again

    for x, outs in zip(xs, call_together(call, xs)):
        assert not isinstance(outs, Exception), outs
        for out in outs:
            torch.testing.assert_close(out, _ref(x))


def test_a_call_on_another_stream_waits_for_the_graphs_work_on_the_last():
    """Graphs of more than 16 tokens share one memory pool, which holds for replays in call order; a call on another
    stream waits for the work queued on the last call's, or two replays would run at once on the same memory."""
    w = torch.randn(512, 512, device="cuda") / 23

    def chain(x):
        for _ in range(40):
            x = torch.tanh(x @ w)
        return (x,)

    cache = GraphCache(chain)
    xs = [torch.randn(64, 512, device="cuda") for _ in range(2)]
    with torch.no_grad():
        held = [cache([x])[0] for x in xs]  # two instances, captured while the other is held
        refs = [chain(x)[0] for x in xs]
        del held
        torch.cuda.synchronize()
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        outs = []
        for stream, x in zip(streams, xs):
            with torch.cuda.stream(stream):
                torch.cuda._sleep(20_000_000)  # both replays queued behind a sleep, so that unordered they overlap
                outs.append(cache([x])[0])
        torch.cuda.synchronize()
    assert len(cache.graphs[next(iter(cache.graphs))]) == 2
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("tokens", [4, 64])
def test_a_graph_captured_under_inference_mode_serves_calls_outside_it(tokens):
    cache = GraphCache(_program)
    xs = [torch.randn(tokens, 8, device="cuda") for _ in range(3)]
    with torch.inference_mode():
        torch.testing.assert_close(cache([xs[0]])[0], _ref(xs[0]))
    with torch.no_grad():
        torch.testing.assert_close(cache([xs[1]])[0], _ref(xs[1]))
    with torch.inference_mode():
        torch.testing.assert_close(cache([xs[2]])[0], _ref(xs[2]))
    assert len(cache.graphs) == 1


class _HandsBack(torch.nn.Module):
    """Returns its input and its weight as they are, beside a new tensor."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, device="cuda"))

    def forward(self, x):
        return x, self.w, x * self.w


def test_outputs_that_are_inputs_or_weights_are_copied_out():
    """A graph in its own pool hands out its outputs where they were written; an input or a weight handed back as
    it is must still be copied (the next call's input copy would overwrite it; a caller's in-place edit would reach
    the weight)."""
    program = _HandsBack()
    cache = GraphCache(program)
    xs = [torch.randn(2, 8, device="cuda") for _ in range(3)]
    with torch.no_grad():
        outs = [cache([x]) for x in xs]
        for x, (same, w, product) in zip(xs, outs):
            torch.testing.assert_close(same, x)
            torch.testing.assert_close(product, x * program.w)
            assert w.data_ptr() != program.w.data_ptr()
        outs[0][1].zero_()
    assert program.w.abs().sum() > 0


def test_small_graphs_keep_their_outputs_in_a_pool_of_their_own():
    """No copy out at the end of a replay: the shared pool (for graphs of more tokens) is never made."""
    cache = GraphCache(_program)
    for tokens in (1, cudagraphs.OWN_POOL_MAX_TOKENS):
        x = torch.randn(tokens, 8, device="cuda")
        torch.testing.assert_close(cache([x])[0], _ref(x))
    assert cache.pool is None
    x = torch.randn(cudagraphs.OWN_POOL_MAX_TOKENS + 1, 8, device="cuda")
    torch.testing.assert_close(cache([x])[0], _ref(x))
    assert cache.pool is not None


def test_all_instances_held_runs_without_graphs():
    cache = GraphCache(_program)
    xs = [torch.randn(2, 8, device="cuda") for _ in range(cudagraphs.INSTANCES + 2)]
    held = [cache([x])[0] for x in xs]
    assert len(cache.graphs[next(iter(cache.graphs))]) == cudagraphs.INSTANCES
    for x, out in zip(xs, held):
        torch.testing.assert_close(out, _ref(x))


def test_an_output_fed_back_as_input():
    cache = GraphCache(_program)
    x = torch.randn(3, 8, device="cuda")
    y = cache([x])[0]
    z = cache([y])[0]
    torch.testing.assert_close(y, _ref(x))
    torch.testing.assert_close(z, _ref(_ref(x)))


def test_without_use_counts_outputs_are_copies(monkeypatch):
    monkeypatch.setattr(cudagraphs, "_use_count", None)
    cache = GraphCache(_program)
    xs = [torch.randn(4, 8, device="cuda") for _ in range(3)]
    outs = [cache([x])[0] for x in xs]
    assert len(cache.graphs[next(iter(cache.graphs))]) == 1
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out, _ref(x))


def test_random_ops_work_after_a_capture_that_failed():
    """A program that synchronizes cannot be captured: it runs as launched, and the failed capture must not leave
    torch's CUDA generator marked as capturing (every later random op on the device raised "Offset increment
    outside graph capture encountered unexpectedly")."""

    def syncs(x):
        return (x * float(x.sum().item()),)

    cache = GraphCache(syncs)
    x = torch.ones(4, 8, device="cuda")
    torch.testing.assert_close(cache([x])[0], syncs(x)[0])
    assert cache.failed
    torch.randn(16, device="cuda")
    torch.randint(0, 10, (16,), device="cuda")


def test_a_deep_copy_of_a_compiled_model_captures_graphs_of_its_own():
    """A graph replays the buffers and weights it was captured from; the copy's cache starts empty."""
    import copy

    from user_modules import LoopMoE, TinyModel

    import moecc

    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval().cuda()
    cm = moecc.compile(model, backend="triton")
    ids = torch.randint(0, 50, (2, 9), device="cuda")
    with torch.no_grad():
        cm(ids), cm(ids)
        (entry,) = cm._entries
        assert entry.graphs is not None and entry.graphs.graphs
        copied = copy.deepcopy(cm)
        assert not copied._entries[0].graphs.graphs
        copied.original_model.head.weight.mul_(0)  # the copy's own weights: the original's graphs must not be read
        torch.testing.assert_close(copied(ids), copied.original_model(ids), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(cm(ids), model(ids), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("seq", [1, 3])
def test_replayed_decode_layers_count_arrivals_in_counters_of_their_own(seq):
    """Every MoE layer of a replayed decode graph selects its tokens in the fused router GEMV, whose last program
    per token is found by counting arrivals in counters the graph zeroed once (``scratch``): replays with fresh
    inputs must match eager, and the graph must hold those counters."""
    from hf_models import make_model

    import moecc

    model = make_model("qwen3_moe").cuda()
    cm = moecc.compile(model, backend="triton")
    with torch.no_grad():
        for seed in range(4):
            ids = torch.randint(0, 97, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            torch.testing.assert_close(cm(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       rtol=2e-4, atol=2e-4)
        (instances,) = cm._entries[-1].graphs.graphs.values()
        assert all(len(i.scratch.buffers) == model.config.num_hidden_layers for i in instances)


def test_shapes_above_the_repeat_range_are_captured_where_a_timed_call_was_host_bound(monkeypatch):
    """Many tiny launches (the host is the bound) are captured from the shape's third call; one long kernel (the
    GPU is the bound) keeps being launched."""
    monkeypatch.setenv("MOECC_CUDA_GRAPH_REPEAT_MAX_TOKENS", "2048")
    monkeypatch.setenv("MOECC_CUDA_GRAPH_PROBE_MAX_TOKENS", "8192")

    def many_small(x):
        for _ in range(200):
            x = x + 1
        return (x,)

    def one_long(x):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time
        return (x * 2,)

    x = torch.zeros(4096, 8, device="cuda")
    with torch.no_grad():
        for program, captured in ((many_small, True), (one_long, False)):
            cache = GraphCache(program)
            outs = [cache([x])[0].clone() for _ in range(4)]
            assert bool(cache.graphs) is captured, program.__name__
            for out in outs:
                torch.testing.assert_close(out, program(x)[0])
