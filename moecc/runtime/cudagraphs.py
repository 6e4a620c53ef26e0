"""CUDA graphs for small and medium token counts: one graph per input shape, replayed from static buffers.

Host work (Python, operator dispatch, Triton's launcher) costs about a millisecond per MoE layer call, more than
the GPU needs for a few hundred tokens; a replay costs one copy in and the replay itself. Each graph ends by copying
its outputs into buffers of its own, outside the graphs' shared memory pool, and a call hands out aliases of those
buffers rather than copies (on an H100 host a clone of the output took 13 us of a 79 us decode call). A graph is
replayed only while no alias of its outputs is alive (the storages' use counts say so); otherwise another instance
of it is captured, up to ``INSTANCES``, after which the call runs without graphs. So an output the caller keeps is
never overwritten. Graphs share one memory pool for everything else, which is safe because replays run one at a
time on one stream; the least recently used shape is dropped past ``MOECC_CUDA_GRAPH_MAX_GRAPHS``."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from moecc import knobs

log = logging.getLogger("moecc.runtime")

INSTANCES = 4  # graphs per input shape whose outputs may be alive at once
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: without it, outputs are copied out


def token_count(tensors: list[torch.Tensor]) -> int:
    counts = [t.numel() // (t.shape[-1] if t.is_floating_point() and t.dim() else 1) for t in tensors]
    return max(counts) if counts else 0


def replays(backend: str, tensors: list[torch.Tensor], enabled: bool | None = None) -> bool:
    """Whether a call replays a CUDA graph: Triton programs on CUDA inputs, inference only, up to
    ``MOECC_CUDA_GRAPH_MAX_TOKENS`` tokens; ``enabled`` (the ``cuda_graphs`` option) overrides the knob."""
    if backend != "triton" or not tensors or torch.is_grad_enabled() or not all(t.is_cuda for t in tensors):
        return False
    wanted = knobs.CUDA_GRAPHS.get() if enabled is None else enabled
    return wanted and token_count(tensors) <= knobs.CUDA_GRAPH_MAX_TOKENS.get()


class _Instance:
    def __init__(self, graph, static_in: list, outputs: tuple) -> None:
        self.graph = graph
        self.static_in = static_in
        self.outputs = outputs
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
        self.pool = None

    def __call__(self, tensors: list[torch.Tensor]):
        key = tuple((t.shape, t.dtype, t.get_device()) for t in tensors)
        if key in self.failed:
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
                log.warning("CUDA graph capture failed for %s, running without graphs: %s", key, exc)
                self.failed.add(key)
                return self.program(*tensors)
            instances.append(free)
        if free is None:
            log.debug("the outputs of all %d graphs for %s are alive: running without graphs", len(instances), key)
            return self.program(*tensors)
        return free.run(tensors)

    def _capture(self, tensors) -> _Instance:
        static_in = [t.clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # compiles kernels and fills allocator pools outside the capture
                warm = self.program(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        # the outputs' own buffers: allocated outside the shared pool, so no other graph's replay writes them
        outputs = tuple(torch.empty_like(o) for o in warm)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            for dst, src in zip(outputs, self.program(*static_in)):
                dst.copy_(src)
        log.debug("captured a CUDA graph for %s", [tuple(t.shape) for t in tensors])
        return _Instance(graph, static_in, outputs)
