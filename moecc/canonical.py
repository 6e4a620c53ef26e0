"""The canonical, unfused form of one recognized MoE block, as a module of moecc ops.

It is both the recognizer's check (run eagerly against the original block) and what the recognize pass
splices into the graph (traced with FX), so the two can never disagree."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

import moecc.ops  # noqa: F401 - registers torch.ops.moecc
from moecc import routing
from moecc.ir import CapacitySpec, ExpertPost, ExpertSpec, ExpertWeights, RoutingSpec, SharedExpert


@dataclass
class BlockAnalysis:
    routing: RoutingSpec
    router_weight: torch.Tensor
    router_bias: torch.Tensor | None
    selection_bias: torch.Tensor | None
    expert: ExpertSpec
    weights: ExpertWeights
    capacity: CapacitySpec = field(default_factory=CapacitySpec)
    shared: list[SharedExpert] = field(default_factory=list)
    outputs: tuple[str, ...] = ("y",)  # what each block output is: y | weights | ids | logits | scores
    # the dtype of each block output besides y, as the block returns it (a bf16 router's logits from an fp32 fit)
    output_dtypes: tuple = ()
    output_tuple: bool = False
    flat_output: bool = False  # the block returns y as [T, H] whatever the rank of its input (Llama 4's)
    router_program: object = None  # a router no pattern matches, as its own exported graph: x -> (weights, ids)
    # a router module that computes its scores by code of its own (a router MLP), as its exported graph:
    # x -> logits [T, E]; ``router_weight`` is then its last layer's [E, F] only
    logits_program: object = None
    post: nn.Module | None = None  # a module without Linear layers the block applies to its output (A.X-K1's norm)
    # a module without Linear layers the block applies to its input before routing and experts both read it (the
    # RMSNorm inside OpenAI's reference GPT-OSS MLPBlock), or before its router alone (``pre_routes_only``);
    # ``residual`` adds the input before it
    pre: nn.Module | None = None
    pre_routes_only: bool = False  # ``pre`` feeds the router alone; the experts read the block's input (a router norm)
    residual: bool = False  # the block adds its input to its output (before ``post``)
    # the router program also reads these of the block's other arguments (DeepSeek-V4's token ids for its hash
    # layers): their places among the flat leaves of the call's (args[1:], kwargs), and how many token dims lead
    other_positions: tuple[int, ...] = ()
    token_dims: int = 1
    # experts the router scores past the bank's, which compute nothing: ids past the bank are null to the expert
    # ops. Identity experts (LongCat-Flash's zero-compute experts) pass their input on, scaled by their routing
    # weight beside the expert ops; zero experts add nothing.
    extra_experts: int = 0
    extra_pass_input: bool = True
    # the block is an expert bank the model hands its routing (``recognize/routed.py``): its other arguments at
    # ``other_positions`` are the routing weights and the expert ids, ``[*token dims, k]`` each; there is no router
    routing_given: bool = False
    expert_scale: torch.Tensor | None = None  # [E]: routing.has_expert_scale's factors
    # ``router_program`` was read off the block's own forward (``recognize/inline_routing.py``), no router module
    own_routing: bool = False
    # a module the bank applies to each (token, slot) pair's expert output before weighting it (a post-expert norm;
    # ``recognize/expert_post.py``): the fused experts then compute one unweighted row per pair, and the module's
    # output rows are weighted and summed here, in fp32
    expert_post: ExpertPost | None = None

    @property
    def expert_pre(self) -> nn.Module | None:
        """The module the block applies to its input before its experts read it."""
        return None if self.pre_routes_only else self.pre

    def describe_extra(self) -> str:
        kind = "identity" if self.extra_pass_input else "zero"
        return f" +{self.extra_experts} {kind} experts" if self.extra_experts else ""


ROUTER_INPUT_SLOTS = 4  # the block's other arguments a router program may read: CanonicalMoE.forward's other0..3


def _maybe(t):
    return None if t is None else nn.Parameter(t.detach(), requires_grad=False)


def _tensors(w: ExpertWeights) -> tuple:
    return w.w_up, w.w_down, w.b_up, w.b_down


def _registered(w: ExpertWeights) -> ExpertWeights:
    """``w`` as frozen parameters over the same storage (``_maybe`` of each)."""
    return ExpertWeights(*(_maybe(t) for t in _tensors(w)))


def _items(result, n: int) -> tuple:
    """The ``n`` items of an op's result. Unpacking an fx Proxy reads the calling function's bytecode to learn how
    many items it takes, which costs more than tracing the rest of ``forward``: indexing does not."""
    return tuple(result[i] for i in range(n))


class CanonicalMoE(nn.Module):
    def __init__(self, a: BlockAnalysis):
        super().__init__()
        self.router_program = a.router_program
        self.logits_program = a.logits_program
        self.post = a.post
        self.pre = a.pre
        self.expert_post = None if a.expert_post is None else a.expert_post.module
        self.router_weight = _maybe(a.router_weight)
        self.router_bias = _maybe(a.router_bias)
        self.selection_bias = _maybe(a.selection_bias)
        self.expert_scale = _maybe(a.expert_scale)
        weights = _registered(a.weights)
        self.w_up, self.w_down, self.b_up, self.b_down = _tensors(weights)
        shared = []
        for i, s in enumerate(a.shared):
            shared.append(replace(s, weights=_registered(s.weights), gate_weight=_maybe(s.gate_weight)))
            for name, t in zip(("w_up", "w_down", "b_up", "b_down", "gate"),
                               (*_tensors(shared[-1].weights), shared[-1].gate_weight)):
                self.register_parameter(f"shared{i}_{name}", t)
        # the analysis keeps the specs, and the detached weights registered above: its own tensors are views of the
        # model's parameters made under no_grad, which torch refuses to deepcopy once their base changed in place
        self.a = replace(a, router_weight=self.router_weight, router_bias=self.router_bias,
                         selection_bias=self.selection_bias, expert_scale=self.expert_scale, weights=weights,
                         shared=shared)

    def forward(self, x, other0=None, other1=None, other2=None, other3=None):
        a, r, e, c = self.a, self.a.routing, self.a.expert, self.a.capacity
        hidden = e.hidden_size
        block_input = x
        routed = x
        if self.pre is not None:
            routed = self.pre(x)
            x = x if a.pre_routes_only else routed
        x2 = x.reshape(-1, hidden)
        r2 = routed.reshape(-1, hidden)  # what the router reads
        logits = None
        if a.routing_given:
            weights, ids = other0.reshape(-1, r.top_k).float(), other1.reshape(-1, r.top_k).long()
        elif self.router_program is not None:
            others = (other0, other1, other2, other3)[:len(a.other_positions)]  # ROUTER_INPUT_SLOTS
            weights, ids = self.router_program(r2, *(o.flatten(0, a.token_dims - 1) for o in others))
            logits = self.logits_program(r2) if self.logits_program is not None \
                else routing.router_logits(r2, self.router_weight, self.router_bias,
                                           a.router_weight.dtype != a.weights.w_up.dtype) \
                if a.router_weight.shape[-1] == hidden else None
        elif self.logits_program is not None:
            logits = self.logits_program(r2)
        elif r.logits_fp32:
            logits = torch.nn.functional.linear(r2.float(), self.router_weight.float(),
                                                None if self.router_bias is None else self.router_bias.float())
        else:
            logits = torch.nn.functional.linear(r2, self.router_weight, self.router_bias)
        if self.router_program is None and not a.routing_given:
            weights, ids = _items(torch.ops.moecc.route(logits, self.selection_bias, r.top_k, r.score, r.topk_first,
                                                        r.renormalize, r.n_group, r.topk_group, r.scale,
                                                        *routing.optional_route_args(r.group_top, self.expert_scale)),
                                  2)
        group = x.shape[-2] if c.group == "sequence" else 0
        k = r.top_k
        if r.weights_on_inputs:
            # every (token, slot) pair becomes a row of its own, scaled in the model's dtype as the block scales
            # it, routed to its one expert with weight 1; the k rows of a token are then summed
            moe_in = (x2.unsqueeze(1) * weights.to(x2.dtype).unsqueeze(-1)).reshape(-1, hidden)
            moe_ids, moe_weights = ids.reshape(-1, 1), torch.ones_like(weights).reshape(-1, 1)
        elif self.expert_post is not None:
            # one row per (token, slot) pair, routed to its one expert with weight 1: the rows the module reads
            moe_in = x2.unsqueeze(1).expand(-1, ids.shape[-1], -1).reshape(-1, hidden)
            moe_ids, moe_weights = ids.reshape(-1, 1), torch.ones_like(weights).reshape(-1, 1)
        else:
            moe_in, moe_ids, moe_weights = x2, ids, weights
        bank = r.num_experts - a.extra_experts
        xs, order, offsets = _items(torch.ops.moecc.dispatch(moe_in, moe_ids, bank, c.capacity, c.capacity_factor,
                                                             c.capacity_min, group, c.priority,
                                                             *(() if c.rounding == "ceil" else (c.rounding,))), 3)
        ys = torch.ops.moecc.expert_ffn(xs, offsets, self.w_up, self.w_down, self.b_up, self.b_down,
                                        e.activation, e.gated, e.alpha, e.limit)
        y = torch.ops.moecc.combine(ys, order, moe_weights)
        if r.weights_on_inputs and k > 1:
            y = y.reshape(-1, k, y.shape[-1]).float().sum(1).to(y.dtype)
        elif self.expert_post is not None:
            pair_ids = ids.reshape(-1)
            live = ((pair_ids >= 0) & (pair_ids < bank)).unsqueeze(-1)
            rows = a.expert_post(y, pair_ids.clamp(0, bank - 1))  # self.expert_post: its parameters' home
            rows = torch.where(live, rows.float(), 0.0).reshape(-1, ids.shape[-1], hidden)
            y = (rows * weights.float().unsqueeze(-1)).sum(1).to(y.dtype)
        for i, s in enumerate(a.shared):
            sy = torch.ops.moecc.shared_ffn(x2, getattr(self, f"shared{i}_w_up"), getattr(self, f"shared{i}_w_down"),
                                            getattr(self, f"shared{i}_b_up"), getattr(self, f"shared{i}_b_down"),
                                            getattr(self, f"shared{i}_gate"), s.spec.activation, s.spec.gated,
                                            s.spec.alpha, s.spec.limit)
            y = y + sy
        if a.extra_experts and a.extra_pass_input:
            passed = torch.where(ids >= bank, weights.float(), 0.0).sum(-1, keepdim=True)
            y = (y.float() + x2.float() * passed).to(y.dtype)
        y = y.to(x.dtype).reshape(x2.shape if a.flat_output else x.shape)
        if a.residual:
            y = block_input.reshape(y.shape) + y
        if self.post is not None:
            y = self.post(y)
        produced = {"y": y, "weights": weights.to(x.dtype), "ids": ids, "logits": logits}
        if "scores" in a.outputs:
            produced["scores"] = routing.scores(logits, r.score)
        outs = tuple(produced[o] for o in a.outputs)
        if a.output_dtypes:
            outs = (outs[0], *(t if d is None else t.to(d) for t, d in zip(outs[1:], a.output_dtypes)))
        return outs if a.output_tuple else outs[0]
