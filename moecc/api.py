"""moecc.compile: the user entry point."""

from __future__ import annotations

from torch import nn

from moecc import knobs, logs
from moecc.codegen.lower import BACKENDS
from moecc.runtime.compiled import CompiledModule

OPTIONS = {"fuse": bool, "verify": bool}


def compile(model: nn.Module, backend: str = "auto", dump_dir: str | None = None, **options) -> CompiledModule:  # noqa: A001
    """Compile ``model`` for MoE inference; capture happens on the first call.

    ``backend``: ``"auto"`` (onnxruntime for CPU inputs, torch on CUDA), ``"onnxruntime"`` (one ONNX model run by
    ONNX Runtime), ``"torch"`` (fast plain torch) or ``"reference"`` (the canonical ops' reference code).
    ``dump_dir`` (or ``MOECC_DUMP_DIR``): write numbered, runnable pass dumps there.
    Options: ``fuse=False`` captures without MoE fusion; ``verify=False`` skips the check on fresh inputs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dump_dir is not None and not isinstance(dump_dir, (str, bytes)) and not hasattr(dump_dir, "__fspath__"):
        raise TypeError(f"dump_dir must be a path, got {type(dump_dir).__name__}")
    for key, value in options.items():
        if key not in OPTIONS:
            raise TypeError(f"unknown option {key!r}; options are {sorted(OPTIONS)}")
        if not isinstance(value, OPTIONS[key]):
            raise TypeError(f"option {key!r} must be {OPTIONS[key].__name__}, got {type(value).__name__}")
    logs.configure()
    dump_dir = str(dump_dir) if dump_dir is not None else knobs.DUMP_DIR.get()
    return CompiledModule(model, backend, dump_dir, fuse=options.get("fuse", True), verify=options.get("verify"))
