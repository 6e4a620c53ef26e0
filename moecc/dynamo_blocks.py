"""Give the MoE blocks in a graph that ``torch.compile`` (dynamo) traced back their modules.

Dynamo hands a backend one flat graph: each MoE block is already traced into ops (HF's grouped_mm form, say), its
weights are graph inputs, and no module is left for recognition to read. Every node still records the modules it
ran in (``nn_module_stack``, keyed by the module's ``id``), and the modules are alive while dynamo compiles, so the
ops of each call of a MoE block can be found and replaced by a ``call_module`` of the block itself. ``capture``
then treats the result as it treats any model.

A call is replaced only on evidence: its ops read one tensor besides the block's own weights, and on the example
inputs every value the rest of the graph reads from them is one of the outputs the block computes from that
tensor. Otherwise the ops stay as dynamo traced them, and the reason is returned. A block that reads more (Gemma 4's
decoder layer, which routes beside attention) may still call its experts as ``experts(x, ids, weights)``
(``recognize.routed.routed_bank``): those calls, which read those three tensors alone, are given back their experts
module instead, as ``moecc.compile``'s second capture does (``Lifted.routed``)."""

from __future__ import annotations

import gc
import logging
import operator
import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from moecc.passes.recognize.bank import is_moe_block

log = logging.getLogger("moecc.dynamo")


@dataclass
class Lifted:
    gm: fx.GraphModule
    blocks: list[str] = field(default_factory=list)  # names of the blocks whose calls became call_module
    unfused: dict[str, str] = field(default_factory=dict)  # name -> why its ops stay as traced
    # block name -> (target of its experts, why the block's own calls stay as traced): experts given back alone,
    # the form of ``moecc.capture.CaptureHints.routed_banks``
    routed: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class _Call:
    """The ops of one call of a block: ``args`` the tensors it reads besides the block's weights, in the order the
    block takes them, ``outputs`` the nodes the rest of the graph reads."""

    nodes: list[fx.Node]
    args: tuple[fx.Node, ...] = ()
    outputs: list[fx.Node] = field(default_factory=list)


def module_name(path: str) -> str:
    """A dynamo source path as a module name: ``L['self'].model.layers.0.mlp`` -> ``model.layers.0.mlp``."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    parts = [re.sub(r"\W", "_", p) for p in path.split(".") if p]
    return ".".join(p if p else "_" for p in parts) or "block"


def _stack_modules(gm: fx.GraphModule) -> dict[str, tuple[str, type]]:
    """key -> (source path, module type) of every module some node ran in."""
    found: dict[str, tuple[str, type]] = {}
    for node in gm.graph.nodes:
        for key, value in (node.meta.get("nn_module_stack") or {}).items():
            found.setdefault(key, value)
    return found


def _live_modules(stack: dict[str, tuple[str, type]]) -> dict[str, nn.Module]:
    """The modules of ``stack`` that are alive, by the ``id`` dynamo keys them with, checked against their type."""
    wanted: dict[int, list[tuple[str, type]]] = {}
    for key, (_, kind) in stack.items():
        address = key.split("@", 1)[0]  # a module's second call in the graph is keyed "<id>@1"
        if address.isdigit():
            wanted.setdefault(int(address), []).append((key, kind))
    if not wanted:
        return {}
    found = {}
    for obj in gc.get_objects():
        for key, kind in wanted.get(id(obj), ()):
            if type(obj) is kind:
                found[key] = obj
    return found


def _innermost_blocks(stack: dict[str, tuple[str, type]], modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    candidates = {key: mod for key, mod in modules.items() if is_moe_block(mod)}
    paths = {key: stack[key][0] for key in candidates}
    return {key: mod for key, mod in candidates.items()
            if not any(other != key and p.startswith(paths[key] + ".") for other, p in paths.items())}


def _size_arithmetic(region: list[fx.Node]) -> set[fx.Node]:
    """The nodes of ``region`` that compute sizes from what it reads (``batch * seq`` of its input's shape): they
    stay in the graph, which may read them after the block (dynamo reuses a symbolic size it computed once)."""
    members, sizes = set(region), set()
    for n in region:  # in graph order, so every input of n is decided before n
        value = n.meta.get("example_value")
        if (not isinstance(value, torch.Tensor) and value is not None
                and all(m in sizes or m not in members for m in n.all_input_nodes)):
            sizes.add(n)
    return sizes


def _calls(gm: fx.GraphModule, key: str) -> list[list[fx.Node]]:
    """The nodes run inside the module ``key`` but for their size arithmetic, split into its calls (the connected
    parts of their graph)."""
    region = [n for n in gm.graph.nodes
              if n.op not in ("placeholder", "output") and key in (n.meta.get("nn_module_stack") or {})]
    sizes = _size_arithmetic(region)
    inside = [n for n in region if n not in sizes]
    members = set(inside)
    parent = {n: n for n in inside}

    def root(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in inside:
        for m in n.all_input_nodes:
            if m in members:
                parent[root(m)] = root(n)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in inside:
        groups.setdefault(root(n), []).append(n)
    return list(groups.values())


def _own_tensors(block: nn.Module) -> set[int]:
    return {id(t) for t in [*block.parameters(), *block.buffers()]}


def _activations(call: _Call, values_of: dict[fx.Node, object], own: set[int]) -> list[tuple[fx.Node, object]]:
    """(node, example value) of each tensor a call's ops read besides the module's weights, in graph order."""
    members = set(call.nodes)
    reads = []
    for n in call.nodes:
        for m in n.all_input_nodes:
            if m not in members and m not in reads:
                reads.append(m)
    activations = []
    for m in reads:
        example = values_of.get(m, m.meta.get("example_value"))
        if m.op == "get_attr" or (m.op == "placeholder" and isinstance(example, torch.Tensor) and id(example) in own):
            continue  # the block's weights, or a constant of the graph (the block computes its own)
        if isinstance(example, torch.Tensor):
            activations.append((m, example))
    return activations


def _describe_call(call: _Call, values_of: dict[fx.Node, object], own: set[int]) -> str | None:
    """Fill ``call.args`` and ``call.outputs``; why the call cannot be replaced, or None."""
    activations = _activations(call, values_of, own)
    if len(activations) != 1:
        return (f"its traced ops read {len(activations)} tensors besides its own weights; only a block called on "
                "its hidden states alone is lifted")
    call.args = (activations[0][0],)
    return _describe_outputs(call)


def _describe_routed_call(call: _Call, values_of: dict[fx.Node, object], own: set[int]) -> str | None:
    """Fill ``call.args`` as ``(x, ids, weights)`` and ``call.outputs`` for a call of experts the model routes;
    why the call cannot be replaced, or None."""
    activations = _activations(call, values_of, own)
    ints = [(n, v) for n, v in activations if not v.is_floating_point()]
    floats = [(n, v) for n, v in activations if v.is_floating_point()]
    if len(activations) != 3 or len(ints) != 1:
        return (f"its experts' traced ops read {len(activations)} tensors besides their weights, not hidden states, "
                "ids and weights")
    (ids, ids_v), = ints
    weights = [(n, v) for n, v in floats if v.shape == ids_v.shape]
    hidden = [(n, v) for n, v in floats if v.shape[:-1] == ids_v.shape[:-1] and v.shape != ids_v.shape]
    if len(weights) != 1 or len(hidden) != 1:
        return "its experts' traced ops read no hidden states, ids and weights of one token count"
    call.args = (hidden[0][0], ids, weights[0][0])
    return _describe_outputs(call)


def _describe_outputs(call: _Call) -> str | None:
    members = set(call.nodes)
    call.outputs = [n for n in call.nodes if any(u not in members for u in n.users)]
    if not call.outputs:
        return "nothing outside the block reads its traced ops"
    last = call.nodes[-1]
    order = {n: i for i, n in enumerate(last.graph.nodes)}
    if any(order[u] < order[last] for n in call.outputs for u in n.users if u not in members):
        return "the graph reads values of the block before its last op"
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n in self.wanted:
            self.seen[n] = value
        return value


def _size_of(size: torch.SymInt) -> int:
    """The value a symbolic size had in the traced call, read without adding a guard."""
    hint = getattr(size.node, "hint", None)
    hint = hint() if callable(hint) else hint
    if not isinstance(hint, int):
        raise _NoValue(f"dynamo passed symbolic size {size} without its value")
    return hint


class _NoValue(Exception):
    pass


def _inputs_for_run(example_inputs) -> list:
    """The example inputs with sizes as ints (dynamo passes a symbolic size's example as a SymInt), activations
    cloned: a traced op may update a KV cache it is given in place."""
    out = []
    for v in example_inputs:
        if isinstance(v, torch.SymInt):
            v = _size_of(v)
        elif isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
            v = v.clone()
        out.append(v)
    return out


def _close(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 1e-2
    return bool(torch.allclose(a.double(), b.double(), rtol=tol, atol=tol * (b.double().abs().max().item() + 1e-30)))


def _match_routed_outputs(call: _Call, bank: nn.Module, seen: dict[fx.Node, object]) -> tuple[list, str | None]:
    """``_match_outputs`` of experts the model routes, called with the ids and weights in either order (Hugging
    Face's ``experts(x, top_k_index, top_k_weights)`` first); ``call.args`` is left in the order that matched."""
    from moecc.passes.recognize.routed import routing_orders

    x, ids, weights = call.args
    why = f"{type(bank).__name__}.forward takes no (x, ids, weights) positionally"
    for weights_at, ids_at in routing_orders(bank):
        routing = [None, None]
        routing[weights_at], routing[ids_at] = weights, ids
        call.args = (x, *routing)
        paths, why = _match_outputs(call, bank, seen)
        if why is None:
            return paths, None
    call.args = (x, ids, weights)
    return [], why


def _match_outputs(call: _Call, block: nn.Module, seen: dict[fx.Node, object]) -> tuple[list, str | None]:
    """The key path into the block's output of each of ``call.outputs``; or why there is none."""
    try:
        with torch.no_grad():
            out = block(*(seen[a] for a in call.args))
    except Exception as exc:  # noqa: BLE001 - a block that takes more than its hidden states, say
        return [], f"the block fails when called on the tensors its ops read ({exc})"
    leaves = pytree.tree_flatten_with_path(out)[0]
    paths = []
    for node in call.outputs:
        value = seen.get(node)
        if not isinstance(value, torch.Tensor):
            return [], f"the graph reads a non-tensor value ({node.name}) from inside the block"
        hit = next((path for path, leaf in leaves if _close(leaf, value)), None)
        if hit is None:
            return [], (f"the graph reads {node.name} from inside the block, which is none of its outputs (a graph "
                        "break inside the block, or a recorded inner value such as router logits)")
        paths.append(hit)
    return paths, None


def _read_path(graph: fx.Graph, value: fx.Node, path) -> fx.Node:
    for key in path:
        if isinstance(key, pytree.SequenceKey):
            value = graph.call_function(operator.getitem, (value, key.idx))
        elif isinstance(key, pytree.MappingKey):
            value = graph.call_function(operator.getitem, (value, key.key))
        elif isinstance(key, pytree.GetAttrKey):
            value = graph.call_function(getattr, (value, key.name))
        else:
            raise TypeError(f"unsupported output path element {key!r}")
    return value


def _register(gm: fx.GraphModule, name: str, block: nn.Module, taken: set[str]) -> str:
    """The target of ``block`` in ``gm``, under its own name unless that clashes with what ``gm`` held before."""
    target = f"moecc_blocks.{name}" if name.split(".", 1)[0] in taken else name
    try:
        registered = gm.get_submodule(target)
    except AttributeError:
        registered = None
    if registered is not block:
        gm.add_submodule(target, block)
    return target


def _routed_calls(gm: fx.GraphModule, name: str, block: nn.Module, modules: dict[str, nn.Module],
                  values_of: dict[fx.Node, object], lifted: Lifted) -> list[tuple[str, nn.Module, _Call, str]]:
    """The calls of the experts that ``block`` (left as traced) routes itself, ``experts(x, ids, weights)``, as
    ``lift_blocks`` plans them; a call that reads anything else adds why to the block's reason instead."""
    from moecc.passes.recognize.routed import routed_bank

    try:
        sub = routed_bank(block)
    except Exception:  # noqa: BLE001 - no experts callable alone: the block's reason stands
        log.debug("looking for %s's experts alone raised", name, exc_info=True)
        sub = None
    bank = None if sub is None else block.get_submodule(sub)
    key = next((k for k, m in modules.items() if m is bank), None)
    if key is None:
        return []
    planned = []
    for nodes in _calls(gm, key):
        if not any(isinstance(n.meta.get("example_value"), torch.Tensor) for n in nodes):
            continue
        call = _Call(nodes)
        why = _describe_routed_call(call, values_of, _own_tensors(bank))
        if why is not None:
            lifted.unfused[name] += f"; {why}"
            return []
        planned.append((f"{name}.{sub}", bank, call, name))
    return planned


def lift_blocks(gm: fx.GraphModule, example_inputs) -> Lifted:
    """Replace each call of a MoE block traced into ``gm`` by a ``call_module`` of the block, where the evidence
    allows (see the module's docstring); ``gm`` is changed in place."""
    lifted = Lifted(gm)
    stack = _stack_modules(gm)
    modules = _live_modules(stack)
    if stack and not modules:
        log.warning("none of the %d modules dynamo records in this graph could be found (torch %s keys them as "
                    "%r): its MoE blocks run as dynamo traced them", len(stack), torch.__version__, next(iter(stack)))
    blocks = _innermost_blocks(stack, modules)
    if not blocks:
        return lifted
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values_of = dict(zip(placeholders, example_inputs))
    planned: list[tuple[str, nn.Module, _Call, str | None]] = []  # name, module, call, block of routed experts
    for key, block in blocks.items():
        name = module_name(stack[key][0])
        own = _own_tensors(block)
        for nodes in _calls(gm, key):
            if not any(isinstance(n.meta.get("example_value"), torch.Tensor) for n in nodes):
                continue  # no call: a global switch the block flips (grad mode), left in place
            call = _Call(nodes)
            why = _describe_call(call, values_of, own)
            if why is not None:
                lifted.unfused[name] = why
            else:
                planned.append((name, block, call, None))
        if name in lifted.unfused and not any(p[0] == name for p in planned):
            planned += _routed_calls(gm, name, block, modules, values_of, lifted)
    if not planned:
        return lifted
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    planned.sort(key=lambda p: position[p[2].nodes[0]])  # graph order, not the order modules were found in
    taken = set(dir(gm))
    wanted = {n for _, _, c, _ in planned for n in (*c.args, *c.outputs)}
    recorder = _Recorder(gm, wanted)
    try:
        inputs = _inputs_for_run(example_inputs)
    except _NoValue as exc:
        lifted.unfused.update({owner or name: str(exc) for name, _, _, owner in planned})
        return lifted
    try:
        with torch.no_grad():
            recorder.run(*inputs)
    except Exception as exc:  # noqa: BLE001 - no evidence, so no block is put back
        lifted.unfused.update({owner or name: f"the graph failed on its example inputs ({exc})"
                               for name, _, _, owner in planned})
        return lifted
    for name, block, call, owner in planned:
        if owner is None:
            paths, why = _match_outputs(call, block, recorder.seen)
        else:
            paths, why = _match_routed_outputs(call, block, recorder.seen)
        if why is not None:
            if owner is None:
                lifted.unfused[name] = why
            else:
                lifted.unfused[owner] += f"; its experts {name}: {why}"
            continue
        target = _register(gm, name, block, taken)
        if owner is not None:
            lifted.routed.setdefault(owner, (target, lifted.unfused[owner]))
        after = call.nodes[-1].next
        with gm.graph.inserting_before(after):
            out = gm.graph.call_module(target, call.args)
            members = set(call.nodes)
            for node, path in zip(call.outputs, paths):
                node.replace_all_uses_with(_read_path(gm.graph, out, path), lambda u, inside=members: u not in inside)
        for node in reversed(call.nodes):
            gm.graph.erase_node(node)
        if name not in lifted.blocks:
            lifted.blocks.append(name)
    for owner in lifted.routed:
        del lifted.unfused[owner]
    for name in lifted.blocks:
        if name in lifted.unfused:
            lifted.unfused[name] = f"some of its calls: {lifted.unfused[name]}"
    gm.graph.lint()
    gm.recompile()
    return lifted
