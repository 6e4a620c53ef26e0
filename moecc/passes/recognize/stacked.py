"""Recognize experts stored as stacked 3D weights ``[E, ., .]`` (or flat ``[E*F, .]``) by enumerating the layouts
they can mean.

Each candidate is a spec plus a builder of canonical weights for any subset of experts, so a layout is tried on
one expert's slices and only the winner is built in full (a copy only where the stored layout differs from the
canonical one). The caller keeps the candidate whose function matches the module's own; an exotic layout is
rejected, never guessed."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moecc.activations import GATED_ONLY, MORE_ACTIVATIONS, PLAIN_ACTIVATIONS
from moecc.ir import ExpertSpec, ExpertWeights
from moecc.passes.recognize import clamp
from moecc.passes.recognize.activation import more_activations
from moecc.passes.recognize.probe import PROBE_PRE_ACTIVATION_STD

_GATED_LAYOUTS = ("concat_gate_first", "concat_up_first", "interleaved_gate_even", "interleaved_up_even")


@dataclass
class Candidate:
    spec: ExpertSpec
    build: Callable[[slice], ExpertWeights]  # canonical weights of the experts in the slice


def entries(lst: nn.Module) -> list[nn.Module]:
    """The modules a ModuleList or ModuleDict holds, in order, one tied to another repeated (``children()`` lists
    a module once): a bank whose router slots share an expert (merged experts) has one entry per slot."""
    return [m for m in lst._modules.values() if m is not None]


def _stacked(named, num_experts: int | None) -> dict[str, torch.Tensor]:
    """The ``[E, ., .]`` weights of ``named``. For a known E, also the first E experts of a weight that holds more,
    beside one of exactly E (LongCat-Flash's up projections also count its identity experts, which compute
    nothing)."""
    found = {n: p for n, p in named if p.dim() == 3 and p.shape[0] >= 2
             and (num_experts is None or p.shape[0] >= num_experts)}
    if num_experts is None or not any(p.shape[0] == num_experts for p in found.values()):
        return {n: p for n, p in found.items() if num_experts is None or p.shape[0] == num_experts}
    return {n: p[:num_experts] for n, p in found.items()}


def stacked_params(module: nn.Module, num_experts: int | None = None,
                   materialize: bool = True) -> dict[str, torch.Tensor]:
    """The module's ``[E, ., .]`` weights; without any, those of its children that hold one each (JetMoE keeps
    its up and down projections in two sub-modules), else its ``projection_lists`` stacked (a copy; shapes alone on
    the meta device unless ``materialize``); for a known E without any of these, its flat ``[E*F, .]`` ones
    (``flat_params``)."""
    found = _stacked(module.named_parameters(recurse=False), num_experts)
    if not found:
        singles = {}
        for name, child in module.named_children():
            own = _stacked(child.named_parameters(recurse=False), num_experts)
            if len(own) == 1:
                ((n, p),) = own.items()
                singles[f"{name}.{n}"] = p
        found = singles if len(singles) >= 2 else {}
    if not found:
        lists = projection_lists(module)
        if lists and (num_experts is None or len(next(iter(lists.values()))) == num_experts):
            found = {f"{name}.weight": _stack([lin.weight for lin in entries(lst)], materialize)
                     for name, lst in lists.items()}
    if not found:
        found = {n: w for n, w in _parameter_list_weights(module, materialize, 2).items()
                 if num_experts is None or w.shape[0] == num_experts}
    return found if found or num_experts is None else flat_params(module, num_experts)


def parameter_shapes(kids: list[nn.Module]) -> list[tuple[str, tuple[int, ...]]] | None:
    """The (name, shape) of each parameter the modules all hold, when they hold the same ones; else None."""
    shapes = [[(n, tuple(p.shape)) for n, p in k.named_parameters()] for k in kids]
    return shapes[0] if all(s == shapes[0] for s in shapes) else None


def parameter_lists(module: nn.Module) -> dict[str, nn.Module]:
    """Child lists of expert modules that hold their weights as bare parameters (``F.linear(x, self.w1)``,
    ``x @ self.w1``), no Linear: two or more modules of the same parameter names and shapes, two or more of them
    matrices. A bank like ``projection_lists``, one module per expert."""
    lists = {}
    for name, child in module.named_children():
        kids = entries(child) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else []
        if len(kids) < 2 or any(isinstance(m, nn.Linear) for k in kids for m in k.modules()):
            continue
        shapes = parameter_shapes(kids)
        if shapes and sum(len(shape) == 2 for _, shape in shapes) >= 2:
            lists[name] = child
    return lists


def _parameter_list_weights(module: nn.Module, materialize: bool, dim: int) -> dict[str, torch.Tensor]:
    """The ``dim``-dimensional parameters of ``parameter_lists``, stacked ``[E, ...]`` under ``<list>.<name>``
    (a copy)."""
    out = {}
    for name, lst in parameter_lists(module).items():
        kids = entries(lst)
        for pname, p in kids[0].named_parameters():
            if p.dim() == dim:
                out[f"{name}.{pname}"] = _stack([k.get_parameter(pname) for k in kids], materialize)
    return out


PROBE_SCALE_ROWS = 256


def probe_scale(module: nn.Module, hidden: int, num_experts: int) -> float:
    """The standard deviation of probe inputs whose pre-activations spread about ``PROBE_PRE_ACTIVATION_STD`` in
    every projection that may read the hidden states: ``[E, ., H]`` or ``[E, H, .]`` weights, by the largest RMS
    norm of their rows (or columns) over H. 1.0 when the module holds none."""
    lists = projection_lists(module)
    # expert 0 alone: stacking a bank kept as lists would copy all of it
    banks = [entries(lst)[0].weight[None] for lst in lists.values()] if lists else \
        list(stacked_params(module, num_experts).values())
    norms = []
    for w in banks:
        for view in _orient(w.detach(), hidden, as_stored=bool(lists)):
            rows = view[0, :PROBE_SCALE_ROWS].double()  # a sample: a whole bank in float64 would be gigabytes
            norms.append(rows.pow(2).sum(1).mean().sqrt().item())
    largest = max(norms, default=0.0)
    return PROBE_PRE_ACTIVATION_STD / largest if largest > 0 else 1.0


def projection_lists(module: nn.Module) -> dict[str, nn.Module]:
    """Child lists holding one Linear per expert (``w1[e]``, ``w2[e]``, ``w3[e]``): an expert bank kept as one list
    per projection rather than one module per expert. Two or more lists of one length, each of one weight shape."""
    by_length: dict[int, dict[str, nn.Module]] = {}
    for name, child in module.named_children():
        kids = entries(child) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else []
        if len(kids) >= 2 and all(isinstance(k, nn.Linear) for k in kids) \
                and len({(k.weight.shape, k.bias is None) for k in kids}) == 1:
            by_length.setdefault(len(kids), {})[name] = child
    lists = max(by_length.values(), key=len, default={})
    return lists if len(lists) >= 2 else {}


def _stack(tensors: list[torch.Tensor], materialize: bool) -> torch.Tensor:
    if materialize:
        return torch.stack([t.detach() for t in tensors])
    return torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, device="meta")


def _listed_biases(module: nn.Module, num_experts: int) -> dict[str, torch.Tensor]:
    """The biases of ``projection_lists``, stacked ``[E, out]``."""
    return {f"{name}.bias": _stack([lin.bias for lin in entries(lst)], True)
            for name, lst in projection_lists(module).items()
            if len(lst) == num_experts and entries(lst)[0].bias is not None}


def flat_params(module: nn.Module, num_experts: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Weights of ``num_experts`` experts stored flat, ``[E*F, width]`` with F >= 2 (DBRX's), as ``[E, F, width]``
    views."""
    return {n: p.view(num_experts, -1, p.shape[1]) for n, p in module.named_parameters(recurse=False)
            if p.dim() == 2 and p.shape[0] % num_experts == 0 and p.shape[0] >= 2 * num_experts
            and (width is None or p.shape[1] == width)}


def flat_bank(module: nn.Module, num_experts: int, hidden: int) -> dict[str, torch.Tensor]:
    """``flat_params`` of ``num_experts`` experts that read or write ``hidden`` when they can be a bank: two or
    more, all of one shape; else none."""
    flat = flat_params(module, num_experts, hidden)
    return flat if len(flat) >= 2 and len({p.shape for p in flat.values()}) == 1 else {}


def _orient(w: torch.Tensor, in_dim: int, as_stored: bool = False) -> list[torch.Tensor]:
    """[E, out, in] views of ``w``: as stored, and transposed when it may be stored [E, in, out] (never for
    ``as_stored``: Linear weights stacked from ``projection_lists``)."""
    out = [w] if w.shape[2] == in_dim else []
    if w.shape[1] == in_dim and not as_stored:
        out.append(w.transpose(1, 2))
    return out


def _orient_out(w: torch.Tensor, out_dim: int, as_stored: bool = False) -> list[torch.Tensor]:
    """[E, out, in] views of ``w`` whose output dimension is ``out_dim``."""
    out = [w] if w.shape[1] == out_dim else []
    if w.shape[2] == out_dim and not as_stored:
        out.append(w.transpose(1, 2))
    return out


def _gate_first(w: torch.Tensor, layout: str, dim: int) -> torch.Tensor:
    """Rows re-ordered to [gate | up] along ``dim``; the stored tensor itself when it already is."""
    if layout == "concat_gate_first":
        return w
    half = w.shape[dim] // 2
    if layout == "concat_up_first":
        gate, up = w.narrow(dim, half, half), w.narrow(dim, 0, half)
    else:
        even = w.index_select(dim, torch.arange(0, w.shape[dim], 2, device=w.device))
        odd = w.index_select(dim, torch.arange(1, w.shape[dim], 2, device=w.device))
        gate, up = (even, odd) if layout == "interleaved_gate_even" else (odd, even)
    return torch.cat([gate, up], dim)


def _float_attr(module: nn.Module, word: str) -> float | None:
    for name, value in vars(module).items():
        if word in name.lower() and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def names_limit(module: nn.Module) -> bool:
    """Whether the module holds its activation's clamp limit as an attribute (HF GPT-OSS's ``limit``)."""
    return _float_attr(module, "limit") is not None


def activations(module: nn.Module, more: bool = False) -> list[tuple[str, float, float]]:
    """(activation, alpha, limit) candidates: GPT-OSS's swiglu at the limit the module names, else at its published
    constants, which a fit must then prove (``clamp.proven_clamp``); a soft-capped swiglu at the caps it names.
    ``more``: instead, the activations past the plain ones (``MORE_ACTIVATIONS``), unclamped, at the parameters the
    module's sub-modules show or at their defaults."""
    if more:
        return [(act, param, 0.0) for act, param in more_activations(module, MORE_ACTIVATIONS)]
    limit = _float_attr(module, "limit")
    alpha = _float_attr(module, "alpha")
    acts = [(act, 1.0, 0.0) for act in PLAIN_ACTIVATIONS]
    if limit is None:
        acts.append(("swiglu_oai", alpha if alpha is not None else clamp.DEFAULT_ALPHA, clamp.DEFAULT_LIMIT))
    elif limit > 0:
        acts.append(("swiglu_oai", alpha if alpha is not None else clamp.DEFAULT_ALPHA, limit))
        acts += [(act, 1.0, limit) for act in PLAIN_ACTIVATIONS]
    return acts + softcapped(module)


def softcapped(module: nn.Module) -> list[tuple[str, float, float]]:
    """``swiglu_softcap`` candidates at the caps the module or its sub-modules name: each pair of a positive number
    under a name with "cap" whose path says "gate" and one whose path says "up" (Inkling 2's ``act_fn.gate_softcap``
    and ``act_fn.up_softcap``, each a module holding ``softcap``)."""
    caps = [(set(re.split(r"[._]", f"{path}.{name}".lower())), float(value)) for path, m in module.named_modules()
            for name, value in vars(m).items()
            if "cap" in name.lower() and "capacity" not in name.lower() and isinstance(value, (int, float))
            and not isinstance(value, bool) and value > 0]
    gate = {v for words, v in caps if "gate" in words}
    up = {v for words, v in caps if "up" in words and "gate" not in words}
    return [("swiglu_softcap", g, u) for g in sorted(gate) for u in sorted(up)]


def candidates(module: nn.Module, hidden: int, num_experts: int, more: bool = False) -> Iterator[Candidate]:
    """Every layout under every activation of ``activations(module, more)``."""
    params = stacked_params(module, num_experts)
    biases = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 2 and p.shape[0] == num_experts}
    listed = _listed_biases(module, num_experts)
    biases.update(listed)
    biases.update({n: b for n, b in _parameter_list_weights(module, True, 1).items() if b.shape[0] == num_experts})
    # Linear weights are [out, in]: stacked from lists, no transposed reading of them is tried
    stored = {n for n in params if n.removesuffix(".weight") in projection_lists(module)}
    acts = activations(module, more)
    # a bias added to the block's output once (JetMoE's [H]) is every expert's down bias when the routing weights
    # sum to 1; the block check decides
    shared_bias = [p.expand(num_experts, hidden) for p in module.parameters(recurse=False)
                   if p.dim() == 1 and p.shape[0] == hidden]
    for down_name in params:
        others = [n for n in params if n != down_name]
        for down in _orient_out(params[down_name], hidden, down_name in stored):
            # when 2I == H both biases are [E, H]: each may be the down projection's, or neither
            for b_down in [*(b for b in biases.values() if b.shape[1] == hidden), *shared_bias, None]:
                yield from _up_candidates(others, params, biases, hidden, down.shape[2], down, b_down, acts, stored,
                                          listed)


def _up_biases(biases: dict[str, torch.Tensor], rows: int, b_down: torch.Tensor | None) -> list:
    """The biases that may belong to an up projection of ``rows`` outputs (not the down projection's), else None."""
    return [b for b in biases.values() if b.shape[1] == rows and b is not b_down] or [None]


def _up_candidates(others, params, biases, hidden, inter, down, b_down, acts, stored, listed):
    has_bias = lambda b_up: b_up is not None or b_down is not None  # noqa: E731
    if len(others) == 1:
        for up, b_up in ((w, b) for w in _orient(params[others[0]], hidden, others[0] in stored)
                         for b in _up_biases(biases, w.shape[1], b_down)):
            u = up.shape[1]
            if u == 2 * inter:
                for layout, (act, alpha, limit) in itertools.product(_GATED_LAYOUTS, acts):
                    def build(sl, up=up, b_up=b_up, layout=layout):
                        return ExpertWeights(_gate_first(up[sl], layout, 1), down[sl],
                                             None if b_up is None else _gate_first(b_up[sl], layout, 1),
                                             None if b_down is None else b_down[sl])
                    yield Candidate(ExpertSpec(hidden, inter, act, True, has_bias(b_up), alpha, limit), build)
            if u == inter:
                for act, alpha, limit in acts:
                    if limit == 0 and act not in GATED_ONLY:
                        def build(sl, up=up, b_up=b_up):
                            return ExpertWeights(up[sl], down[sl], None if b_up is None else b_up[sl],
                                                 None if b_down is None else b_down[sl])
                        yield Candidate(ExpertSpec(hidden, inter, act, False, has_bias(b_up), alpha), build)
    elif len(others) == 2:
        for gate_name, up_name in itertools.permutations(others):
            for b_cat in _gate_up_biases(gate_name, up_name, biases, listed, inter, b_down):
                for g in _orient(params[gate_name], hidden, gate_name in stored):
                    for v in _orient(params[up_name], hidden, up_name in stored):
                        if g.shape[1] != inter or v.shape[1] != inter:
                            continue
                        for act, alpha, limit in acts:
                            def build(sl, g=g, v=v, b_cat=b_cat):
                                return ExpertWeights(torch.cat([g[sl], v[sl]], 1), down[sl],
                                                     None if b_cat is None else b_cat[sl],
                                                     None if b_down is None else b_down[sl])
                            yield Candidate(ExpertSpec(hidden, inter, act, True, has_bias(b_cat), alpha, limit),
                                            build)


def _gate_up_biases(gate_name, up_name, biases, listed, inter, b_down) -> list:
    """``[E, 2I]`` biases ``[gate | up]`` that separate gate and up projections may add: the biases of their lists
    when they are Linear lists; else each ``[E, I]`` bias as either one's (zeros for the other), both, or none."""
    listed_pair = [listed.get(n.removesuffix(".weight") + ".bias") for n in (gate_name, up_name)]
    if any(b is not None for b in listed_pair) or listed:
        return [torch.cat(listed_pair, 1) if all(b is not None for b in listed_pair) else None]
    fits = [b for b in biases.values() if b.shape[1] == inter and b is not b_down]
    zero = lambda b: torch.zeros_like(b)  # noqa: E731
    pairs = [(b, zero(b)) for b in fits] + [(zero(b), b) for b in fits]
    pairs += [(g, u) for g, u in itertools.permutations(fits, 2)]
    return [None, *(torch.cat(pair, 1) for pair in pairs)]
