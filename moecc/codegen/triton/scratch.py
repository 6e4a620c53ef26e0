"""Zeroed scratch (arrival counters) that a CUDA graph keeps, so that its replays need no memset.

A kernel that counts its programs' arrivals (the fused router GEMV's last program per token runs the selection)
needs its counters at zero when it starts. Allocated per call, they cost a memset launch: inside a replayed decode
graph one more node on the device (0.8 us of a 38 us Qwen3-MoE layer at one token on an H200), plus its gap. Every
kernel that takes counters from ``zeroed_counters`` leaves them at zero when it finishes, so counters zeroed once
serve every later launch, provided no two launches use them at the same time. ``graph_scratch`` gives each
captured graph counters of its own for that reason: a graph's replays run one after the other on one stream, and
two graphs never share theirs. Outside it, each call allocates zeroed counters as before."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_local = threading.local()


class GraphScratch:
    """The counters of one captured program, in the order its launches ask for them: the warm-up calls before the
    capture allocate them (zeroed, outside the capture), and the capture records launches that use them in place."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.taken = 0

    def rewind(self) -> None:
        """A new call of the program: its launches ask for counters in the same order as the last call's."""
        self.taken = 0

    def take(self, n: int, device: torch.device) -> torch.Tensor:
        i, self.taken = self.taken, self.taken + 1
        if i < len(self.buffers):
            held = self.buffers[i]
            if held.device == device and held.numel() >= n:
                return held[:n]
        counters = torch.zeros(n, dtype=torch.int32, device=device)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return counters  # a call that asks for more than its warm-ups did: a memset in the graph, still correct
        if i < len(self.buffers):
            self.buffers[i] = counters
        else:
            self.buffers.append(counters)
        return counters


@contextmanager
def graph_scratch(scratch: GraphScratch):
    """Counters asked for inside come from ``scratch`` (the calls of one graph's warm-up and capture)."""
    before = getattr(_local, "scratch", None)
    _local.scratch = scratch
    try:
        yield scratch
    finally:
        _local.scratch = before


def zeroed_counters(n: int, device: torch.device) -> torch.Tensor:
    """``n`` int32 counters at zero; the kernel given them must leave them at zero."""
    scratch = getattr(_local, "scratch", None)
    if scratch is None:
        return torch.zeros(n, dtype=torch.int32, device=device)
    return scratch.take(n, device)
