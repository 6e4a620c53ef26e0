"""Recognize experts stored as stacked 3D weights ``[E, ., .]`` by enumerating the layouts they can mean.

Each candidate is a canonical (spec, weights) pair; the caller keeps the one whose function matches the
module's own, so an exotic layout is rejected rather than guessed."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch import nn

from moecc.ir import ExpertSpec, ExpertWeights

_ACTS = ("silu", "gelu", "gelu_tanh", "relu")
_GATED_LAYOUTS = ("concat_gate_first", "concat_up_first", "interleaved_gate_even", "interleaved_up_even")


def stacked_params(module: nn.Module, num_experts: int | None = None) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False)
            if p.dim() == 3 and p.shape[0] >= 2 and (num_experts is None or p.shape[0] == num_experts)}


def _orient(w: torch.Tensor, in_dim: int) -> list[torch.Tensor]:
    """[E, out, in] views of ``w``: as stored, and transposed when it may be stored [E, in, out]."""
    out = [w] if w.shape[2] == in_dim else []
    if w.shape[1] == in_dim:
        out.append(w.transpose(1, 2))
    return out


def _orient_out(w: torch.Tensor, out_dim: int) -> list[torch.Tensor]:
    """[E, out, in] views of ``w`` whose output dimension is ``out_dim``."""
    out = [w] if w.shape[1] == out_dim else []
    if w.shape[2] == out_dim:
        out.append(w.transpose(1, 2))
    return out


def _split_gated(w: torch.Tensor, layout: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    half = w.shape[dim] // 2
    first, second = (w.narrow(dim, 0, half), w.narrow(dim, half, half)) if layout.startswith("concat") else (
        w.index_select(dim, torch.arange(0, w.shape[dim], 2, device=w.device)),
        w.index_select(dim, torch.arange(1, w.shape[dim], 2, device=w.device)))
    return (first, second) if layout.endswith("gate_first") or layout.endswith("gate_even") else (second, first)


def _float_attr(module: nn.Module, word: str) -> float | None:
    for name, value in vars(module).items():
        if word in name.lower() and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _activations(module: nn.Module) -> Iterator[tuple[str, float, float]]:
    limit = _float_attr(module, "limit")
    alpha = _float_attr(module, "alpha")
    for act in _ACTS:
        yield act, 1.0, 0.0
    if limit is not None and limit > 0:
        yield "swiglu_oai", alpha if alpha is not None else 1.702, limit
        for act in _ACTS:
            yield act, 1.0, limit


def candidates(module: nn.Module, hidden: int, num_experts: int) -> Iterator[tuple[ExpertSpec, ExpertWeights]]:
    params = stacked_params(module, num_experts)
    biases = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 2 and p.shape[0] == num_experts}
    names = list(params)
    acts = list(_activations(module))
    for down_name in names:
        downs = _orient_out(params[down_name], hidden)
        others = [n for n in names if n != down_name]
        for down in downs:
            inter = down.shape[2]
            b_down = next((b for b in biases.values() if b.shape[1] == hidden), None)
            yield from _up_candidates(module, others, params, biases, hidden, inter, down, b_down, acts)


def _up_candidates(module, others, params, biases, hidden, inter, down, b_down, acts):
    if len(others) == 1:
        for up in _orient(params[others[0]], hidden):
            u = up.shape[1]
            b_up = next((b for b in biases.values() if b.shape[1] == u and b is not b_down), None)
            if u == 2 * inter:
                for layout, (act, alpha, limit) in itertools.product(_GATED_LAYOUTS, acts):
                    g, v = _split_gated(up, layout, 1)
                    w_up = torch.cat([g, v], 1)
                    bu = None
                    if b_up is not None:
                        bg, bv = _split_gated(b_up, layout, 1)
                        bu = torch.cat([bg, bv], 1)
                    spec = ExpertSpec(hidden, inter, act, True, b_up is not None or b_down is not None, alpha, limit)
                    yield spec, ExpertWeights(w_up, down, bu, b_down)
            if u == inter:
                for act, _, limit in acts:
                    if limit == 0 and act != "swiglu_oai":
                        yield (ExpertSpec(hidden, inter, act, False, b_up is not None or b_down is not None),
                               ExpertWeights(up, down, b_up, b_down))
    elif len(others) == 2:
        for gate_name, up_name in itertools.permutations(others):
            for g in _orient(params[gate_name], hidden):
                for v in _orient(params[up_name], hidden):
                    if g.shape[1] != inter or v.shape[1] != inter:
                        continue
                    for act, alpha, limit in acts:
                        yield (ExpertSpec(hidden, inter, act, True, False, alpha, limit),
                               ExpertWeights(torch.cat([g, v], 1), down, None, b_down))
