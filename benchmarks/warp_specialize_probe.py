"""Does this Triton warp-specialize a TMA GEMM's K loop on this GPU, and does it pay? (CUDA, Hopper or newer)

    python benchmarks/warp_specialize_probe.py

A plain dense GEMM C = A @ B^T in bf16 through TMA descriptors, with ``tl.range(..., warp_specialize=...)`` off
and on, on the two GEMM shapes of a Mixtral layer at 4096 tokens, next to cuBLAS (``torch.matmul``). It tells how
close Triton's own tile-level GEMM gets to cuBLAS, the ceiling for moecc's grouped GEMMs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moe_layer import cuda_time  # the layer benchmark's timer, beside this file
from triton.tools.tensor_descriptor import TensorDescriptor

TILES = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 4)]


@triton.jit
def _matmul(a_desc, b_desc, c_ptr, M, N, K, WS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr, GM: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pid_m = pid // (GM * num_n) * GM + (pid % GM)
    pid_n = (pid % (GM * num_n)) // GM
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), warp_specialize=WS):
        a = a_desc.load([pid_m * BM, k * BK])
        b = b_desc.load([pid_n * BN, k * BK])
        acc = tl.dot(a, b.T, acc)
    om = pid_m * BM + tl.arange(0, BM)
    on = pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + om[:, None] * N + on[None, :], acc.to(tl.bfloat16), mask=(om < M)[:, None] & (on < N)[None, :])


SHAPES = ((8192, 28672, 4096), (8192, 4096, 14336))  # a Mixtral layer's GEMM 1 and GEMM 2 at 4096 tokens


def dense_problems(shapes=SHAPES):
    """Per (M, N, K): bf16 A [M, K], B [N, K], an output C [M, N], the FLOPs and cuBLAS's C in fp32, after
    printing cuBLAS's time on it (the reference both probes compare against)."""
    print(f"# triton {triton.__version__}, {torch.cuda.get_device_name()}")
    for m, n, k in shapes:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        flops = 2 * m * n * k
        ms = cuda_time(lambda a=a, b=b: a @ b.T, 20)
        print(f"{m}x{n}x{k} cuBLAS {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s")
        yield m, n, k, a, b, c, flops, (a @ b.T).float()


def main():
    for m, n, k, a, b, c, flops, ref in dense_problems():
        for bm, bn, bk, warps, stages in TILES:
            a_desc, b_desc = TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk])
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            for ws in (False, True):
                args = (a_desc, b_desc, c, m, n, k)
                meta = dict(WS=ws, BM=bm, BN=bn, BK=bk, GM=8, num_warps=warps, num_stages=stages)
                try:
                    ms = cuda_time(lambda args=args, meta=meta, grid=grid: _matmul[grid](*args, **meta), 20)
                except Exception as exc:  # noqa: BLE001 - a probe reports what this Triton refuses
                    print(f"  {bm}x{bn}x{bk} w{warps} s{stages} ws={ws}: failed: {str(exc).splitlines()[0][:200]}")
                    continue
                err = ((c.float() - ref).norm() / ref.norm()).item()
                print(f"  {bm}x{bn}x{bk} w{warps} s{stages} ws={ws}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s "
                      f"(err {err:.1e})")


if __name__ == "__main__":
    main()
