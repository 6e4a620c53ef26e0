"""``moecc::grouped_matmul_nbits``: ``grouped_matmul`` on int8/int4 expert weights, a ``com.microsoft.MatMulNBits``
per expert on its sorted rows.

The quantized twin of ``sorted_experts``' float form. On this project's CPU a MatMulNBits of int4 weights ran a
Mixtral-small expert 2x faster than a float MatMul at one token (5x with int8 activations), where
``com.microsoft.QMoE`` was slower than the float form at every token count (RESULTS.md, session 47). It also takes
any activation the torch program computes, where QMoE has five."""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from moecc.codegen.onnx.quant import QuantSpec, pack_nbits, unpack_nbits

log = logging.getLogger("moecc.codegen.onnx")


def accuracy_level(spec: QuantSpec) -> int:
    """MatMulNBits' ``accuracy_level``: 4 rounds the activations to int8 on the fly; 0 keeps them float."""
    return 4 if spec.int8_activations else 0


@torch.library.custom_op("moecc::grouped_matmul_nbits", mutates_args=())
def grouped_matmul_nbits(x: Tensor, offsets: Tensor, packed: list[Tensor], scales: list[Tensor], bits: int,
                         accuracy: int, rows: Tensor | None = None) -> Tensor:
    """``grouped_matmul`` with expert e's weight [N, K] held as ``pack_nbits`` packs it (``packed[e]`` [N, blocks,
    blob], ``scales[e]`` [N * blocks]); x float32 [T, K]. With ``accuracy`` 4 ONNX Runtime also rounds the
    activations to int8, which this reference does not model."""
    xs = x if rows is None else x[rows]
    k = x.shape[1]
    out = xs.new_zeros((xs.shape[0], packed[0].shape[0]))
    bounds = offsets.tolist()
    for e, (q, s) in enumerate(zip(packed, scales)):
        if bounds[e + 1] > bounds[e]:
            out[bounds[e]:bounds[e + 1]] = xs[bounds[e]:bounds[e + 1]] @ unpack_nbits(q, s, bits, k).t()
    return out


@grouped_matmul_nbits.register_fake
def _grouped_matmul_nbits_fake(x, offsets, packed, scales, bits, accuracy, rows=None):
    return x.new_empty(((x if rows is None else rows).shape[0], packed[0].shape[0]))


def grouped_matmul_nbits_onnx(x, offsets, packed, scales, bits, accuracy, rows=None):
    """The translation torch.onnx uses for ``moecc::grouped_matmul_nbits``: ``grouped_matmul``'s split of the rows
    by expert, then a MatMulNBits per expert."""
    import onnxscript

    from moecc.codegen.onnx.ort_moe import contrib_schema
    from moecc.codegen.onnx.sorted_experts import split_by_expert

    matmul_nbits = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits",
                                        contrib_schema("MatMulNBits"))
    k = x.shape[1]
    parts, zeros = split_by_expert(x, offsets, len(packed), rows)
    outs = []
    for part, q, s in zip(parts, packed, scales):
        n, blocks, blob = q.shape
        outs.append(matmul_nbits(part, q, s, K=k, N=n, bits=bits, block_size=blob * 8 // bits,
                                 accuracy_level=accuracy))
    from onnxscript import opset18 as op

    return op.Concat(*outs, zeros(packed[0].shape[0]), axis=0)


@functools.lru_cache(maxsize=None)
def matmul_nbits_computes_same(bits: int, block: int, accuracy: int,
                               provider: str = "CPUExecutionProvider") -> bool:
    """Run one com.microsoft.MatMulNBits node of random weights packed by ``pack_nbits`` and compare it with the
    dequantized product: whether the installed ONNX Runtime has the op for these bits and block size, laid out as
    moecc packs it."""
    from moecc.codegen.onnx.ort_moe import _rel_error, _run_one_node

    g = torch.Generator().manual_seed(11)
    t, k, n = 24, 3 * block + block // 2, 40  # a padded last block
    x = torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g)
    q, s = pack_nbits(w, QuantSpec(bits, block))
    ref = x @ unpack_nbits(q, s, bits, k).t()
    y = _run_one_node("MatMulNBits", ["x", "q", "s"],
                      dict(K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy), {"q": q, "s": s},
                      {"x": x}, provider, out_shape=[t, n])
    if isinstance(y, Exception):
        log.info("com.microsoft.MatMulNBits(int%d, block %d) not usable on %s: %s", bits, block, provider, y)
        return False
    err = _rel_error(y, ref)
    log.info("com.microsoft.MatMulNBits(int%d, block %d, accuracy %d) on %s: relative error %.1e", bits, block,
             accuracy, provider, err)
    # int8 activations are rounded by ORT only: the probe then checks layout and semantics, not the last digits
    return err < (3e-2 if accuracy == 4 else 1e-4)
