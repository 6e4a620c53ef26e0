"""Recognize one dense MLP expert module (Linear layers plus an activation) as a canonical expert."""

from __future__ import annotations

import dataclasses
import itertools
import logging

import torch
from torch import nn

from moecc.activations import MORE_ACTIVATIONS, PLAIN_ACTIVATIONS
from moecc.experts import expert_activation
from moecc.ir import ExpertSpec, ExpertWeights
from moecc.match import MatchResult
from moecc.passes.recognize import stacked
from moecc.passes.recognize.activation import more_activations
from moecc.passes.recognize.probe import (
    PROBE_PRE_ACTIVATION_STD,
    PROBE_WIDE,
    close,
    common_or_rival,
    probe_input,
    rel_err,
    snap,
)

log = logging.getLogger("moecc.passes.recognize")


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


def _reading(calls, x: torch.Tensor) -> list:
    """The Linear calls that read ``x`` itself."""
    return [c for c in calls if c[1].shape == x.shape and torch.equal(c[1], x)]


def _input_spread(calls, x: torch.Tensor) -> float:
    """The standard deviation of what the Linear layers that read ``x`` add to their bias."""
    spreads = [(out - (lin.bias if lin.bias is not None else 0)).double().std().item() for lin, _, out in
               _reading(calls, x) if out.numel() > 1]  # a zero-width expert (a shared expert of size 0) has none
    return max(spreads, default=0.0)


def _best_fit(fits: list[tuple], function, target: torch.Tensor, wide=None) -> tuple[tuple, float] | None:
    """(fit, its error) of the fit whose ``function(*fit)`` is closest to ``target``, if any is close. ``wide``:
    (function, target) of the same calls on a wider probe (``_Wide``), which the fit must reproduce too."""
    scored = [(fit, rel_err(out, target)) for fit in fits if close(out := function(*fit), target)
              and (wide is None or close(wide[0](*fit), wide[1]))]
    return min(scored, key=lambda s: s[1]) if scored else None


class _Wide:
    """The module's Linear calls on its probe spread ``PROBE_WIDE`` times wider: the output of each input
    projection (by module) and the down projection's input."""

    def __init__(self, module: nn.Module, x: torch.Tensor, down: nn.Linear):
        wide = (x.double() * PROBE_WIDE).to(x.dtype)
        calls, _ = _record_linear_calls(module, wide)
        self.out = {id(lin): out for lin, _, out in _reading(calls, wide)}
        self.down_in = next(inp for lin, inp, _ in calls if lin is down)

    @classmethod
    def of(cls, module: nn.Module, x: torch.Tensor, down: nn.Linear) -> _Wide | None:
        try:
            return cls(module, x, down)
        except Exception:  # noqa: BLE001 - a module that fails on wide inputs keeps what the first probe proved
            return None


def analyze_mlp(module: nn.Module, hidden: int) -> MatchResult[tuple[ExpertSpec, ExpertWeights]]:
    """Find ``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))`` by watching the module's Linear calls."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(linears) not in (2, 3):
        return MatchResult.fail(f"{type(module).__name__} has {len(linears)} Linear layers, expected 2 or 3")
    x = probe_input(16, hidden, linears[0].weight, seed=11)
    try:
        calls, y = _record_linear_calls(module, x)
        if isinstance(y, torch.Tensor) and y.shape == x.shape and (spread := _input_spread(calls, x)) > 0:
            x = (x.double() * (PROBE_PRE_ACTIVATION_STD / spread)).to(x.dtype)
            calls, y = _record_linear_calls(module, x)
    except Exception as exc:  # noqa: BLE001 - any failure means "not an MLP we understand"
        return MatchResult.fail(f"{type(module).__name__} could not be called on [n, hidden]: {exc}")
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return MatchResult.fail(f"{type(module).__name__} does not map [n, {hidden}] to [n, {hidden}]")
    first = _reading(calls, x)
    rest = [c for c in calls if not any(c is f for f in first)]  # identity: a Linear called twice has equal modules
    scale = _output_scale(rest[0][2], y) if len(rest) == 1 else None
    if scale is None:
        return MatchResult.fail(f"{type(module).__name__}: no single output projection found (nor one times a "
                                "constant scale)")
    down, down_in, _ = rest[0]
    w_down, b_down = _scaled(down, scale)
    ups = [c for i, c in enumerate(first) if all(c[0] is not f[0] for f in first[:i])]  # one call per Linear
    if len(ups) not in (1, 2):
        return MatchResult.fail(f"{type(module).__name__}: {len(ups)} projections read the input, expected 1 or 2")
    wide = _Wide.of(module, x, down)
    # the common activations first, the others only where none of them is within a quarter of the dtype's
    # rounding: bf16's probe bound admits silu for mish, its rounding gelu for quick GELU; one of the others must
    # then halve the error
    def rival():
        more = more_activations(module, MORE_ACTIVATIONS)
        return _expert_of(ups, down_in, wide, hidden, [(a, p, 0.0) for a, p in more], more)
    found = common_or_rival(_expert_of(ups, down_in, wide, hidden, _gated_activations(module),
                                       [(a, 1.0) for a in PLAIN_ACTIVATIONS]), rival, x.dtype)
    if found is None:
        how = "gated" if len(ups) == 2 else ("plain or gated over halves or alternate rows of its one input "
                                              "projection")
        return MatchResult.fail(f"{type(module).__name__}: activation ({how}) is none of "
                                f"{(*PLAIN_ACTIVATIONS, *MORE_ACTIVATIONS)}")
    (spec, w_up, b_up), _ = found
    return MatchResult.success((spec, ExpertWeights(w_up, w_down, b_up, b_down)))


def _expert_of(ups, down_in: torch.Tensor, wide: _Wide | None, hidden: int,
               gated_acts: list[tuple[str, float, float]], plain_acts: list[tuple[str, float]]):
    """((spec, w_up, b_up), error) of the input projections ``ups`` (their recorded calls) under the activation of
    ``gated_acts`` ((name, alpha, limit)) or ``plain_acts`` ((name, parameter)) closest to the down projection's
    input, on the probe and on ``wide``; None when none gives it."""
    def on_wide(function):
        return None if wide is None else (function, wide.down_in)

    if len(ups) == 2:
        def gated(g, u, act, out=lambda call: call[2]):
            return expert_activation(torch.cat([out(g), out(u)], -1), act[0], True, *act[1:])
        fits = [(g, u, act) for (g, u), act in itertools.product(itertools.permutations(ups), gated_acts)]
        best = _best_fit(fits, gated, down_in, on_wide(
            lambda g, u, act: gated(g, u, act, lambda call: wide.out[id(call[0])])))
        if best is None:
            return None
        (g, u, (act, alpha, limit)), err = best
        spec = ExpertSpec(hidden, g[0].out_features, act, True, g[0].bias is not None, alpha, limit)
        w_up = torch.cat([g[0].weight, u[0].weight], 0)
        return (spec, w_up, torch.cat([g[0].bias, u[0].bias], 0) if spec.has_bias else None), err
    u = ups[0]
    best = _best_fit(plain_acts, lambda act, param: expert_activation(u[2], act, False, param, 0.0), down_in,
                     on_wide(lambda act, param: expert_activation(wide.out[id(u[0])], act, False, param, 0.0)))
    if best is not None:
        (act, param), err = best
        return (ExpertSpec(hidden, u[0].out_features, act, False, u[0].bias is not None, param), u[0].weight,
                u[0].bias), err
    return _fused_gate_up(u, down_in, hidden, gated_acts, None if wide is None else
                          (wide.out[id(u[0])], wide.down_in))


def _output_scale(down_out: torch.Tensor, y: torch.Tensor) -> float | torch.Tensor | None:
    """``s`` with ``y = s * down_out``: 1.0 when the expert returns its output projection; a constant written in
    its code (``2.0 * self.down(h)``) or a learned per-feature scale (a layer scale) otherwise; None when no
    constant scale gives ``y``."""
    if close(down_out + 0, y):
        return 1.0
    d, t = down_out.double(), y.double()
    per_feature = (d * t).sum(0) / (d * d).sum(0).clamp_min(torch.finfo(torch.float64).tiny)
    if not close((per_feature * d).to(y.dtype), y) or not per_feature.abs().gt(0).all():
        return None
    scalar = (d * t).sum() / (d * d).sum()
    if close((scalar * d).to(y.dtype), y):
        return snap(scalar.item(), y.dtype)
    return per_feature


def _scaled(down: nn.Linear, scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight and bias with ``scale`` folded in."""
    if isinstance(scale, float) and scale == 1.0:
        return down.weight, down.bias
    s = scale if isinstance(scale, float) else scale.to(down.weight.dtype)
    w = down.weight.detach() * (s if isinstance(s, float) else s[:, None])
    return w, None if down.bias is None else down.bias.detach() * s


def dense_mlps(modules: list[nn.Module]) -> bool:
    """Whether each module is a dense MLP (``analyze_mlp``) of the hidden size its first Linear reads."""
    first = next((m for m in modules[0].modules() if isinstance(m, nn.Linear)), None)
    return first is not None and all(analyze_mlp(m, first.in_features) for m in modules)


def _gated_activations(module: nn.Module) -> list[tuple[str, float, float]]:
    """(activation, alpha, limit) a gated MLP may apply: the plain ones, GPT-OSS's clamped swiglu where the module
    names its limit (MiniMax-M3's shared expert holds ``swiglu_alpha`` and ``swiglu_limit``), and a soft-capped
    swiglu at the caps it names."""
    plain = [(act, 1.0, 0.0) for act in PLAIN_ACTIVATIONS]
    if not stacked.names_limit(module):
        return plain + stacked.softcapped(module)
    return plain + [a for a in stacked.activations(module) if a[2] > 0]


def _fused_gate_up(u, down_in: torch.Tensor, hidden: int, acts: list[tuple[str, float, float]], wide=None):
    """((spec, w_up, b_up), error) of one Linear whose output holds both gate and up: split in halves
    (``.chunk(2, -1)``, gate or up first) or in alternate rows (``[..., ::2]``, as GPT-OSS stores them), gate rows
    first in ``w_up``; None when no split and activation (of ``acts``, ``_gated_activations``) give the down
    projection's input (and, given ``wide`` (the Linear's output, the down projection's input), the same on the
    wider probe)."""
    lin, _, out = u
    rows = lin.out_features
    if rows % 2 or down_in.shape[-1] != rows // 2:
        return None
    half = torch.arange(rows // 2, device=out.device)
    splits = [(half, half + rows // 2), (half + rows // 2, half), (2 * half, 2 * half + 1), (2 * half + 1, 2 * half)]

    def split(g, up, act, out=out):
        return expert_activation(torch.cat([out[:, g], out[:, up]], -1), act[0], True, *act[1:])
    best = _best_fit([(g, up, act) for (g, up), act in itertools.product(splits, acts)], split, down_in,
                     None if wide is None else (lambda g, up, act: split(g, up, act, wide[0]), wide[1]))
    if best is None:
        return None
    (g, up, (act, alpha, limit)), err = best
    order = torch.cat([g, up]).to(lin.weight.device)
    b_up = None if lin.bias is None else lin.bias[order]
    return (ExpertSpec(hidden, rows // 2, act, True, lin.bias is not None, alpha, limit), lin.weight[order], b_up), err


def stack_mlps(modules: list[nn.Module], hidden: int) -> MatchResult[tuple[ExpertSpec, ExpertWeights]]:
    specs, weights = [], []
    for i, m in enumerate(modules):
        r = analyze_mlp(m, hidden)
        if not r:
            return MatchResult.fail(f"expert {i}: {r.reason}")
        specs.append(r.value[0])
        weights.append(r.value[1])
    widest = max(specs, key=lambda s: s.intermediate_size)
    if any(dataclasses.replace(s, intermediate_size=widest.intermediate_size) != widest for s in specs):
        return MatchResult.fail("experts differ in activation, gating or biases")
    if any(s != widest for s in specs):
        if not _zero_keeps_zero(widest):
            return MatchResult.fail(f"experts differ in width and {widest.describe()} does not map 0 to 0, so "
                                    "zero columns cannot pad the narrower ones")
        weights = [_widened(w, s, widest.intermediate_size) for w, s in zip(weights, specs)]
        log.info("experts of intermediate sizes %s are padded with zero units to %d",
                 sorted({s.intermediate_size for s in specs}), widest.intermediate_size)
    stack = lambda name: None if getattr(weights[0], name) is None else torch.stack(  # noqa: E731
        [getattr(w, name).detach() for w in weights])
    return MatchResult.success((widest, ExpertWeights(stack("w_up"), stack("w_down"), stack("b_up"),
                                                       stack("b_down"))))


def _zero_keeps_zero(spec: ExpertSpec) -> bool:
    up_rows = 2 * spec.intermediate_size if spec.gated else spec.intermediate_size
    h = expert_activation(torch.zeros(1, up_rows), spec.activation, spec.gated, spec.alpha, spec.limit)
    return not h.any().item()


def _widened(w: ExpertWeights, spec: ExpertSpec, inter: int) -> ExpertWeights:
    """An expert of ``spec.intermediate_size`` as one of ``inter``: zero rows of w_up (and b_up) after each of its
    gate and up parts, zero columns of w_down. The extra intermediate units are act(0) = 0 (``_zero_keeps_zero``)
    and reach the output through zero columns, so the function is exactly the expert's."""
    extra = inter - spec.intermediate_size
    if extra == 0:
        return w
    parts = 2 if spec.gated else 1

    def rows(t):
        if t is None:
            return None
        halves = t.detach().reshape(parts, spec.intermediate_size, *t.shape[1:])
        return torch.nn.functional.pad(halves, (0, 0) * (t.dim() - 1) + (0, extra)).reshape(parts * inter,
                                                                                            *t.shape[1:])

    w_down = torch.nn.functional.pad(w.w_down.detach(), (0, extra))
    return ExpertWeights(rows(w.w_up), w_down, rows(w.b_up), w.b_down)
