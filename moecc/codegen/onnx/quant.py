"""Weight-only int8/int4 expert quantization for com.microsoft.QMoE (symmetric, per output channel or per block
of ``block_size`` input features), and its exact dequantized reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    block_size: int = 0  # 0: one scale per output channel
    int8_activations: bool = False  # ORT accuracy_level 4: activations quantized on the fly (faster, less exact)

    @property
    def zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def describe(self) -> str:
        return (f"int{self.bits} " + (f"block {self.block_size}" if self.block_size else "per-channel")
                + (", int8 activations" if self.int8_activations else ""))


def quant_spec(quantize: str | None, block_size: int = 0, int8_activations: bool = False) -> QuantSpec | None:
    if quantize is None:
        if block_size or int8_activations:
            raise ValueError("quant_block_size and quant_int8_activations need quantize='int8' or 'int4'")
        return None
    if quantize not in BITS:
        raise ValueError(f"quantize must be one of {sorted(BITS)}, got {quantize!r}")
    if block_size and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"quant_block_size must be 0 or a power of two >= 16, got {block_size}")
    return QuantSpec(BITS[quantize], block_size, int8_activations)


def cannot_quantize(spec: QuantSpec, *weights: Tensor) -> str | None:
    """Why ``weights`` ([E, N, K] each) cannot be stored in ``spec``, or None: blocks must tile each input size,
    and int4 packs two input features per byte."""
    for w in weights:
        k = w.shape[-1]
        if spec.block_size and k % spec.block_size:
            return f"block size {spec.block_size} does not divide the expert input size {k}"
        if spec.bits == 4 and k % 2:
            return f"int4 packs input features in pairs, and the expert input size {k} is odd"
    return None


def quantize(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """w [E, N, K] float -> (packed uint8 [E, N, K*bits/8], scales [E, N] or [E, N, K/block])."""
    e, n, k = w.shape
    qmax = spec.zero_point - 1
    blocks = w.float().reshape(e, n, -1, spec.block_size) if spec.block_size else w.float().unsqueeze(2)
    scale = blocks.abs().amax(-1).clamp(min=1e-12) / qmax
    q = torch.clamp(torch.round(blocks / scale.unsqueeze(-1)), -qmax - 1, qmax) + spec.zero_point
    q = q.reshape(e, n, k).to(torch.uint8)
    if spec.bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)  # low nibble first
    return q.contiguous(), (scale if spec.block_size else scale.squeeze(2)).contiguous()


def dequantize(q: Tensor, scale: Tensor, spec: QuantSpec, k: int) -> Tensor:
    if spec.bits == 4:
        q = torch.stack([q & 0xF, q >> 4], -1).reshape(*q.shape[:-1], k)
    w = q.float() - spec.zero_point
    if spec.block_size:
        return (w.reshape(*w.shape[:-1], -1, spec.block_size) * scale.unsqueeze(-1)).reshape(w.shape)
    return w * scale.unsqueeze(-1)


# block sizes com.microsoft.MatMulNBits takes (powers of two from 16), largest first: a per-channel scale repeats
# over blocks of the largest that divides the input size (128 was a little faster than 32 on this project's CPU)
NBITS_BLOCKS = (128, 64, 32, 16)


def nbits_block(spec: QuantSpec, k: int) -> int:
    """The MatMulNBits block size holding ``spec`` over ``k`` input features: the spec's own, else (per channel)
    the largest of ``NBITS_BLOCKS`` that divides ``k``, else 16 (the last block padded)."""
    if spec.block_size:
        return spec.block_size
    return next((b for b in NBITS_BLOCKS if k % b == 0), NBITS_BLOCKS[-1])


def pack_nbits(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """w [N, K] float -> com.microsoft.MatMulNBits' (packed uint8 [N, blocks, block * bits / 8], scales [N * blocks]
    float32): ``quantize``'s codes of the input padded with zeros to whole blocks (the padding dequantizes to 0 and
    has no say in a scale, and lets int4 take an odd input size); a per-channel scale repeats over the blocks."""
    n, k = w.shape
    block = nbits_block(spec, k)
    blocks = -(-k // block)
    padded = torch.nn.functional.pad(w.float(), (0, blocks * block - k))
    q, scale = quantize(padded[None], QuantSpec(spec.bits, spec.block_size and block))
    scale = scale[0] if spec.block_size else scale[0, :, None].expand(n, blocks)
    return q[0].reshape(n, blocks, -1).contiguous(), scale.reshape(-1).contiguous()


def unpack_nbits(packed: Tensor, scales: Tensor, bits: int, k: int) -> Tensor:
    """The float [N, K] weight ``pack_nbits`` packed (``bits`` 4 or 8, ``k`` input features before padding)."""
    n, blocks, blob = packed.shape
    block = blob * 8 // bits
    return dequantize(packed.reshape(n, -1), scales.reshape(n, blocks), QuantSpec(bits, block), blocks * block)[:, :k]
