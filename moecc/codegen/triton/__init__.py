"""The Triton backend: fused gating, align/sort, two grouped expert GEMMs, a deterministic combine.

On a machine without CUDA the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before
moecc's Triton modules are imported (the interpreter's bf16 ``tl.dot`` is broken: use fp32 or fp16 there)."""

import os

import torch


def available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "no CUDA device; set TRITON_INTERPRET=1 (before importing moecc) to run Triton's interpreter"
