"""An expert bank the model hands its routing, ``bank(x, ids, weights)``, recognized without its router.

Where a block's own analysis fails (Gemma 4 routes in its decoder layer, beside attention and a dense MLP; Inkling's
router also weighs its shared experts), the experts alone may still be canonical. Capture then keeps the bank as the
leaf instead of the block (``moecc.capture.CaptureHints.routed_banks``), the routing is traced into the graph as the
model's own ops, and this module proves ``dispatch -> expert_ffn -> combine`` equal to the bank on ids and weights
drawn afresh, never on the example's routing."""

from __future__ import annotations

import inspect
import itertools
import math
import weakref
from dataclasses import replace

import torch
from torch import nn
from torch.utils import _pytree as pytree

from moecc.canonical import BlockAnalysis, CanonicalMoE
from moecc.ir import RoutingSpec
from moecc.match import MatchResult
from moecc.passes.recognize import expert_post, stacked
from moecc.passes.recognize.bank import bank_and_ancestors, find_bank, find_expert_list, is_moe_block
from moecc.passes.recognize.block import stacked_winner, unfit_parameters, wide_probe
from moecc.passes.recognize.mlp import stack_mlps
from moecc.passes.recognize.probe import close, rel_err, tolerance
from moecc.passes.recognize.router import find_router


def routing_positions(call: tuple) -> tuple[int, int] | None:
    """(weights, ids) places among the flat leaves of a call's ``(args[1:], kwargs)``: its only two tensors, one
    floating and one integer, both shaped ``[*token dims, k]`` of the hidden states ``args[0]``, or ``[tokens, k]``
    (DBRX routes the tokens flattened and hands its experts the hidden states as they came)."""
    args, kwargs = call
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    lead = tuple(args[0].shape[:-1])
    leaves = pytree.tree_leaves((args[1:], kwargs))
    tensors = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    if len(tensors) != 2:
        return None
    a, b = (leaves[i] for i in tensors)
    if a.shape != b.shape or tuple(a.shape[:-1]) not in (lead, (math.prod(lead),)):
        return None
    if a.is_floating_point() == b.is_floating_point() or a.dtype == torch.bool or b.dtype == torch.bool:
        return None
    return tuple(tensors) if a.is_floating_point() else (tensors[1], tensors[0])


def routing_orders(module: nn.Module) -> list[tuple[int, int]]:
    """(weights, ids) places among the arguments after ``x`` to try when calling ``module`` positionally: ids first
    (Hugging Face's ``experts(x, top_k_index, top_k_weights)``), then weights first."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return []
    return [(1, 0), (0, 1)] if len(params) >= 3 else []


def routed_bank(block: nn.Module) -> str | None:
    """The path inside ``block`` of the module nearest its expert bank that takes ``(x, ids, weights)`` (in either
    order) and whose experts read as canonical ones when it is called so: the module a routed-bank capture keeps
    as the leaf. None when there is none, so that no capture is spent on experts that cannot fuse."""
    bank = find_bank(block)
    if bank is None:
        return None
    bank_mod, num_experts, _ = bank
    like = next(bank_mod.parameters(), None)
    if like is None or bank_mod is block:
        return None
    # the hidden size a router reads, then each size of the bank's weights (the experts may read a projection of
    # what the router reads: Muse Spark's)
    router = find_router(block, num_experts, None, {id(m) for m in bank_mod.modules()})
    sizes = sorted({int(d) for p in bank_mod.parameters() if p.dim() >= 2 for d in p.shape[-2:]})
    if router is not None:
        sizes = [int(router.weight.shape[1]), *(d for d in sizes if d != router.weight.shape[1])]
    path = {id(m): name for name, m in block.named_modules()}
    for mod in bank_and_ancestors(block, bank_mod):
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            continue
        for hidden, order in itertools.product(sizes, routing_orders(mod)):
            x = torch.randn(4, hidden, dtype=like.dtype, device=like.device)
            ids = torch.zeros(4, 1, dtype=torch.long, device=like.device)
            w = torch.ones(4, 1, dtype=like.dtype, device=like.device)
            call = ((x, *((w, ids) if order == (0, 1) else (ids, w))), {})
            try:
                if _expert_candidates(mod, _Caller(mod, call, order), hidden, like):
                    return path[id(mod)]
            except Exception:  # noqa: BLE001, S112 - the module has another calling convention
                continue
    return None


class _Caller:
    """Calls the bank as the model did, with the routing replaced: ``(x, ids, weights) -> y``."""

    def __init__(self, bank: nn.Module, call: tuple, positions: tuple[int, int]):
        args, kwargs = call
        self.bank, self.positions = bank, positions
        self.leaves, self.spec = pytree.tree_flatten((args[1:], kwargs))
        self.x = args[0]
        self.weights, self.ids = (self.leaves[i] for i in positions)

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[-1])

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        leaves = list(self.leaves)
        leaves[self.positions[0]], leaves[self.positions[1]] = weights, ids
        rest, kwargs = pytree.tree_unflatten(leaves, self.spec)
        with torch.no_grad():
            return self.bank(x, *rest, **kwargs)

    def routing(self, x: torch.Tensor, num_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (ids, weights) for ``x``: k distinct experts per token and positive weights, in the example's
        dtypes and ranks."""
        g = torch.Generator().manual_seed(seed)
        lead = x.shape[:-1] if self.ids.dim() == self.x.dim() else (math.prod(x.shape[:-1]),)
        k = min(self.top_k, num_experts)
        ids = torch.rand(*lead, num_experts, generator=g).argsort(-1)[..., :k]
        weights = torch.rand(*lead, k, generator=g) + 0.1
        return (ids.to(device=self.ids.device, dtype=self.ids.dtype),
                weights.to(device=self.weights.device, dtype=self.weights.dtype))


# each bank's experts as read for a width, until the compile ends (``forget_reads``, which ``build`` calls): the
# search for a block's experts and their analysis in the capture that follows read the same bank (E calls and a
# layout search each), and a reading may hold a copy of the bank's weights
_READ: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forget_reads() -> None:
    _READ.clear()


def _expert_candidates(bank: nn.Module, caller: _Caller, hidden: int, like: torch.Tensor):
    """The (spec, weights) of the bank's experts, each expert's function read by routing every token to it. A read
    that succeeded is reused within the compile: the caller proves it on the routing of its own call either way."""
    kept = _READ.get(bank)
    if kept is not None and kept[0] == hidden:
        return kept[1]
    found = _read_experts(bank, caller, hidden, like)
    if found:
        _READ[bank] = (hidden, found)
    return found


def _read_experts(bank: nn.Module, caller: _Caller, hidden: int, like: torch.Tensor):
    listed = find_expert_list(bank)
    if listed is not None:
        r = stack_mlps(listed[1], hidden)
        return r if not r else MatchResult.success(((*r.value, None), len(listed[1])))
    found = find_bank(bank)
    banks = [found[:2]] if found is not None else _counted_flat_banks(bank, hidden)
    if not banks:
        return MatchResult.fail("no expert bank: neither a ModuleList of MLPs nor stacked [E, ., .] weights")
    for bank_mod, num_experts in banks:
        read = _read_stacked(bank, bank_mod, num_experts, caller, hidden, like)
        if read:
            break
    return read


def _read_stacked(bank: nn.Module, bank_mod: nn.Module, num_experts: int, caller: _Caller, hidden: int,
                  like: torch.Tensor):
    """The experts of ``bank`` whose weights ``bank_mod`` holds for ``num_experts`` experts, each read by routing
    probe tokens to it through ``caller``."""
    x = torch.randn(5, hidden, dtype=torch.float64) * stacked.probe_scale(bank_mod, hidden, num_experts)
    x = x.to(dtype=like.dtype, device=like.device).reshape(*([1] * (caller.x.dim() - 2)), 5, hidden)
    one = torch.ones(*x.shape[:-1], 1, dtype=caller.weights.dtype, device=like.device)
    refs = []
    for e in range(num_experts):
        y = caller(x, torch.full(one.shape, e, dtype=caller.ids.dtype, device=like.device), one)
        if not isinstance(y, torch.Tensor) or y.numel() != x.numel():
            return MatchResult.fail(f"{type(bank).__name__} returns no [tokens, {hidden}] tensor for its routing")
        refs.append(y.reshape(-1, hidden))
    expert0 = lambda v: caller(v.reshape(x.shape), torch.zeros(one.shape, dtype=caller.ids.dtype,  # noqa: E731
                                                                 device=like.device), one).reshape(-1, hidden)
    flat = x.reshape(-1, hidden)
    wide = wide_probe(expert0, flat)
    winner, post = stacked_winner(bank_mod, hidden, num_experts, flat, refs, wide), None
    for module in expert_post.candidates(bank, num_experts) if winner is None else ():
        post = expert_post.how_called(module, hidden, like)
        if post is not None:
            winner = stacked_winner(bank_mod, hidden, num_experts, flat, refs, wide, post.on_expert)
            if winner is not None:
                break
    if winner is None:
        return MatchResult.fail(f"{type(bank_mod).__name__}: the expert function matches no canonical expert "
                                "(layouts, activations and clamps tried, with and without each module that may "
                                "follow the experts)")
    return MatchResult.success(((winner.spec, winner.build(slice(None)), post), num_experts))


def _counted_flat_banks(bank: nn.Module, hidden: int) -> list[tuple[nn.Module, int]]:
    """(module, E) of flat ``[E*F, hidden]`` weights (DBRX's) in a bank that holds no router to read E off: E from
    the integer settings of the bank's modules whose names speak of experts (``num_experts``; also
    ``num_experts_per_tok``, so the largest first). Only candidates: the experts read with each are proven."""
    counts = sorted({value for m in bank.modules() for name, value in vars(m).items()
                     if "expert" in name.lower() and type(value) is int and value >= 2}, reverse=True)
    return [(mod, num_experts) for num_experts in counts for mod in bank.modules()
            if stacked.flat_bank(mod, num_experts, hidden)]


def analyze_routed_bank(bank: nn.Module, call: tuple | None) -> MatchResult[BlockAnalysis]:
    """The canonical form of an expert bank called as ``bank(x, ids, weights)`` in the example ``call`` (its
    recorded ``(args, kwargs)``), proven on probe tokens with fresh routing: two random inputs, and one whose
    tokens all go to the same few experts."""
    if call is None:
        return MatchResult.fail("the bank's example call was not recorded")
    positions = routing_positions(call)
    if positions is None:
        return MatchResult.fail("the bank is not called with exactly its routing besides its hidden states (one "
                                "integer and one floating tensor, [*token dims, k])")
    if is_moe_block(bank):
        return MatchResult.fail("the bank holds a router of its own")
    if (why := unfit_parameters(bank)) is not None:
        return MatchResult.fail(why)
    caller = _Caller(bank, call, positions)
    like = next(bank.parameters())
    hidden = int(caller.x.shape[-1])
    found = _expert_candidates(bank, caller, hidden, like)
    if not found:
        return MatchResult.fail(f"experts not recognized: {found.reason}")
    (spec, weights, post), num_experts = found.value
    if caller.top_k > num_experts:
        return MatchResult.fail(f"it is handed {caller.top_k} experts per token, more than its {num_experts}")
    a = BlockAnalysis(RoutingSpec(num_experts, caller.top_k, "given"), None, None, None, spec, weights,
                      other_positions=positions, token_dims=caller.x.dim() - 1, routing_given=True,
                      expert_post=post)
    on_outputs = _proven(bank, caller, a, hidden, like)
    if on_outputs or post is not None:
        return on_outputs
    # each weight may scale its expert's input rather than its output (Llama 4's), the same only for linear experts
    on_inputs = _proven(bank, caller, replace(a, routing=replace(a.routing, weights_on_inputs=True)), hidden, like)
    return on_inputs if on_inputs else on_outputs


def _proven(bank: nn.Module, caller: _Caller, a: BlockAnalysis, hidden: int,
            like: torch.Tensor) -> MatchResult[BlockAnalysis]:
    """``a`` when its canonical form gives the bank's output on fresh routing of every probe input."""
    num_experts = a.routing.num_experts
    rank = caller.x.dim()
    shapes = [(2, 8), (3, 5)] if rank == 3 else [(16,), (7,)]
    g = torch.Generator().manual_seed(4321)
    inputs = [torch.randn(*s, hidden, generator=g).to(like) for s in shapes]
    # every token on the same experts: the per-expert groups are as uneven as they get
    inputs.append(torch.randn(*shapes[0], hidden, generator=g).to(like))
    canon = CanonicalMoE(a)
    for i, x in enumerate(inputs):
        ids, w = caller.routing(x, num_experts, 10 + i)
        if i == len(inputs) - 1:
            ids = ids.flatten(0, -2)[:1].expand(ids.shape).contiguous()
        ref = caller(x, ids, w)
        if not isinstance(ref, torch.Tensor):
            return MatchResult.fail(f"{type(bank).__name__} returns {type(ref).__name__}, not one tensor")
        with torch.no_grad():
            y = canon(x, w, ids)
        if ref.shape != y.shape:
            if ref.numel() != y.numel():
                return MatchResult.fail(f"{type(bank).__name__}'s output is shaped {tuple(ref.shape)} for input "
                                        f"{tuple(x.shape)}")
            a = replace(a, flat_output=ref.shape == x.reshape(-1, hidden).shape)
            canon = CanonicalMoE(a)
            with torch.no_grad():
                y = canon(x, w, ids)
        if not close(y.reshape(ref.shape), ref):
            return MatchResult.fail(f"dispatch -> {a.expert.describe()} experts -> combine differs from "
                                    f"{type(bank).__name__} on fresh routing (relative error "
                                    f"{rel_err(y.reshape(ref.shape), ref):.1e}, bound {10 * tolerance(ref.dtype):.0e})")
    return MatchResult.success(a)
