"""Which calls of a compiled model or a loaded artifact may run at once in several threads.

Calls take turns under a lock (``CompiledModule``, ``LoadedModel``): a capture's tracing state is global, and a
program's caches (captures, CUDA graphs and their static buffers, scratch counters) are shared. Once a call has
found its program, though, running it often shares nothing: such a program runs after the lock is released, so
that a server's threads overlap in it (two threads on two cores ran tiny-moe-stdlib on ONNX Runtime 1.9x as fast as
one, each session on one thread, ``MOECC_ORT_THREADS=1``)."""

from __future__ import annotations

import torch


def runs_alone(backend: str, writes, tensors) -> bool:
    """Whether a program of ``backend`` called on ``tensors`` may run outside the lock: an ONNX Runtime session
    (``InferenceSession.run`` is thread-safe) or a torch program on the CPU, neither writing the model's buffers or
    its inputs (``writes``). Triton and CUDA programs keep their turns: their launches share scratch counters,
    tuned-tile caches and a stream, on which the GPU runs them in order anyway."""
    if writes or backend not in ("onnxruntime", "torch"):
        return False
    return backend == "onnxruntime" or not any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
