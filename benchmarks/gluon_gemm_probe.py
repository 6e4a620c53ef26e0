"""Does a hand-scheduled Gluon GEMM beat Triton's tile-level GEMM on Hopper? (CUDA, Hopper)

    python benchmarks/gluon_gemm_probe.py              # time on the GPU
    python benchmarks/gluon_gemm_probe.py --compile    # compile for sm_90 only (no GPU needed)

A dense C = A @ B^T in bf16, persistent and warp-specialized: one loader warp issues the TMA loads of A and B
tiles into a ring of shared-memory stages, the default partition (two warpgroups) runs the asynchronous
warpgroup MMAs on a 128xBN tile and stores C through TMA, so the loads of the next tile overlap the epilogue of
this one. It runs on the two GEMM shapes of a Mixtral layer at 4096 tokens next to cuBLAS (``torch.matmul``) and
Triton's own TMA GEMM (``warp_specialize_probe.py``): the question is whether moecc's grouped GEMMs could get past
the ~80 % of cuBLAS that Triton's ``tl.dot`` reaches here. The tile order and the MMA ring are moecc's
(``ws_gemm._tile`` and ``ws_gemm._mma_tile``). Run it from the repository root with ``PYTHONPATH=.``."""

from __future__ import annotations

import argparse

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

# moecc's own tile order and MMA ring, so that the probe times the mainloop the grouped GEMMs run
from moecc.codegen.triton.ws_gemm import _mma_tile, _store_tile, _tile, _tma_load

# (BM, BN, BK, stages, GROUP_M, consumer warps)
VARIANTS = [(128, 256, 64, 3, 8, 8), (128, 256, 64, 3, 1, 8), (128, 128, 64, 4, 8, 4), (128, 128, 64, 6, 8, 4)]


@gluon.jit
def _loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.shape[0]
    num_m = gl.cdiv(M, BM)
    num_n = gl.cdiv(N, BN)
    it = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile(tile, num_m, num_n, GROUP_M)
        for k in range(0, K, BK):
            s = it % STAGES
            # a stage is free once the consumer arrived on it; the first lap waits on the phase before the first
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            _tma_load(a_desc, [pid_m * BM, k], ready.index(s), a_bufs.index(s))
            _tma_load(b_desc, [pid_n * BN, k], ready.index(s), b_bufs.index(s))
            it += 1


@gluon.jit
def _consumer(c_desc, a_bufs, b_bufs, ready, empty, c_smem, M, N, K, GROUP_M: gl.constexpr,
              num_warps: gl.constexpr):
    BM: gl.constexpr = c_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[1]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BN, 16])
    num_m = gl.cdiv(M, BM)
    num_n = gl.cdiv(N, BN)
    acc = gl.zeros((BM, BN), gl.float32, layout)
    it = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile(tile, num_m, num_n, GROUP_M)
        acc, it = _mma_tile(a_bufs, b_bufs, ready, ready, empty, acc, it, K, False)
        _store_tile(c_desc, c_smem, acc, pid_m * BM, pid_n * BN)
    tma.store_wait(0)


@gluon.jit
def ws_matmul_kernel(a_desc, b_desc, c_desc, M, N, K, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                     num_warps: gl.constexpr):
    dtype: gl.constexpr = a_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_smem = gl.allocate_shared_memory(dtype, c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_consumer, (c_desc, a_bufs, b_bufs, ready, empty, c_smem, M, N, K, GROUP_M, num_warps)),
        (_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M)),
    ], [1], [40])


def _layouts(bm, bn, bk):
    a = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.bfloat16)
    b = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.bfloat16)
    c = gl.NVMMASharedLayout.get_default_for([bm, bn], gl.bfloat16)
    return a, b, c


def compile_only():
    """Compile every variant for sm_90 with the bundled ptxas, without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    for bm, bn, bk, stages, group_m, warps in VARIANTS:
        a, b, c = _layouts(bm, bn, bk)
        sig = {"a_desc": f"tensordesc<bf16[{bm}, {bk}],{a!r}>", "b_desc": f"tensordesc<bf16[{bn}, {bk}],{b!r}>",
               "c_desc": f"tensordesc<bf16[{bm}, {bn}],{c!r}>", "M": "i32", "N": "i32", "K": "i32",
               "STAGES": "constexpr", "GROUP_M": "constexpr", "num_warps": "constexpr"}
        src = GluonASTSource(ws_matmul_kernel, sig, constexprs={"STAGES": stages, "GROUP_M": group_m,
                                                                 "num_warps": warps})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        print(bm, bn, bk, stages, group_m, warps, "ok:", kernel.metadata.shared, "bytes shared,",
              kernel.n_regs if hasattr(kernel, "n_regs") else "", "regs")


def run(a, b, c, bm, bn, bk, stages, group_m, warps, num_sms):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    la, lb, lc = _layouts(bm, bn, bk)
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk], la)
    b_desc = TensorDescriptor.from_tensor(b, [bn, bk], lb)
    c_desc = TensorDescriptor.from_tensor(c, [bm, bn], lc)
    m, n = c.shape
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    ws_matmul_kernel[(min(num_sms, tiles),)](a_desc, b_desc, c_desc, m, n, a.shape[1], stages, group_m,
                                             num_warps=warps)


def main():
    import torch
    from moe_layer import cuda_time  # the layer benchmark's timer, beside this file
    from warp_specialize_probe import dense_problems  # the same operands and cuBLAS reference, beside this file

    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for _m, _n, _k, a, b, c, flops, ref in dense_problems():
        for variant in VARIANTS:
            try:
                run(a, b, c, *variant, num_sms)
                torch.cuda.synchronize()
                ms = cuda_time(lambda a=a, b=b, c=c, v=variant: run(a, b, c, *v, num_sms), 20)
            except Exception as exc:  # noqa: BLE001 - a probe reports what this Triton refuses
                print(f"  {variant}: failed: {str(exc).splitlines()[0][:300]}")
                continue
            err = ((c.float() - ref).norm() / ref.norm()).item()
            print(f"  gluon ws {variant}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s (err {err:.1e})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="compile for sm_90 only, no GPU")
    if parser.parse_args().compile:
        compile_only()
    else:
        main()
