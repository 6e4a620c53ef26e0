"""Find a block's expert bank by structure and call it: the bank's module and expert count, the modules a router
is not looked for in, and probes that run one expert of a bank on given rows (through the bank's own calling
convention) for recognition to compare candidates against."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from moecc.passes.recognize import stacked
from moecc.passes.recognize.mlp import dense_mlps
from moecc.passes.recognize.probe import close
from moecc.passes.recognize.router import find_router


def has_linear(m: nn.Module) -> bool:
    return any(isinstance(c, nn.Linear) for c in m.modules())


def listed_experts(lst: nn.Module) -> list[nn.Module]:
    """The modules of a ModuleList or ModuleDict that may be experts: all but dropouts the list holds for itself
    (NLLB-MoE's bank, a ModuleDict, also registers its token dropout in it). An Identity stays: a null expert."""
    return [k for k in stacked.entries(lst) if not isinstance(k, nn.modules.dropout._DropoutNd)]


def experts_of_one_kind(kids: list[nn.Module]) -> bool:
    """Whether modules listed together can be the experts of one bank: of one type; or of mixed types (experts
    some of which were swapped for others) when each is a dense MLP or all hold parameters of the same names and
    shapes. Recognition then proves each one's function (``stack_mlps``), or says which one it cannot read."""
    if len({type(k) for k in kids}) == 1 or dense_mlps(kids):
        return True
    return bool(stacked.parameter_shapes(kids))


def find_expert_list(block: nn.Module) -> tuple[nn.Module, list[nn.Module]] | None:
    best = None
    for mod in block.modules():
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            kids = listed_experts(mod)
            # a list of bare Linears is one projection of every expert (``stacked.projection_lists``)
            if len(kids) >= 2 and has_linear(kids[0]) and not isinstance(kids[0], nn.Linear) \
                    and experts_of_one_kind(kids):
                if best is None or len(kids) > len(best[1]):
                    best = (mod, kids)
    return best


def find_stacked_bank(block: nn.Module) -> tuple[nn.Module, int] | None:
    """(module, E) of the most ``[E, ., .]`` weights of one E; else of the most flat ``[E*F, H]`` ones, E and H
    read off a Linear router to E outputs."""
    best = None
    for mod in block.modules():
        params = stacked.stacked_params(mod, materialize=False)
        by_e: dict[int, int] = {}
        for p in params.values():
            by_e[p.shape[0]] = by_e.get(p.shape[0], 0) + 1
        for e, count in by_e.items():
            if count >= 2 and (best is None or count > best[2]):
                best = (mod, e, count)
        if len(by_e) >= 2 and best is None:
            # weights of different expert counts: the experts all of them hold (the rest compute nothing)
            best = (mod, min(by_e), len(params))
    if best is None:
        routers = {(m.out_features, m.in_features) for m in block.modules()
                   if isinstance(m, nn.Linear) and m.out_features >= 2}
        for mod in block.modules():
            for e, hidden in routers:
                flat = stacked.flat_bank(mod, e, hidden)
                if flat and (best is None or len(flat) > best[2]):
                    best = (mod, e, len(flat))
    return None if best is None else (best[0], best[1])


def find_bank(block: nn.Module) -> tuple[nn.Module, int, list[nn.Module] | None] | None:
    """(bank module, E, expert modules or None for stacked weights)."""
    bank_list = find_expert_list(block)
    if bank_list is not None:
        return bank_list[0], len(bank_list[1]), bank_list[1]
    sb = find_stacked_bank(block)
    return None if sb is None else (sb[0], sb[1], None)


def bank_skip(block: nn.Module, bank: nn.Module, experts: list[nn.Module] | None = None) -> set[int]:
    """Modules a router is not looked for in: the bank's, or, when the bank is the block itself, its experts' (a
    ModuleList of decoder layers is no MoE block because some layer holds an [n_layers, H] weight)."""
    if bank is not block:
        return {id(m) for m in bank.modules()}
    lists = [*stacked.projection_lists(block).values(), *stacked.parameter_lists(block).values()]
    return {id(m) for e in [*(experts or []), *lists] for m in e.modules()}


def is_moe_block(module: nn.Module) -> bool:
    """A module that owns an expert bank and a router for it (checked by structure only). A module that holds its
    experts' weights itself and must be handed more than its hidden states (``experts(x, ids, weights)``) is a bank
    its caller routes: an ``[E, H]`` weight in it is no router (Ergo's per-expert output norm)."""
    bank = find_bank(module)
    if bank is None or bank[0] is module and required_inputs(module) >= 3:
        return False
    return find_router(module, bank[1], None, bank_skip(module, bank[0], bank[2])) is not None


def required_inputs(module: nn.Module) -> int:
    """How many positional arguments ``module.forward`` needs (those without defaults)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return 0
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def bank_probe(bank: nn.Module, hidden: int, like: torch.Tensor):
    """f(e, x): expert e applied to x, by calling the bank with every token routed to e, when the bank allows it."""
    try:
        n_params = len([p for p in inspect.signature(bank.forward).parameters.values()
                        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    except (TypeError, ValueError):
        return None
    if n_params < 3:
        return None

    def f(e: int, x: torch.Tensor) -> torch.Tensor:
        ids = torch.full((x.shape[0], 1), e, dtype=torch.long, device=x.device)
        w = torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device)
        with torch.no_grad():
            return bank(x, ids, w)

    x = torch.randn(4, hidden, dtype=like.dtype, device=like.device)
    try:
        y = f(0, x)
    except Exception:  # noqa: BLE001 - the bank has another calling convention
        return None
    if not isinstance(y, torch.Tensor) or y.numel() != x.numel():
        return None
    return f if y.shape == x.shape else lambda e, x: f(e, x).reshape(x.shape)


def grouped_rows_probe(bank: nn.Module, hidden: int, like: torch.Tensor, num_experts: int):
    """f(e, x) for a bank called with its hidden states alone, ``[E * n, H]``, whose rows ``e*n:(e+1)*n`` go to
    expert ``e`` (Llama 4's, handed every token once per expert): ``x`` in every expert's rows, expert ``e``'s
    outputs. None where the bank takes more, or its output rows are not the rows of its input each computed alone.
    That is a guess at the convention (rows interleaved by expert would pass it as well), which no canonical expert
    then fits: the caller falls back to the block's probes. One call of the bank serves every expert of an ``x``
    (the bank computes all of them on each call)."""
    if required_inputs(bank) != 1:
        return None
    last: list = [None, None]  # the x of the last call, and the bank's output on it

    def f(e: int, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if last[0] is not x:
            rows = x.repeat(num_experts, 1)
            y = called(bank, rows)
            if not isinstance(y, torch.Tensor) or y.shape != rows.shape:
                raise ValueError(f"the bank returned {type(y).__name__} for rows {tuple(rows.shape)}")
            last[:] = [x, y]
        return last[1][e * n:(e + 1) * n]

    g = torch.Generator().manual_seed(0)
    whole = torch.randn(num_experts * 3, hidden, generator=g).to(dtype=like.dtype, device=like.device)
    try:
        y = called(bank, whole)
        if not isinstance(y, torch.Tensor) or y.shape != whole.shape:
            return None
        # each expert's rows with other rows beside them: the same outputs
        for e in (0, num_experts - 1):
            if not close(f(e, whole[e * 3:(e + 1) * 3]), y[e * 3:(e + 1) * 3]):
                return None
    except Exception:  # noqa: BLE001 - another calling convention
        return None
    return f


def bank_caller(block: nn.Module, bank: nn.Module, hidden: int, like: torch.Tensor):
    """``bank_probe`` of the bank module, else of the nearest module above it inside the block that takes
    ``(x, ids, weights)`` (DBRX's weights sit in an MLP called with each expert's slices; the module above it
    takes the routing)."""
    lists = list(stacked.parameter_lists(bank).values())
    if len(lists) == 1:  # experts of bare parameters: each one is called alone
        experts = stacked.entries(lists[0])
        f = lambda e, x: called(experts[e], x)  # noqa: E731
        try:
            y = f(0, torch.randn(4, hidden, dtype=like.dtype, device=like.device))
        except Exception:  # noqa: BLE001 - an expert that takes more than the hidden states
            y = None
        if isinstance(y, torch.Tensor) and y.shape == (4, hidden):
            return f
    for mod in bank_and_ancestors(block, bank):
        f = bank_probe(mod, hidden, like)
        if f is not None:
            return f
    return None


def bank_and_ancestors(block: nn.Module, bank: nn.Module):
    """``bank``, then each module above it inside ``block``, nearest first, ``block`` itself excluded: where the
    module that takes a bank's routing is looked for."""
    parents = {id(child): mod for mod in block.modules() for child in mod.children()}
    mod = bank
    while mod is not block:
        yield mod
        mod = parents.get(id(mod), block)


def called(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)
