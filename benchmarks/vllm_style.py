"""A vLLM-style fused MoE, written for this benchmark as the third kind of baseline users run (CUDA, or Triton's
interpreter on CPU).

It follows the algorithm of vLLM's Triton ``fused_moe`` (vLLM is not installed on the GPU machine, and moecc does
not depend on it): route with the block's own router; sort the (token, slot) pairs by expert into row blocks
padded to BLOCK_M (moecc's ``align``, standing in for vLLM's ``moe_align_block_size`` CUDA kernel); a grouped
GEMM over those blocks whose A rows are loaded through the token index, writing ``[T*k, 2I]``; SiLU-and-multiply
in its own kernel; the second grouped GEMM, which multiplies each row by its routing weight and writes
``[T*k, H]``; the sum over the k slots of a token. Both GEMMs are one non-persistent launch each, with one
``tl.dot`` tile config taken from vLLM's tuning tables for the H100 (``CONFIGS``, keyed like vLLM's by the token
count, the nearest key wins). ``replayed`` replays the whole call from a CUDA graph, as vLLM serves decode
batches."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moecc.codegen.triton.align import align
from moecc.runtime.cudagraphs import GraphCache

# vLLM's shipped H100 tables (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for bf16:
# "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json" (Qwen3-30B-A3B) and, as vLLM ships none for Mixtral's
# N=14336 on the H100, "E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json" (Mixtral at tensor parallel 2: same
# experts and hidden size, half the intermediate size); other shapes use the table nearest in expert count
CONFIGS = {
    (128, 768): {1: (16, 32, 64, 1, 4, 4), 2: (16, 64, 64, 32, 4, 3), 4: (16, 128, 64, 1, 4, 4),
                 8: (16, 64, 64, 64, 4, 5), 16: (16, 32, 256, 64, 4, 2), 24: (16, 64, 128, 16, 4, 3),
                 32: (16, 32, 128, 1, 4, 5), 48: (16, 64, 128, 1, 4, 3), 64: (16, 256, 128, 1, 8, 3),
                 96: (16, 128, 128, 1, 4, 2), 128: (16, 256, 128, 1, 8, 2), 256: (32, 256, 128, 1, 8, 3),
                 512: (64, 128, 64, 1, 4, 3), 1024: (64, 256, 64, 1, 8, 5), 1536: (128, 256, 64, 1, 8, 4),
                 2048: (128, 256, 64, 1, 8, 4), 3072: (128, 256, 64, 1, 8, 4), 4096: (128, 256, 64, 1, 8, 4)},
    (8, 7168): {1: (16, 64, 128, 64, 4, 4), 2: (16, 128, 128, 32, 8, 4), 4: (16, 32, 256, 16, 4, 4),
                8: (16, 128, 128, 32, 8, 4), 16: (16, 128, 128, 1, 4, 4), 24: (16, 128, 128, 1, 4, 4),
                32: (16, 128, 128, 1, 4, 4), 48: (32, 128, 128, 1, 4, 4), 64: (32, 128, 128, 1, 4, 4),
                96: (32, 128, 128, 64, 4, 4), 128: (64, 128, 128, 1, 4, 4), 256: (64, 128, 128, 64, 4, 4),
                512: (64, 256, 64, 32, 4, 4), 1024: (128, 256, 64, 16, 8, 4), 1536: (128, 256, 64, 64, 8, 4),
                2048: (128, 256, 64, 32, 8, 4), 3072: (128, 256, 64, 64, 8, 4), 4096: (128, 256, 64, 16, 8, 4)},
}
INTERPRET_CONFIG = (16, 32, 32, 1, 4, 1)  # Triton's interpreter: small tiles, one stage


def config_for(num_experts: int, tokens: int) -> tuple[int, ...]:
    if not torch.cuda.is_available():
        return INTERPRET_CONFIG
    table = CONFIGS[min(CONFIGS, key=lambda key: abs(key[0] - num_experts))]
    return table[min(table, key=lambda m: abs(m - tokens))]


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, weight_ptr, sorted_ptr, block_expert_ptr, total_ptr, n_pairs, max_rows,
                         N, K, stride_am, stride_be, stride_bn, stride_cm, TOP_K: tl.constexpr,
                         MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[pair] = A[pair // TOP_K] @ B[expert]^T (times the pair's routing weight) for every pair row of the sorted
    blocks; B is [E, N, K] with K contiguous."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(max_rows, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = pid // in_group * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % rows_in_group
    pid_n = (pid % in_group) // rows_in_group
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    is_pair = pair < n_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // TOP_K).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + (cols % N)[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        in_k = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=is_pair[:, None] & in_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None], other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHT:
        acc *= tl.load(weight_ptr + pair, mask=is_pair, other=0.0)[:, None]
    c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=is_pair[:, None] & (cols < N)[None, :])


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, inter, stride_in, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + row * stride_in + inter + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)


def _grouped_gemm(a, w, weights, aligned, n_pairs, top_k, config):
    sorted_ids, block_expert, total = aligned
    block_m, block_n, block_k, group_m, warps, stages = config
    _, n, k = w.shape
    c = torch.empty((n_pairs, n), dtype=a.dtype, device=a.device)
    max_rows = sorted_ids.numel()
    grid = (triton.cdiv(max_rows, block_m) * triton.cdiv(n, block_n),)
    _grouped_gemm_kernel[grid](
        a, w, c, weights if weights is not None else a, sorted_ids, block_expert, total, n_pairs, max_rows, n, k,
        a.stride(0), w.stride(0), w.stride(1), c.stride(0), TOP_K=top_k, MUL_WEIGHT=weights is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps, num_stages=stages)
    return c


class VllmStyleMoE:
    """Runs an HF Mixtral-style sparse MoE block (``gate`` returning (logits, weights, ids), ``experts`` holding
    ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, SiLU) the way vLLM's Triton ``fused_moe`` does."""

    def __init__(self, block):
        self.block = block
        self.w1 = block.experts.gate_up_proj.detach().contiguous()
        self.w2 = block.experts.down_proj.detach().contiguous()
        self._graphs = GraphCache(lambda x: (self.run(x),))

    def run(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        _, weights, ids = self.block.gate(x2)
        t, top_k = ids.shape
        n_pairs = t * top_k
        num_experts, up_rows, _ = self.w1.shape
        inter = up_rows // 2
        config = config_for(num_experts, t)
        aligned = align(ids, num_experts, config[0])
        gate_up = _grouped_gemm(x2, self.w1, None, aligned, n_pairs, top_k, config)
        h = torch.empty((n_pairs, inter), dtype=x.dtype, device=x.device)
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(n_pairs, triton.cdiv(inter, block))](gate_up, h, inter, gate_up.stride(0), h.stride(0),
                                                                   BLOCK=block)
        pairs = _grouped_gemm(h, self.w2, weights.reshape(-1).float().contiguous(), aligned, n_pairs, 1, config)
        return pairs.view(t, top_k, -1).sum(1).reshape(shape)

    def replayed(self, x: torch.Tensor) -> torch.Tensor:
        """``run`` replayed from a CUDA graph per input shape, through the same graph cache as moecc's runtime."""
        return self._graphs([x])[0]
