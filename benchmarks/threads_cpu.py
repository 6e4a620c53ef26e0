"""Calls of one compiled model from several threads at once (a server's worker pool), on the CPU.

    python benchmarks/threads_cpu.py [--threads 1 2] [--backends onnxruntime torch] [--calls 20]

Compiles ../shared/models/tiny-moe-stdlib once per backend and times ``--calls`` calls per thread of a
[4, 128]-token batch, with ONNX Runtime's sessions on one thread each (``MOECC_ORT_THREADS=1``) and on its default
(one per core). Prints ms per call (wall time over all calls) and each count's speed-up over one thread. The calls
find their program under the compiled model's lock and run it after (``moecc/runtime/turns.py``): ONNX Runtime
sessions and torch programs on the CPU overlap."""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch
from transformers import AutoModelForCausalLM

import moecc

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "tiny-moe-stdlib")


def per_call_ms(cm, ids, threads: int, calls: int) -> float:
    def work():
        with torch.no_grad():
            for _ in range(calls):
                cm(input_ids=ids)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return (time.perf_counter() - start) / (threads * calls) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--model", default=MODEL)
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    print(f"{os.cpu_count()} cores, torch {torch.get_num_threads()} threads; ms per call, speed-up over one thread")
    for backend in args.backends:
        settings = ["1", "0"] if backend == "onnxruntime" else ["-"]
        for ort_threads in settings:
            if ort_threads != "-":
                os.environ["MOECC_ORT_THREADS"] = ort_threads
            cm = moecc.compile(model, backend=backend)
            with torch.no_grad():
                cm(input_ids=ids)
            times = {n: per_call_ms(cm, ids, n, args.calls) for n in args.threads}
            label = backend if ort_threads == "-" else f"{backend}, MOECC_ORT_THREADS={ort_threads}"
            cells = "  ".join(f"{n} thread{'s' if n > 1 else ''}: {ms:6.2f} ({times[args.threads[0]] / ms:4.2f}x)"
                              for n, ms in times.items())
            print(f"{label:<36} {cells}", flush=True)
    os.environ.pop("MOECC_ORT_THREADS", None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
