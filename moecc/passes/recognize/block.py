"""Recognize one MoE block: find its experts, router and shared experts, then prove the canonical form equal.

Recognition is by structure plus evidence. Candidate meanings are read off the module's parameters and
sub-modules, and one is accepted only when the canonical block computes the same outputs as the original
block on fresh random inputs of two shapes. An unproven block is never rewritten."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
from torch import nn

from moecc import knobs
from moecc.activations import GATED_ONLY
from moecc.autocast import autocast_state
from moecc.canonical import BlockAnalysis, CanonicalMoE
from moecc.ir import CapacitySpec, ExpertSpec, ExpertWeights, RoutingSpec, SharedExpert
from moecc.match import MatchResult
from moecc.passes.recognize import clamp, stacked
from moecc.passes.recognize.amplify import amplifier
from moecc.passes.recognize.bank import (
    bank_caller,
    bank_skip,
    find_bank,
    find_expert_list,
    find_stacked_bank,
    grouped_rows_probe,
    has_linear,
)
from moecc.passes.recognize.inline_routing import routing_programs
from moecc.passes.recognize.input_module import expert_input_module, input_module
from moecc.passes.recognize.logit_affine import affine_router
from moecc.passes.recognize.mlp import analyze_mlp, stack_mlps
from moecc.passes.recognize.other_args import OtherArgs
from moecc.passes.recognize.probe import PROBE_WIDE, close, common_or_rival, rel_err, snap, tensor_leaves, tolerance
from moecc.passes.recognize.reads import ParameterReads, unread_modules
from moecc.passes.recognize.router import (
    capacity_candidates,
    chosen_by_expert_calls,
    export_logits,
    export_router,
    find_router,
    fit_capacity,
    fit_routing,
    group_candidates,
    module_router,
    read_outputs,
    router_over_more,
    routing_candidates,
    topk_candidates,
)
from moecc.routing import SCORES

MAX_JOINT_CANDIDATES = 20000


def _expert_fn(spec: ExpertSpec, w: ExpertWeights, e: int, x: torch.Tensor) -> torch.Tensor:
    offsets = torch.tensor([0] * (e + 1) + [x.shape[0]] * (w.w_up.shape[0] + 1 - e), device=x.device)
    return torch.ops.moecc.expert_ffn(x, offsets, w.w_up, w.w_down, w.b_up, w.b_down, spec.activation, spec.gated,
                                      spec.alpha, spec.limit)


def stacked_winner(bank: nn.Module, hidden: int, num_experts: int, x: torch.Tensor, refs: list[torch.Tensor],
                   wide: tuple[torch.Tensor, torch.Tensor] | None = None, post=None):
    """``best_layout`` of the bank's layouts under the plain activations; under the others too where none of those
    is within a quarter of the dtype's rounding, one of them then taken only where it halves the error (bf16's
    probe bound admits silu for mish, its rounding gelu for quick GELU). In fp32 the common case searches no more
    than before the others existed. ``post(y, e)``: what the bank does to expert ``e``'s output rows ``y`` before
    it weights them (a post-expert norm), applied to each candidate's."""
    found = common_or_rival(best_layout(stacked.candidates(bank, hidden, num_experts), x, refs, wide, post),
                            lambda: best_layout(stacked.candidates(bank, hidden, num_experts, more=True), x, refs,
                                                wide, post), x.dtype)
    return None if found is None else found[0]


def wide_probe(expert_fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(input, expert 0's output) on ``x`` spread ``PROBE_WIDE`` times wider, where a clipped activation shows;
    None when the expert fails on it."""
    wide = (x.double() * PROBE_WIDE).to(x.dtype)
    try:
        return wide, expert_fn(wide)
    except Exception:  # noqa: BLE001 - an expert that fails on wide inputs keeps what the first probe proved
        return None


def best_layout(cands, x: torch.Tensor, refs: list[torch.Tensor],
                wide: tuple[torch.Tensor, torch.Tensor] | None = None, post=None):
    """(candidate, error on expert 0) of the stacked-bank candidate that fits the probed expert functions best.
    One within the dtype's own rounding on
    expert 0 and proven on every expert is taken at once (most banks: the first layouts tried); otherwise every
    candidate within the probe bound is ranked on expert 0 (a later one must halve the error, as in ``_Closest``),
    and the best proven on every expert wins. In bf16 that bound admits silu for gelu, so the first candidate within
    it is not simply taken. Only the winner is built for all experts. ``wide``: expert 0's (input, output) on a wider
    probe (``wide_probe``), which a winner must reproduce too."""
    tight = tolerance(x.dtype)

    def expert(c, e: int, v: torch.Tensor) -> torch.Tensor:
        y = _expert_fn(c.spec, c.build(slice(e, e + 1)), 0, v)
        return y if post is None else post(y, e)

    def proven(c) -> bool:
        if wide is not None and not close(expert(c, 0, wide[0]), wide[1]):
            return False
        return all(close(expert(c, e, x), refs[e]) for e in range(1, len(refs)))

    ranked = []
    for c in cands:
        y0 = expert(c, 0, x)
        if not close(y0, refs[0]):
            continue
        err = rel_err(y0, refs[0])
        if err <= tight and proven(c):
            return c, err
        ranked.append((err, c))
    best_err, kept = None, []
    for err, c in ranked:
        if best_err is None or err < best_err / 2:
            best_err = err
            kept.insert(0, (c, err))
        else:
            kept.append((c, err))
    return next((ce for ce in kept if proven(ce[0])), None)


def _shared_experts(block: nn.Module, used: set[int], hidden: int) -> MatchResult[list[SharedExpert]]:
    shared, gates = [], {}
    for name, child in block.named_children():
        if id(child) in used:
            continue
        if isinstance(child, nn.Linear) and child.out_features == 1 and child.in_features == hidden:
            gates[name] = child.weight
            continue
        if isinstance(child, (nn.Dropout, nn.Identity)) or not has_linear(child):
            continue
        r = analyze_mlp(child, hidden)
        if not r:
            return MatchResult.fail(f"sub-module {name!r} is neither router, experts nor a shared MLP: {r.reason}")
        spec, w = r.value
        one = ExpertWeights(*(None if t is None else t.detach().unsqueeze(0) for t in (w.w_up, w.w_down, w.b_up,
                                                                                         w.b_down)))
        shared.append(SharedExpert(spec, one))
    if len(gates) > 1 or (gates and len(shared) != 1):
        held = "no shared expert" if not shared else f"{len(shared)} shared experts"
        return MatchResult.fail(f"shared-expert gates do not pair with exactly one shared expert: sub-module(s) "
                                f"{', '.join(map(repr, gates))} (Linear {hidden} -> 1) read as gates, and the block "
                                f"holds {held} (a gate over the whole output of the block is no canonical form)")
    if gates:
        shared[0].gate_weight = next(iter(gates.values())).detach()
    return MatchResult.success(shared)


UNREAD_CHECK_TOKENS = 512


def _unread_modules(block: nn.Module, example: torch.Tensor, like: torch.Tensor, others: OtherArgs | None) -> set[int]:
    """Ids of the modules inside the block's children whose parameters the block does not read, on 16 random
    tokens and then, where some child went unread, on ``UNREAD_CHECK_TOKENS`` (``reads``): a child some code path
    reads only past a token count is no child to leave out. None of them is router, shared expert or norm."""
    reads = ParameterReads()
    g = torch.Generator().manual_seed(4321)
    hidden = example.shape[-1]
    unread: set[int] = set()
    for tokens in (16, UNREAD_CHECK_TOKENS):
        shape = (4, tokens // 4, hidden) if example.dim() == 3 else (tokens, hidden)
        x = torch.randn(shape, generator=g).to(like)
        args, kwargs, _ = others.for_input(x, 99) if others else ((), {}, [])
        try:
            with torch.no_grad(), reads:
                block(x, *args, **kwargs)
        except Exception:  # noqa: BLE001 - a block that fails here fails its probes too, and says why there
            return set()
        unread = unread_modules(block, reads)
        if not unread:
            break
    return unread


def _output_modules(block: nn.Module, used: set[int]) -> list[nn.Module]:
    """Children left over once router, experts and shared experts are found that hold weights but no Linear (a
    norm): each may be applied to the block's output, which the block check decides."""
    return [child for child in block.children() if id(child) not in used and not has_linear(child)
            and any(True for _ in child.parameters()) and all(p.dim() < 3 for p in child.parameters())]


def _probe_inputs(example: torch.Tensor, hidden: int, like: torch.Tensor, collide: int,
                  sweep: bool = False) -> list[torch.Tensor]:
    """Two random inputs, then one whose tokens are all alike, so any capacity limit is sure to overflow: three
    sequences of an odd length, so that a capacity factor's ``k*G*cf/E`` falls between integers for the usual
    factors, per sequence and in all (a ceiling and a floor then differ). ``sweep``: before that one, tokens that
    move in steps from one random token to another, whose top-k changes order on the way: an expert some take
    first and others second, past its capacity, tells token-major from slot-major priority."""
    shapes = [(2, 8, hidden), (3, 5, hidden)] if example.dim() == 3 else [(16, hidden), (7, hidden)]
    g = torch.Generator().manual_seed(1234)
    xs = [torch.randn(*s, generator=g) for s in shapes]
    if sweep:
        ends = torch.randn(2, hidden, generator=g)
        steps = torch.linspace(0, 1, 3 * (collide | 1))[:, None]
        xs.append(((1 - steps) * ends[0] + steps * ends[1]).reshape(3, collide | 1, hidden))
    same = torch.randn(1, 1, hidden, generator=g) + 1e-3 * torch.randn(3, collide | 1, hidden, generator=g)
    xs.append(same)
    xs = [x if example.dim() == 3 or x.dim() == 2 else x.reshape(-1, hidden) for x in xs]
    return [x.to(device=like.device, dtype=like.dtype) for x in xs]


def _verify(block: nn.Module, a: BlockAnalysis, inputs, refs, router_inputs=None,
            missed: list | None = None) -> tuple[BlockAnalysis, float] | None:
    """Same outputs as the block on every probe input, within the loose bound of ``close``: (the analysis with
    extra block outputs mapped to weights/ids/logits/scores, the largest relative error of ``y``). ``router_inputs``:
    per probe input, the block's token-shaped other arguments it was called with. ``missed``: gets the
    candidate's ``y`` on the first probe when that is where it differs."""
    kinds = ("y", "weights", "ids", "logits") + (("scores",) if a.routing.score in SCORES else ())
    canon = CanonicalMoE(replace(a, outputs=kinds, output_tuple=True))
    names = None
    worst = 0.0
    for x, ref, others in zip(inputs, refs, router_inputs or [()] * len(inputs)):
        try:
            with torch.no_grad():
                got = dict(zip(kinds, canon(x, *others)))
        except Exception:  # noqa: BLE001 - an output module candidate that does not take the block's output
            if a.post is None:
                raise
            return None
        if not close(got["y"], ref[0]):
            if missed is not None and names is None:
                missed.append(got["y"])
            return None
        worst = max(worst, rel_err(got["y"], ref[0]))
        mapping = ["y"]
        for leaf in ref[1:]:
            if leaf is None:  # an output the model never reads: its slot holds y, which nothing reads either
                mapping.append("y")
                continue
            hit = next((k for k in kinds[1:] if got[k].numel() == leaf.numel()
                        and got[k].dtype.is_floating_point == leaf.dtype.is_floating_point
                        and close(got[k].reshape(leaf.shape).to(leaf.dtype), leaf)), None)
            if hit is None:
                return None
            mapping.append(hit)
        if names is not None and names != mapping:
            return None
        names = mapping
    dtypes = tuple(None if leaf is None else leaf.dtype for leaf in refs[0][1:])
    return replace(a, outputs=tuple(names), output_dtypes=dtypes), worst


class _Closest:
    """The candidate to accept. In fp32 ``close`` separates candidates by orders of magnitude, but its bound for
    bf16 (16 %, wide enough for a probe token whose near-tied experts flip) also admits a neighbour of the right
    function: weights on the experts' outputs where the block puts them on their inputs differ by only 1 - w when
    the routing weight w is near 1 (Llama 4's sigmoid top-1, about 9 % at its size). So a candidate within the
    dtype's own rounding is taken at once; one that passes only the loose bound is kept while up to ``LOOK_ON``
    more candidates are tried, and the closest wins (a later one must halve the error: equal forms differ by
    rounding only, and the first of them stays)."""

    LOOK_ON = 64

    def __init__(self, dtype: torch.dtype):
        self.tight = tolerance(dtype)
        self.best: tuple[BlockAnalysis, float] | None = None
        self.left = self.LOOK_ON

    def offer(self, result: tuple[BlockAnalysis, float] | None) -> bool:
        """Record a candidate's result; True when the search is over."""
        if self.best is not None:
            self.left -= 1
        if result is not None and (self.best is None or result[1] < self.best[1] / 2):
            self.best = result
        return self.best is not None and (self.best[1] <= self.tight or self.left <= 0)

    @property
    def analysis(self) -> BlockAnalysis | None:
        return None if self.best is None else self.best[0]


def _scaled(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether ``ref`` is a constant times ``y`` within the probes' bound (least squares)."""
    bound = 10 * tolerance(ref.dtype)
    y, ref = y.double().flatten(), ref.double().flatten()
    c = (y @ ref) / (y @ y).clamp_min(1e-300)
    return bool((c * y - ref).norm() <= bound * ref.norm())


def _adds_input(y: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether ``ref`` is ``x + y`` within the probes' bound: a block that adds its input to its output itself."""
    return x.numel() == ref.numel() and close(y, ref - x.reshape(ref.shape), scale=10 * max(
        1.0, (ref.double().norm() / (ref - x.reshape(ref.shape)).double().norm().clamp_min(1e-30)).item()))


def _with_residual(block: nn.Module, a: BlockAnalysis, posts: list[nn.Module], y: torch.Tensor, inputs, refs,
                   router_inputs):
    """``a`` proven with the block adding its input to the candidate's output ``y`` itself, then maybe applying one
    of its output modules to the sum (a post-norm residual, ``norm(x + moe(x))``); each is screened on the first
    probe before the whole check."""
    x, ref = inputs[0], refs[0][0]
    if _adds_input(y, x, ref):
        return _verify(block, replace(a, residual=True), inputs, refs, router_inputs)
    if x.numel() != ref.numel():
        return None
    for post in posts:
        try:
            with torch.no_grad():
                got = post(x.reshape(ref.shape) + y.reshape(ref.shape))
        except Exception:  # noqa: BLE001 - an output module that does not take the block's output
            continue
        if close(got, ref):
            ok = _verify(block, replace(a, residual=True, post=post), inputs, refs, router_inputs)
            if ok is not None:
                return ok
    return None


def _refit_experts(block: nn.Module, a: BlockAnalysis, inputs, scale: float, acts, expert_candidates) -> BlockAnalysis:
    """``a`` with the experts that fit the block best on probes whose expert inputs are ``scale`` times those of
    ``inputs``. The search proves a candidate on unit probes, where small expert weights leave pre-activations of a
    few hundredths and bf16 cannot tell silu from gelu or relu, nor one gated layout from another where the block
    adds its larger input to the experts' output; amplified probes spread them, but saturate the router too (top-1
    then passes for top-2), so only the experts are chosen on them, the routing found on unit probes kept. First
    ``a``'s weights under each activation of ``acts`` ((activation, alpha, limit)); only when none of them is
    within the dtype's rounding, every candidate of ``expert_candidates`` ((spec, weights) pairs, each a copy of
    the bank in some layout)."""
    e = a.expert
    with amplifier(a.expert_pre, scale, inputs[0]) as amplify:
        if amplify is None:
            return a
        spread = [amplify(x) for x in inputs]
        try:
            with torch.no_grad():
                refs = [tensor_leaves(block(x))[0] for x in spread]
        except Exception:  # noqa: BLE001 - a block that fails on large inputs keeps what the unit probes proved
            return a

        def error(candidate: BlockAnalysis) -> float:
            canon = CanonicalMoE(replace(candidate, outputs=("y",), output_tuple=False))
            with torch.no_grad():
                return max(rel_err(canon(x), ref) for x, ref in zip(spread, refs))

        best, best_err = a, error(a)
        relabelled = [replace(a, expert=replace(e, activation=act, alpha=alpha, limit=limit))
                      for act, alpha, limit in acts if (act, alpha, limit) != (e.activation, e.alpha, e.limit)
                      and (e.gated or act not in GATED_ONLY)]
        for candidate in relabelled:
            err = error(candidate)
            if err < best_err / 2:
                best, best_err = candidate, err
        if best_err > tolerance(refs[0].dtype):
            for spec, weights in expert_candidates:
                candidate = replace(a, expert=spec, weights=weights)
                err = error(candidate)
                if err < best_err / 2:
                    best, best_err = candidate, err
    return best if best_err <= 10 * tolerance(refs[0].dtype) else a


def _with_output_scales(block: nn.Module, a: BlockAnalysis, inputs, refs) -> tuple[BlockAnalysis, float] | None:
    """The block's routed and shared outputs summed with constant coefficients (Cohere2-MoE averages the two; a
    user block may return ``1.5 * y``): fit them on the probes, fold the routed one into the routing scale and the
    shared one into copies of the shared experts' down projections, then prove the result like any candidate."""
    if a.router_program is not None or a.post is not None:
        # a router's own code gives its weights, so no scale folds into them; a scale before an output module
        # (a norm) is not a scale of the block's output
        return None
    whole = CanonicalMoE(replace(a, outputs=("y",), output_tuple=False))
    routed = CanonicalMoE(replace(a, shared=[], outputs=("y",), output_tuple=False))
    columns, target = [], []
    with torch.no_grad():
        for x, ref in zip(inputs, refs):
            y_routed = routed(x).double().flatten()
            parts = [y_routed, whole(x).double().flatten() - y_routed] if a.shared else [y_routed]
            columns.append(torch.stack(parts, 1))
            target.append(ref[0].double().flatten())
    fit = torch.linalg.lstsq(torch.cat(columns), torch.cat(target)[:, None]).solution.flatten().tolist()
    fit = (fit + [1.0])[:2]
    if not all(abs(c) < 1e6 and c == c for c in fit):
        return None
    for alpha, beta in dict.fromkeys([tuple(snap(c, refs[0][0].dtype) for c in fit), tuple(fit)]):
        if (alpha, beta) == (1.0, 1.0):
            continue
        scaled = replace(a, routing=replace(a.routing, scale=a.routing.scale * alpha), shared=[replace(
            sh, weights=replace(sh.weights, w_down=sh.weights.w_down * beta,
                                b_down=None if sh.weights.b_down is None else sh.weights.b_down * beta))
            for sh in a.shared])
        result = _verify(block, scaled, inputs, refs)
        if result is not None:
            return result
    return None


def _pairs(routing_options, expert_candidates):
    """Every (routing, experts) pair; expert candidates are built lazily, one at a time, outermost."""
    routing_options = list(routing_options)
    if isinstance(expert_candidates, list):
        for r, e in itertools.product(routing_options, expert_candidates):
            yield r, e
        return
    for e in expert_candidates:
        for r in routing_options:
            yield r, e


UNMATCHED_ROUTING = ("routing matches no known pattern (softmax, sigmoid or sqrt-softplus scores, top-k before/after "
                     "scoring, renormalisation, selection bias, groups, scale)")


def _with_router_as_written(block, router, obs, x2, call, num_experts, expert_candidates, shared, inputs, refs,
                            raw, flat_output, others: OtherArgs | None = None, router_inputs=None, pre=None,
                            pre_placements: tuple[bool, ...] = (False,)):
    """A router no pattern matches stays as its own graph ops; its (weights, ids) feed the canonical experts.
    ``x2``: what the router read of the first probe, as tokens; ``call``: the (args, kwargs) the block called the
    router with; ``others``/``router_inputs``: the block's other arguments, which the router may read too (token
    ids); ``pre``: the module the block applies to its input first, for its router alone or not
    (``pre_placements``)."""
    if obs.dropped:
        return MatchResult.fail(f"router {router.path}: {UNMATCHED_ROUTING}, and it drops tokens")
    token_dims = inputs[0].dim() - 1
    try:
        program = export_router(router.module, x2, obs, *call, others=tuple(router_inputs[0]) if others else (),
                                token_dims=token_dims)
    except Exception as exc:  # noqa: BLE001 - a router torch.export cannot capture stays inside the block
        return MatchResult.fail(f"router {router.path}: {UNMATCHED_ROUTING}; exporting it as written failed: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return _with_routing_program(block, router, program, obs.ids.shape[1], num_experts, expert_candidates, shared,
                                 inputs, refs, raw, flat_output, others, router_inputs, pre, pre_placements)


def _with_routing_program(block, router, program, k, num_experts, expert_candidates, shared, inputs, refs, raw,
                          flat_output, others=None, router_inputs=None, pre=None, pre_placements=(False,)):
    """The canonical experts fed by ``program``, ``tokens -> (weights, ids)`` of ``k`` experts each, checked against
    the block on its probes (``_with_router_as_written``)."""
    token_dims = inputs[0].dim() - 1
    spec = RoutingSpec(num_experts, k, "as written", has_router_bias=router.bias is not None)
    closest = _Closest(router.weight.dtype)
    for on_inputs, (espec, ew) in _pairs((False, True), expert_candidates):
        extra = num_experts - int(ew.w_up.shape[0])
        for pass_input, routes_only in itertools.product(_extra_kinds(extra, CapacitySpec(), on_inputs),
                                                         pre_placements):
            a = BlockAnalysis(replace(spec, weights_on_inputs=on_inputs), router.weight, router.bias, None, espec,
                              ew, CapacitySpec(), shared, output_tuple=not isinstance(raw[0], torch.Tensor),
                              router_program=program, flat_output=flat_output,
                              other_positions=others.positions if others else (), token_dims=token_dims, pre=pre,
                              pre_routes_only=routes_only, extra_experts=extra, extra_pass_input=pass_input,
                              logits_program=router.logits)
            if closest.offer(_verify(block, a, inputs, refs, router_inputs)):
                return MatchResult.success(closest.analysis)
    if closest.analysis is not None:
        return MatchResult.success(closest.analysis)
    return MatchResult.fail(f"router {router.path}: {UNMATCHED_ROUTING}; with its own routing the experts still "
                            "do not reproduce the block")


def _checked_again(block: nn.Module, a: BlockAnalysis, inputs, refs) -> tuple[BlockAnalysis, float] | None:
    """``_verify`` of an analysis a check already gave: ``(a, the largest relative error of y)``, or None."""
    again = _verify(block, replace(a, outputs=("y",), output_dtypes=()), inputs, refs)
    return None if again is None else (a, again[1])


ROUTES_OTHERWISE = 0.02  # mean relative difference of the weights of tokens that chose the same experts


def _routes_otherwise(own: BlockAnalysis, fitted: BlockAnalysis, x: torch.Tensor) -> bool:
    """Whether the routing read off the block's code and a fitted canonical routing are other functions on the
    probe ``x``: on the tokens for which both choose the same experts (near ties in low precision may choose
    others), weights that differ by more than rounding, or too few such tokens."""
    outs = ("y", "weights", "ids")
    with torch.no_grad():
        _, w_own, i_own = CanonicalMoE(replace(own, outputs=outs, output_tuple=True))(x)
        _, w_fit, i_fit = CanonicalMoE(replace(fitted, outputs=outs, output_tuple=True))(x)
    if i_own.shape != i_fit.shape:
        return True
    o_own, o_fit = i_own.argsort(-1), i_fit.argsort(-1)
    same = (i_own.gather(-1, o_own) == i_fit.gather(-1, o_fit)).all(-1)
    if int(same.sum()) < same.numel() // 2:
        return True
    w_own, w_fit = w_own.float().gather(-1, o_own)[same], w_fit.float().gather(-1, o_fit)[same]
    return float(((w_own - w_fit).abs() / w_own.abs().clamp_min(1e-6)).mean()) > ROUTES_OTHERWISE


def _with_own_routing(block, router, like, hidden, num_experts, expert_candidates, expert_inputs, shared, inputs,
                      refs, raw, flat_output) -> MatchResult[BlockAnalysis]:
    """The canonical experts fed by a routing the block computes in its own forward (``inline_routing``): of the
    candidates that reproduce the block, the first within the dtype's rounding, else the closest (in bf16 a wrong
    candidate, the weights before their renormalisation, say, can pass the loose bound). ``expert_candidates``: a
    list, or a function that makes a fresh generator of them; ``expert_inputs``: what each expert module read of
    the first probe, which shows the ids."""
    programs = routing_programs(block, like, inputs[0].dim(), hidden, num_experts)
    if not programs:
        return programs
    tokens = inputs[0].reshape(-1, hidden)
    chosen = chosen_by_expert_calls(expert_inputs, tokens) if _all_tensors(expert_inputs) else None
    tried = 0
    closest = _Closest(like.dtype)
    for program, k in programs.value:
        if chosen is not None:
            try:
                with torch.no_grad():
                    ids = program(tokens)[1]
            except Exception:  # noqa: BLE001 - a candidate that runs on no other token count is not the routing
                continue
            if ids.shape != chosen.shape or not torch.equal(ids.sort(-1).values, chosen):
                continue
        tried += 1
        candidates = expert_candidates if isinstance(expert_candidates, list) else expert_candidates()
        r = _with_routing_program(block, router, program, k, num_experts, candidates, shared, inputs, refs, raw,
                                  flat_output)
        if r and closest.offer(_checked_again(block, r.value, inputs, refs)):
            break
    if closest.analysis is not None:
        return MatchResult.success(replace(closest.analysis, own_routing=True))
    if not tried:
        return MatchResult.fail("none of its [T, k] ids and weights picks the experts the block called")
    return MatchResult.fail(f"the experts fed by none of its {tried} candidate (weights, ids) pairs reproduce "
                            "the block")


def _extra_kinds(extra: int, cap: CapacitySpec, on_inputs: bool) -> tuple[bool, ...]:
    """What experts past the bank may do, as ``BlockAnalysis.extra_pass_input``: pass their input on or add nothing;
    with none past the bank, the one candidate as it is. Their weights scale outputs of a dropless block only."""
    if not extra:
        return (True,)
    return () if on_inputs or not cap.dropless else (True, False)


def _pre_placements(pre: nn.Module | None, x: torch.Tensor, expert_inputs: list[list],
                    call: Callable[[torch.Tensor], object]) -> tuple[bool, ...]:
    """Whether ``pre``, the module whose output the router read, feeds the router alone (``pre_routes_only``).
    The rows the expert modules were called with tell where they show it (rows of the block's input, not of
    ``pre``'s output: a norm of the router's input only). Else, for a ``pre`` that ignores its input's scale (a
    norm), the block ``call``ed on twice its input: a block that reads its input only through ``pre`` (adding it
    back aside) gives the same, experts that read the input itself do not. Else both are tried."""
    if pre is None:
        return (False,)
    hidden = x.shape[-1]
    with torch.no_grad():
        normed = pre(x)
        if _all_tensors(expert_inputs):
            if chosen_by_expert_calls(expert_inputs, normed.reshape(-1, hidden)) is not None:
                return (False,)
            if chosen_by_expert_calls(expert_inputs, x.reshape(-1, hidden)) is not None:
                return (True,)
        twice = (x.double() * 2).to(x.dtype)
        try:
            if not close(pre(twice), normed):
                return (False, True)
            y, y2 = tensor_leaves(call(x))[0], tensor_leaves(call(twice))[0]
        except Exception:  # noqa: BLE001 - a block that fails on a larger input leaves both to the search
            return (False, True)
    if close(y2, y) or (y.shape == x.shape and close(y2 - twice, y - x)):
        return (False,)
    return (True, False)


def _all_tensors(expert_inputs: list[list]) -> bool:
    return bool(expert_inputs) and all(isinstance(t, torch.Tensor) for calls in expert_inputs for t in calls)


def _recorder(into: list):
    """A forward pre-hook that keeps the first argument of each call of its module in ``into``."""
    def hook(module, args):
        into.append(args[0] if args else None)
    return hook


def _searched_routing(router, mods: list[nn.Module], num_experts: int, chosen: torch.Tensor | None = None):
    """(routing spec, selection bias, expert scale, capacity) candidates for a router whose outputs are not
    observed; ``chosen``: the experts each probe token reached, where the expert calls showed them, which may point
    to groups that no attribute names (``observed_groups``). Every candidate without a per-expert scale comes
    first; then each one again with each of the router's ``[E]`` tensors but its selection bias as the
    scale of its chosen weights (Gemma 4's ``per_expert_scale``, written inline)."""
    def options():
        return itertools.product(
            routing_candidates(num_experts, topk_candidates(mods, num_experts), router.selection_biases,
                               group_candidates(mods, num_experts, chosen), router.bias is not None, False),
            capacity_candidates(mods))

    plain = ((spec, sel, None, cap) for (spec, sel), cap in options())
    scaled = ((replace(spec, has_expert_scale=True), sel, factor, cap) for (spec, sel), cap in options()
              for factor in router.selection_biases if factor is not sel)
    return itertools.chain(plain, scaled)


def _variants(spec: RoutingSpec, cap: CapacitySpec, dtype: torch.dtype, linear: bool = True,
              weight_dtype: torch.dtype | None = None):
    """(logits in fp32, weights on the experts' inputs) to try for one routing candidate: its own precision first,
    the other one for low-precision routers of one Linear (``linear``; a router of code of its own keeps its
    precisions), and fp32 alone for a router weight of another dtype than its input (a gate kept in fp32 in a bf16
    model); weights on the outputs first, on the inputs only when dropless (a capacity counts token slots, which
    scaled inputs would turn into rows of their own)."""
    if weight_dtype is not None and weight_dtype != dtype and linear:
        precisions = (True,)
    elif dtype != torch.float32 and linear:
        precisions = (spec.logits_fp32, not spec.logits_fp32)
    else:
        precisions = (spec.logits_fp32,)
    places = (False, True) if cap.dropless else (False,)
    return [(fp32, on_inputs) for on_inputs in places for fp32 in precisions]


def analyze_block(block: nn.Module, example: torch.Tensor, others: OtherArgs | None = None,
                  read: set[int] | None = None, refused: str = "", own_first: bool = False
                  ) -> MatchResult[BlockAnalysis]:
    """The canonical form of ``block`` (``_analyze_block``), with a clamp limit the bank does not name proven on
    probes that pass it (``clamp``)."""
    r = _analyze_block(block, example, others, read, refused=refused, own_first=own_first)
    if not r and (where := hidden_not_last(block, example)):
        return MatchResult.fail(f"{r.reason}; {where}")
    if not r or r.value.expert.limit <= 0:
        return r
    bank, _, experts = find_bank(block)
    if experts is not None or stacked.names_limit(bank):
        return r
    limit = f"GPT-OSS's swiglu fits the experts on unit probes, and {type(bank).__name__} names no clamp limit"
    inputs = _probe_inputs(example, int(example.shape[-1]), next(block.parameters()), 16)
    if clamp.proven_clamp(block, r.value, inputs, others):
        return r
    return MatchResult.fail(f"{limit}, but the clamp at {r.value.expert.limit:g} does not fit probes that pass it")


def hidden_not_last(block: nn.Module, example: torch.Tensor) -> str | None:
    """Where the block's input holds its hidden size elsewhere than last (channels first, ``[B, H, L]``), which
    canonical forms do not read, the reason to add to why it was not fused; else None. The hidden size is a size
    of its parameters (the router's ``[E, H]``) that the input's last dim is not."""
    sizes = {d for p in block.parameters() for d in p.shape}
    shape = list(example.shape)
    if len(shape) < 2 or shape[-1] in sizes:
        return None
    at = [i for i, d in enumerate(shape[:-1]) if d > 1 and d in sizes]
    if not at:
        return None
    return (f"its input {shape} ends in a size none of its parameters has, and holds {shape[at[-1]]} at dim "
            f"{at[-1]}: moecc fuses blocks whose input holds the hidden size last (move it last around the block)")


def _autocast_to(like: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts the block's matmuls to, when it is on for its device and not its parameters'."""
    cast = dict(autocast_state()).get(like.device.type)
    return cast if cast != like.dtype else None


def unfit_parameters(block: nn.Module) -> str | None:
    """Why no canonical form can stand for ``block`` whatever it computes, read off its parameters and the
    autocast state alone; None when nothing rules it out."""
    like = next(block.parameters(), None)
    if like is None:
        return "block has no parameters"
    if like.dtype == torch.float64:
        return ("float64 block: the canonical ops route and combine in float32, which does not reproduce float64 to "
                "its precision")
    if (cast := _autocast_to(like)) is not None:
        return (f"the call runs under torch.autocast({like.device.type!r}, dtype={cast}), which rounds the block's "
                f"matmuls to {cast} while its parameters are {like.dtype}: the canonical ops compute in the "
                f"parameters' dtype. Cast the model to {cast} (model.to(dtype)) rather than autocast, or call it "
                "outside autocast")
    if offloaded_weights(block):
        return OFFLOADED
    if (bad := _non_finite_parameter(block)) is not None:
        return (f"parameter {bad} holds NaN or inf (a module built without initializing its weights?): probes of "
                "such a block tell nothing about its function")
    return None


OFFLOADED = ("its weights are offloaded (on the meta device, loaded for each call by hooks such as accelerate's "
             "offloading): a fused block reads weights that stay in memory")


def offloaded_weights(block: nn.Module) -> bool:
    """Weights on the meta device in a model that runs: hooks swap them in for each call and out again."""
    return any(t.is_meta for t in itertools.chain(block.parameters(), block.buffers()))


def _non_finite_parameter(block: nn.Module) -> str | None:
    for name, param in block.named_parameters():
        if param.is_floating_point() and not all_finite(param):
            return name
    return None


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite. A NaN or an inf makes the sum NaN or inf, so a finite sum says so in
    one pass without a mask: ``isfinite(t).all()`` took 30 times as long on a CPU (0.6 s for an expert bank of 58M
    elements, 16 ms for 131k). Only a sum that overflowed is checked element by element."""
    with torch.no_grad():
        return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _scores_no_linear_gives(router, out, x2: torch.Tensor) -> bool:
    """Whether a router module's outputs ``out`` for tokens ``x2`` hold E scores per token that its weight as a
    Linear of ``x2`` does not give, in either precision: a router MLP whose last layer is ``[E, H]``."""
    n, num_experts = x2.shape[0], router.weight.shape[0]
    scores = [t for t in torch.utils._pytree.tree_leaves(out)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() == n * num_experts]
    if not scores:
        return False
    with torch.no_grad():
        linear = [router.logits_of(x2, fp32) for fp32 in (False, True)]
    return not any(close(s.reshape(n, num_experts).float(), lin.float()) for s in scores for lin in linear)


def _input_like(block: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """An empty tensor of the dtype the block is handed (its probes' dtype) on its parameters' device: not its first
    parameter's dtype, which a router kept in fp32 in a bf16 model (``_keep_in_fp32_modules``) does not share."""
    param = next(block.parameters())
    dtype = example.dtype if example.is_floating_point() else param.dtype
    return torch.empty(0, dtype=dtype, device=param.device)


def _analyze_block(block: nn.Module, example: torch.Tensor, others: OtherArgs | None = None,
                   read: set[int] | None = None, scores_by_module: bool = False,
                   refused: str = "", own_first: bool = False) -> MatchResult[BlockAnalysis]:
    """``others``: the block's arguments besides its hidden states, when its outputs depend on them (only a router
    kept as written may read them). ``read``: which of the block's tensor outputs the model reads (None: all); the
    others need not be reproduced (a block that also returns its router's probabilities, or an auxiliary loss,
    which the model drops at inference). ``scores_by_module``: the router's scores are what its module (the
    block's child that holds its weight) returns, not a Linear of what it reads: a router MLP whose last layer
    happens to be ``[E, H]``, tried where the Linear reading fits nothing. ``refused``: why no canonical routing may
    serve (one the check on fresh inputs found to differ from the block's): only its routing as written does.
    ``own_first``: the routing read off its code is tried before the search, and taken within the dtype's rounding."""
    hidden = int(example.shape[-1])
    if (why := unfit_parameters(block)) is not None:
        return MatchResult.fail(why)
    like = _input_like(block, example)
    rtol = 10 * tolerance(like.dtype)

    input_scale = 1.0
    bank_list = find_expert_list(block)
    if bank_list is not None:
        bank_mod, experts = bank_list
        num_experts = len(experts)
        r = stack_mlps(experts, hidden)
        if not r:
            return MatchResult.fail(f"experts not recognized: {r.reason}")
        expert_candidates = [r.value]
    else:
        sb = find_stacked_bank(block)
        if sb is None:
            return MatchResult.fail("no expert bank: neither a ModuleList of MLPs nor stacked [E, ., .] weights")
        bank_mod, num_experts = sb
        probe_fn = bank_caller(block, bank_mod, hidden, like)
        by_rows = probe_fn is None
        if by_rows:
            probe_fn = grouped_rows_probe(bank_mod, hidden, like, num_experts)
        winner = None
        if probe_fn is not None:
            x = torch.randn(5, hidden, dtype=torch.float64) * stacked.probe_scale(bank_mod, hidden, num_experts)
            x = x.to(dtype=like.dtype, device=like.device)
            refs = [probe_fn(e, x) for e in range(num_experts)]
            winner = stacked_winner(bank_mod, hidden, num_experts, x, refs, wide_probe(partial(probe_fn, 0), x))
            if winner is None and not by_rows:
                return MatchResult.fail(f"{type(bank_mod).__name__}: the expert function matches no canonical "
                                        "expert (layouts, activations and clamps tried)")
        if winner is not None:
            expert_candidates = [(winner.spec, winner.build(slice(None)))]
        else:  # (rows grouped by expert were a guess at the bank's convention: the block's probes decide)
            # the block's probes are the only check of the expert function here: its activation is checked again
            # on inputs that spread the pre-activations (``_refit_experts``)
            input_scale = stacked.probe_scale(bank_mod, hidden, num_experts)

            def all_candidates(stacked_experts=num_experts):  # built one at a time: each is a copy of the bank
                # (``num_experts`` itself grows past the bank's where the router scores experts that compute nothing)
                return ((c.spec, c.build(slice(None))) for more in (False, True)
                        for c in stacked.candidates(bank_mod, hidden, stacked_experts, more))
            expert_candidates = all_candidates()

    used = bank_skip(block, bank_mod, experts if bank_list is not None else None)
    used |= _unread_modules(block, example, like, others)
    router = find_router(block, num_experts, hidden, used)
    bank_experts = num_experts
    if router is None:
        router = router_over_more(block, num_experts, hidden, used)
        if router is not None:
            # the router scores experts past the bank's, which compute nothing (LongCat-Flash's identity experts):
            # routing is fitted over all of them, and the check proves whether they pass their input on
            num_experts = int(router.weight.shape[0])
    if router is None or scores_by_module:
        router = module_router(block, num_experts, hidden, used, router)
        if isinstance(router, MatchResult):
            return router
    extra = num_experts - bank_experts
    # what computes the logits: the router module, else the module whose own parameter the router weight is (a bare
    # Linear child, whose inputs still show what the router reads)
    owner = next((m for m in block.modules() if any(p is router.weight for p in m.parameters(recurse=False))), None)
    reader = router.module or owner
    if router.module is not None:
        used |= {id(m) for m in router.module.modules()}
    elif owner is not None:
        used.add(id(owner))
    shared = _shared_experts(block, used, hidden)
    if not shared:
        return MatchResult.fail(shared.reason)

    leftovers = _output_modules(block, used)
    mods = [block] + ([router.module] if router.module is not None else [])
    caps = capacity_candidates(mods)
    fixed_caps = [c.capacity for c in caps if c.capacity > 0]
    inputs = _probe_inputs(example, hidden, like, max([16, *(c + 3 for c in fixed_caps)]), sweep=len(caps) > 1)
    router_calls: list = []  # (args, kwargs, outputs) of each call of the router module, or of ``reader``
    hook = None if reader is None or reader is block else reader.register_forward_hook(
        lambda m, args, kwargs, out: router_calls.append((args, kwargs, out)), with_kwargs=True)
    # what each expert module reads in the first call, which shows the experts each token chose
    expert_inputs: list[list] = [[] for _ in range(bank_experts)] if bank_list is not None else []
    expert_hooks = [m.register_forward_pre_hook(_recorder(expert_inputs[e])) for e, m in enumerate(experts)] \
        if bank_list is not None else []
    calls = [others.for_input(x, 100 + i) if others else ((), {}, []) for i, x in enumerate(inputs)]
    router_inputs = [c[2] for c in calls] if others else None
    try:
        with torch.no_grad():
            raw = [block(inputs[0], *calls[0][0], **calls[0][1])]
            for h in expert_hooks:
                h.remove()
            raw += [block(x, *c[0], **c[1]) for x, c in zip(inputs[1:], calls[1:])]
    except Exception as exc:  # noqa: BLE001
        return MatchResult.fail(f"block could not be called on a [.., {hidden}] input: {exc}")
    finally:
        for h in [hook, *expert_hooks]:
            if h is not None:
                h.remove()
    refs = [[t if i == 0 or read is None or i in read else None for i, t in enumerate(tensor_leaves(r))]
            for r in raw]
    pre = input_module(inputs[0], router_calls[0][0], leftovers) if router_calls else None
    if pre is None and not router_calls and _all_tensors(expert_inputs):
        pre = expert_input_module(inputs[0], expert_inputs, leftovers)
    posts = [None, *(m for m in leftovers if m is not pre)]
    pre_placements = _pre_placements(pre, inputs[0], expert_inputs,
                                     lambda x: block(x, *calls[0][0], **calls[0][1]))

    def routed(x: torch.Tensor) -> torch.Tensor:
        """What the router reads of a block input ``x``."""
        if pre is None:
            return x
        with torch.no_grad():
            return pre(x)

    if not refs[0] or refs[0][0].shape not in (inputs[0].shape, inputs[0].reshape(-1, hidden).shape):
        return MatchResult.fail("block's first output is shaped neither like its input nor like its tokens [T, H]")
    flat_output = refs[0][0].shape != inputs[0].shape
    unexported = None  # why a router module that computes its scores by code of its own gives no logits program
    if router.computes_logits:
        if not router_calls:
            return MatchResult.fail(f"router {router.path} ({type(router.module).__name__}) computes the experts' "
                                    "scores by code of its own, and the block never calls it")
        first = router_calls[0][0][0] if router_calls[0][0] else None
        if not isinstance(first, torch.Tensor) or first.shape[-1] != hidden:
            return MatchResult.fail(f"router {router.path} ({type(router.module).__name__}) computes the experts' "
                                    f"scores by code of its own from no [.., {hidden}] hidden states")
        try:
            router = replace(router, logits=export_logits(router.module, routed(inputs[0]).reshape(-1, hidden),
                                                          num_experts, *router_calls[0][:2]))
        except Exception as exc:  # noqa: BLE001 - what the router returns, or export, decides; both say why
            unexported = (f"router {router.path} ({type(router.module).__name__}) computes the experts' scores by "
                          f"code of its own, and exporting its scores failed: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")

    def scored_by_module(as_written_too: bool) -> MatchResult[BlockAnalysis] | None:
        """The block read again with its router module's own scores as the logits (``scores_by_module``), where
        that is another reading; with its routing as written only where ``as_written_too``."""
        if router.computes_logits or others or router.module is None or not router_calls:
            return None
        if not _scores_no_linear_gives(router, router_calls[0][2], routed(inputs[0]).reshape(-1, hidden)):
            return None
        r = _analyze_block(block, example, others, read, scores_by_module=True)
        return r if r and (as_written_too or r.value.router_program is None) else None

    routing_options = []
    observed = router.module is not None
    if observed:
        if len(router_calls) != len(inputs):
            return MatchResult.fail(f"router {router.path} is not called once per block call")
        x3 = inputs[0]
        obs = read_outputs(router_calls[0][2], x3.reshape(-1, hidden).shape[0], num_experts)
        # a router module that returns its logits only (DBRX's) leaves the selection to the block's own code
        observed = obs is not None
    as_written = None
    as_found = router
    if observed:
        def router_as_written(expert_candidates):
            return _with_router_as_written(block, as_found, obs, routed(x3).reshape(-1, hidden),
                                           router_calls[0][:2], num_experts, expert_candidates, shared.value, inputs,
                                           refs, raw, flat_output, others, router_inputs, pre, pre_placements)

    def finished(a: BlockAnalysis) -> MatchResult[BlockAnalysis]:
        if input_scale != 1.0 and not others:
            a = _refit_experts(block, a, inputs, input_scale, stacked.activations(bank_mod), all_candidates())
            # wider still, where an activation clipped past a few units (relu6) parts from its unclipped neighbour
            acts = stacked.activations(bank_mod) + stacked.activations(bank_mod, more=True)
            a = _refit_experts(block, a, inputs, input_scale * PROBE_WIDE, acts, [])
        return MatchResult.success(a)

    def own_routing() -> MatchResult[BlockAnalysis]:
        """The canonical experts fed by the routing read off the block's code (``_with_own_routing``)."""
        candidates = expert_candidates if isinstance(expert_candidates, list) else all_candidates
        return _with_own_routing(block, router, like, hidden, num_experts, candidates, expert_inputs, shared.value,
                                 inputs, refs, raw, flat_output)

    if refused:
        if observed:
            own = router_as_written(expert_candidates)
        elif others:
            own = MatchResult.fail("its routing reads its other arguments")
        else:
            own = own_routing()
        return finished(own.value) if own else MatchResult.fail(f"{refused}; with its routing as written: "
                                                                f"{own.reason}")
    if own_first and not observed and not others:
        # a block of the same structure fitted no canonical routing and took its own: so may this one, without the
        # search (thousands of candidates for a stacked bank); where it does not, the search runs as for any block
        own = own_routing()
        checked = _checked_again(block, own.value, inputs, refs) if own else None
        if checked is not None and checked[1] <= tolerance(like.dtype):
            return finished(own.value)
    if observed:
        fitted = None if unexported else fit_routing(router, obs, routed(x3).reshape(-1, hidden), num_experts, mods,
                                                     rtol)
        if fitted is None and router.bias is not None and router.bias_is_attribute:
            # a router module's own ``bias`` may bias the selection only (DeepSeek-V3's reference Gate)
            as_selection = replace(router, bias=None, selection_biases=[router.bias, *router.selection_biases])
            fitted = fit_routing(as_selection, obs, routed(x3).reshape(-1, hidden), num_experts, mods, rtol)
            router = as_selection if fitted is not None else router
        if fitted is None and (by_module := scored_by_module(as_written_too=False)) is not None:
            # a router MLP whose last layer is [E, H] returns scores no Linear of its input gives: its own scores,
            # routed canonically, before its whole routing as written
            return by_module
        if fitted is None:
            as_written = router_as_written(expert_candidates)
            if as_written:
                return as_written
            # what the router returns may not be (weights, ids) of the tokens at all (JetMoE's are pairs sorted by
            # expert): the routing is then searched for as for a router whose outputs were not read
            observed = False
            if not isinstance(expert_candidates, list):  # that search needs a generator of its own
                expert_candidates = all_candidates()
    if unexported and (scores_by_module or not observed):
        # a retry by the module's scores that gives none leaves the routing as written to the first reading
        return MatchResult.fail(unexported)
    if observed:
        spec, sel, per_expert = fitted
        xc = inputs[-1]
        obs_c = read_outputs(router_calls[-1][2], xc.reshape(-1, hidden).shape[0], num_experts)
        cap = None if obs_c is None else fit_capacity(router, spec, sel, obs_c, routed(xc).reshape(-1, hidden),
                                                      xc.shape[-2] if xc.dim() == 3 else 0, mods)
        if cap is None:
            return MatchResult.fail(f"router {router.path}: tokens it drops match no capacity rule "
                                    "(fixed or factor capacity, per sequence or per batch, token or slot order)")
        routing_options = [(spec, sel, per_expert, cap)]
    else:
        chosen = None
        if _all_tensors(expert_inputs):
            chosen = chosen_by_expert_calls(expert_inputs, routed(inputs[0]).reshape(-1, hidden))
        routing_options = _searched_routing(router, mods, num_experts, chosen)

    tried = 0
    budget = knobs.RECOGNIZE_SEARCH_S.get()
    deadline = time.monotonic() + budget
    out_of_time = False

    def candidates(router, routing_options, expert_candidates):
        nonlocal tried
        pairs = _pairs(routing_options, expert_candidates)
        for (spec, sel, per_expert, cap), (espec, ew) in itertools.islice(pairs, MAX_JOINT_CANDIDATES):
            tried += 1
            cap = cap if isinstance(cap, CapacitySpec) else CapacitySpec()
            variants = _variants(spec, cap, like.dtype, router.logits is None, router.weight.dtype)
            for (fp32, on_inputs), post, routes_only in itertools.product(variants, posts, pre_placements):
                for pass_input in _extra_kinds(extra, cap, on_inputs):
                    yield BlockAnalysis(replace(spec, logits_fp32=fp32, weights_on_inputs=on_inputs), router.weight,
                                        router.bias, sel, espec, ew, cap, shared.value,
                                        output_tuple=not isinstance(raw[0], torch.Tensor), flat_output=flat_output,
                                        post=post, pre=pre, pre_routes_only=routes_only, extra_experts=extra,
                                        extra_pass_input=pass_input, expert_scale=per_expert,
                                        logits_program=router.logits)

    def search(router, routing_options, expert_candidates) -> _Closest:
        nonlocal out_of_time
        closest = _Closest(like.dtype)
        for a in candidates(router, routing_options, expert_candidates):
            if closest.best is None and tried > 1 and time.monotonic() > deadline:
                # a block no candidate fits (a router-shaped weight that routes nothing) would try them all
                out_of_time = True
                break
            missed: list = []
            ok = _verify(block, a, inputs, refs, router_inputs, missed)
            # the routing was observed exactly (one candidate, so fitting output scales is cheap); else only a
            # block output that is a constant times this candidate's is fitted (a block that returns 1.5 * y)
            if ok is None and (observed or (missed and not a.shared and _scaled(missed[0], refs[0][0]))):
                ok = _with_output_scales(block, a, inputs, refs)
            if ok is None and missed and a.post is None:
                ok = _with_residual(block, a, posts[1:], missed[0], inputs, refs, router_inputs)
            elif ok is not None and ok[1] > closest.tight and a.post is None:
                # a pass within low precision's loose bound only: the block may add its input, which that bound
                # hides where the experts' output is much larger; the closer of the two is kept
                if closest.offer(ok):
                    break
                ok = _verify(block, replace(a, residual=True), inputs, refs, router_inputs)
            if closest.offer(ok):
                break
        return closest

    closest = search(router, routing_options, expert_candidates)
    if closest.analysis is None and observed and router is not as_found:
        # the selection-bias reading fitted the router's outputs, not the block (near ties in low precision): the
        # router as written still serves the canonical experts
        if not isinstance(expert_candidates, list):
            expert_candidates = all_candidates()
        as_written = router_as_written(expert_candidates)
        if as_written:
            return as_written
    loose = closest.best is not None and closest.best[1] > closest.tight
    if (closest.analysis is None or loose) and not observed and not others and router.logits is None:
        # also where a candidate passed low precision's loose bound only: a temperature the block applies to the
        # logits changes its routing weights by less than that bound
        affine = affine_router(block, router, inputs[0], routed(inputs[0]))
        if affine is not None:
            if not isinstance(expert_candidates, list):  # a generator, spent by the first search
                expert_candidates = all_candidates()
            by_affine = search(affine, _searched_routing(affine, mods, num_experts), expert_candidates)
            if by_affine.best is not None and (closest.best is None or by_affine.best[1] < closest.best[1] / 2):
                router, closest = affine, by_affine
    if closest.analysis is not None:
        if closest.best[1] > closest.tight and not others and closest.analysis.router_program is None:
            # within low precision's loose bound only, which also admits a neighbouring function (softmax for a
            # renormalised softplus): the block's own routing, where it routes otherwise
            own = own_routing()
            checked = _checked_again(block, own.value, inputs, refs) if own else None
            # the block's own routing computes its weights and ids with the block's own ops: within the dtype's
            # rounding, or it is no reading of them
            if checked is not None and checked[1] <= closest.tight and checked[1] < closest.best[1] / 2 \
                    and _routes_otherwise(own.value, closest.analysis, inputs[0]):
                return finished(own.value)
        return finished(closest.analysis)
    if as_written is None and (by_module := scored_by_module(as_written_too=True)) is not None:
        return by_module
    stopped = f", the search stopped after {budget:g} s (MOECC_RECOGNIZE_SEARCH_S)" if out_of_time else ""
    failed = as_written if as_written is not None else MatchResult.fail(
        f"no canonical form reproduces the block's outputs ({tried} candidates tried{stopped}; router "
        f"{router.path}, {num_experts} experts)")
    if others:
        return failed
    own = own_routing()
    if own:
        return finished(own.value)
    return MatchResult.fail(f"{failed.reason}; the routing read off its forward: {own.reason}")

