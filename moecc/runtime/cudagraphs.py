"""CUDA graphs for small and medium token counts: one graph per input shape, replayed from static buffers.

Host work (Python, operator dispatch, Triton's launcher) costs about a millisecond per MoE layer call, more than
the GPU needs for a few hundred tokens; a replay costs one copy in and the replay itself. A call hands out aliases of a
graph's output buffers rather than copies (on an H100 host a clone of the output took 13 us of a 79 us decode
call). A graph is replayed only while no alias of its outputs is alive (the storages' use counts say so);
otherwise another instance of it is captured, up to ``INSTANCES``, after which the call runs without graphs. So an
output the caller keeps is never overwritten. Graphs of more than ``OWN_POOL_MAX_TOKENS`` tokens share one memory
pool, which is safe because replays run one at a time in call order (callers in several threads take turns, and a
call on another stream than the last waits for the work queued there), and end by copying their outputs into
buffers of their own outside it; graphs of fewer tokens keep everything in a pool of their own, and their outputs
where their last kernels write them. The least recently used shape is dropped past
``MOECC_CUDA_GRAPH_MAX_GRAPHS``. Each graph also keeps its kernels' zeroed counters (``scratch``).

Up to ``MOECC_CUDA_GRAPH_MAX_TOKENS`` (512) tokens a shape is captured on its first call. Above that and up to
``MOECC_CUDA_GRAPH_REPEAT_MAX_TOKENS`` (2048) it is captured on its second: the host's launch path (about 0.7 ms
per layer call) still bounds layers of small experts at about 1k tokens, but a capture costs more than one call, so a
prompt length seen once runs as launched and only a shape that repeats (a batch of fixed length, a benchmark loop)
pays for its graph. Above that and up to ``MOECC_CUDA_GRAPH_PROBE_MAX_TOKENS`` (16384) a shape's first two calls are
timed (``timed_call``), the second launched behind a GPU sleep so that its kernels run back to back, and graphs take
over from its third only where launching it took the host about as long as its kernels took the GPU, or longer.
That depends on the host's speed as much as on the model (on one H200 host Qwen3-MoE's layer at 4096 tokens took
1.03 ms to launch against about 0.7 ms of kernels), while a call whose kernels outlast its launching gains nothing
from a graph, which would hold its memory pool."""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections import OrderedDict

import torch
from torch import fx
from torch.utils import _pytree as pytree

from moecc import knobs
from moecc.codegen.triton.scratch import GraphScratch, graph_scratch
from moecc.runtime.direct import retargeted
from moecc.runtime.weights import program_devices, program_storages

log = logging.getLogger("moecc.runtime")

INSTANCES = 4  # graphs per input shape whose outputs may be alive at once
SEEN = 64  # shapes above MOECC_CUDA_GRAPH_MAX_TOKENS remembered from their first call
# a call is host-bound when launching it takes the host this share of its kernels' time or more: launched calls then
# leave the GPU waiting (they overlap the previous call's kernels only while the host is the faster), and a replay
# costs the kernels and two copies
HOST_BOUND_SHARE = 0.9
SLEEP_MAX_S = 0.1  # the longest GPU sleep a timed call is launched behind
SLEEP_CYCLES_PER_S = 2.5e9  # at least as many as a GPU's clock runs, so that a sleep lasts its seconds or more
# up to here a graph keeps its outputs in a memory pool of its own, saving the copy out (a kernel of about 2 us in
# a 38 us decode layer); above, pools of their own would hold too much memory for too little gain
OWN_POOL_MAX_TOKENS = 16
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: without it, outputs are copied out


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # private (Inductor's launchers call it)


def _current_raw_stream(device: int) -> int:
    """The current CUDA stream's handle on ``device``, without building a ``torch.cuda.Stream`` (about 1 us)."""
    return _raw_stream(device) if _raw_stream is not None else torch.cuda.current_stream(device).cuda_stream


def token_count(tensors: list[torch.Tensor]) -> int:
    counts = [t.numel() // (t.shape[-1] if t.is_floating_point() and t.dim() else 1) for t in tensors]
    return max(counts) if counts else 0


def replays(backend: str, tensors: list[torch.Tensor], enabled: bool | None = None) -> bool:
    """Whether a call may replay a CUDA graph: Triton programs on CUDA inputs, inference only, outside a capture of
    the caller's, up to ``MOECC_CUDA_GRAPH_MAX_TOKENS`` tokens, or ``MOECC_CUDA_GRAPH_REPEAT_MAX_TOKENS`` and
    ``MOECC_CUDA_GRAPH_PROBE_MAX_TOKENS`` for shapes seen before (``GraphCache`` decides); ``enabled`` (the
    ``cuda_graphs`` option) overrides the knob."""
    if backend != "triton" or not tensors or torch.is_grad_enabled() or not all(t.is_cuda for t in tensors):
        return False
    wanted = knobs.CUDA_GRAPHS.get() if enabled is None else enabled
    # while the caller captures a graph of its own, that graph records the launches (and no stream may sync)
    if not wanted or torch.cuda.is_current_stream_capturing():
        return False
    tokens = token_count(tensors)
    # decode's few tokens read one knob (each read is an environment lookup, about 1 us)
    return tokens <= knobs.CUDA_GRAPH_MAX_TOKENS.get() or tokens <= max(knobs.CUDA_GRAPH_REPEAT_MAX_TOKENS.get(),
                                                                        knobs.CUDA_GRAPH_PROBE_MAX_TOKENS.get())


def timed_call(program, tensors: list[torch.Tensor], state: float | None) -> tuple[tuple, bool | float]:
    """One call of a shape above ``MOECC_CUDA_GRAPH_REPEAT_MAX_TOKENS``, timed: (its outputs, the shape's next
    state). The first (``state`` None) gives its host seconds, which size the next one's ``host_bound_call``."""
    if state is None:
        start = time.perf_counter()
        out = program(*tensors)
        return out, time.perf_counter() - start
    return host_bound_call(program, tensors, min(2 * state + 1e-3, SLEEP_MAX_S))


def host_bound_call(program, tensors: list[torch.Tensor], sleep_s: float) -> tuple[tuple, bool | float]:
    """``program(*tensors)`` launched behind ``sleep_s`` of GPU sleep, so that its kernels queue up and run back
    to back: (its outputs, whether its launching took the host about as long as its kernels took the GPU, or the
    host's seconds where the sleep ran out before the launches did and the kernels may have waited on them)."""
    stream = torch.cuda.current_stream()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(sleep_s * SLEEP_CYCLES_PER_S))
    begin.record(stream)
    start = time.perf_counter()
    out = program(*tensors)
    host = time.perf_counter() - start
    end.record(stream)
    ran_out = begin.query()
    end.synchronize()
    shapes = [tuple(t.shape) for t in tensors]
    if ran_out:
        log.debug("CUDA graphs for %s: %.3f ms of launching outlasted %.3f ms of GPU sleep", shapes, host * 1e3,
                  sleep_s * 1e3)
        return out, False if sleep_s >= SLEEP_MAX_S else host
    device = begin.elapsed_time(end) / 1e3
    bound = host >= HOST_BOUND_SHARE * device
    log.debug("CUDA graphs for %s: launching took %.3f ms, the kernels %.3f ms: %s", shapes, host * 1e3,
              device * 1e3, "host-bound, captured from the next call" if bound else "launched as they are")
    return out, bound


def static_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A graph's input buffers, which each replay fills in place: never inference tensors, even when the capture
    runs under ``torch.inference_mode()``, or a later call outside it could not fill them."""
    with torch.inference_mode(False):
        return [t.clone() for t in tensors]


class _Instance:
    def __init__(self, graph, static_in: list, outputs: tuple, scratch: GraphScratch) -> None:
        self.graph = graph
        self.static_in = static_in
        self.outputs = outputs
        self.scratch = scratch  # the zeroed counters its kernels use in place
        # the storages live as long as ``outputs``: their handles are read once (each read builds a Python object)
        self.storages = [o.untyped_storage()._cdata for o in outputs]
        self.base = [_use_count(c) for c in self.storages] if _use_count else None

    def free(self) -> bool:
        """No alias handed out by ``run`` is alive (always, without use counts: then ``run`` hands out copies)."""
        return self.base is None or all(_use_count(c) <= b for c, b in zip(self.storages, self.base))

    def run(self, tensors: list[torch.Tensor]) -> tuple:
        for dst, src in zip(self.static_in, tensors):
            dst.copy_(src)
        self.graph.replay()
        if self.base is None:
            return tuple(o.clone() for o in self.outputs)
        return tuple(o.detach() for o in self.outputs)


class GraphCache:
    def __init__(self, program) -> None:
        self.program = program
        self.graphs: OrderedDict[tuple, list[_Instance]] = OrderedDict()
        self.failed: set[tuple] = set()
        self.seen: OrderedDict[tuple, bool | float | None] = OrderedDict()  # shapes above MAX_TOKENS, newest last
        self.pool = None
        # callers in several threads take turns: an instance is chosen free and its static buffers filled and
        # replayed before another caller may choose
        self.lock = threading.Lock()
        self.stream: torch.cuda.Stream | None = None  # the stream of the last call, which the graphs' work is on
        self.raw_stream: int | None = None
        # a graph records the work of one device's stream; a program whose weights sit on several GPUs (a model split
        # over them) would replay without the work of the others, so it runs as launched
        self.devices = program_devices(program)
        self.spans_devices = False

    def __deepcopy__(self, memo: dict) -> GraphCache:
        # a graph replays the buffers and weights of the program it was captured from: the copy captures its own
        return GraphCache(copy.deepcopy(self.program, memo))

    def __call__(self, tensors: list[torch.Tensor]):
        with self.lock:
            if (device := tensors[0].get_device()) < 0:  # (a CPU test's stand-in program has no stream)
                return self._call(tensors)
            if self._on_several_devices(device, tensors):
                return self.program(*tensors)
            # graphs capture and replay on the current device's streams: the one the inputs are on
            with contextlib.nullcontext() if device == torch.cuda.current_device() else torch.cuda.device(device):
                self._follow_stream(device)
                return self._call(tensors)

    def _on_several_devices(self, device: int, tensors: list[torch.Tensor]) -> bool:
        if (self.devices and self.devices != {device}) or any(t.get_device() != device for t in tensors):
            if not self.spans_devices:
                self.spans_devices = True
                log.info("no CUDA graphs for a program on CUDA devices %s: a graph records one device's work",
                         sorted(self.devices | {t.get_device() for t in tensors}))
            return True
        return False

    def _follow_stream(self, device: int) -> None:
        """Graphs share memory (static inputs, the shared pool) across calls, which is safe while their work runs in
        call order: a call on another stream than the last waits for the work queued on that one."""
        raw = _current_raw_stream(device)
        if raw == self.raw_stream:
            return
        current = torch.cuda.current_stream(device)
        if self.stream is not None:
            current.wait_stream(self.stream)
        self.stream, self.raw_stream = current, raw

    def _call(self, tensors: list[torch.Tensor]):
        key = tuple((t.shape, t.dtype, t.get_device()) for t in tensors)
        now = False if key in self.failed else self._graphs_now(key, tensors)
        if now is None:
            out, self.seen[key] = timed_call(self.program, tensors, self.seen.get(key))
            return out
        if not now:
            return self.program(*tensors)
        instances = self.graphs.get(key)
        if instances is None:
            instances = self.graphs[key] = []
            while len(self.graphs) > max(1, knobs.CUDA_GRAPH_MAX_GRAPHS.get()):
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        free = next((i for i in instances if i.free()), None)
        if free is None and len(instances) < INSTANCES:
            try:
                free = self._capture(tensors)
            except Exception as exc:  # noqa: BLE001 - a program that cannot be captured runs as launched
                restore_rng_after_failed_capture()
                log.warning("CUDA graph capture failed for %s, running without graphs: %s", key, exc)
                self.failed.add(key)
                return self.program(*tensors)
            instances.append(free)
        if free is None:
            log.debug("the outputs of all %d graphs for %s are alive: running without graphs", len(instances), key)
            return self.program(*tensors)
        return free.run(tensors)

    def _graphs_now(self, key: tuple, tensors: list[torch.Tensor]) -> bool | None:
        """Whether this call goes through graphs: always up to MAX_TOKENS, from a shape's second call up to
        REPEAT_MAX_TOKENS, and up to PROBE_MAX_TOKENS once its timed calls found it host-bound (None: a timed call,
        ``timed_call``). Shapes above MAX_TOKENS are remembered in ``seen``, the last ``SEEN`` of them: None once
        called (in the repeat range), else their state after ``timed_call``."""
        tokens = token_count(tensors)
        if key in self.graphs or tokens <= knobs.CUDA_GRAPH_MAX_TOKENS.get():
            return True
        repeat = tokens <= knobs.CUDA_GRAPH_REPEAT_MAX_TOKENS.get()
        if not repeat and tokens > knobs.CUDA_GRAPH_PROBE_MAX_TOKENS.get():
            return False
        if key in self.seen:
            state = self.seen[key]
            self.seen.move_to_end(key)
            if repeat or state is True:
                del self.seen[key]
                return True
            return None if state is not False else False
        self.seen[key] = None
        while len(self.seen) > SEEN:
            self.seen.popitem(last=False)
        return False if repeat else None

    def _capture(self, tensors) -> _Instance:
        static_in = static_copies(tensors)
        scratch = GraphScratch()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad(), graph_scratch(scratch):
            for _ in range(2):  # compiles kernels and fills allocator pools outside the capture
                scratch.rewind()
                warm = self.program(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        if token_count(tensors) <= OWN_POOL_MAX_TOKENS:
            instance = self._capture_in_own_pool(static_in, scratch)
            if instance is not None:
                return instance
        # the outputs' own buffers: allocated outside the shared pool, so no other graph's replay writes them
        outputs = tuple(torch.empty_like(o) for o in warm)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        scratch.rewind()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad(), graph_scratch(scratch):
            for dst, src in zip(outputs, self.program(*static_in)):
                dst.copy_(src)
        log.debug("captured a CUDA graph for %s", [tuple(t.shape) for t in tensors])
        return _Instance(graph, static_in, outputs, scratch)

    def _capture_in_own_pool(self, static_in: list, scratch: GraphScratch) -> _Instance | None:
        """A graph whose outputs stay where its last kernels write them, in a memory pool no other graph uses: no
        copy out at the end of each replay. None when an output is not the graph's own memory (an input or a
        weight handed back as it is), which only a copy keeps apart."""
        graph = torch.cuda.CUDAGraph()
        scratch.rewind()
        with torch.cuda.graph(graph), torch.no_grad(), graph_scratch(scratch):
            outputs = tuple(self.program(*static_in))
        # a function (a moecc op call, whose outputs are always new tensors) holds no tensors of its own
        held = program_storages(self.program) | {t.untyped_storage().data_ptr() for t in static_in}
        if any(not isinstance(o, torch.Tensor) or o.untyped_storage().data_ptr() in held for o in outputs):
            return None
        log.debug("captured a CUDA graph in its own pool for %s", [tuple(t.shape) for t in static_in])
        return _Instance(graph, static_in, outputs, scratch)


def restore_rng_after_failed_capture() -> None:
    """A capture that fails leaves torch's default CUDA generators marked as capturing (up to torch 2.11,
    ``capture_end`` raises before the epilogue that clears the mark), and every later random op on the device then
    raises "Offset increment outside graph capture encountered unexpectedly": in the caller's code, long after the
    failure moecc handled. Each default generator gets a copy of its state, the same seed and offset, unmarked."""
    for generator in getattr(torch.cuda, "default_generators", ()):
        try:
            generator.graphsafe_set_state(generator.clone_state())
        except Exception as exc:  # noqa: BLE001 - a torch without these calls, or one that cleans up by itself
            log.debug("could not restore the state of %s after a failed capture: %s", generator, exc)


class _GraphedCall:
    """One moecc op call of a program, replayed from a CUDA graph per shape of its activations. The weights it reads
    are the program's own parameters, at fixed addresses, so a graph holds them as they are and only the
    activations are copied in."""

    def __init__(self, target, node: fx.Node, enabled: bool | None):
        leaves, self.spec = pytree.tree_flatten((node.args, node.kwargs))
        self.dynamic = [i for i, v in enumerate(leaves) if isinstance(v, fx.Node) and v.op != "get_attr"]
        self.target = target
        self.enabled = enabled
        self.graphs = GraphCache(self._call)
        self.leaves: list = []
        self.single = False

    def _call(self, *tensors):
        leaves = list(self.leaves)
        for i, t in zip(self.dynamic, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        out = self.target(*args, **kwargs)
        self.single = isinstance(out, torch.Tensor)
        return (out,) if self.single else tuple(out)

    def __call__(self, *args, **kwargs):
        leaves = pytree.tree_leaves((args, kwargs))
        tensors = [leaves[i] for i in self.dynamic]
        # a size passed as a number would be baked into the graph: such calls run as launched
        if not all(isinstance(t, torch.Tensor) for t in tensors) or not replays("triton", tensors, self.enabled):
            return self.target(*args, **kwargs)
        self.leaves = leaves
        outs = self.graphs(tensors)
        return outs[0] if self.single else outs


def graphed_ops(program, enabled: bool | None = None):
    """``program`` (a GraphModule) with each moecc op call replayed from CUDA graphs of its own (``_GraphedCall``),
    for calls whose whole-program shapes never repeat (a KV cache that grows by a token per step) but whose MoE
    layers see the same few tokens each time. The copy shares the program's parameters; anything else is returned
    as it is."""
    if not isinstance(program, fx.GraphModule):
        return program
    targets = {node.name: _graphed_function(_GraphedCall(node.target, node, enabled), node.target)
               for node in program.graph.nodes if node.op == "call_function" and _is_moecc_op(node.target)}
    return retargeted(program, targets, "OpGraphedProgram")


def _is_moecc_op(target) -> bool:
    """A moecc custom op, called through the dispatcher or directly (``direct.direct_body``)."""
    return getattr(target, "namespace", None) == "moecc" or getattr(target, "moecc_op", False)


def _graphed_function(call: _GraphedCall, target):
    """``call`` as a plain function, which FX code generation can name (``graphed`` holds the call)."""

    def graphed(*args, **kwargs):
        return call(*args, **kwargs)

    name = getattr(target, "__name__", "moecc_op").replace(".", "_")
    graphed.__name__ = graphed.__qualname__ = f"{name}_graphed"
    graphed.graphed = call
    return graphed
