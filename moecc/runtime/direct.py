"""Run a lowered program's moecc ops as direct Python calls, without torch's operator dispatcher.

The program keeps its ``torch.ops.moecc.*`` calls, which export, tracing and ``torch.compile`` need. For running
it, though, each call through the dispatcher costs host time: on an H100 host one ``moecc::fused_moe_triton`` call
took 748 us where its Python body, called with the same arguments, took 494 us (``benchmarks/host_path.py``),
which decides the layer's time wherever the kernels are shorter than the host work (Qwen3-MoE at 4096 tokens).
So the runtime executes a copy of the graph whose moecc custom ops call their implementation directly. Only ops
with one implementation for every device and no mutated arguments are swapped; the copy shares the program's
parameters and buffers."""

from __future__ import annotations

import functools
import logging

import torch
from torch import fx
from torch._library import custom_ops

log = logging.getLogger("moecc.runtime")


def direct_body(target):
    """The Python implementation behind ``target`` when it is a moecc custom op that may be called directly,
    else None."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "moecc":
        return None
    # torch keeps these private: where a release moves them, the op runs through the dispatcher as before
    opdef = getattr(custom_ops, "OPDEFS", {}).get(target.name())
    body = getattr(opdef, "_init_fn", None)
    if body is None or set(getattr(opdef, "_backend_fns", {"?": None})) != {None} or target._schema.is_mutable:
        return None
    return _below_autograd(body)


@functools.cache
def _below_autograd(body):
    # the dispatcher runs an op without an autograd formula below autograd: its body records no graph
    def call(*args, **kwargs):
        with torch.no_grad():
            return body(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"{body.__name__}_direct"
    call.moecc_op = True  # what ``cudagraphs.graphed_ops`` looks for
    return call


def direct_calls(program, in_place: bool = False):
    """``program`` with its moecc ops called directly: a GraphModule sharing its parameters, or with
    ``in_place`` the same module, recompiled (for a program that nothing traces or exports again, such as one
    loaded from an artifact, whose input checks stay as they are). ``program`` itself when it calls none, or is
    not a GraphModule."""
    if not isinstance(program, fx.GraphModule):
        return program
    swaps = {node.name: body for node in program.graph.nodes
             if node.op == "call_function" and (body := direct_body(node.target)) is not None}
    if not swaps:
        return program
    log.debug("%d moecc op calls run without the dispatcher", len(swaps))
    if in_place:
        for node in program.graph.nodes:
            if node.name in swaps:
                node.target = swaps[node.name]
        program.recompile()
        return program
    return retargeted(program, swaps, "DirectProgram")


def retargeted(program: fx.GraphModule, targets: dict, class_name: str) -> fx.GraphModule:
    """A copy of ``program`` whose nodes named in ``targets`` call the target given there instead; it shares the
    program's parameters and buffers."""
    graph = fx.Graph()
    graph.set_codegen(program.graph._codegen)  # e.g. an exported program's pytree handling of its inputs
    env: dict[fx.Node, fx.Node] = {}
    for node in program.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.name in targets:
            env[node].target = targets[node.name]
    return fx.GraphModule(program, graph, class_name=class_name)
