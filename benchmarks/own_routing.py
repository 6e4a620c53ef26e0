"""A user MoE block whose routing is its own code (softplus scores, top-k, renormalised), which no canonical
routing reproduces: before session 35 moecc ran it as written; now its routing is read off its code and its
experts fuse. Times the block in eager against ``moecc.compile`` of it, on the GPU (Triton) or the CPU (torch).

    python benchmarks/own_routing.py [--hidden 1024 --inter 512 --experts 32 --top-k 4] [--tokens 1 64 512 4096]

Prints ms per call, the speed-up over eager and the relative difference of the outputs."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import moecc


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SoftplusMoE(nn.Module):
    def __init__(self, hidden: int, inter: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(MLP(hidden, inter) for _ in range(experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = F.softplus(self.gate(x)).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


def timed(fn, device: str, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512, 4096])
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    block = SoftplusMoE(args.hidden, args.inter, args.experts, args.top_k).eval().to(device, dtype)
    start = time.perf_counter()
    cm = moecc.compile(block, backend="triton" if device == "cuda" else "torch")
    x = torch.randn(1, 64, args.hidden, device=device, dtype=dtype)
    with torch.no_grad():
        cm(x)
    (layer,) = cm.moe_layers
    print(f"{device} {dtype}, H {args.hidden}, I {args.inter}, E {args.experts}, k {args.top_k}; compile "
          f"{time.perf_counter() - start:.1f} s; fused: {layer.fused} ({layer.routing or layer.reason})")
    print("| T | eager ms | moecc ms | speed-up | rel. difference |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for t in args.tokens:
            x = torch.randn(1, t, args.hidden, device=device, dtype=dtype)
            ref, got = block(x), cm(x)
            diff = ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
            eager = timed(lambda x=x: block(x), device)
            compiled = timed(lambda x=x: cm(x), device)
            print(f"| {t} | {eager:.3f} | {compiled:.3f} | {eager / compiled:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
