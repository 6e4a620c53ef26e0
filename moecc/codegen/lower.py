"""Lower a pass-pipeline result to a backend: retarget the fused canonical ops to that backend's kernels."""

from __future__ import annotations

import torch
from torch import fx, nn

import moecc.codegen.torch.moe  # noqa: F401 - registers moecc::fused_moe_torch
from moecc.errors import BackendError

BACKENDS = ("auto", "torch", "reference", "onnxruntime", "triton")
# The layout each backend's expert kernels read; the place-experts pass is told, it does not know backends.
EXPERT_LAYOUT = {"torch": "io", "reference": "oi", "onnxruntime": "oi", "triton": "oi_gu"}


def resolve_backend(backend: str, example: list) -> str:
    """``auto``: triton on CUDA (torch when Triton is missing), onnxruntime for CPU inputs."""
    if backend != "auto":
        return backend
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example)
    if on_cuda:
        from moecc.codegen.triton import available

        return "triton" if available()[0] else "torch"
    return "onnxruntime"


def lower(gm: fx.GraphModule, backend: str, example: list[torch.Tensor] | None = None,
          folder: str | None = None, quant=None) -> nn.Module:
    if quant is not None and backend != "onnxruntime":
        raise ValueError(f"quantize needs the onnxruntime backend (backend={backend!r})")
    if backend == "reference":
        return gm
    if backend == "torch":
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.moecc.fused_moe.default:
                node.target = torch.ops.moecc.fused_moe_torch.default
        gm.recompile()
        return gm
    if backend == "triton":
        from moecc.codegen.triton import available

        ok, why = available()
        if not ok:
            raise BackendError(f"backend 'triton' is not available: {why}")
        from moecc.codegen.triton.configs import INTERPRET

        tensors = [*gm.parameters(), *(t for t in example or [] if isinstance(t, torch.Tensor))]
        if not INTERPRET and tensors and not any(t.is_cuda for t in tensors):
            raise BackendError("backend 'triton' runs on CUDA tensors, and this program's are on the CPU: move the "
                               "model and its inputs to a CUDA device, or set TRITON_INTERPRET=1 before importing "
                               "moecc to run the kernels in Triton's interpreter (slow: for tests)")
        from moecc.codegen.triton.fold_shared import fold_shared_experts
        from moecc.codegen.triton.moe import fused_moe_triton, fused_route_triton

        fold_shared_experts(gm)

        swap = {torch.ops.moecc.fused_moe.default: fused_moe_triton._opoverload,
                torch.ops.moecc.fused_route.default: fused_route_triton._opoverload}
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in swap:
                node.target = swap[node.target]
        gm.recompile()
        return gm
    if backend == "onnxruntime":
        from moecc.codegen.onnx.lower import lower_to_ort

        return lower_to_ort(gm, example, folder, quant)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
