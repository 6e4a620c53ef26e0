"""inline_routing: the routing a block computes in its own forward, read off its code, for a block no canonical
routing reproduces.

A block whose router is a plain Linear and whose selection is its own code (softplus scores, a threshold on the
weights, a temperature from a buffer) has no router module to keep as written. Its forward is exported here, fed
tokens, and each pair of ``[T, k]`` values in it (floating weights, integer ids in ``[0, E)``) that only the
tokens compute, through no data-dependent size, is a candidate routing: the ops above them become a program of
their own, ``tokens [T, H] -> (weights [T, k] fp32, ids [T, k] int64)``, which the recognizer then proves by
evaluation to feed the canonical experts as the block feeds its own. Nothing here decides that a candidate is the
routing; the check of the whole block on the probes does."""

from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
from collections.abc import Iterator

import torch
import torch._functorch.config as functorch_config
import torch.fx.experimental._config as fx_config
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from moecc.logs import EXPORT_LOGGERS, hush_torch_deprecations, quiet, stderr_to_debug
from moecc.match import MatchResult
from moecc.module_casts import idle_module_casts
from moecc.passes.graph_utils import attr_of, copy_graph

log = logging.getLogger("moecc.passes.recognize")

MAX_PROGRAMS = 12  # candidate (weights, ids) pairs built and checked, latest in the block's code first
_TOKENS = (13, 17, 19, 23)  # the export's token count: neither 0 or 1 (which export specializes) nor a block size


class _OnTokens(nn.Module):
    """The block called on tokens ``[T, H]``, reshaped to the rank its model calls it with (one row of tokens)."""

    def __init__(self, block: nn.Module, rank: int) -> None:
        super().__init__()
        self.block = block
        self.lead = [1] * (rank - 2)

    def forward(self, x: torch.Tensor):
        return self.block(x.reshape(*self.lead, *x.shape))


def _exported(block: nn.Module, rank: int, x: torch.Tensor) -> fx.GraphModule:
    """The block's forward on tokens ``x`` as functional ATen ops (a weight the code writes in place, ``keep[:, 1] =
    ...``, is then a value above the weights rather than a write no ancestor of theirs shows). An expert loop that
    branches on a size of its values (``if token.numel() == 0: continue``) stops export; the forward is then
    exported again with the example's values deciding such branches, which only the loop after the routing holds:
    the routing's ops, all this module reads, take none (``_clean``), and the probes check every candidate."""
    def export():
        with torch.no_grad(), stderr_to_debug(log, "torch.export of the block's forward"), quiet(*EXPORT_LOGGERS), \
                idle_module_casts(), warnings.catch_warnings():
            hush_torch_deprecations()
            return torch.export.export(_OnTokens(block, rank), (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},),
                                       strict=False).run_decompositions({}).module()

    try:
        return export()
    except Exception:  # noqa: BLE001 - tried again below; the second failure is the one reported
        log.debug("exporting %s's forward failed; again with real values", type(block).__name__, exc_info=True)
    with contextlib.ExitStack() as stack:
        for config, name in ((functorch_config, "fake_tensor_propagate_real_tensors"),
                             (fx_config, "soft_pending_unbacked_not_found_error")):
            if hasattr(config, name):  # both in torch 2.13; the second is missing in older releases
                stack.enter_context(config.patch(**{name: True}))
        return export()


def _values(gm: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, object]:
    """Each node's value in one call of ``gm``, up to where the call fails: a forward exported with the example's
    values deciding its branches holds runtime checks of them, which other values (even the same tokens, the
    decomposition having traced again) can fail; the routing comes before the loop that holds them."""
    seen: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            seen[n] = out = super().run_node(n)
            return out

    with torch.no_grad():
        try:
            Recorder(gm).run(x)
        except Exception:  # noqa: BLE001 - what ran before is what the routing needs
            log.debug("the exported forward stopped at node %d", len(seen), exc_info=True)
    return seen


def _ancestors(roots: list[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _clean(nodes: set[fx.Node]) -> bool:
    """Nodes that compute values of the tokens alone: no size that depends on values, and nothing written."""
    for n in nodes:
        if n.op == "call_module":
            return False
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
            return False
        val = n.meta.get("val")
        if val is not None and free_unbacked_symbols(val):
            return False
    return True


def _graph(gm: fx.GraphModule, x: fx.Node, weights: fx.Node, ids: fx.Node, k: int,
           held: set[str]) -> tuple[fx.Graph, dict[str, torch.Tensor]]:
    """The ops above ``weights`` and ``ids`` as a graph of the tokens, and the constants it reads: attributes of the
    export that are not among ``held``, the block's own parameters and buffers (as the export names them)."""
    inside = _ancestors([weights, ids])
    graph = fx.Graph()
    env = {x: graph.placeholder("x")}
    constants: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node in inside and node is not x:
            env[node] = copied = graph.node_copy(node, lambda n: env[n])
            if node.op == "get_attr" and node.target not in held:
                name = f"_constant_{len(constants)}"
                constants[name] = attr_of(gm, node)
                copied.target = name
    w = graph.call_method("float", (graph.call_method("reshape", (env[weights], -1, k)),))
    i = graph.call_method("long", (graph.call_method("reshape", (env[ids], -1, k)),))
    graph.output((w, i))
    return graph, constants


# A candidate read off a block's export: its graph, its k, and the tensors the block's code makes (``keep[:, 3:] =
# False`` lifts a constant), which the graph reads as attributes of its own since the block does not hold them.
_Read = tuple[fx.Graph, int, dict[str, torch.Tensor]]

# (block structure) -> the candidates read: a block of the same code and parameter shapes (the next layer) reads
# the same ops off its code, over its own parameters, without an export of its own (seconds for a block of many
# experts, whose loop export traces). Cleared after each recognize pass (``forget``).
_READ: dict[tuple, list[_Read]] = {}


def forget() -> None:
    _READ.clear()


def _structure(block: nn.Module, like: torch.Tensor, rank: int, hidden: int, num_experts: int) -> tuple:
    return (tuple(type(m) for m in block.modules()),
            tuple((n, tuple(t.shape), t.dtype) for n, t in [*block.named_parameters(), *block.named_buffers()]),
            like.dtype, like.device.type, rank, hidden, num_experts)


def _rooted(block: nn.Module, rank: int, read: list[_Read]) -> list[tuple[fx.GraphModule, int]] | None:
    """The graphs read off a block of the same structure, over ``block``'s own parameters and buffers; None where
    one reads an attribute this block has not."""
    out = []
    for graph, k, constants in read:
        root = _OnTokens(block, rank)
        for name, value in constants.items():
            root.register_buffer(name, value, persistent=False)
        try:
            out.append((fx.GraphModule(root, copy_graph(graph)), k))
        except AttributeError:
            return None
    return out


def routing_programs(block: nn.Module, like: torch.Tensor, rank: int, hidden: int,
                     num_experts: int) -> MatchResult[Iterator[tuple[fx.GraphModule, int]]]:
    """Candidate routings of ``block`` read off its exported forward, as ``(program, k)``, latest first; ``like``:
    the dtype and device of its input; ``rank``: the rank of the input its model hands it."""
    key = _structure(block, like, rank, hidden, num_experts)
    if key in _READ and (again := _rooted(block, rank, _READ[key])) is not None:
        return MatchResult.success(iter(again))
    read = _read_off(block, like, rank, hidden, num_experts)
    if not read:
        return read
    rooted = _rooted(block, rank, read.value)
    if rooted is None:
        return MatchResult.fail("a candidate read off its forward reads an attribute the block does not hold")
    _READ[key] = read.value
    return MatchResult.success(iter(rooted))


def _read_off(block: nn.Module, like: torch.Tensor, rank: int, hidden: int,
              num_experts: int) -> MatchResult[list[_Read]]:
    """The candidates' graphs (``routing_programs``), from an export of the block's forward."""
    n = next(t for t in _TOKENS if t not in (hidden, num_experts))
    g = torch.Generator().manual_seed(31)
    x = torch.randn(n, hidden, generator=g).to(dtype=like.dtype, device=like.device)
    try:
        gm = _exported(block, rank, x)
        values = _values(gm, x)
    except Exception as exc:  # noqa: BLE001 - a forward torch.export cannot capture has no routing to read
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return MatchResult.fail(f"exporting its forward failed: {first}")
    placeholder = next(nd for nd in gm.graph.nodes if nd.op == "placeholder")
    order = {nd: i for i, nd in enumerate(gm.graph.nodes)}
    held = {f"block.{name}" for name, _ in [*block.named_parameters(remove_duplicate=False),
                                             *block.named_buffers(remove_duplicate=False)]}

    def pairs_of(floating: bool) -> list[tuple[fx.Node, int]]:
        found = []
        for nd, v in values.items():
            if not isinstance(v, torch.Tensor) or v.is_floating_point() != floating or v.numel() % n or not v.numel():
                continue
            k = v.numel() // n
            if k > num_experts or (floating and v.dim() == 0):
                continue
            if not floating and (v.dtype == torch.bool or int(v.min()) < 0 or int(v.max()) >= num_experts):
                continue
            found.append((nd, k))
        return sorted(found, key=lambda p: -order[p[0]])

    ids, weights = pairs_of(False), pairs_of(True)
    if not ids:
        return MatchResult.fail(f"its forward computes no [T, k] expert ids in [0, {num_experts}) from the tokens")
    if not weights:
        return MatchResult.fail("its forward computes no [T, k] routing weights beside its expert ids")

    graphs = []
    for (w, kw), (i, ki) in itertools.product(weights, ids):
        if kw != ki or values[w].shape[:-1] != values[i].shape[:-1]:
            continue
        inside = _ancestors([w, i])
        if placeholder in inside and _clean(inside):
            graph, constants = _graph(gm, placeholder, w, i, ki, held)
            graphs.append((graph, ki, constants))
            if len(graphs) >= MAX_PROGRAMS:
                break
    if not graphs:
        return MatchResult.fail("no [T, k] weights and ids of its forward are computed from the tokens alone")
    return MatchResult.success(graphs)
