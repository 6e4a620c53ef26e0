"""Device time of ``align`` (count + placement launches) over token and expert counts, per placement.

    python benchmarks/align_bench.py --tokens 512 4096 16384 65536 --experts 8 128 256

Each call is replayed from a CUDA graph of 20 calls (the tuner's timer, without its L2 flush: align's ids were just
written by the gating), so the time is the kernels' and not the host's. Prints the time of the placement ``align``
picks and of each placement forced, and checks that the two place alike."""

from __future__ import annotations

import argparse
import contextlib

import torch

import moecc.codegen.triton.align as align_module
from moecc.codegen.triton.align import align
from moecc.codegen.triton.tune import _graph_timer


@contextlib.contextmanager
def placement(name: str):
    """Force the rank or the scan placement (``auto``: leave the choice to ``align``)."""
    saved = align_module.RANK_FROM, align_module.RANK_BINS_OFF
    if name != "auto":
        align_module.RANK_FROM, align_module.RANK_BINS_OFF = (0, 0) if name == "rank" else (1 << 62, 1 << 62)
    try:
        yield
    finally:
        align_module.RANK_FROM, align_module.RANK_BINS_OFF = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 16384, 65536])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 128, 256])
    ap.add_argument("--block-m", type=int, default=128)
    a = ap.parse_args()
    names = ("auto", "scan", "rank")
    graph_ms = _graph_timer(flush_l2=False)
    print(f"{'T':>6} {'E':>4} {'k':>2} " + " ".join(f"{n + ' us':>8}" for n in names))
    for e in a.experts:
        k = 2 if e <= 16 else 8
        for t in a.tokens:
            ids = torch.rand(t, e, device="cuda").topk(k, dim=1).indices
            times, results = [], []
            for name in names:
                with placement(name):
                    times.append(1e3 * graph_ms(lambda ids=ids, e=e: align(ids, e, a.block_m)))
                    results.append(align(ids, e, a.block_m))
            (s1, b1, n1), (s2, b2, n2) = results[1:]
            n = int(n1.item())
            same = torch.equal(n1, n2) and torch.equal(s1[:n], s2[:n]) and torch.equal(b1[:n // a.block_m],
                                                                                         b2[:n // a.block_m])
            print(f"{t:>6} {e:>4} {k:>2} " + " ".join(f"{x:>8.1f}" for x in times) + ("" if same else "  DIFFER"))


if __name__ == "__main__":
    main()
