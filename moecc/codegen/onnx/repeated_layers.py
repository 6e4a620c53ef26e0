"""Export a program whose layers repeat by exporting each distinct layer once.

``torch.onnx.export`` costs about 30 ms per op on a small CPU, so a 32-layer model spends a minute exporting 32
copies of one layer. Here the program is cut into segments, runs of nodes that ran in one layer (the outermost
``<container>.<index>`` module of each node's ``moecc_module``; nodes a pass created, which have no module,
join the segment before them, as does code outside the layers that runs after a layer) and the nodes before
the first layer. A segment's tensors from outside (the program's
inputs, its weights, earlier segments' values) become its inputs, so two layers of one code differ only in the
tensors they are given. Segments alike node for node are exported and optimized once; the ONNX graph is then
put together from copies of those exports, each wired to its own weights (initializers) and to the values
before it.

A size (a ``SymInt``) that crosses from one segment to the next is read again, inside the segment, from a dim
of one of its inputs (or of a program input with that dim), or computed again from the dims its symbols are
(``segment_sizes``). Where anything stands in the way (a size of no
dim, a value that is not a tensor, a higher-order op, a segment that writes into its inputs, a dtype
NumPy cannot carry), the caller exports the whole program as before: this is a shortcut, never a second
semantics. ``MOECC_ONNX_REPEATS`` turns it off."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from moecc.codegen.onnx import segment_sizes
from moecc.passes.graph_utils import attr_of

log = logging.getLogger("moecc.codegen.onnx")

# below this many ops saved, the extra exports' fixed cost (about a second each) eats the gain
MIN_OPS_SAVED = 100


class NotRepeated(Exception):
    """Why the program is exported whole."""


@dataclass
class Segment:
    key: object                                           # (container, index) of a layer, or "outer"
    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(default_factory=list)   # tensors from outside, in order of first use
    sizes: dict = field(default_factory=dict)             # SymInt node from outside -> how it is read again
    outputs: list[fx.Node] = field(default_factory=list)  # its values used after it
    signature: str = ""


def _outer_index(path: str) -> tuple[str, int] | None:
    parts = path.split(".")
    for j, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:j]), int(part)
    return None


def _containers(gm: fx.GraphModule) -> set[str]:
    """Module lists with two members or more that some node ran in."""
    seen: dict[str, set[int]] = {}
    for node in gm.graph.nodes:
        found = _outer_index(node.meta.get("moecc_module") or "")
        if found is not None:
            seen.setdefault(found[0], set()).add(found[1])
    return {c for c, members in seen.items() if len(members) >= 2}


def _runs(gm: fx.GraphModule) -> list[Segment]:
    containers = _containers(gm)
    if not containers:
        raise NotRepeated("no node ran in a numbered layer")
    runs: list[Segment] = []
    key = "outer"
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        path = node.meta.get("moecc_module")
        if path is not None:  # a node a pass made has no module: it stays with the nodes before it
            found = _outer_index(path)
            if found is not None and found[0] in containers:
                key = found
            elif key == "outer" or not runs:
                key = "outer"
            # else code outside the layers after a layer (a residual around a block held in a list) stays with it
        if not runs or runs[-1].key != key:
            runs.append(Segment(key, []))
        runs[-1].nodes.append(node)
    return runs


def _symbol(value) -> str | None:
    """The symbolic size's expression, or None for a size that is not symbolic (a SymInt of a constant)."""
    if isinstance(value, torch.SymInt):
        return None if value.node.maybe_as_int() is not None else str(value)
    return str(value) if type(value).__name__ == "SymbolicDim" else None


def _dims(node: fx.Node) -> list:
    val = node.meta.get("val")
    return list(getattr(val, "shape", None) or [])


def _is_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return val is not None and hasattr(val, "shape") and hasattr(val, "dtype")


def _wire(gm: fx.GraphModule, runs: list[Segment]) -> None:
    """Fill each segment's inputs, sizes and outputs; raise NotRepeated where a value cannot cross."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for seg in runs:
        own = set(seg.nodes)
        for node in seg.nodes:
            for arg in node.all_input_nodes:
                if arg in own or arg in seg.inputs or arg in seg.sizes:
                    continue
                if arg.op == "get_attr" or _is_tensor(arg):  # plan() saw that every get_attr is a tensor
                    seg.inputs.append(arg)
                elif _symbol(arg.meta.get("val")) is None:
                    raise NotRepeated(f"{node.name} takes {arg.name}, which is neither a tensor nor a size")
                else:
                    seg.sizes[arg] = None
            if any(user not in own for user in node.users):
                if not _is_tensor(node) and any(u is output for u in node.users):
                    raise NotRepeated(f"the program returns {node.name}, which is not a tensor")
                if _is_tensor(node):
                    seg.outputs.append(node)
        for size in seg.sizes:
            seg.sizes[size] = _size_recipe(str(size.meta["val"]), seg, placeholders)
    for node in output.all_input_nodes:
        if not _is_tensor(node):
            raise NotRepeated(f"the program returns {node.name}, which is not a tensor")


def _find_dim(symbol: str, seg: Segment, placeholders: list[fx.Node]) -> tuple[int, int] | None:
    for candidates in (seg.inputs, placeholders):
        for node in candidates:
            for d, dim in enumerate(_dims(node)):
                if _symbol(dim) == symbol:
                    if node not in seg.inputs:
                        seg.inputs.append(node)
                    return seg.inputs.index(node), d
    return None


def _size_recipe(text: str, seg: Segment, placeholders: list[fx.Node]) -> tuple:
    """How the segment reads a size again: ("dim", position, dim) of an input that has it, else ("expr", the
    expression, {symbol: (position, dim)}) computed from the dims its symbols are."""
    if (found := _find_dim(text, seg, placeholders)) is not None:
        return ("dim", *found)
    try:
        expr = segment_sizes.parse(text)
    except segment_sizes.Unwritable as exc:
        raise NotRepeated(str(exc)) from None
    dims = {}
    for name in segment_sizes.symbols(expr):
        if (found := _find_dim(name, seg, placeholders)) is None:
            raise NotRepeated(f"the size {text} is no input's dim, nor is its {name}")
        dims[name] = found
    return ("expr", expr, dims)


def subprogram(gm: fx.GraphModule, seg: Segment) -> fx.GraphModule:
    """The segment as a program of its own: its outside tensors are placeholders, sizes read from them."""
    graph, env = fx.Graph(), {}
    for i, node in enumerate(seg.inputs):
        env[node] = graph.placeholder(f"in_{i}")
        env[node].meta["val"] = attr_of(gm, node) if node.op == "get_attr" else node.meta.get("val")
    for size, recipe in seg.sizes.items():
        if recipe[0] == "dim":
            env[size] = graph.call_function(torch.ops.aten.sym_size.int, (env[seg.inputs[recipe[1]]], recipe[2]))
            continue
        _, expr, where = recipe
        dims = {name: graph.call_function(torch.ops.aten.sym_size.int, (env[seg.inputs[pos]], d))
                for name, (pos, d) in where.items()}
        try:
            env[size] = segment_sizes.emit(graph, expr, dims)
        except segment_sizes.Unwritable as exc:
            raise NotRepeated(str(exc)) from None
    root = nn.Module()
    for node in seg.nodes:
        if node.op == "call_module":
            _place(root, node.target, gm.get_submodule(node.target))
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[n] for n in seg.outputs))
    return fx.GraphModule(root, graph)


def _place(root: nn.Module, target: str, module: nn.Module) -> None:
    *owners, name = target.split(".")
    for part in owners:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(name, module)


def _signature(sub: fx.GraphModule, seg: Segment) -> str:
    from moecc.codegen.onnx.export_cache import graph_parts

    parts = list(graph_parts(sub, ""))
    # a module called as written bakes its own weights into the export: such a segment is alike only itself
    modules = [id(sub.get_submodule(n.target)) for n in sub.graph.nodes if n.op == "call_module"]
    return repr((parts, modules))


@dataclass
class Plan:
    segments: list[Segment]
    programs: dict[str, fx.GraphModule]   # signature -> the first segment's program
    ops_saved: int


def plan(gm: fx.GraphModule) -> Plan:
    """Segments and their distinct programs; NotRepeated where exporting by layers would not pay or cannot be
    done."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not isinstance(attr_of(gm, node), torch.Tensor):
            raise NotRepeated(f"{node.target} is a {type(attr_of(gm, node)).__name__}, not a tensor")
    segments = _runs(gm)
    _wire(gm, segments)
    segments = [s for s in segments if s.outputs]  # a run of sizes only: read again where they are used
    programs: dict[str, fx.GraphModule] = {}
    saved = 0
    for seg in segments:
        sub = subprogram(gm, seg)
        seg.signature = _signature(sub, seg)
        if seg.signature in programs:
            saved += len(seg.nodes)
        else:
            programs[seg.signature] = sub
    if saved < MIN_OPS_SAVED:
        raise NotRepeated(f"repeated layers would save {saved} ops of export, fewer than {MIN_OPS_SAVED}")
    return Plan(segments, programs, saved)


def segment_examples(gm: fx.GraphModule, example: list, found: Plan) -> dict[str, list[torch.Tensor]]:
    """The inputs each distinct program sees when ``gm`` runs on ``example``."""
    first = {}
    for seg in found.segments:
        first.setdefault(seg.signature, seg)
    wanted = {n for seg in first.values() for n in seg.inputs}
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                values[n] = out.detach() if isinstance(out, torch.Tensor) else out
            return out

    with torch.no_grad():
        Recorder(gm).run(*example)
    for node in wanted:
        for dim, size in zip(_dims(node), getattr(values[node], "shape", ())):
            if _symbol(dim) is not None and size < 2:
                # exported on its own, the segment would take this size for a constant (export specializes 0
                # and 1), where the whole program keeps it symbolic
                raise NotRepeated(f"{node.name} has the symbolic dim {dim} at size {size} in this example")
    return {sig: [values[n] for n in seg.inputs] for sig, seg in first.items()}
