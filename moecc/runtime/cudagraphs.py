"""CUDA graphs for small and medium token counts: one graph per input shape, replayed from static buffers.

Host work (Python, operator dispatch, Triton's launcher) costs about a millisecond per MoE layer call, more than
the GPU needs for a few hundred tokens; a replay costs one copy in and one copy out. Graphs share one memory
pool, which is safe because replays run one at a time on one stream and outputs are copied out at once; the
least recently used graph is dropped past ``MOECC_CUDA_GRAPH_MAX_GRAPHS``."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from moecc import knobs

log = logging.getLogger("moecc.runtime")


def token_count(tensors: list[torch.Tensor]) -> int:
    counts = [t.numel() // (t.shape[-1] if t.is_floating_point() and t.dim() else 1) for t in tensors]
    return max(counts) if counts else 0


def replays(backend: str, tensors: list[torch.Tensor], enabled: bool | None = None) -> bool:
    """Whether a call replays a CUDA graph: Triton programs on CUDA inputs, inference only, up to
    ``MOECC_CUDA_GRAPH_MAX_TOKENS`` tokens; ``enabled`` (the ``cuda_graphs`` option) overrides the knob."""
    wanted = knobs.CUDA_GRAPHS.get() if enabled is None else enabled
    return (wanted and backend == "triton" and bool(tensors) and all(t.is_cuda for t in tensors)
            and not torch.is_grad_enabled() and token_count(tensors) <= knobs.CUDA_GRAPH_MAX_TOKENS.get())


class GraphCache:
    def __init__(self, program) -> None:
        self.program = program
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self.failed: set[tuple] = set()
        self.pool = None

    def __call__(self, tensors: list[torch.Tensor]):
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
        if key in self.failed:
            return self.program(*tensors)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(tensors)
            except Exception as exc:  # noqa: BLE001 - a program that cannot be captured runs as launched
                log.warning("CUDA graph capture failed for %s, running without graphs: %s", key, exc)
                self.failed.add(key)
                return self.program(*tensors)
            while len(self.graphs) > max(1, knobs.CUDA_GRAPH_MAX_GRAPHS.get()):
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, static_in, static_out = self.graphs[key]
        for dst, src in zip(static_in, tensors):
            dst.copy_(src)
        graph.replay()
        return tuple(o.clone() for o in static_out)

    def _capture(self, tensors):
        static_in = [t.clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # compiles kernels and fills allocator pools outside the capture
                self.program(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            static_out = self.program(*static_in)
        log.debug("captured a CUDA graph for %s", [tuple(t.shape) for t in tensors])
        return graph, static_in, tuple(static_out)
