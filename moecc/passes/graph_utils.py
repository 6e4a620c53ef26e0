"""Small FX helpers shared by the passes."""

from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager

import torch
from torch import fx
from torch.utils import _pytree as pytree

# graph modules whose code a PassManager regenerates once, after its last pass: -> whether a pass changed the graph
_STALE_CODE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def recompile(gm: fx.GraphModule) -> None:
    """What a pass calls once it changed ``gm``'s graph. While a PassManager defers it (``recompile_once``), this
    only notes the change: regenerating a whole model's Python code takes a quarter of a second or more, and no one
    reads the code between two passes unless an instrument runs the module (``Instrument.runs_module``)."""
    if gm in _STALE_CODE:
        _STALE_CODE[gm] = True
    else:
        gm.recompile()


@contextmanager
def recompile_once(gm: fx.GraphModule):
    """Within it, ``recompile(gm)`` is put off; on leaving (a failure too), ``gm`` is recompiled if a pass changed
    it."""
    _STALE_CODE[gm] = False
    try:
        yield
    finally:
        if _STALE_CODE.pop(gm, False):
            gm.recompile()


def attr_of(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a ``get_attr`` node reads."""
    owner, _, name = node.target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A new graph with ``graph``'s nodes, output included."""
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy


def output_leaves(out) -> tuple:
    """A block's outputs as the flat tuple of their tensors: how the graph reads a block that returns a nested
    structure (a dict, a tuple inside a tuple, a None beside its tensors), whose tensors export numbered in that
    flat order."""
    return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _level_changes() -> frozenset:
    from torch._functorch import predispatch

    return frozenset(f for f in (getattr(predispatch, "_vmap_increment_nesting", None),
                                 getattr(predispatch, "_vmap_decrement_nesting", None)) if f is not None)


_LEVEL_CHANGES = _level_changes()


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """``graph.eliminate_dead_code()`` that also keeps vmap's level changes. torch.fx counts jvp's as side effects
    but not vmap's, so a ``torch.vmap`` traced into a program (some attention-mask builders use one) would lose the
    calls that open and close its level, which have no users, and its batching ops would then fail."""
    return graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or (
        n.op == "call_function" and n.target in _LEVEL_CHANGES))


def fresh_container(value):
    """A shallow, mutable copy of a container a call passes its callee, made anew at every run of the graph: a
    block may write into a dict it is handed (Gemma 4's layers store keys and values in one), which as a literal
    of the graph would carry those writes from run to run (and into the graph's printed code)."""
    if type(value).__module__ == "torch.fx.immutable_collections":  # fx hands containers of nodes so
        return dict(value) if isinstance(value, dict) else list(value)
    return copy.copy(value)


def op_arguments(node: fx.Node) -> dict:
    """Every argument of a call of an operator, by its schema's names, defaults filled in: a graph leaves out
    trailing arguments that hold their defaults (``moecc::route``'s ``group_top`` and ``expert_scale``), so a
    position read from ``node.args`` would depend on how the call was written."""
    schema = node.target._schema
    values = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
        else:
            raise TypeError(f"{node.format_node()} gives no {arg.name!r}, which has no default")
    return values


# the aten ops that change a tensor's dtype and nothing else
DTYPE_CASTS = (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout)


def parameter_through_casts(node) -> fx.Node | None:
    """The ``get_attr`` a value is, directly or through dtype casts (a router that computes its logits in fp32
    casts its weight: Ernie 4.5 VL's ``self.weight.float()``); None where it is computed otherwise."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in DTYPE_CASTS:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "get_attr" else None


def block_path(call: fx.Node) -> str:
    """The path in the model of the block a ``call_module`` node calls (its target may be a name capture gave)."""
    return call.meta.get("moecc_block", call.target)


def module_calls(gm: fx.GraphModule) -> list[tuple[str, torch.nn.Module]]:
    """(path in the model, module) of each module the graph still calls: the MoE blocks recognition left as
    written."""
    return [(block_path(n), gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]


def blocks_left_as_written(gm: fx.GraphModule) -> list[str]:
    """The MoE blocks the graph still calls as modules (recognition left them as written), by their paths in the
    model: exports trace their Python code, which the graph does not show."""
    return [path for path, _ in module_calls(gm)]


def nodes_calling(gm: fx.GraphModule, op) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


class _Inlining(fx.Tracer):
    """Traces into every sub-module (torch.nn's own too), so an inlined module leaves ATen and moecc calls only."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return False


def inline_module(gm: fx.GraphModule, node: fx.Node, module: torch.nn.Module, prefix: str,
                  inputs: list | None = None) -> fx.Node:
    """Replace ``node`` by the traced graph of ``module``, registered at ``prefix``, whose inputs are ``inputs``
    (default: ``node``'s positional arguments); inputs it has no value for must be unused."""
    gm.add_submodule(prefix, module)
    traced = fx.GraphModule(module, _Inlining().trace(module))
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    val_map = dict(zip(placeholders, node.args if inputs is None else inputs))
    with gm.graph.inserting_before(node):
        for sub in traced.graph.nodes:
            if sub.op in ("placeholder", "output"):
                continue
            new = gm.graph.node_copy(sub, lambda n: val_map[n])
            if sub.op == "get_attr":
                new.target = f"{prefix}.{sub.target}"
            if isinstance(new.target, torch._ops.OpOverloadPacket):
                new.target = new.target.default
            val_map[sub] = new
    out = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    result = torch.fx.node.map_arg(out, lambda n: val_map[n])
    return result
