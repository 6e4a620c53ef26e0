"""Programmatic dependent launch (sm_90 and newer; knob ``MOECC_TRITON_PDL``).

A kernel launched with ``launch_pdl=True`` may start before the kernel ahead of it in the stream has finished: as
soon as every program of that kernel has called ``gdc_launch_dependents`` (or exited). It must call ``gdc_wait``,
which returns once the kernel ahead has finished and its writes are visible, before it reads anything that kernel
writes and before it writes anything at all. moecc's chain is gating -> decode GEMV 1 -> decode GEMV 2: gating
and GEMV 1 let their dependents launch, GEMV 1 waits first thing, and GEMV 2 reads only what was complete before
GEMV 1 passed its wait (ids, routing weights, its own weights) ahead of its wait."""

from __future__ import annotations

import torch

from moecc import knobs
from moecc.codegen.triton.configs import INTERPRET, device_index, sm90_or_newer


def enabled(x: torch.Tensor) -> bool:
    """On CUDA devices of sm_90 or newer, outside the interpreter, unless the knob turns it off."""
    return x.is_cuda and not INTERPRET and knobs.TRITON_PDL.get() and sm90_or_newer(device_index(x))


def launch_options(pdl: bool) -> dict:
    """Launch keywords of a dependent kernel (none when off: the interpreter knows no ``launch_pdl``)."""
    return {"launch_pdl": True} if pdl else {}
