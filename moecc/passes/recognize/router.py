"""Find a block's router and fit its routing function to what the router module returns."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from moecc.ir import CapacitySpec, RoutingSpec
from moecc.match import MatchResult
from moecc.module_casts import idle_module_casts
from moecc.passes.recognize.probe import rel_err, snap, tolerance
from moecc.routing import SCORES, apply_capacity, route_reference, router_logits


@dataclass
class Router:
    weight: torch.Tensor  # [E, H]
    bias: torch.Tensor | None
    module: nn.Module | None  # the module that computes routing, when it is its own module
    selection_biases: list[torch.Tensor]
    path: str
    bias_is_attribute: bool = False  # ``bias`` is a router module's own attribute, not a Linear's bias
    # the router module computes its E scores by code of its own (an MLP): ``weight`` is only its last layer's
    # ``[E, F]``, and ``logits`` the module exported as ``tokens -> [tokens, E]`` once a call of it was seen
    computes_logits: bool = False
    logits: nn.Module | None = None

    def logits_of(self, x2: torch.Tensor, fp32: bool) -> torch.Tensor:
        """The router's logits for tokens ``x2`` (what it reads of them)."""
        if self.logits is not None:
            with torch.no_grad():
                return self.logits(x2)
        return router_logits(x2, self.weight, self.bias, fp32)


def find_router(block: nn.Module, num_experts: int, hidden: int | None, skip: set[int]) -> Router | None:
    """The ``[E, H]`` router weight outside the expert bank: a Linear to E outputs first, then a router module's
    ``weight``, then any other ``[E, H]`` (or ``[H, E]``) parameter of the block."""
    found: list[tuple[int, Router]] = []
    for path, mod in block.named_modules():
        if id(mod) in skip:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() != 2 or "bias" in pname.lower():
                continue
            w = None
            if p.shape[0] == num_experts and (hidden is None or p.shape[1] == hidden):
                w = p
            elif (p.shape[1] == num_experts and (hidden is None or p.shape[0] == hidden)
                  and not isinstance(mod, nn.Linear)):
                w = p.t()
            if w is None or w.shape[1] == num_experts and w.shape[0] != num_experts:
                continue
            bias = getattr(mod, "bias", None) if pname == "weight" else None
            bias = bias if isinstance(bias, torch.Tensor) and tuple(bias.shape) == (num_experts,) else None
            owner = None if mod is block else mod
            if type(mod) is nn.Linear:
                # a router module wraps its Linear; a bare Linear child means routing is written inline
                parent = path.rpartition(".")[0]
                owner = block.get_submodule(parent) if parent else None
            sel = _selection_biases(block, path, num_experts, bias)
            rank = 0 if type(mod) is nn.Linear else 1 if pname == "weight" else 2
            if rank == 2 and not re.search("gate|router|route|gating", pname.lower()):
                rank = 3
            found.append((rank, Router(w, bias, owner, sel, f"{path}.{pname}" if path else pname,
                                       bias is not None and not isinstance(mod, nn.Linear))))
    return min(found, key=lambda r: r[0])[1] if found else None


def router_over_more(block: nn.Module, num_experts: int, hidden: int, skip: set[int]) -> Router | None:
    """The router (``find_router``) of a block whose router scores more experts than its bank holds: the one
    ``[R, H]`` weight outside the bank with R > E rows (the extra R - E experts are identity experts)."""
    weights = [p for mod in block.modules() if id(mod) not in skip
               for pname, p in mod.named_parameters(recurse=False) if p.dim() == 2 and "bias" not in pname.lower()]
    rows = {int(p.shape[0]) for p in weights if p.shape[1] == hidden and p.shape[0] > num_experts}
    # R scores, not R features: no weight reads R inputs (the first layer of a router MLP does, ZAYA's)
    rows = {r for r in rows if not any(p.shape[1] == r for p in weights)}
    found = [r for r in (find_router(block, n, hidden, skip) for n in sorted(rows)) if r is not None]
    return found[0] if len(found) == 1 else None


def module_router(block: nn.Module, num_experts: int, hidden: int, skip: set[int], found: Router | None = None
                  ) -> Router | MatchResult:
    """A router module that computes its E scores by code of its own (a router MLP): the block's child that holds
    ``found``'s weight, by default the one ``[E, F]`` weight outside the bank (F not the hidden size, else a Linear
    router would have been found). A MatchResult says why there is none."""
    found = found or find_router(block, num_experts, None, skip)
    if found is None:
        return MatchResult.fail(f"no router: no [E={num_experts}, H={hidden}] weight outside the experts")
    child = found.path.split(".")[0] if "." in found.path else ""
    if not child:
        return MatchResult.fail(
            f"no router: no [E={num_experts}, H={hidden}] weight outside the experts; the block scores experts with "
            f"its [{', '.join(map(str, found.weight.shape))}] {found.path} in its own code, and no module of it "
            "computes the scores alone")
    return replace(found, module=block.get_submodule(child), bias=None, bias_is_attribute=False, path=child,
                   computes_logits=True)


def _selection_biases(block: nn.Module, path: str, num_experts: int, bias) -> list[torch.Tensor]:
    """``[E]`` (or ``[1, E]``) tensors that may bias expert selection, as ``[E]``: in the router weight's module
    and its children first (ERNIE 4.5 keeps it in a ``moe_statics`` child), then on each module above it up to the
    block (AFMoE's block holds ``expert_bias`` and passes it to its router module)."""
    found: list[torch.Tensor] = []
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        mod = block.get_submodule(".".join(parts[:depth]))
        inside = depth == len(parts) and depth > 0
        for _, t in itertools.chain(mod.named_buffers(recurse=inside), mod.named_parameters(recurse=inside)):
            if t.dim() in (1, 2) and t.shape[-1] == num_experts and t.numel() == num_experts and t is not bias \
                    and t.is_floating_point() and not any(t is f or t.data_ptr() == f.data_ptr() for f in found):
                found.append(t.reshape(num_experts))
    return found


@dataclass
class Observed:
    ids: torch.Tensor  # [n, k], dropped pairs = -1
    weights: torch.Tensor  # [n, k]
    dropped: bool
    alternatives: tuple = ()  # other float outputs shaped like the weights (e.g. logits when k == E)


def read_outputs(out, n: int, num_experts: int) -> Observed | None:
    """Read (ids, weights) off a router's outputs for ``n`` tokens, whatever order it returns them in."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    leaves = [t.reshape(n, -1) for t in leaves if t.numel() and t.numel() % n == 0]
    ints = [t for t in leaves if not t.is_floating_point()]
    floats = [t for t in leaves if t.is_floating_point()]
    ids = next((t for t in ints if t.shape[1] < num_experts or (t.max() > 1)), None)
    mask = next((t for t in ints if t.shape[1] == num_experts and t.max() <= 1), None)
    if ids is None and mask is not None:
        keep = mask.sum(-1, keepdim=True) > 0
        ids = torch.where(keep, mask.argmax(-1, keepdim=True), torch.full_like(keep, -1, dtype=torch.int64))
    if ids is None:
        return None
    same_shape = [t for t in floats if t.shape == ids.shape]
    if not same_shape:
        return None
    return Observed(ids.long(), same_shape[0], bool((ids < 0).any()), tuple(same_shape[1:]))


def _int_attrs(mods: list[nn.Module], pattern: str) -> list[int]:
    found = []
    for m in mods:
        for name, v in vars(m).items():
            if re.search(pattern, name.lower()) and isinstance(v, int) and not isinstance(v, bool) and v > 0:
                found.append(v)
    return found


def _float_attrs(mods: list[nn.Module], pattern: str) -> list[float]:
    found = []
    for m in mods:
        for name, v in vars(m).items():
            if re.search(pattern, name.lower()) and isinstance(v, float) and v > 0:
                found.append(v)
    return found


def topk_candidates(mods: list[nn.Module], num_experts: int) -> list[int]:
    named = _int_attrs(mods, r"(^|_)(top_?k|k|num_experts_per_tok|experts_per_tok(en)?|num_selected|n_activated)")
    rest = [k for k in range(1, min(num_experts, 8) + 1) if k not in named]
    return list(dict.fromkeys(k for k in named if k <= num_experts)) + rest


def group_candidates(mods: list[nn.Module], num_experts: int,
                     chosen: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """(n_group, topk_group) to try: none, those the modules' attributes name, then those that the experts each
    probe token chose (``chosen`` [n, k], where known) point to (``observed_groups``)."""
    out = [(1, 1)]
    for g in _int_attrs(mods, r"n_?group|num_groups?$|num_expert_group"):
        for tg in _int_attrs(mods, r"topk_?group"):
            if num_experts % g == 0 and tg <= g and (g, tg) not in out:
                out.append((g, tg))
    if chosen is not None:
        out += [g for g in observed_groups(chosen, num_experts) if g not in out]
    return out


def observed_groups(ids: torch.Tensor, num_experts: int) -> list[tuple[int, int]]:
    """(n_group, topk_group) that the chosen ids [n, k] themselves point to, for group-limited routing written with
    constants in a block's own code (no attribute names its groups): for each split of the experts into ``g`` equal
    groups of consecutive ids, the most groups any token's choices span, where that stays below k and at or below
    half the groups on every probe token (DeepSeek-V3 keeps 4 of 8, V2 3 of 8). Plain top-k over random probes
    spans more on some token; a false candidate would only cost search time, as every candidate is checked."""
    n, k = ids.shape
    out = []
    for g in range(2, num_experts):
        if num_experts % g or n == 0:
            continue
        groups = (ids // (num_experts // g)).sort(-1).values
        spanned = int((1 + (groups[:, 1:] != groups[:, :-1]).sum(-1)).max())
        if spanned < k and spanned <= g // 2:
            out.append((g, spanned))
    return out


def chosen_by_expert_calls(expert_inputs: list[list[torch.Tensor]], x2: torch.Tensor) -> torch.Tensor | None:
    """Ids [T, k] of the experts each token of ``x2`` [T, H] reached, read off the inputs each expert module was
    called with (a loop over a ModuleList of experts); None where an expert read rows that are not rows of ``x2``
    (its input scaled first, say) or tokens reached different numbers of experts."""
    hit = torch.zeros(x2.shape[0], len(expert_inputs), dtype=torch.bool, device=x2.device)
    for e, calls in enumerate(expert_inputs):
        for rows in calls:
            rows = rows.reshape(-1, x2.shape[-1])
            same = (rows[:, None, :] == x2[None, :, :]).all(-1)
            if not bool(same.any(-1).all()):
                return None
            hit[:, e] |= same.any(0)
    counts = hit.sum(-1)
    if x2.shape[0] == 0 or int(counts.min()) != int(counts.max()) or int(counts[0]) == 0:
        return None
    return hit.nonzero()[:, 1].reshape(x2.shape[0], -1)


def capacity_candidates(mods: list[nn.Module]) -> list[CapacitySpec]:
    out = [CapacitySpec()]
    fixed = _int_attrs(mods, r"capacity")
    factors = _float_attrs(mods, r"capacity_factor")
    cmins = _int_attrs(mods, r"min_capacity|capacity_min") or [0]
    for group, priority in itertools.product(("sequence", "all"), ("token", "slot")):
        for c in fixed:
            if c not in cmins:
                out.append(CapacitySpec(capacity=c, group=group, priority=priority, formula=f"{c}"))
        for cf, rounding in itertools.product(factors, ("ceil", "floor")):
            rounded = "ceiling" if rounding == "ceil" else "floor"
            out.append(CapacitySpec(capacity_factor=cf, capacity_min=cmins[0], group=group, priority=priority,
                                    formula=f"max({cmins[0]}, {rounded}(k*G*{cf:g}/E))", rounding=rounding))
    return out


def routing_candidates(num_experts: int, top_ks: list[int], sel_biases: list, groups, has_bias: bool,
                       logits_fp32: bool) -> Iterator[tuple[RoutingSpec, torch.Tensor | None]]:
    for k in top_ks:
        for sel in [None, *sel_biases]:
            # a group scored by its best two choices (DeepSeek-V3) or its best one (DeepSeek-V2's
            # group_limited_greedy), with or without a selection bias
            for (g, tg), group_top in ((gt, top) for gt in groups for top in ((2, 1) if gt[0] > 1 else (2,))):
                for score, topk_first, renorm in itertools.product(SCORES, (False, True),
                                                                   (True, False)):
                    # a softmax over the chosen ones needs no renormalisation; groups select on scores
                    if topk_first and ((renorm and score == "softmax") or g > 1):
                        continue
                    yield RoutingSpec(num_experts, k, score, topk_first, renorm, g, tg, 1.0, logits_fp32, has_bias,
                                      sel is not None, group_top=group_top), sel


Fitted = tuple[RoutingSpec, "torch.Tensor | None", "torch.Tensor | None"]  # spec, selection bias, expert scale


def fit_routing(router: Router, obs: Observed, x2: torch.Tensor, num_experts: int, mods: list[nn.Module],
                rtol: float, logits_fp32: bool | None = None) -> Fitted | None:
    """The routing spec (with its scale), selection bias and per-expert scale whose output equals the observed
    (ids, weights) on every routed token. ``logits_fp32``: whether the router's logits are computed in fp32, where
    the caller knows (None: fitted)."""
    for weights in (obs.weights, *obs.alternatives):
        fitted = _fit_one(router, Observed(obs.ids, weights, obs.dropped), x2, num_experts, mods, rtol, logits_fp32)
        if fitted is not None:
            return fitted
    return None


def _fit_one(router: Router, obs: Observed, x2: torch.Tensor, num_experts: int, mods: list[nn.Module],
             rtol: float, logits_fp32: bool | None = None) -> Fitted | None:
    """The candidate that selects the observed experts and whose weights, times a scale (and maybe times one of the
    router's ``[E]`` tensors at each chosen expert), come closest to the observed ones (a later one must halve an
    error above rounding), if within ``rtol``. The closest, not the first within ``rtol``: a bound loose
    enough for bf16 weights (near-tied logits round apart) also admits neighbours of the right function on a
    router whose scores are nearly uniform (a random one): the top-2 of 6 softmax scores renormalised and times
    0.37 lie within 16 % of the scores themselves."""
    k = obs.ids.shape[1]
    keep = (obs.ids >= 0).all(-1)
    obs_ids, obs_w = obs.ids[keep], obs.weights[keep].float()
    order = obs_ids.argsort(-1)
    obs_ids, obs_w = obs_ids.gather(1, order), obs_w.gather(1, order)
    # a bf16 router picks its experts from bf16 logits: near-ties then split differently than in fp32
    precisions = (True, False) if x2.dtype == router.weight.dtype != torch.float32 else (True,)
    if logits_fp32 is not None:
        precisions = (logits_fp32 or x2.dtype == torch.float32,)
    best: tuple[float, RoutingSpec, torch.Tensor | None, torch.Tensor | None] | None = None
    exact = tolerance(x2.dtype) / 10
    groups = group_candidates(mods, num_experts, obs_ids)
    for fp32 in precisions:
        logits = router.logits_of(x2, fp32).float()
        for spec, sel in routing_candidates(num_experts, [k], router.selection_biases, groups,
                                            router.bias is not None, fp32):
            w, ids = route_reference(logits, sel, spec.top_k, spec.score, spec.topk_first, spec.renormalize,
                                     spec.n_group, spec.topk_group, 1.0, spec.group_top)
            ids_k, w_k = ids[keep], w[keep]
            o = ids_k.argsort(-1)
            if not torch.equal(ids_k.gather(1, o), obs_ids):
                continue
            w_k = w_k.gather(1, o)
            for per_expert in (None, *(b for b in router.selection_biases if b is not sel)):
                w_e = w_k if per_expert is None else w_k * per_expert.float()[obs_ids]
                fit = _scale_fit(w_e, obs_w, rtol, obs.weights.dtype)
                if fit is None:
                    continue
                scale, err = fit
                # equal forms (top-k then softmax, softmax then top-k renormalised) differ by rounding: the first
                # stays, and so does no per-expert scale where one of ones fits as well
                if best is None or (best[0] > exact and err < best[0] / 2):
                    best = (err, replace(spec, scale=scale, has_expert_scale=per_expert is not None), sel, per_expert)
    return None if best is None else best[1:]


def _scale_fit(w: torch.Tensor, obs_w: torch.Tensor, rtol: float, dtype: torch.dtype) -> tuple[float, float] | None:
    """(scale, relative error) of ``w * scale`` as ``obs_w``, within ``rtol``; a scale of 1 that fits is 1, not the
    rounding noise of low-precision weights around it."""
    if torch.allclose(w, obs_w, rtol=rtol, atol=rtol * 1e-2):
        return 1.0, rel_err(w, obs_w)
    scale = snap((obs_w.sum() / w.sum()).item(), dtype) if w.sum() != 0 else 1.0
    if not torch.allclose(w * scale, obs_w, rtol=rtol, atol=rtol * 1e-2):
        return None
    return scale, rel_err(w * scale, obs_w)


def fit_capacity(router: Router, spec: RoutingSpec, sel, obs: Observed, x2: torch.Tensor, seq_len: int,
                 mods: list[nn.Module]) -> CapacitySpec | None:
    """The capacity rule that drops exactly the pairs the router dropped (observed on colliding tokens)."""
    logits = router.logits_of(x2, True)
    _, ids = route_reference(logits, sel, spec.top_k, spec.score, spec.topk_first, spec.renormalize, spec.n_group,
                             spec.topk_group, 1.0, spec.group_top)
    for cap in capacity_candidates(mods):
        if cap.dropless:
            if not obs.dropped:
                return cap
            continue
        got = apply_capacity(ids, spec.num_experts, cap.capacity, cap.capacity_factor, cap.capacity_min,
                             0 if cap.group == "all" else seq_len, cap.priority, cap.rounding)
        if torch.equal(torch.where(got >= spec.num_experts, -1, got), obs.ids):
            return cap
    return None


def export_router(router: nn.Module, x2: torch.Tensor, obs: Observed, args: tuple, kwargs: dict,
                  others: tuple = (), token_dims: int = 1):
    """The router module as an ATen graph (its own code, token dim symbolic) returning (weights, ids): the
    routing of a router no pattern matches, kept exactly as written. ``args``/``kwargs``: a call of the router
    by its block; the hidden states (the first argument) keep that call's rank, with all tokens in one row of a
    3D input, and the other arguments (an ``expert_bias`` the block passes, say) are bound as they were, except
    ``others``: token-shaped arguments of the block (``token_dims`` leading token dims), which the program takes
    as inputs of their own, flat over the tokens, after ``x``, wherever the router reads them."""
    def pick(leaves: list[torch.Tensor], n: int):
        w_pos = next(i for i, t in enumerate(leaves) if t.numel() == obs.weights.numel() and t.is_floating_point()
                     and torch.equal(t.reshape(n, -1), obs.weights))
        i_pos = next(i for i, t in enumerate(leaves) if not t.is_floating_point() and t.numel() == obs.ids.numel())
        return lambda out, n: (out[w_pos].reshape(n, -1).float(), out[i_pos].reshape(n, -1).long())

    return _export_outputs(router, x2, args, kwargs, pick, others, token_dims)


def export_logits(router: nn.Module, x2: torch.Tensor, num_experts: int, args: tuple, kwargs: dict) -> nn.Module:
    """A router module that computes its scores by code of its own, as an ATen graph ``tokens [n, H] -> logits
    [n, E]``: its first floating output with E values per token. ``args``/``kwargs``: a call of it by its block
    (``export_router``). Raises ValueError when it returns no such output."""
    def pick(leaves: list[torch.Tensor], n: int):
        pos = next((i for i, t in enumerate(leaves) if t.is_floating_point() and t.numel() == n * num_experts), None)
        if pos is None:
            raise ValueError(f"it returns no [.., {num_experts}] floating output (its scores)")
        if leaves[pos].shape == (n, num_experts):  # no reshape between the scores and the route: fuse_gating's
            return lambda out, n: (out[pos],)
        return lambda out, n: (out[pos].reshape(n, num_experts),)

    return _FirstOutput(_export_outputs(router, x2, args, kwargs, pick))


class _FirstOutput(nn.Module):
    """A program's one output: an exported graph returns its outputs flat, as a tuple."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)[0]


def _export_outputs(router: nn.Module, x2: torch.Tensor, args: tuple, kwargs: dict, pick, others: tuple = (),
                    token_dims: int = 1):
    """The router module called as its block called it (``export_router``), exported: ``pick``, handed the
    tensor outputs of a first call for ``n`` tokens, returns ``select(outputs, n)``, what the program returns."""
    leaves_of = lambda out: [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]  # noqa: E731
    rank = args[0].dim() if args and isinstance(args[0], torch.Tensor) else 2
    bound, spec = torch.utils._pytree.tree_flatten((args[1:], kwargs))
    slots = [next((j for j, o in enumerate(others) if v is o), None) if isinstance(v, torch.Tensor) else None
             for v in bound]
    lead = [1] * (rank - 2)

    def call(inner, x, *flat_others):
        values = [v if s is None else flat_others[s].reshape(*lead, *flat_others[s].shape)
                  for v, s in zip(bound, slots)]
        rest, kw = torch.utils._pytree.tree_unflatten(values, spec)
        return inner(x.reshape(*lead, *x.shape), *rest, **kw)

    flat_others = [o.flatten(0, token_dims - 1) for o in others]
    with torch.no_grad():
        select = pick(leaves_of(call(router, x2, *flat_others)), x2.shape[0])

    class RoutingOf(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, *flat):
            return select(leaves_of(call(self.inner, x, *flat)), x.shape[0])

    tokens = torch.export.Dim.AUTO if not others else torch.export.Dim("tokens")
    with torch.no_grad(), idle_module_casts():
        # export nests the *flat of forward in a tuple of its own, and leaves it out when it is empty
        shapes = ({0: tokens}, tuple({0: tokens} for _ in flat_others)) if flat_others else ({0: tokens},)
        ep = torch.export.export(RoutingOf(router), (x2, *flat_others), dynamic_shapes=shapes, strict=False)
    gm = ep.module()
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()
    for node in [nd for nd in gm.graph.nodes if nd.op == "call_module" and nd.target == "_guards_fn"]:
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()  # what the router computes beside the outputs kept (its top-k beside its logits)
    gm.recompile()
    return gm
