"""Host cost of one Triton launch on this machine: ``kernel[grid](...)`` (bind, specialize, look up, launch)
against a launch of the ``CompiledKernel`` it returned, and a torch op for scale.

    python benchmarks/launch_cost.py

The GPU sleeps while the launches are timed, so that no launch waits for the device (CUDA)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from host_path import host_ms  # beside this file


@triton.jit
def _add(x_ptr, y_ptr, out_ptr, n, s1, s2, s3, s4, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)


def main() -> None:
    x = torch.randn(4096, device="cuda")
    y, out = torch.randn_like(x), torch.empty_like(x)
    grid = (triton.cdiv(x.numel(), 1024), 1, 1)
    compiled = _add[grid](x, y, out, x.numel(), 1, 2, 3, 4, BLOCK=1024, FLAG=True)
    torch.cuda.synchronize()
    print(f"triton {triton.__version__}, {torch.cuda.get_device_name()}")
    n = x.numel()
    cases = {"kernel[grid](...)": lambda: _add[grid](x, y, out, n, 1, 2, 3, 4, BLOCK=1024, FLAG=True),
             "compiled[grid](...)": lambda: compiled[grid](x, y, out, n, 1, 2, 3, 4, 1024, True),
             "torch.add(out=)": lambda: torch.add(x, y, out=out)}
    for name, fn in cases.items():
        print(f"{name:22s}{host_ms(fn, 400) * 1e3:6.1f} us")


if __name__ == "__main__":
    main()
