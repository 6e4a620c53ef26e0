"""What moecc knows about one MoE block: the specs the canonical ops are parameterised by."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from moecc.activations import describe as describe_activation


@dataclass
class RoutingSpec:
    num_experts: int
    top_k: int
    score: str = "softmax"  # moecc.routing.SCORES: softmax | sigmoid | sqrtsoftplus
    topk_first: bool = False  # top-k of the logits, then the score over the chosen ones
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    logits_fp32: bool = False
    has_router_bias: bool = False
    has_selection_bias: bool = False
    # each routing weight scales its expert's input rather than its output (Llama 4): the same only for a linear
    # expert, so recognition proves which one a block computes
    weights_on_inputs: bool = False
    group_top: int = 2  # a group's score sums its best group_top choice scores (moecc.routing.route_reference)
    has_expert_scale: bool = False  # each chosen weight times its expert's own factor, last (Gemma 4)

    def describe(self) -> str:
        on_inputs = " weights-on-inputs" if self.weights_on_inputs else ""
        if self.score == "given":
            return (f"top{self.top_k} ids and weights computed by the model's own ops, handed to the experts"
                    + (" weights-on-inputs" if self.weights_on_inputs else ""))
        if self.score == "as written":
            return f"top{self.top_k}, router kept as its own graph ops (no known pattern)" + on_inputs
        order = f"top{self.top_k}->{self.score}" if self.topk_first else f"{self.score}->top{self.top_k}"
        parts = [order]
        if self.renormalize:
            parts.append("renorm")
        if self.has_selection_bias:
            parts.append("selection-bias")
        if self.n_group > 1:
            by = "" if self.group_top == 2 else f" by top-{self.group_top}"
            parts.append(f"groups {self.topk_group}/{self.n_group}{by}")
        if self.scale != 1.0:
            parts.append(f"x{self.scale:g}")
        if self.has_expert_scale:
            parts.append("per-expert-scale")
        if self.has_router_bias:
            parts.append("router-bias")
        return " ".join(parts) + on_inputs


@dataclass
class ExpertSpec:
    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    gated: bool = True
    has_bias: bool = False
    alpha: float = 1.0
    limit: float = 0.0

    def describe(self) -> str:
        act = describe_activation(self.activation, self.alpha)
        kind = f"gated-{act}" if self.gated else act
        if self.activation == "swiglu_softcap":
            kind += f" caps {self.alpha:g}/{self.limit:g}"
        elif self.limit > 0:
            kind += f" clamp {self.limit:g}"
        return kind + (" +bias" if self.has_bias else "")


@dataclass(frozen=True)
class ExpertPost:
    """A module an expert bank applies to each expert's output rows before it weights them (a post-expert norm,
    ``moecc/passes/recognize/expert_post.py``)."""

    module: nn.Module
    takes_ids: bool  # called as ``module(rows, expert ids [rows])``

    def __call__(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.module(rows, ids) if self.takes_ids else self.module(rows)

    def on_expert(self, rows: torch.Tensor, e: int) -> torch.Tensor:
        """The module on rows that expert ``e`` computed."""
        return self(rows, torch.full(rows.shape[:1], e, dtype=torch.long, device=rows.device))

    def describe(self) -> str:
        return f"{type(self.module).__name__}{' per expert' if self.takes_ids else ''} on each expert's output"


@dataclass
class CapacitySpec:
    capacity: int = -1  # fixed capacity per group, -1: none
    capacity_factor: float = 0.0  # 0: none
    capacity_min: int = 0
    group: str = "all"  # all | sequence: tokens that share one capacity budget
    priority: str = "token"  # token | slot
    formula: str = "T*k (dropless)"
    rounding: str = "ceil"  # ceil | floor: of k*G*cf/E, for a capacity factor

    @property
    def dropless(self) -> bool:
        return self.capacity < 0 and self.capacity_factor <= 0


@dataclass
class ExpertWeights:
    """Canonical stacked layout: w_up [E, U, H] (gate rows first when gated), w_down [E, H, I]."""

    w_up: torch.Tensor
    w_down: torch.Tensor
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None


@dataclass
class SharedExpert:
    spec: ExpertSpec
    weights: ExpertWeights  # E == 1
    gate_weight: torch.Tensor | None = None  # [1, H]: sigmoid(x @ g^T) scales the shared output


@dataclass
class MoELayerInfo:
    """One entry of ``compiled.moe_layers``."""

    name: str
    num_experts: int = 0
    top_k: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    routing: str = ""
    activation: str = ""
    shared_experts: int = 0
    output_module: str = ""  # the type of a module the block applies to its output last (a norm), if any
    # the type of a module the block applies to its input first (a pre-norm), if any; "(router only)" where only
    # its router reads that module's output
    input_module: str = ""
    residual: bool = False  # the block adds its input to its output itself
    fused: bool = False
    reason: str = ""
    capacity: str = "dropless"
    placement: dict = field(default_factory=dict)
    expert_load: list = field(default_factory=list)  # tokens routed to each expert on the capture's sample
    lowering: str = ""
    # "" (float), "int4 per-channel", ..., or "none: <why>" when asked for but not applied
    quantization: str = ""  # how the backend ran it, e.g. "com.microsoft.MoE" or "decomposed: <why>"
    graph_prefix: str = ""  # where the canonical weights of this block live in the graph module
    # the block whose experts these are, where the block itself was left as written and its experts captured alone
    # (routed by the model's own ops)
    block: str = ""
    # of a block left as written: the path of the experts it calls as ``experts(x, ids, weights)``, which read as
    # canonical experts (``recognize/routed.py``); compile captures them alone next
    routed_bank: str = ""

    def as_dict(self) -> dict:
        return asdict(self)
