"""One ONNX model put together from the exports of a program's segments (``repeated_layers``).

Each segment becomes a copy of its program's export: the export's inputs are wired to the program's inputs,
to initializers holding the segment's own tensors (no copy: an initializer reads the tensor's memory), or to
the outputs of earlier copies. Constants an export made itself are shared by its copies. Intermediate values
keep their dtype and leave their shapes to ONNX Runtime's inference: each export numbered its symbolic dims
on its own."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from torch import fx
from torch.utils import _pytree as pytree

from moecc.codegen.onnx.repeated_layers import NotRepeated, Plan
from moecc.passes.graph_utils import attr_of


def onnx_dtype(dtype: torch.dtype) -> ir.DataType:
    try:
        return ir.DataType.from_numpy(np.dtype(torch.empty((), dtype=dtype).numpy().dtype))
    except (TypeError, RuntimeError) as exc:
        raise NotRepeated(f"{dtype} has no NumPy dtype to carry it") from exc


def _shape(val) -> ir.Shape:
    return ir.Shape([int(d) if isinstance(d, int) else str(d) for d in val.shape])


def _initializer(name: str, tensor: torch.Tensor) -> ir.Value:
    array = tensor.detach().cpu().contiguous().numpy()
    dtype = onnx_dtype(tensor.dtype)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                    const_value=ir.Tensor(array, dtype, name=name))


def stitch(gm: fx.GraphModule, found: Plan, exports: dict[str, ir.Model]) -> ir.Model:
    """The program ``gm`` as one ONNX model, from ``exports`` (one per distinct segment program)."""
    graph_inputs, initializers, nodes, values, held = [], {}, [], {}, {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if val is None or not hasattr(val, "shape"):
                raise NotRepeated(f"the program input {node.name} is not a tensor")
            values[node] = ir.Value(name=node.name, shape=_shape(val), type=ir.TensorType(onnx_dtype(val.dtype)))
            graph_inputs.append(values[node])
        elif node.op == "get_attr":
            tensor = attr_of(gm, node)
            same = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            if same not in held:  # one tensor under two names (tied embeddings): one initializer
                held[same] = initializers[node.target] = _initializer(node.target, tensor)
            values[node] = held[same]
    shared: dict[tuple[str, str], ir.Value] = {}
    opsets: dict[str, int] = {}
    functions: dict = {}
    ir_version = 0
    for i, seg in enumerate(found.segments):
        model = exports[seg.signature]
        g = model.graph
        if len(g.inputs) != len(seg.inputs) or len(g.outputs) != len(seg.outputs):
            raise NotRepeated(f"segment {i}'s export takes {len(g.inputs)} inputs and gives {len(g.outputs)} outputs "
                              f"for {len(seg.inputs)} and {len(seg.outputs)}")
        env: dict[ir.Value, ir.Value] = {mine: values[node] for mine, node in zip(g.inputs, seg.inputs)}
        for name, init in g.initializers.items():
            key = (seg.signature, name)
            if key not in shared:
                shared[key] = ir.Value(name=f"const{len(shared)}/{name}", shape=init.shape, type=init.type,
                                       const_value=init.const_value)
                initializers[shared[key].name] = shared[key]
            env[init] = shared[key]
        for node in g:
            nodes.append(_copy(node, env, f"segment{i}/"))  # "/": no weight is named so
        for out, node in zip(g.outputs, seg.outputs):
            values[node] = env[out]
        for domain, version in {**model.opset_imports, **g.opset_imports}.items():
            if opsets.setdefault(domain, version) != version:
                raise NotRepeated(f"the exports import {domain} at versions {opsets[domain]} and {version}")
        for key, function in model.functions.items():
            functions.setdefault(key, function)
        ir_version = max(ir_version, model.ir_version)
    outputs = _outputs(gm, values, graph_inputs, initializers, nodes)
    main = ir.Graph(graph_inputs, outputs, nodes=nodes, initializers=list(initializers.values()),
                    opset_imports=opsets, name="main_graph")
    return ir.Model(main, ir_version=ir_version, producer_name="moecc", functions=list(functions.values()))


def _copy(node: ir.Node, env: dict, prefix: str) -> ir.Node:
    for attr in node.attributes.values():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            raise NotRepeated(f"the export's {node.op_type} holds a graph")
    inputs = []
    for value in node.inputs:
        if value is not None and value not in env:
            raise NotRepeated(f"the export's {node.op_type} reads {value.name}, which it does not define")
        inputs.append(None if value is None else env[value])
    copy = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()), overload=node.overload,
                   num_outputs=len(node.outputs), version=node.version, name=f"{prefix}{node.name}")
    for mine, theirs in zip(node.outputs, copy.outputs):
        theirs.name = f"{prefix}{mine.name}"
        theirs.type = mine.type
        env[mine] = theirs
    return copy


def _outputs(gm: fx.GraphModule, values: dict, graph_inputs: list, initializers: dict, nodes: list) -> list:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = pytree.tree_leaves(output.args[0])
    outputs = []
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, fx.Node) or leaf not in values:
            raise NotRepeated(f"the program's output {i} is {leaf!r}, not a value of the program")
        value = values[leaf]
        if value in graph_inputs or value.name in initializers or value in outputs:
            identity = ir.Node("", "Identity", [value], num_outputs=1, name=f"output_{i}")
            nodes.append(identity)
            value = identity.outputs[0]
            value.type = values[leaf].type
        value.name = f"output_{i}"
        val = leaf.meta.get("val")
        value.shape = _shape(val)
        value.type = ir.TensorType(onnx_dtype(val.dtype))
        outputs.append(value)
    return outputs
