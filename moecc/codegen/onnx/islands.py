"""A program whose blocks left as written cannot go into an ONNX graph: ONNX Runtime runs the graph between them,
torch runs the blocks.

Such a block's export traces its Python code, which fails for data-dependent expert loops and for ops with no ONNX
function (Hugging Face's ``grouped_mm`` experts on the CPU); an offloaded block would have its weights copied into
the graph. Without this, the whole program fell back to torch, several times slower on the CPU.

The program is split at those module calls (``torch.fx.passes.split_module``): each run of ops between them is
exported to an ONNX graph of its own, and each call stays a call of the block, hooks and all. Only tensors cross
from one part to the next: a size (``sym_size``, arithmetic on sizes) is computed again in every part that reads
it, since an ONNX graph takes and gives tensors only."""

from __future__ import annotations

import logging
import os

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from moecc.capture_cache import SymbolicDim, ValueInfo
from moecc.logs import quiet_deepcopy, slow_step
from moecc.passes.graph_utils import attr_of

log = logging.getLogger("moecc.codegen.onnx")
_SCALARS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool, SymbolicDim)


def _scalar(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), _SCALARS)


def _container(node: fx.Node) -> bool:
    """A value that is neither a tensor nor a size: a tuple of outputs, a block's output tree."""
    val = node.meta.get("val")
    return not isinstance(val, (torch.Tensor, ValueInfo)) and not isinstance(val, _SCALARS)


def _parts(gm: fx.GraphModule, on_torch: set[fx.Node]) -> dict[fx.Node, int]:
    """Each node's part, in graph order: even parts go to ONNX Runtime, odd ones hold one call of ``on_torch`` and
    what reads its outputs before they are tensors (the items of its tuple). A node reading a value that is no
    tensor goes in that value's part."""
    part: dict[fx.Node, int] = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        reads = [a for a in node.all_input_nodes if a in part]
        containers = [part[a] for a in reads if _container(a)]
        if node in on_torch:
            part[node] = current + 1
            current += 2
        elif containers and all(part[a] <= max(containers) for a in reads):
            part[node] = max(containers)
        else:
            part[node] = current
    for node in reversed(gm.graph.nodes):
        # a value no ONNX graph can carry (a dict the blocks share), made where no block runs: made in the part of
        # its first reader instead, when that is a block's (torch parts pass any Python value on)
        users = [part[u] for u in node.users if u in part]
        if node in part and part[node] % 2 == 0 and _container(node) and users and min(users) % 2:
            if all(part[a] <= min(users) for a in node.all_input_nodes if a in part):
                part[node] = min(users)
    return part


class NotSplit(Exception):
    """The program cannot be split so that only tensors cross into and out of its ONNX Runtime parts."""


def _tensors_only(sub: fx.GraphModule, name: str) -> None:
    out = next(n for n in sub.graph.nodes if n.op == "output").args[0]
    values = [n for n in sub.graph.nodes if n.op == "placeholder"]
    values += [v for v in (out if isinstance(out, (tuple, list)) else (out,))]
    for value in values:
        if not isinstance(value, fx.Node) or not isinstance(value.meta.get("val"), (torch.Tensor, ValueInfo)):
            raise NotSplit(f"{name} would take or give {value!r}, which is no tensor")


def _scalars_in_place(gm: fx.GraphModule, part: dict[fx.Node, int]) -> None:
    """Compute sizes again in each part that reads them, so that only tensors cross between parts."""
    copies: dict[tuple[fx.Node, int], fx.Node] = {}

    def local(value: fx.Node, p: int, before: fx.Node) -> fx.Node:
        if not _scalar(value) or value.op == "placeholder" or part.get(value) == p:
            return value
        if (value, p) not in copies:
            with gm.graph.inserting_before(before):
                copy = gm.graph.node_copy(value, lambda a: local(a, p, before))
            part[copy] = p
            copies[(value, p)] = copy
        return copies[(value, p)]

    for node in list(gm.graph.nodes):
        if node not in part:
            continue
        p = part[node]
        for value in list(node.all_input_nodes):
            if (mine := local(value, p, node)) is not value:
                node.replace_input_with(value, mine)
    gm.graph.lint()
    gm.recompile()


def _attributes_inside(split: fx.GraphModule) -> None:
    """Each part reads the model's tensors as attributes of its own, as the whole program did: ``split_module``
    hands them in as arguments, which an ONNX graph would take as inputs on every call (no initializers for ONNX
    Runtime to fold or pre-pack)."""
    for call in [n for n in split.graph.nodes if n.op == "call_module"]:
        sub = split.get_submodule(call.target)
        if not isinstance(sub, fx.GraphModule):
            continue
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        first = next(n for n in sub.graph.nodes if n.op != "placeholder")
        kept = []
        for arg, placeholder in zip(call.args, placeholders):
            if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
                kept.append(arg)
                continue
            tensor = attr_of(split, arg)
            if isinstance(tensor, nn.Parameter):
                sub.register_parameter(placeholder.target, tensor)
            else:
                sub.register_buffer(placeholder.target, tensor)
            with sub.graph.inserting_before(first):
                read = sub.graph.get_attr(placeholder.target)
            read.meta = placeholder.meta
            placeholder.replace_all_uses_with(read)
            sub.graph.erase_node(placeholder)
        call.args = tuple(kept)
        sub.recompile()
    split.graph.eliminate_dead_code()
    split.recompile()


class _OrtPart(nn.Module):
    """One part of the split program on ONNX Runtime, giving what its graph module gave: a value or a tuple."""

    def __init__(self, runner: nn.Module, single: bool) -> None:
        super().__init__()
        self.runner = runner
        self.single = single

    def forward(self, *tensors):
        out = self.runner(*tensors)
        return out[0] if self.single else out


class _PartInputs(fx.Interpreter):
    """Runs the split program on example inputs, noting what each part is called with."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.inputs: dict[str, list] = {}

    def call_module(self, target, args, kwargs):
        self.inputs.setdefault(target, list(args))
        return super().call_module(target, args, kwargs)


def blocks_on_torch(gm: fx.GraphModule, example: list, on_torch: list[fx.Node], folder: str, open_part) -> nn.Module:
    """``gm`` split at the calls ``on_torch``, its other parts each lowered by ``open_part(part, example, path)``
    to a module that runs an ONNX file with ONNX Runtime. ``gm`` is left as it was: a caller whose split fails
    goes on to export it whole."""
    graph = quiet_deepcopy(gm.graph)  # the parts' own size computations go into the copy
    copies = dict(zip(gm.graph.nodes, graph.nodes))
    gm, on_torch = fx.GraphModule(gm, graph), [copies[call] for call in on_torch]
    part = _parts(gm, set(on_torch))
    _scalars_in_place(gm, part)
    split = split_module(gm, gm, lambda node: part[node], keep_original_order=True)
    _attributes_inside(split)
    recorder = _PartInputs(split)
    with torch.no_grad():
        recorder.run(*example)
    lowered = 0
    for name, args in recorder.inputs.items():
        sub = getattr(split, name)
        if not isinstance(sub, fx.GraphModule) or int(name.rsplit("_", 1)[1]) % 2:
            continue
        if not any(n.op == "call_function" for n in sub.graph.nodes):
            continue  # it only passes values on
        _tensors_only(sub, name)
        out = next(n for n in sub.graph.nodes if n.op == "output").args[0]
        what = f"part {lowered + 1} of the program between blocks run by torch"
        with slow_step(log, f"exporting {what}"):
            runner = open_part(sub, args, os.path.join(folder, name, "model.onnx"))
        setattr(split, name, _OrtPart(runner, not isinstance(out, (tuple, list))))
        lowered += 1
    log.info("the program runs on ONNX Runtime in %d parts, with %d block call(s) on torch between them", lowered,
             len(on_torch))
    return split
