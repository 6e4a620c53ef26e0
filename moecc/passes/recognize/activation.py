"""The parameters of activations that a module's own sub-modules compute (``nn.LeakyReLU(0.3)``, ``nn.PReLU()``,
``nn.ELU(0.5)``), so that an expert search tries them besides each activation's defaults."""

from __future__ import annotations

import torch
from torch import nn

from moecc.activations import BY_NAME, candidates
from moecc.passes.recognize.probe import close


def _numbers(module: nn.Module) -> set[float]:
    found = {float(v) for v in vars(module).values() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    found |= {float(p.detach().reshape(()).item()) for p in module.parameters(recurse=False) if p.numel() == 1}
    return found


def seen_parameters(module: nn.Module) -> dict[str, tuple[float, ...]]:
    """{activation: parameters} for each parametric activation that some leaf sub-module of ``module`` computes at
    one of its own numbers (a float attribute or a one-element parameter), checked on a grid of inputs."""
    seen: dict[str, set[float]] = {}
    for sub in module.modules():
        if next(sub.children(), None) is not None or any(p.numel() > 1 for p in sub.parameters(recurse=False)):
            continue
        numbers = _numbers(sub)
        if not numbers:
            continue
        like = next(sub.parameters(recurse=False), None)
        grid = torch.linspace(-6, 6, 97).reshape(1, -1)
        if like is not None:
            grid = grid.to(like.device, like.dtype)
        try:
            with torch.no_grad():
                out = sub(grid)
        except Exception:  # noqa: BLE001 - a module that is no elementwise function of one tensor
            continue
        if not isinstance(out, torch.Tensor) or out.shape != grid.shape:
            continue
        for name, act in BY_NAME.items():
            if act.params is None:
                continue
            seen.setdefault(name, set()).update(p for p in numbers if close(act.fn(grid, p), out))
    return {name: tuple(sorted(ps)) for name, ps in seen.items() if ps}


def more_activations(module: nn.Module, names: tuple[str, ...]) -> list[tuple[str, float]]:
    """(name, parameter) of each activation of ``names``, at the parameters ``module``'s sub-modules show, else at
    the activation's defaults."""
    return candidates(names, seen_parameters(module))
