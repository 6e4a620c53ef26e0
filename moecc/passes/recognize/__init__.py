"""recognize: lift each captured MoE block (a ``call_module`` leaf) into canonical moecc ops."""

from __future__ import annotations

import logging
import operator
import time

import torch
from torch import fx
from torch.utils import _pytree as pytree

from moecc import module_state
from moecc.canonical import ROUTER_INPUT_SLOTS, CanonicalMoE
from moecc.hooks import own_hooks
from moecc.ir import MoELayerInfo
from moecc.match import MatchResult
from moecc.passes.base import MoePass, PassResult, layers_of
from moecc.passes.graph_utils import inline_module, output_leaves, recompile
from moecc.passes.recognize import inline_routing
from moecc.passes.recognize.bank import is_moe_block
from moecc.passes.recognize.block import OFFLOADED, analyze_block, offloaded_weights, unfit_parameters
from moecc.passes.recognize.memo import RecognitionMemo
from moecc.passes.recognize.other_args import OtherArgs, independent_of_other_args
from moecc.passes.recognize.routed import analyze_routed_bank, routed_bank, routing_positions

log = logging.getLogger("moecc.passes.recognize")

# a block call's meta: why no canonical routing may serve it (``runtime.localize`` found one to differ from the block)
REFUSED_ROUTING = "moecc_refused_routing"
# a block call's meta while recognize analyzes it: a block of the same structure took the routing read off its own
# code, which this one is then offered before the search
OWN_ROUTING_FIRST = "moecc_own_routing_first"
REUSE_FAILURES_AFTER_S = 1.0  # a block left as written after a search this long: same-structure blocks reuse it


def _example_of(node: fx.Node) -> torch.Tensor:
    val = node.args[0].meta.get("val")
    shape = [s if isinstance(s, int) else 2 for s in val.shape]
    return torch.empty(shape, dtype=val.dtype)


def _other_args(node: fx.Node) -> str:
    """The block's arguments besides its hidden states, as a reason names them; empty when there are none."""
    parts = [f"argument {i + 1}" for i, a in enumerate(node.args[1:]) if a is not None]
    parts += [k for k, v in node.kwargs.items() if v is not None]
    return ", ".join(parts)


def _reads(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(the nodes that read a block call's outputs, the ``output_leaves`` nodes between them and the call): a
    block of nested outputs is read through ``graph_utils.output_leaves``, whose getitems number its tensors."""
    flat = [u for u in node.users if u.target is output_leaves]
    return [u for f in flat for u in f.users] + [u for u in node.users if u not in flat], flat


def _read_outputs(node: fx.Node) -> set[int] | None:
    """Which of a block call's tensor outputs the graph reads (None: a block of one output, read whole)."""
    reads, _ = _reads(node)
    if not all(u.target is operator.getitem for u in reads):
        return None
    return {u.args[1] for u in reads if u.users}


def _analyze(block: torch.nn.Module, node: fx.Node):
    """The block's analysis; for a block whose outputs depend on its other arguments, one whose router, kept as
    written, reads them (DeepSeek-V4's hash layers pick experts by token id)."""
    names = _other_args(node)
    read = _read_outputs(node)
    refused = node.meta.get(REFUSED_ROUTING, "")
    if not names:
        return analyze_block(block, _example_of(node), read=read, refused=refused,
                             own_first=node.meta.get(OWN_ROUTING_FIRST, False))
    from moecc.capture import EXAMPLE_CALLS

    call = EXAMPLE_CALLS.get(block)
    if call is not None and routing_positions(call) is not None and not is_moe_block(block):
        return analyze_routed_bank(block, call)
    r = independent_of_other_args(block, call, names)
    if r:
        return analyze_block(block, _example_of(node), read=read, refused=refused)
    if call is None:
        return r
    others = OtherArgs(call)
    if not others.positions or len(others.positions) > ROUTER_INPUT_SLOTS:
        return r
    with_others = analyze_block(block, _example_of(node), others, read, refused)
    if with_others and with_others.value.router_program is None:
        return r  # a canonical routing cannot read them: the block's dependence on them is somewhere else
    return with_others if with_others else MatchResult.fail(f"{r.reason}; with them, {with_others.reason}")


def _analyze_keeping_state(block: torch.nn.Module, node: fx.Node):
    """``_analyze``, with the block's buffers put back after its probes; a block whose calls update its buffers
    (an expert-load count) is no canonical block: the fused ops would compute its outputs and never update them."""
    if offloaded_weights(block):
        return MatchResult.fail(OFFLOADED)
    pre, post = own_hooks(block)
    if pre or post:
        return MatchResult.fail(f"it has forward {'pre-' if pre and not post else ''}hooks of its own "
                                f"({len(pre) + len(post)}), which run around it as written and which no fused op "
                                "would run")
    with module_state.kept(block) as before:
        result = _analyze(block, node)
        changed = before.changed()
    if changed:
        return MatchResult.fail(f"calling it updates its buffer{'s' if len(changed) > 1 else ''} "
                                f"{', '.join(changed)}, which no fused op would")
    return result


def routed_bank_path(name: str, block: torch.nn.Module) -> str:
    """The model path of the experts ``block`` calls as ``experts(x, ids, weights)`` (``routed.routed_bank``), or
    "" where there are none or nothing can fuse them."""
    if unfit_parameters(block) is not None:
        return ""
    try:
        sub = routed_bank(block)
    except Exception:  # noqa: BLE001 - the block stays as written, with the reason it has
        log.debug("looking for %s's experts alone raised", name, exc_info=True)
        return ""
    return "" if sub is None else f"{name}.{sub}" if name else sub


def _structure(block: torch.nn.Module, node: fx.Node) -> tuple:
    """What decides whether recognition can fit a block: the classes of its modules, its parameters' names,
    shapes and dtypes, its input's shape and dtype, and how it is called. Not its weight values."""
    val = node.args[0].meta.get("val")
    return (tuple(type(m) for m in block.modules()),
            tuple((n, tuple(p.shape), p.dtype) for n, p in [*block.named_parameters(), *block.named_buffers()]),
            None if val is None else (tuple(str(d) for d in val.shape), val.dtype),
            _other_args(node), None if (read := _read_outputs(node)) is None else frozenset(read))


def _any_length(structure: tuple) -> tuple:
    """``_structure`` with its input's sizes reduced to its rank: a canonical block is the same function at every
    length (an encoder and a decoder sharing one block call it on sequences of their own lengths)."""
    classes, params, value, other_args, read = structure
    return classes, params, None if value is None else (len(value[0]), value[1]), other_args, read


def _inputs(node: fx.Node, a) -> list[fx.Node]:
    """The hidden states, then the other arguments the canonical block reads."""
    leaves = pytree.tree_flatten((tuple(node.args[1:]), dict(node.kwargs)))[0]
    return [node.args[0], *(leaves[i] for i in a.other_positions)]


class Recognize(MoePass):
    name = "recognize"

    def __init__(self, memo: RecognitionMemo | None = None) -> None:
        super().__init__()
        # the analyses of the model's earlier captures, reused while nothing they read of a block has changed
        self.memo = memo if memo is not None else RecognitionMemo()
        # block path -> the analysis of each block lifted: what the check on fresh inputs compares each block with
        # where the whole program disagrees (``runtime.localize``); the graph's own canonical modules give their
        # weights up to the graph when inlined
        self.canonical: dict[str, object] = {}

    def run(self, gm: fx.GraphModule) -> PassResult:
        layers = layers_of(gm)
        modified = False
        matched = failed = reused = 0
        failed_like: dict[tuple, tuple] = {}  # structure -> (first block, reason) of blocks left as written
        own_routing: set[tuple] = set()  # structures of blocks that took the routing read off their own code
        # a block the model calls more than once (one target, several nodes): the canonical module of its first
        # call serves each call alike, so that its weights are held once
        lifted: dict[tuple, tuple] = {}  # (target, *structure at any length) -> (analysis, canonical module, prefix)
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and "moecc_block" in n.meta]
        for node in calls:
            name = node.meta["moecc_block"]
            block = gm.get_submodule(node.target)
            info = layers.setdefault(name, MoELayerInfo(name=name))
            key = _structure(block, node)
            reuse = (node.target, *_any_length(key))
            if reuse in lifted:
                a, module, prefix = lifted[reuse]
                self._replace(gm, node, inline_module(gm, node, module, prefix, _inputs(node, a)), a.output_tuple)
                modified = True
                continue
            failed_key = (key, node.meta.get(REFUSED_ROUTING, ""))  # a block refused canonical routings fails apart
            told = False  # the block was left as written in an earlier capture, which warned about it
            if failed_key in failed_like:
                # a search that fails tries every candidate (thousands for a stacked bank routed inline): the
                # same code over the same shapes fails the same way, and leaving a block as written is always exact;
                # only long searches are reused, so that a failure a block's values caused costs little
                first, reason = failed_like[failed_key]
                result = MatchResult.fail(f"{reason} (as {first}, the same module over the same shapes)")
            else:
                start = time.perf_counter()
                own_first = failed_key in own_routing
                # a block whose call reads other arguments is analyzed on the call's own values: never reused
                memo_key = None if _other_args(node) else (_any_length(key), failed_key[1], own_first)
                result = None if memo_key is None else self.memo.get(block, memo_key)
                if result is not None:
                    log.debug("MoE block %s: recognized as in an earlier capture", name)
                    reused += 1
                    told = not result
                else:
                    result = self._analyze(name, block, node, own_first)
                    if memo_key is not None:
                        self.memo.put(block, memo_key, result)
                if not result and time.perf_counter() - start > REUSE_FAILURES_AFTER_S:
                    failed_like[failed_key] = (name, result.reason)
                if result and result.value.own_routing:
                    own_routing.add(failed_key)
            if not result:
                info.reason = result.reason
                failed += 1
                info.routed_bank = routed_bank_path(name, block)
                if info.routed_bank:
                    log.info("MoE block %s is no canonical block (%s); its experts %s may fuse alone", name,
                             result.reason, info.routed_bank)
                else:
                    (log.info if told else log.warning)("MoE block %s left as written: %s", name, result.reason)
                continue
            a = result.value
            info.num_experts, info.top_k = a.routing.num_experts, a.routing.top_k
            info.hidden_size, info.intermediate_size = a.expert.hidden_size, a.expert.intermediate_size
            info.routing, info.activation = a.routing.describe(), a.expert.describe()
            if a.expert_post is not None:
                info.activation += f", then {a.expert_post.describe()}"
            info.num_experts -= a.extra_experts
            info.routing += a.describe_extra()
            if node.meta.get(REFUSED_ROUTING):
                info.routing += (" (the canonical routing that passed recognition's probes differed from it on "
                                 "fresh inputs)")
            info.shared_experts = len(a.shared)
            info.output_module = "" if a.post is None else type(a.post).__name__
            info.input_module = "" if a.pre is None else type(a.pre).__name__ + (" (router only)"
                                                                                 if a.pre_routes_only else "")
            info.residual = a.residual
            info.capacity = "dropless" if a.capacity.dropless else a.capacity.formula
            others = sum(r[0] == node.target for r in lifted)  # calls of another signature or dtype
            prefix = f"{node.target}_moe" + (f"_{others}" if others else "")
            info.graph_prefix = info.graph_prefix or prefix
            module = CanonicalMoE(a)
            lifted[reuse] = (a, module, prefix)
            self.canonical[name] = a
            self._replace(gm, node, inline_module(gm, node, module, prefix, _inputs(node, a)), a.output_tuple)
            matched += 1
            modified = True
        inline_routing.forget()
        still_called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for target in {n.target for n in calls} - still_called:
            gm.delete_submodule(target)
        self.stats = {"matched": matched, "left_as_written": failed, "reused": reused}
        if modified:
            gm.graph.lint()
            recompile(gm)
        return PassResult(gm, modified)

    @staticmethod
    def _analyze(name: str, block: torch.nn.Module, node: fx.Node, own_first: bool):
        if own_first:
            node.meta[OWN_ROUTING_FIRST] = True
        try:
            return _analyze_keeping_state(block, node)
        except Exception as exc:  # noqa: BLE001 - a block recognition cannot analyze runs as written
            log.debug("recognizing %s raised", name, exc_info=True)
            return MatchResult.fail(f"recognition raised {type(exc).__name__}: {exc} (a moecc bug: please report it "
                                    "with MOECC_DUMP_DIR set)")
        finally:
            node.meta.pop(OWN_ROUTING_FIRST, None)

    @staticmethod
    def _replace(gm: fx.GraphModule, node: fx.Node, out, is_tuple: bool) -> None:
        if not is_tuple:
            node.replace_all_uses_with(out)
        else:
            reads, flat = _reads(node)
            for user in reads:
                assert user.target is operator.getitem, "tuple-returning blocks are only read by getitem"
                user.replace_all_uses_with(out[user.args[1]])
                gm.graph.erase_node(user)
            for f in flat:
                gm.graph.erase_node(f)
        gm.graph.erase_node(node)
