"""Recognize one dense MLP expert module (Linear layers plus an activation) as a canonical expert."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from moecc.experts import PLAIN_ACTIVATIONS, expert_activation
from moecc.ir import ExpertSpec, ExpertWeights
from moecc.match import MatchResult
from moecc.passes.recognize.probe import close, probe_input


def _record_linear_calls(module: nn.Module, x: torch.Tensor):
    calls: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
    hooks = [
        lin.register_forward_hook(lambda m, inp, out: calls.append((m, inp[0], out)))
        for lin in module.modules()
        if isinstance(lin, nn.Linear)
    ]
    try:
        with torch.no_grad():
            y = module(x)
    finally:
        for h in hooks:
            h.remove()
    return calls, y


def analyze_mlp(module: nn.Module, hidden: int) -> MatchResult[tuple[ExpertSpec, ExpertWeights]]:
    """Find ``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))`` by watching the module's Linear calls."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(linears) not in (2, 3):
        return MatchResult.fail(f"{type(module).__name__} has {len(linears)} Linear layers, expected 2 or 3")
    x = probe_input(6, hidden, linears[0].weight, seed=11)
    try:
        calls, y = _record_linear_calls(module, x)
    except Exception as exc:  # noqa: BLE001 - any failure means "not an MLP we understand"
        return MatchResult.fail(f"{type(module).__name__} could not be called on [n, hidden]: {exc}")
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return MatchResult.fail(f"{type(module).__name__} does not map [n, {hidden}] to [n, {hidden}]")
    first = [c for c in calls if c[1].shape == x.shape and torch.equal(c[1], x)]
    rest = [c for c in calls if c not in first]
    if len(rest) != 1 or not close(rest[0][2] + 0, y):
        return MatchResult.fail(f"{type(module).__name__}: no single output projection found")
    down, down_in, _ = rest[0]
    ups = [c for c in first]
    if len(ups) == 2:
        for (g, u), act in itertools.product(itertools.permutations(ups), PLAIN_ACTIVATIONS):
            h = torch.cat([g[2], u[2]], -1)
            if close(expert_activation(h, act, True, 1.0, 0.0), down_in):
                spec = ExpertSpec(hidden, g[0].out_features, act, True, g[0].bias is not None)
                w_up = torch.cat([g[0].weight, u[0].weight], 0)
                b_up = torch.cat([g[0].bias, u[0].bias], 0) if spec.has_bias else None
                return MatchResult.success((spec, ExpertWeights(w_up, down.weight, b_up, down.bias)))
        return MatchResult.fail(f"{type(module).__name__}: gated activation is none of {PLAIN_ACTIVATIONS}")
    if len(ups) == 1:
        u = ups[0]
        for act in PLAIN_ACTIVATIONS:
            if close(expert_activation(u[2], act, False, 1.0, 0.0), down_in):
                spec = ExpertSpec(hidden, u[0].out_features, act, False, u[0].bias is not None)
                return MatchResult.success((spec, ExpertWeights(u[0].weight, down.weight, u[0].bias, down.bias)))
        return MatchResult.fail(f"{type(module).__name__}: activation is none of {PLAIN_ACTIVATIONS}")
    return MatchResult.fail(f"{type(module).__name__}: {len(ups)} projections read the input, expected 1 or 2")


def stack_mlps(modules: list[nn.Module], hidden: int) -> MatchResult[tuple[ExpertSpec, ExpertWeights]]:
    specs, weights = [], []
    for i, m in enumerate(modules):
        r = analyze_mlp(m, hidden)
        if not r:
            return MatchResult.fail(f"expert {i}: {r.reason}")
        specs.append(r.value[0])
        weights.append(r.value[1])
    if any(s != specs[0] for s in specs):
        return MatchResult.fail("experts differ in shape or activation")
    stack = lambda name: None if getattr(weights[0], name) is None else torch.stack(  # noqa: E731
        [getattr(w, name).detach() for w in weights])
    return MatchResult.success((specs[0], ExpertWeights(stack("w_up"), stack("w_down"), stack("b_up"),
                                                        stack("b_down"))))
