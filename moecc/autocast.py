"""The autocast regions a call runs in: part of what a capture is valid for."""

from __future__ import annotations

import torch

DEVICE_TYPES = ("cpu", "cuda")


def autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """(device type, dtype) of each device whose autocast is on. torch.export traces autocast's casts into the
    program, so a capture made under autocast holds for calls under the same autocast only, and one made outside it
    for calls outside it (it would leave out the casts eager makes there)."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in DEVICE_TYPES if torch.is_autocast_enabled(d))
