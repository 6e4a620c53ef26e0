"""moecc.compile: the user entry point."""

from __future__ import annotations

from torch import nn

from moecc import knobs, logs
from moecc.codegen.lower import BACKENDS
from moecc.runtime.compiled import CompiledModule

OPTIONS = {"fuse": bool, "verify": bool, "quantize": (str, type(None)), "quant_block_size": int,
           "quant_int8_activations": bool, "cuda_graphs": bool,
           "copy_expert_weights": (bool, type(None))}


def compile(model: nn.Module, backend: str = "auto", dump_dir: str | None = None, **options) -> CompiledModule:  # noqa: A001
    """Compile ``model`` for MoE inference; capture happens on the first call.

    ``backend``: ``"auto"`` (onnxruntime for CPU inputs, torch on CUDA), ``"onnxruntime"`` (one ONNX model run by
    ONNX Runtime), ``"torch"`` (fast plain torch) or ``"reference"`` (the canonical ops' reference code).
    ``dump_dir`` (or ``MOECC_DUMP_DIR``): write numbered, runnable pass dumps there.
    Options: ``fuse=False`` captures without MoE fusion; ``verify=False`` skips the check on fresh inputs;
    ``quantize="int8"|"int4"`` (onnxruntime only, opt-in) stores expert weights quantized, per output channel or
    per ``quant_block_size`` input features; ``quant_int8_activations=True`` also rounds activations to int8 (much
    faster on CPU, less exact); ``cuda_graphs=False`` turns off the Triton backend's CUDA graphs for small token
    counts (on by default; they replay under ``torch.no_grad()``). ``copy_expert_weights``: whether the
    place-experts pass may re-lay out a copy of expert weights that the model still holds (the Triton backend's
    interleaved gate/up layout, the torch backend's transposed one; a few percent faster at large token counts),
    which doubles the experts' memory while the model lives: ``None`` (default) when the copies take at most a
    quarter of the device's free memory, ``True`` always, ``False`` never."""
    _check_args(model, backend, dump_dir, options)
    logs.configure()
    dump_dir = str(dump_dir) if dump_dir is not None else knobs.DUMP_DIR.get()
    return CompiledModule(model, backend, dump_dir, options)


def _check_args(model, backend, dump_dir, options) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dump_dir is not None and not isinstance(dump_dir, (str, bytes)) and not hasattr(dump_dir, "__fspath__"):
        raise TypeError(f"dump_dir must be a path, got {type(dump_dir).__name__}")
    for key, value in options.items():
        if key not in OPTIONS:
            raise TypeError(f"unknown option {key!r}; options are {sorted(OPTIONS)}")
        if not isinstance(value, OPTIONS[key]) or (OPTIONS[key] is int and isinstance(value, bool)):
            kinds = OPTIONS[key] if isinstance(OPTIONS[key], tuple) else (OPTIONS[key],)
            raise TypeError(f"option {key!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                            f"got {type(value).__name__}")
    from moecc.codegen.onnx.quant import quant_spec

    # ValueError names a bad value
    quant_spec(options.get("quantize"), options.get("quant_block_size", 0),
               options.get("quant_int8_activations", False))
