"""Programmatic dependent launch (sm_90 and newer; knob ``MOECC_TRITON_PDL``).

A kernel launched with ``launch_pdl=True`` may start before the kernel ahead of it in the stream has finished: as
soon as every program of that kernel has called ``gdc_launch_dependents`` (or exited). It must call ``gdc_wait``,
which returns once the kernel ahead has finished and its writes are visible, before it reads anything that kernel
writes and before it writes anything at all. moecc has two chains:

- decode: gating -> GEMV 1 -> GEMV 2. Gating and GEMV 1 let their dependents launch, GEMV 1 waits first thing, and
  GEMV 2 reads only what was complete before GEMV 1 passed its wait (ids, routing weights, its own weights) ahead
  of its wait.
- prefill: gating -> align count -> align place -> GEMM 1 -> GEMM 2 -> combine. Each kernel after gating waits first
  thing and then lets its dependent launch (``follow_previous``), so the dependent's programs take the SMs the last
  programs of this one leave, instead of the launch starting once this one has ended. Since every kernel has
  waited before it releases the next, a kernel's wait also covers every kernel before it.

A kernel of torch's between two of these (a capacity drop, say) is an ordinary launch: the dependent after it then
starts once it ends, as without the flag."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from moecc import knobs
from moecc.codegen.triton.configs import INTERPRET, device_index, sm90_or_newer


def enabled(x: torch.Tensor) -> bool:
    """On CUDA devices of sm_90 or newer, outside the interpreter, unless the knob turns it off."""
    return x.is_cuda and not INTERPRET and knobs.TRITON_PDL.get() and sm90_or_newer(device_index(x))


def launch_options(pdl: bool) -> dict:
    """Launch keywords of a dependent kernel (none when off: the interpreter knows no ``launch_pdl``)."""
    return {"launch_pdl": True} if pdl else {}


def chained(t: torch.Tensor) -> dict:
    """The ``PDL`` constexpr and launch keywords of a prefill-chain kernel reading ``t``."""
    pdl = enabled(t)
    return dict(PDL=pdl, **launch_options(pdl))


@triton.jit
def follow_previous(PDL: tl.constexpr):
    """The first thing a kernel of the prefill chain does: wait for the kernel ahead, then release the next."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
