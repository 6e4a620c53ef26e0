"""lift_routing: routing the model computes in its own graph ops, feeding canonical experts -> ``linear`` +
``moecc.route``, where evaluation proves the two equal.

Experts captured without their block (``recognize/routed.py``) are handed ids and weights that the model computes
itself, as ATen ops of the graph: a softmax, a top-k, a renormalisation written out in the model's code. When those
ops are a function of one router matmul's input alone, this pass lifts them out as a program of their own, fits a
canonical routing to its outputs on probe inputs (``recognize.router.fit_routing``: score, top-k order,
renormalisation, selection bias, groups, scale), checks the fit on two more probes, and then feeds the experts
from ``linear`` + ``moecc.route`` instead, which ``fuse_gating`` turns into one fused op. The model's own ops stay
for any other reader (a model that also returns its router's outputs). Routing that fits nothing (Inkling's, which
normalizes the routed scores together with the shared expert's) stays as written, and the pass summary says why."""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from moecc.match import MatchResult
from moecc.passes.base import MoePass, PassResult, layers_of
from moecc.passes.graph_utils import attr_of, eliminate_dead_code, nodes_calling, parameter_through_casts, recompile
from moecc.passes.recognize.probe import tolerance
from moecc.passes.recognize.router import Observed, Router, fit_routing
from moecc.routing import optional_route_args, route_reference, router_logits

log = logging.getLogger("moecc.passes")

_LINEAR = (torch.ops.aten.linear.default, torch._C._nn.linear, torch.nn.functional.linear)
_ROUTES = (torch.ops.moecc.route.default, torch.ops.moecc.fused_route.default)
PROBE_TOKENS = (64, 7, 33)  # the first fits, the others check
ALREADY_ROUTED = "routed by a recognized block's own routing"
_THROUGH = ("reshape", "float", "long")


def _ancestors(roots: list[fx.Node], stop=lambda n: False) -> set[fx.Node]:
    seen, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if not stop(n):
            todo.extend(n.all_input_nodes)
    return seen


def _router_linear(gm: fx.GraphModule, roots: list[fx.Node], num_experts: int) -> fx.Node | None:
    """The nearest linear above ``roots`` whose weight is a parameter ``[E', H]`` with ``E' >= num_experts``."""
    frontier, seen = list(roots), set()
    while frontier:
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if n.op == "call_function" and n.target in _LINEAR \
                    and (param := parameter_through_casts(n.args[1])) is not None:
                w = attr_of(gm, param)
                if w.dim() == 2 and w.shape[0] >= num_experts:
                    return n
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None


def _routing_program(gm: fx.GraphModule, linear: fx.Node, outputs: list[fx.Node]) -> MatchResult[fx.GraphModule]:
    """``x_r -> outputs`` as a program of its own, ``x_r`` the linear's input: the nodes between the two and the
    parameters they read, and nothing else (no other input of the model, no size of one)."""
    inside = _ancestors(outputs, stop=lambda n: n is linear or n.op == "get_attr")
    inside |= _ancestors([n for n in linear.all_input_nodes if n is not linear.args[0]],
                         stop=lambda n: n.op == "get_attr")
    if linear.args[0] in inside:
        return MatchResult.fail("the routing reads the router matmul's input besides through the matmul")
    reads = sorted(n.name for n in inside if n.op == "placeholder")
    if reads:
        return MatchResult.fail(f"the routing also reads the model input {reads[0]}, not only the router's")
    graph = fx.Graph()
    env = {linear.args[0]: graph.placeholder("x")}
    for node in gm.graph.nodes:
        if node in inside:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[o] for o in outputs))
    return MatchResult.success(fx.GraphModule(gm, graph))


def _from_route(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
            and node.args[0].target in _ROUTES)


def _source(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """(the model's value a canonical op reads through the canonical module's own reshapes and casts, those
    nodes). The model's nodes carry the value torch.export gave them (``meta["val"]``); inlined ones do not."""
    chain = []
    while "val" not in node.meta and node.op == "call_method" and node.target in _THROUGH:
        chain.append(node)
        node = node.args[0]
    return node, chain


def lift_one(gm: fx.GraphModule, dispatch: fx.Node, combine: fx.Node) -> MatchResult[str]:
    """Feed ``dispatch`` and ``combine`` from a canonical route proven equal to the model's routing ops above them;
    the routing's description."""
    (ids_in, ids_chain), (weights_in, weights_chain) = _source(dispatch.args[1]), _source(combine.args[2])
    per_pair = _unit_weights_of(weights_in)  # experts with a post-expert norm: rows weighted after the combine
    if per_pair is not None:
        weights_in, weights_chain = _source(per_pair)
        if not ids_chain or not weights_chain:
            return MatchResult.fail("the pair rows' routing is read without the canonical module's reshapes")
    if _from_route(ids_in) or _from_route(weights_in):
        return MatchResult.fail(ALREADY_ROUTED)
    if "val" not in ids_in.meta or "val" not in weights_in.meta:
        return MatchResult.fail(ALREADY_ROUTED)  # a router kept as its own program, inlined with the experts
    if any("val" not in u.meta and u.op != "output" and u not in (*ids_chain, *weights_chain)
            for u in (*ids_in.users, *weights_in.users)):
        return MatchResult.fail("the experts read their routing through more than reshapes and casts (weights "
                                "on the experts' inputs)")
    bank = dispatch.args[2]
    linear = _router_linear(gm, [ids_in, weights_in], bank)
    if linear is None:
        return MatchResult.fail(f"no router matmul to >= {bank} experts above the ids and weights")
    program = _routing_program(gm, linear, [weights_in, ids_in])
    if not program:
        return program
    weight_node = parameter_through_casts(linear.args[1])
    bias_node = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    if bias_node is not None and getattr(bias_node, "op", None) != "get_attr":
        return MatchResult.fail("the router's bias is computed in the graph")
    weight = attr_of(gm, weight_node)
    bias = None if bias_node is None else attr_of(gm, bias_node)
    num_experts, hidden = int(weight.shape[0]), int(weight.shape[1])
    params = [n for n in program.value.graph.nodes if n.op == "get_attr"]
    # any [E] or [1, E] parameter the routing reads may bias the selection, or scale each expert's weight
    sels = [(n.target, attr_of(gm, n).detach().reshape(num_experts)) for n in params
            if n.target not in (weight_node.target, getattr(bias_node, "target", None))
            and attr_of(gm, n).numel() == num_experts and attr_of(gm, n).shape[-1] == num_experts]
    x_val, w_val = linear.args[0].meta.get("val"), linear.args[1].meta.get("val")
    dtype = x_val.dtype if x_val is not None else weight.dtype
    w_dtype = w_val.dtype if w_val is not None else weight.dtype  # after the model's own cast
    g = torch.Generator().manual_seed(2024)
    probes = [torch.randn(n, hidden, generator=g).to(device=weight.device, dtype=dtype) for n in PROBE_TOKENS]
    try:
        with torch.no_grad():
            outs = [program.value(x) for x in probes]
    except Exception as exc:  # noqa: BLE001 - ops that need more than the probe (a size of another input)
        return MatchResult.fail(f"the routing ops do not run alone: {type(exc).__name__}")
    if not all(w.is_floating_point() and not i.is_floating_point() and w.shape == i.shape and w.dim() == 2
               for w, i in outs):
        return MatchResult.fail("the routing ops do not give [T, k] weights and ids")
    router = Router(weight.detach(), None if bias is None else bias.detach(), None,
                    [b for _, b in sels], str(weight_node.target))
    rtol = 10 * tolerance(outs[0][0].dtype)
    # the graph shows the precision of the logits: the matmul's own (random probes rarely tell the two apart, and
    # near-tied tokens of a real input would then pick other experts than the model's)
    fitted = fit_routing(router, Observed(outs[0][1].long(), outs[0][0], False), probes[0], num_experts, [], rtol,
                         logits_fp32=dtype == torch.float32 and w_dtype == torch.float32)
    if fitted is None:
        return MatchResult.fail("the routing ops match no canonical routing")
    spec, sel, per_expert = fitted
    for x, (w_ref, ids_ref) in zip(probes[1:], outs[1:]):
        logits = router_logits(x, router.weight, router.bias, spec.logits_fp32).float()
        w, ids = route_reference(logits, sel, spec.top_k, spec.score, spec.topk_first, spec.renormalize,
                                 spec.n_group, spec.topk_group, spec.scale, spec.group_top, per_expert)
        o, o_ref = ids.argsort(-1), ids_ref.long().argsort(-1)
        if not torch.equal(ids.gather(1, o), ids_ref.long().gather(1, o_ref)) or not torch.allclose(
                w.gather(1, o), w_ref.float().gather(1, o_ref), rtol=rtol, atol=rtol * 1e-2):
            return MatchResult.fail(f"{spec.describe()} fits one probe of the routing ops but not another")
    sel_target = next((t for t, b in sels if b is sel), None)
    scale_target = next((t for t, b in sels if b is per_expert), None)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    with gm.graph.inserting_before(max(weights_in, ids_in, key=order.get).next):
        # the weight as the model's matmul reads it: the parameter itself where the model's cast changes nothing
        x_r, w_r = linear.args[0], weight_node if w_dtype == weight.dtype else linear.args[1]
        if spec.logits_fp32 and (dtype != torch.float32 or w_dtype != torch.float32):
            x_r, w_r = gm.graph.call_method("float", (x_r,)), gm.graph.call_method("float", (w_r,))
        logits = gm.graph.call_function(torch.ops.aten.linear.default, (x_r, w_r, bias_node))
        sel_node, scale_node = (_per_expert(gm, t, num_experts) for t in (sel_target, scale_target))
        route = gm.graph.call_function(torch.ops.moecc.route.default, (
            logits, sel_node, spec.top_k, spec.score, spec.topk_first, spec.renormalize, spec.n_group,
            spec.topk_group, spec.scale, *optional_route_args(spec.group_top, scale_node)))
        new_w = gm.graph.call_function(operator.getitem, (route, 0))
        new_ids = gm.graph.call_function(operator.getitem, (route, 1))
    if per_pair is not None:
        # the canonical module reads ids and weights in more places than dispatch and combine (the pair rows, their
        # weighting): each of its chains of reshapes and casts now starts from the route
        ids_chain[-1].update_arg(0, new_ids)
        weights_chain[-1].update_arg(0, new_w)
        return MatchResult.success(spec.describe())
    # the route gives [T, k] fp32 weights and int64 ids, what the canonical reshapes and casts made of the model's
    dispatch.update_arg(1, new_ids)
    combine.update_arg(2, new_w)
    return MatchResult.success(spec.describe())


def _unit_weights_of(node: fx.Node) -> fx.Node | None:
    """The routing weights whose ones ``node`` is (``torch.ones_like(weights)``, inlined by the canonical module of
    experts with a post-expert norm, which weights each pair's rows after the combine), else None."""
    if "val" in node.meta or node.op != "call_function" or node.target is not torch.ones_like:
        return None
    return node.args[0] if isinstance(node.args[0], fx.Node) else None


def _per_expert(gm: fx.GraphModule, target: str | None, num_experts: int) -> fx.Node | None:
    """The parameter ``target`` as an ``[E]`` value of the graph (a router may keep it as ``[1, E]``)."""
    if target is None:
        return None
    node = gm.graph.get_attr(target)
    if tuple(attr_of(gm, node).shape) != (num_experts,):
        node = gm.graph.call_method("reshape", (node, num_experts))
    return node


def _combine_of(dispatch: fx.Node) -> fx.Node | None:
    return next((u for g in dispatch.users for u in g.users if u.target is torch.ops.moecc.combine.default), None)


class LiftRouting(MoePass):
    name = "lift_routing"

    def run(self, gm: fx.GraphModule) -> PassResult:
        lifted, kept = 0, []
        prefixes = {info.graph_prefix: info for info in layers_of(gm).values() if info.graph_prefix}
        for dispatch in nodes_calling(gm, torch.ops.moecc.dispatch.default):
            combine = _combine_of(dispatch)
            if combine is None:
                continue
            try:
                r = lift_one(gm, dispatch, combine)
            except Exception as exc:  # noqa: BLE001 - the routing stays as written; compile goes on
                log.debug("lift_routing raised", exc_info=True)
                r = MatchResult.fail(f"raised {type(exc).__name__}: {exc}")
            ffn = next((u for g in dispatch.users for u in g.users if u.target is torch.ops.moecc.expert_ffn.default),
                       None)
            prefix = ffn.args[2].target.rsplit(".", 1)[0] if ffn is not None and ffn.args[2].op == "get_attr" else ""
            if not r:
                if r.reason != ALREADY_ROUTED:
                    kept.append(f"{prefix or dispatch.name}: {r.reason}")
                continue
            lifted += 1
            if prefix in prefixes:
                prefixes[prefix].routing = f"{r.value}, lifted from the model's own routing ops"
        self.stats = {"lifted": lifted, "kept": kept}
        if lifted:
            _drop_orphan_asserts(gm)
            eliminate_dead_code(gm.graph)
            recompile(gm)
        return PassResult(gm, lifted > 0)


def _drop_orphan_asserts(gm: fx.GraphModule) -> None:
    """Remove ``_assert_tensor_metadata`` checks of values that nothing but such checks reads any more: torch.export
    adds them to a model's casts, and as side effects they would keep alive the routing ops this pass replaced."""
    def check(n: fx.Node) -> bool:
        return n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default

    while True:
        eliminate_dead_code(gm.graph)
        orphans = [n for n in gm.graph.nodes if check(n) and isinstance(n.args[0], fx.Node)
                   and all(check(u) for u in n.args[0].users)]
        if not orphans:
            return
        for n in orphans:
            gm.graph.erase_node(n)
