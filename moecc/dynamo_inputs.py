"""The inputs of a graph dynamo hands over, as moecc takes a model's.

Dynamo passes every parameter the graph reads, and every symbolic size, as an input of its own. moecc's runtime
keys CUDA graphs and the check on fresh inputs by the tensor inputs (a weight passed in would be copied into each
replay and drawn at random by the check), and keeps non-tensor inputs as constants of a capture (so every new size
would be a new capture). So the graph reads its weights as attributes (``bound``: an input whose tensor changes
identity is bound anew, which the runtime's weight check sees), and its sizes off the tensors that have them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn


@dataclass
class GraphInputs:
    positions: list[int]  # of dynamo's inputs, those the compiled graph takes, in order
    bound: dict[int, str] = field(default_factory=dict)  # dynamo's input position -> attribute of the graph
    numbers: set[int] = field(default_factory=set)  # positions of Python numbers dynamo passes as 0-d tensors
    dynamic_dims: list[set[int]] = field(default_factory=list)  # per input taken: the dims dynamo keeps symbolic

    def select(self, gm: fx.GraphModule, args: tuple) -> list:
        """The inputs the compiled graph takes; a weight the model now holds another tensor for is bound anew."""
        for i, name in self.bound.items():
            if getattr(gm, name) is not args[i]:
                _bind(gm, name, args[i])
        return [args[i].item() if i in self.numbers else args[i] for i in self.positions]


def _bind(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    if name in gm._parameters or name in gm._buffers:
        delattr(gm, name)
    if isinstance(value, nn.Parameter):
        gm.register_parameter(name, value)
    else:
        gm.register_buffer(name, value)


def _is_weight(node: fx.Node, value) -> bool:
    if isinstance(value, nn.Parameter):
        return True
    if not isinstance(value, torch.Tensor):
        return False
    name = getattr(getattr(node.meta.get("grapharg"), "source", None), "name", None)
    name = name() if callable(name) else name  # a method in some torch versions, a property in others
    return isinstance(name, str) and "._buffers[" in name


def _bind_weights(gm: fx.GraphModule, placeholders: list[fx.Node], example_inputs) -> dict[int, str]:
    """Each parameter or buffer input the graph still reads becomes an attribute; unread ones (the lifted blocks'
    own weights) are dropped."""
    bound = {}
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not _is_weight(node, value):
            continue
        if node.users:
            _bind(gm, node.name, value)
            with gm.graph.inserting_before(node):
                read = gm.graph.get_attr(node.name)
            read.meta = dict(node.meta)
            node.replace_all_uses_with(read)
            bound[i] = node.name
        gm.graph.erase_node(node)
    return bound


def _reads_the_number(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "item") or (
        node.op == "call_function" and node.target in (torch.ops.aten.item.default,
                                                       torch.ops.aten._local_scalar_dense.default))


def _numbers_as_numbers(gm: fx.GraphModule, placeholders: list[fx.Node]) -> set[int]:
    """A Python number dynamo passes as a 0-d tensor (``dynamic=True`` does, for float attributes) is taken as the
    number, which moecc keeps as a constant of the capture (torch.export cannot guard on a tensor's value); the
    graph turns it back into the tensor it reads."""
    numbers, alive = set(), _placeholders(gm)
    last = [n for n in placeholders if n in alive][-1]
    for i, node in enumerate(placeholders):
        if node not in alive or not getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False):
            continue
        value = node.meta.get("example_value")
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            continue
        users = list(node.users)
        with gm.graph.inserting_after(last):
            tensor = gm.graph.call_function(torch.scalar_tensor, (node,), {"dtype": value.dtype})
        tensor.meta["example_value"] = value
        for user in users:
            if _reads_the_number(user):
                user.replace_all_uses_with(node)
                gm.graph.erase_node(user)
            else:
                user.replace_input_with(node, tensor)
        if not tensor.users:
            gm.graph.erase_node(tensor)
        node.meta = {k: v for k, v in node.meta.items() if k != "example_value"}
        numbers.add(i)
    return numbers


def _tensor_dims(nodes: list[fx.Node]) -> list[tuple[fx.Node, list]]:
    return [(n, list(n.meta["example_value"].shape)) for n in nodes
            if isinstance(n.meta.get("example_value"), torch.Tensor)]


def _read_sizes_off_tensors(gm: fx.GraphModule, placeholders: list[fx.Node]) -> set[fx.Node]:
    """Each symbolic-size input some tensor input has as a dim is read off that tensor; the inputs left unread."""
    tensors = _tensor_dims(placeholders)
    unread = set()
    for node in placeholders:
        size = node.meta.get("example_value")
        if not isinstance(size, torch.SymInt):
            continue
        found = next(((t, i) for t, dims in tensors for i, d in enumerate(dims)
                      if isinstance(d, torch.SymInt) and d.node.expr == size.node.expr), None)
        if found is None:
            continue
        with gm.graph.inserting_after(placeholders[-1]):
            read = gm.graph.call_function(torch.ops.aten.sym_size.int, found)
        read.meta["example_value"] = size
        node.replace_all_uses_with(read)
        unread.add(node)
    return unread


def take_inputs(gm: fx.GraphModule, example_inputs) -> GraphInputs:
    """Rewrite ``gm`` (in place) to take the inputs of ``GraphInputs.positions`` only."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    bound = _bind_weights(gm, placeholders, example_inputs)
    numbers = _numbers_as_numbers(gm, placeholders)
    left = _placeholders(gm)
    for node in _read_sizes_off_tensors(gm, [n for n in placeholders if n in left]):
        gm.graph.erase_node(node)
    left = _placeholders(gm)
    positions = [i for i, n in enumerate(placeholders) if n in left]
    gm.graph.lint()
    gm.recompile()
    taken = [placeholders[i] for i in positions]
    dims = [{d for d, size in enumerate(shape) if not isinstance(size, int)} for _, shape in _tensor_dims(taken)]
    return GraphInputs(positions, bound, numbers, dims)


def _placeholders(gm: fx.GraphModule) -> set[fx.Node]:
    return {n for n in gm.graph.nodes if n.op == "placeholder"}
