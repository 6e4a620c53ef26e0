"""MoE blocks written the way users write them."""

from __future__ import annotations

import collections
import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def weighted_experts(experts, x, weights, chosen):
    """Each token's chosen experts on its row, weighted and summed: the usual loop over experts."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = torch.where(chosen == e)
        out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
    return out


class LoopMoE(nn.Module):
    """A Linear gate, a ModuleList of MLP experts, the usual loop with torch.where / index_add_."""

    renormalize = True

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(hidden, inter) for _ in range(num_experts))

    @staticmethod
    def apply_expert(expert, x, weight):
        return expert(x) * weight

    def router_input(self, x):
        return x

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(self.router_input(x)), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            out.index_add_(0, token, self.apply_expert(expert, x[token], weights[token, slot, None]))
        return out.reshape(shape)


class GShardMoE(nn.Module):
    """Dense einsum dispatch/combine with one-hot masks and a capacity factor (top-1, Switch/GShard style)."""

    def __init__(self, hidden=24, inter=32, num_experts=4, capacity_factor=1.0):
        super().__init__()
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.wi = nn.Parameter(torch.randn(num_experts, hidden, inter) * hidden ** -0.5)
        self.wo = nn.Parameter(torch.randn(num_experts, inter, hidden) * inter ** -0.5)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        tokens, num_experts = x.shape[0], self.wi.shape[0]
        capacity = max(0, -(-int(tokens * self.capacity_factor) // num_experts))
        probs = F.softmax(self.router(x), dim=-1)
        gate, index = probs.max(dim=-1)
        mask = F.one_hot(index, num_experts)
        position = (torch.cumsum(mask, dim=0) - 1) * mask
        keep = (position < capacity) & (mask > 0)
        slot = position.sum(-1).clamp(max=max(capacity, 1) - 1)
        dispatch = F.one_hot(slot, max(capacity, 1)).unsqueeze(1) * keep.unsqueeze(-1)
        dispatch = dispatch.to(x.dtype)  # [T, E, C]
        expert_in = torch.einsum("tec,th->ech", dispatch, x)
        h = F.gelu(torch.einsum("ech,ehi->eci", expert_in, self.wi))
        expert_out = torch.einsum("eci,eih->ech", h, self.wo)
        combine = dispatch * gate[:, None, None]
        return torch.einsum("tec,ech->th", combine, expert_out).reshape(shape)


class FloorCapacityMoE(nn.Module):
    """nanoMoE's layer (top-k then softmax over the kept logits; a capacity of ``floor(k * cf * T / E)`` per
    expert, slot-major: every first choice claims a place before any second choice; dense dispatch and combine
    masks; GELU experts as stacked weights under ``torch.bmm``). Fails below ``E / (k * cf)`` tokens, as nanoMoE
    does (a capacity of 0)."""

    def __init__(self, hidden=24, num_experts=8, top_k=2, capacity_factor=1.25):
        super().__init__()
        self.top_k, self.n_exp, self.capacity_factor = top_k, num_experts, capacity_factor
        self.w_g = nn.Linear(hidden, num_experts, bias=False)
        self.c_fc = nn.Parameter(torch.randn(num_experts, hidden, 4 * hidden) * hidden ** -0.5)
        self.c_proj = nn.Parameter(torch.randn(num_experts, 4 * hidden, hidden) * (4 * hidden) ** -0.5)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        tokens, k = x.shape[0], self.top_k
        logits = self.w_g(x)
        top_logits, top_ids = logits.topk(k, dim=-1)
        probs = torch.full_like(logits, float("-inf")).scatter_(-1, top_ids, top_logits).softmax(-1)
        capacity = math.floor(k * self.capacity_factor * tokens / self.n_exp)
        mask = F.one_hot(top_ids, self.n_exp).permute(1, 0, 2)  # [k, T, E]
        rank = (torch.cumsum(mask.reshape(k * tokens, self.n_exp), 0) - 1).reshape(k, tokens, self.n_exp)
        mask = mask * torch.lt(rank, capacity)
        rank = torch.sum(mask * rank, dim=-1)  # [k, T]
        weights = mask * probs[None]  # [k, T, E]
        combine = torch.sum(weights.unsqueeze(3) * F.one_hot(rank, capacity).unsqueeze(2), dim=0)  # [T, E, C]
        batches = combine.bool().permute(1, 2, 0).type_as(x) @ x  # [E, C, H]
        out = torch.bmm(F.gelu(torch.bmm(batches, self.c_fc)), self.c_proj)
        return (combine.reshape(tokens, -1) @ out.reshape(-1, shape[-1])).reshape(shape)


class BmmMoE(nn.Module):
    """Stacked 3D expert weights gathered per (token, slot) and applied with torch.bmm."""

    def __init__(self, hidden=24, inter=36, num_experts=5, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.randn(num_experts, hidden, inter) * hidden ** -0.5)
        self.w_up = nn.Parameter(torch.randn(num_experts, hidden, inter) * hidden ** -0.5)
        self.w_down = nn.Parameter(torch.randn(num_experts, inter, hidden) * inter ** -0.5)

    def router_input(self, x):
        return x

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(self.router_input(x))
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        flat = idx.reshape(-1)
        xs = x.repeat_interleave(self.top_k, dim=0).unsqueeze(1)
        h = F.silu(torch.bmm(xs, self.w_gate[flat])) * torch.bmm(xs, self.w_up[flat])
        y = torch.bmm(h, self.w_down[flat]).squeeze(1)
        y = (y.view(-1, self.top_k, shape[-1]) * weights.unsqueeze(-1)).sum(1)
        return y.reshape(shape)


class BiasArgRouter(nn.Module):
    """A router module that reads [B, S, H] and takes the selection bias its block holds as an argument (AFMoE's
    layout): sigmoid scores, top-k of scores plus bias, renormalised scores; ``temperature`` != 1 is no known
    pattern (its weights are a softmax of the top-k scores over a temperature)."""

    def __init__(self, hidden, num_experts, top_k, temperature=1.0):
        super().__init__()
        self.top_k, self.temperature = top_k, temperature
        self.gate = nn.Linear(hidden, num_experts, bias=False)

    def forward(self, x, expert_bias):
        _, _, hidden = x.shape
        scores = torch.sigmoid(self.gate(x.view(-1, hidden)).float())
        _, chosen = torch.topk(scores + expert_bias, self.top_k, dim=-1)
        top = scores.gather(1, chosen)
        if self.temperature != 1.0:
            return torch.softmax(top / self.temperature, -1), chosen
        return top / (top.sum(-1, keepdim=True) + 1e-20), chosen


class BlockBiasMoE(nn.Module):
    """The selection bias is the block's parameter, handed to its router module on each call."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2, temperature=1.0):
        super().__init__()
        self.router = BiasArgRouter(hidden, num_experts, top_k, temperature)
        self.experts = nn.ModuleList(MLP(hidden, inter) for _ in range(num_experts))
        self.expert_bias = nn.Parameter(torch.randn(num_experts) * 0.1, requires_grad=False)

    def forward(self, x):
        weights, chosen = self.router(x, self.expert_bias)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None].to(flat.dtype))
        return out.reshape(x.shape)


class InputScaledMoE(LoopMoE):
    """Each routing weight scales its expert's input, not its output (Llama 4's way, here with k = 2), and the
    top-k scores are not renormalised."""

    renormalize = False

    @staticmethod
    def apply_expert(expert, x, weight):
        return expert(x * weight)


class OutputGateMoE(LoopMoE):
    """A sigmoid gate of each token over the whole output of the block, and no shared expert: no canonical form."""

    def __init__(self, hidden=24, **kw):
        super().__init__(hidden, **kw)
        self.out_gate = nn.Linear(hidden, 1)

    def forward(self, x):
        return super().forward(x) * torch.sigmoid(self.out_gate(x))


class TinyModel(nn.Module):
    """Embedding, a norm and a residual around a user MoE block: a whole model, not a bare block."""

    def __init__(self, block: nn.Module, hidden=24, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.moe = block
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.moe(self.norm(h))
        return self.head(h)


class ValueBranchModel(nn.Module):
    """Control flow on tensor values outside the MoE blocks (torch.export refuses it): the hidden states are
    halved where their largest entry passes ``limit``. Two layers, each a block of ``make_block()``."""

    def __init__(self, make_block, hidden=24, vocab=50, limit=2.5):
        super().__init__()
        self.limit = limit
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(2))
        self.blocks = nn.ModuleList(make_block() for _ in range(2))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        for norm, block in zip(self.norms, self.blocks):
            if h.abs().max() > self.limit:
                h = h / 2
            h = h + block(norm(h))
        return self.head(h)


class TracedOtherwiseModel(TinyModel):
    """Code that takes another path while exported: the residual is scaled only under ``torch.export``, as a
    library may build an attention mask one way in eager and another way while traced (transformers 5.17's Doge).
    The exported program computes other numbers than eager on every input."""

    def forward(self, ids):
        h = self.embed(ids)
        if torch.compiler.is_exporting():
            h = h * 0.5
        return self.head(h + self.moe(self.norm(h)))


class IdentityExpertsMoE(nn.Module):
    """A softmax router over ``num_experts + identity`` experts, of which the last ``identity`` compute nothing and
    pass their input on, scaled by their weight (LongCat-Flash's identity experts, MoE++'s copy experts), or, with
    ``pass_input=False``, add nothing (MoE++'s zero experts); the expert loop of a user's own code."""

    def __init__(self, hidden=24, inter=40, num_experts=6, identity=3, top_k=3, pass_input=True):
        super().__init__()
        self.top_k = top_k
        self.pass_input = pass_input
        self.gate = nn.Linear(hidden, num_experts + identity, bias=False)
        self.experts = nn.ModuleList(MLP(hidden, inter) for _ in range(num_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = torch.topk(F.softmax(self.gate(x), dim=-1), self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e in range(self.gate.out_features):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            if e >= len(self.experts) and not self.pass_input:
                continue
            rows = x[token] if e >= len(self.experts) else self.experts[e](x[token])
            out.index_add_(0, token, rows * weights[token, slot, None])
        return out.reshape(shape)


class TopkIndexer(nn.Module):
    """The ``keep`` features of the highest ReLU scores, as a DeepSeek-V3.2 indexer picks keys: the scores that the
    ReLU leaves at zero tie."""

    def __init__(self, hidden=24, keep=16):
        super().__init__()
        self.keep = keep
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, h):
        return F.relu(self.proj(h)).topk(self.keep, dim=-1).indices


class TiedTopkModel(TinyModel):
    """A ``TopkIndexer`` outside the MoE block keeps some features of the hidden states. torch and ONNX Runtime
    keep other features among the tied ones, so the ONNX program computes other numbers than eager."""

    def __init__(self, block: nn.Module, hidden=24, vocab=50):
        super().__init__(block, hidden, vocab)
        self.indexer = TopkIndexer(hidden)

    def forward(self, ids):
        h = self.embed(ids)
        h = h * torch.zeros_like(h).scatter(-1, self.indexer(h), 1.0)
        h = h + self.moe(self.norm(h))
        return self.head(h)


class SquaredReluMLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)) ** 2)


class SquaredReluMoE(LoopMoE):
    """Experts of squared ReLU (Nemotron-H's), not gated."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        self.experts = nn.ModuleList(SquaredReluMLP(hidden, inter) for _ in range(num_experts))


class MLPRoutedMoE(LoopMoE):
    """A router that is a small MLP of its own width scoring the experts and a skip class (ZAYA's): no Linear to E
    outputs, no [E, H] weight of the hidden states. A token's slot on the skip class adds nothing."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        self.gate = nn.Sequential(nn.Linear(hidden, 16), nn.GELU(), nn.Linear(16, num_experts + 1))


class PostNormMoE(LoopMoE):
    """The block normalizes its own output (A.X-K1's post-MLP norm inside its MoE block)."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        self.out_norm = nn.LayerNorm(hidden)
        with torch.no_grad():
            self.out_norm.weight.uniform_(0.5, 1.5)
            self.out_norm.bias.normal_()

    def forward(self, x):
        return self.out_norm(super().forward(x))


class IdsModel(nn.Module):
    """``TinyModel`` whose MoE block is also handed the token ids (as DeepSeek-V4's decoder hands them)."""

    def __init__(self, block: nn.Module, hidden=24, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.moe = block
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.moe(h, input_ids=ids)
        return self.head(h)


class KeywordIdsModel(IdsModel):
    """Hands the block its hidden states by keyword as well."""

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.moe(x=h, input_ids=ids)
        return self.head(h)


class IgnoresIdsMoE(LoopMoE):
    def forward(self, x, input_ids=None):
        return super().forward(x)


class PadMaskedMoE(LoopMoE):
    """Token id 0 is padding: its output is zero. The example ids hold no 0, so the example call alone would not
    show that the block reads them."""

    def forward(self, x, input_ids=None):
        out = super().forward(x)
        return out if input_ids is None else out * (input_ids != 0).unsqueeze(-1).to(out.dtype)


class HashRouter(nn.Module):
    """Experts from a fixed table of token ids, weighted by the renormalised router scores of those experts."""

    def __init__(self, hidden, num_experts, top_k, vocab):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, hidden) * hidden ** -0.5)
        self.register_buffer("table", torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(vocab)]))

    def forward(self, x, input_ids):
        chosen = self.table[input_ids.reshape(-1)]
        weights = F.softmax(F.linear(x.reshape(-1, x.shape[-1]), self.weight), dim=-1).gather(1, chosen)
        return weights / weights.sum(-1, keepdim=True), chosen


class HashRoutedMoE(LoopMoE):
    """DeepSeek-V4's hash layers: the router module reads the token ids the decoder hands the block."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2, vocab=50):
        super().__init__(hidden, inter, num_experts, top_k)
        del self.gate
        self.router = HashRouter(hidden, num_experts, top_k, vocab)

    def forward(self, x, input_ids=None):
        shape = x.shape
        weights, chosen = self.router(x, input_ids)
        x = x.reshape(-1, shape[-1])
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, self.apply_expert(expert, x[token], weights[token, slot, None]))
        return out.reshape(shape)


class ScaledOutputMoE(LoopMoE):
    """Returns its output times a constant written in its code, not held as an attribute."""

    def forward(self, x):
        return 1.5 * super().forward(x)


class SequentialGeluMoE(LoopMoE):
    """Experts as ``nn.Sequential(Linear, GELU, Linear)`` with biases, a router with a bias, and a softmax over the
    top-k logits."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        self.gate = nn.Linear(hidden, num_experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, inter), nn.GELU(), nn.Linear(inter, hidden))
                                     for _ in range(num_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, chosen = self.gate(x).topk(self.top_k, dim=-1)
        weights = logits.softmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out[token] += weights[token, slot, None] * expert(x[token])
        return out.reshape(shape)


class ProjectionListsMoE(nn.Module):
    """One ``ModuleList`` per projection (``w1[e]``, ``w3[e]``, ``w2[e]``) instead of one module per expert, and
    Switch's top-1: the largest router probability, not renormalised."""

    def __init__(self, hidden=24, inter=40, num_experts=6, bias=False):
        super().__init__()
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w1 = nn.ModuleList(nn.Linear(hidden, inter, bias=bias) for _ in range(num_experts))
        self.w3 = nn.ModuleList(nn.Linear(hidden, inter, bias=bias) for _ in range(num_experts))
        self.w2 = nn.ModuleList(nn.Linear(inter, hidden, bias=bias) for _ in range(num_experts))

    def forward(self, x):
        weight, chosen = self.router(x).softmax(-1).max(-1)
        out = torch.zeros_like(x)
        for e in range(len(self.w1)):
            mask = chosen == e
            if mask.any():
                h = F.silu(self.w1[e](x[mask])) * self.w3[e](x[mask])
                out[mask] = weight[mask, None] * self.w2[e](h)
        return out


class ResidualInsideMoE(LoopMoE):
    """Adds its input to its output itself, as an FFN sub-layer with its residual inside does."""

    def forward(self, x):
        return x + super().forward(x)


class FusedGateUpMLP(nn.Module):
    """One Linear for gate and up together, split in halves (``chunk``) or in alternate rows; ``split`` names the
    gate's part: "first_half", "second_half", "even" or "odd"."""

    def __init__(self, hidden, inter, split="first_half", bias=False):
        super().__init__()
        self.split = split
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=bias)
        self.down = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        y = self.gate_up(x)
        if self.split in ("first_half", "second_half"):
            a, b = y.chunk(2, dim=-1)
        else:
            a, b = y[..., ::2], y[..., 1::2]
        gate, up = (a, b) if self.split in ("first_half", "even") else (b, a)
        return self.down(F.silu(gate) * up)


class FusedGateUpMoE(LoopMoE):
    def __init__(self, split="first_half", bias=False, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        self.experts = nn.ModuleList(FusedGateUpMLP(hidden, inter, split, bias) for _ in range(num_experts))


class ScaledLogitsMoE(LoopMoE):
    """Scores ``softmax(gate(x) * scale + shift)``: a router temperature (``scale = 1 / T``), a learned
    per-expert logit bias, or both, written in the block's code rather than in its gate. ``after_topk``: the
    block takes the top-k of the logits as they are and scales only the k it kept (no shift then)."""

    def __init__(self, scale=1.0, shift=False, top_k=2, after_topk=False):
        super().__init__(top_k=top_k)
        self.after_topk = after_topk
        self.register_buffer("scale", torch.tensor(scale))
        self.shift = nn.Parameter(torch.randn(len(self.experts)) * 0.5) if shift else None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.after_topk:
            kept, chosen = torch.topk(self.gate(x), self.top_k, dim=-1)
            weights = F.softmax(kept * self.scale, dim=-1)
        else:
            logits = self.gate(x) * self.scale
            if self.shift is not None:
                logits = logits + self.shift
            weights, chosen = torch.topk(F.softmax(logits, dim=-1), self.top_k, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
        return weighted_experts(self.experts, x, weights, chosen).reshape(shape)


class ReferenceGate(nn.Module):
    """DeepSeek-V3's reference inference Gate: its ``bias`` biases the selection only, groups limit it."""

    def __init__(self, hidden, num_experts, top_k, n_groups, topk_groups, route_scale):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups, self.route_scale = top_k, n_groups, topk_groups, route_scale
        self.weight = nn.Parameter(torch.randn(num_experts, hidden) * 0.2)
        self.bias = nn.Parameter(torch.randn(num_experts) * 0.1)

    def forward(self, x):
        scores = F.linear(x, self.weight).sigmoid()
        original_scores = scores
        scores = (scores + self.bias).view(x.size(0), self.n_groups, -1)
        group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
        indices = group_scores.topk(self.topk_groups, dim=-1)[1]
        mask = scores.new_ones(x.size(0), self.n_groups, dtype=bool).scatter_(1, indices, False)
        scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = torch.topk(scores, self.topk, dim=-1)[1]
        weights = original_scores.gather(1, indices)
        weights /= weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).type_as(x), indices


class ExpertScaledRouter(nn.Module):
    """Softmax, top-k and renormalisation, then each weight times its expert's learned factor (Gemma 4's router,
    inside its block here)."""

    def __init__(self, hidden, num_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.per_expert_scale = nn.Parameter(torch.rand(num_experts) + 0.5)

    def forward(self, x):
        probs = F.softmax(self.proj(x), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return probs, weights * self.per_expert_scale[ids], ids


class ExpertScaledMoE(LoopMoE):
    """A block whose router module scales each routing weight by its expert's own factor."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        del self.gate
        self.router = ExpertScaledRouter(hidden, num_experts, top_k)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        _, weights, chosen = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None].to(x.dtype))
        return out.reshape(shape)


class InlineExpertScaledMoE(LoopMoE):
    """``ExpertScaledMoE`` with its routing written in the block's own code: no router module whose outputs
    recognition could read, so the per-expert factor must be found by search."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        self.per_expert_scale = nn.Parameter(torch.rand(num_experts) + 0.5)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = torch.topk(F.softmax(self.gate(x), dim=-1), self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True) * self.per_expert_scale[chosen]
        return weighted_experts(self.experts, x, weights, chosen).reshape(shape)


class ReferenceGateMoE(LoopMoE):
    """DeepSeek-V3's reference MoE: a ``Gate`` module returning (weights, ids), experts looped over by count."""

    def __init__(self, hidden=24, inter=40, num_experts=8, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        self.gate = ReferenceGate(hidden, num_experts, top_k, n_groups=4, topk_groups=2, route_scale=2.5)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x)
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=len(self.experts)).tolist()
        for i, expert in enumerate(self.experts):
            if counts[i]:
                idx, top = torch.where(indices == i)
                y[idx] += expert(x[idx]) * weights[idx, top, None]
        return y.view(shape)


class PostNormResidualMoE(PostNormMoE):
    """A post-norm FFN sub-layer inside the block: ``norm(x + moe(x))``, as original Transformer layers place it."""

    def forward(self, x):
        return self.out_norm(x + LoopMoE.forward(self, x))


class PreNormMoE(LoopMoE):
    """Normalizes its own input before routing and experts read it, adding that input back or not."""

    def __init__(self, residual=False, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        self.residual = residual
        self.in_norm = nn.LayerNorm(hidden)
        with torch.no_grad():
            self.in_norm.weight.uniform_(0.5, 1.5)
            self.in_norm.bias.normal_()

    def forward(self, x):
        y = super().forward(self.in_norm(x))
        return x + y if self.residual else y


def _with_router_norm(name: str, cls, norm):
    """``cls`` whose router reads ``norm`` of the block's input, its experts the input itself (``name``: the
    module-level name it is bound to, which pickling looks up)."""

    class RouterNormed(cls):
        renormalize = False

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.router_norm = norm(self.router_input_width())
            with torch.no_grad():
                self.router_norm.weight.uniform_(0.5, 1.5)

        def router_input_width(self):
            return (self.gate if hasattr(self, "gate") else self.router).weight.shape[1]

        def router_input(self, x):
            return self.router_norm(x)

    RouterNormed.__name__ = RouterNormed.__qualname__ = name
    return RouterNormed


RouterNormMoE = _with_router_norm("RouterNormMoE", LoopMoE, nn.LayerNorm)  # the experts' calls show they read the input
RouterNormBmmMoE = _with_router_norm("RouterNormBmmMoE", BmmMoE, nn.RMSNorm)  # stacked weights: no expert call shows it


class Fp32GateMoE(LoopMoE):
    """A gate its model keeps in fp32 in a low-precision model (Hugging Face's ``_keep_in_fp32_modules_strict``
    for DeepSeek-style gates), defined before the experts: the block's first parameter is not of its input's dtype.
    Call ``keep_gate_fp32()`` after casting the model."""

    def router_input(self, x):
        return x.float()

    @staticmethod
    def apply_expert(expert, x, weight):
        return expert(x) * weight.to(x.dtype)

    def keep_gate_fp32(self):
        self.gate.float()
        return self


class ScoringModule(nn.Module):
    """A router that scores the experts by code of its own, read on ``[B, S, H]``: ``kind`` "mlp" (ZAYA's router
    MLP: a norm, a GELU layer of ``width``, a last layer to E; at ``width == H`` that last layer is an ``[E, H]``
    weight that reads no hidden states) or "cosine" (X-MoE's: cosine similarity of a projection with expert
    embeddings, over a temperature). ``returns``: "logits", or "routing" (logits, top-k weights, ids)."""

    def __init__(self, hidden, num_experts, top_k, kind="mlp", width=16, returns="logits"):
        super().__init__()
        self.kind, self.top_k, self.returns = kind, top_k, returns
        if kind == "mlp":
            self.norm = nn.LayerNorm(hidden)
            self.fc = nn.Linear(hidden, width)
            self.out = nn.Linear(width, num_experts, bias=False)
        else:
            self.proj = nn.Linear(hidden, width, bias=False)
            self.expert_embeddings = nn.Parameter(torch.randn(num_experts, width))
            self.temperature = 0.1

    def forward(self, h):
        if self.kind == "mlp":
            logits = self.out(F.gelu(self.fc(self.norm(h))))
        else:
            logits = F.normalize(self.proj(h), dim=-1) @ F.normalize(self.expert_embeddings, dim=-1).T
            logits = logits / self.temperature
        if self.returns == "logits":
            return logits
        weights, ids = torch.topk(F.softmax(logits, dim=-1), self.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), ids


class ScoringModuleMoE(LoopMoE):
    """``LoopMoE`` routed by a ``ScoringModule``: softmax then top-k of its logits in the block, or the top-k
    weights and ids it returns."""

    def __init__(self, kind="mlp", width=16, returns="logits", hidden=24, num_experts=6, top_k=2):
        super().__init__(hidden=hidden, num_experts=num_experts, top_k=top_k)
        del self.gate
        self.router = ScoringModule(hidden, num_experts, top_k, kind, width, returns)

    def forward(self, x):
        shape = x.shape
        scored = self.router(x)
        x = x.reshape(-1, shape[-1])
        if self.router.returns == "logits":
            weights, chosen = torch.topk(F.softmax(scored.reshape(-1, scored.shape[-1]), dim=-1), self.top_k, dim=-1)
        else:
            weights, chosen = scored[1].reshape(-1, self.top_k), scored[2].reshape(-1, self.top_k)
        return weighted_experts(self.experts, x, weights, chosen).reshape(shape)


class InlineCosineMoE(LoopMoE):
    """Cosine routing written in the block's own code: no module of it computes the scores alone."""

    def __init__(self):
        super().__init__()
        del self.gate
        self.proj = nn.Linear(24, 8, bias=False)
        self.expert_embeddings = nn.Parameter(torch.randn(len(self.experts), 8))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = F.normalize(self.proj(x), dim=-1) @ F.normalize(self.expert_embeddings, dim=-1).T / 0.1
        weights, chosen = torch.topk(F.softmax(logits, dim=-1), self.top_k, dim=-1)
        return weighted_experts(self.experts, x, weights, chosen).reshape(shape)


def oai_swiglu(x, alpha: float = 1.702, limit: float = 7.0):
    """OpenAI's reference GPT-OSS swiglu: its constants are the function's defaults, not attributes."""
    x_glu, x_linear = x[..., ::2], x[..., 1::2]
    x_glu = x_glu.clamp(min=None, max=limit)
    x_linear = x_linear.clamp(min=-limit, max=limit)
    return x_glu * torch.sigmoid(alpha * x_glu) * (x_linear + 1)


class ReferenceRMSNorm(nn.Module):
    """OpenAI's reference RMSNorm: an fp32 scale, computed in fp32."""

    def __init__(self, hidden, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.empty(hidden, dtype=torch.float32).uniform_(0.5, 1.5))

    def forward(self, x):
        t, dtype = x.float(), x.dtype
        t = t * torch.rsqrt(torch.mean(t ** 2, dim=-1, keepdim=True) + self.eps)
        return (t * self.scale).to(dtype)


class ReferenceMLPBlock(nn.Module):
    """OpenAI's reference GPT-OSS ``MLPBlock``: its own pre-norm, each token's expert weights gathered and applied
    with einsum, ``swiglu`` at its function's defaults, ``x + moe(norm(x))``. ``weight_scale`` sets how often the
    clamp acts (1.0: on about a fifth of the gate's pre-activations; 0.05: never on ordinary inputs)."""

    def __init__(self, hidden=24, inter=16, num_experts=6, top_k=2, swiglu=oai_swiglu, weight_scale=1.0):
        super().__init__()
        self.top_k, self.swiglu = top_k, swiglu
        self.norm = ReferenceRMSNorm(hidden)
        self.gate = nn.Linear(hidden, num_experts)
        self.mlp1_weight = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) * weight_scale)
        self.mlp1_bias = nn.Parameter(torch.randn(num_experts, 2 * inter) * weight_scale)
        self.mlp2_weight = nn.Parameter(torch.randn(num_experts, hidden, inter) * 0.2)
        self.mlp2_bias = nn.Parameter(torch.randn(num_experts, hidden) * 0.2)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        t = self.norm(x)
        g = self.gate(t)
        experts = torch.topk(g, k=self.top_k, dim=-1, sorted=True)
        expert_weights = F.softmax(experts.values, dim=1)
        expert_indices = experts.indices
        t = torch.einsum("beck,bk->bec", self.mlp1_weight[expert_indices, ...], t) \
            + self.mlp1_bias[expert_indices, ...]
        t = self.swiglu(t)
        t = torch.einsum("beck,bek->bec", self.mlp2_weight[expert_indices, ...], t)
        t += self.mlp2_bias[expert_indices, ...]
        t = torch.einsum("bec,be->bc", t, expert_weights)
        return (x + t).reshape(shape)


class DenseGateMoE(LoopMoE):
    """Every expert on every token, weighted by a ``[.., E]`` gate that is zero but at the top-k (a softmax over the
    chosen logits scattered into place)."""

    def forward(self, x):
        logits = self.gate(x)
        chosen_logits, chosen = logits.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, chosen, chosen_logits.softmax(-1))
        outs = torch.stack([expert(x) for expert in self.experts], -2)
        return (gates.unsqueeze(-1) * outs).sum(-2)


class DenseEinsumMoE(nn.Module):
    """Stacked GELU experts computed densely with einsums, the top-k mask applied to the router probabilities and
    renormalised."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(num_experts, hidden, inter) * 0.2)
        self.w_out = nn.Parameter(torch.randn(num_experts, inter, hidden) * 0.2)

    def forward(self, x):
        probs = self.router(x).softmax(-1)
        mask = torch.zeros_like(probs).scatter(-1, probs.topk(self.top_k, dim=-1).indices, 1.0)
        gates = probs * mask
        gates = gates / gates.sum(-1, keepdim=True)
        h = F.gelu(torch.einsum("bsh,ehi->bsei", x, self.w_in))
        return torch.einsum("bse,bseh->bsh", gates, torch.einsum("bsei,eih->bseh", h, self.w_out))


class OtherOutputsDenseMoE(DenseEinsumMoE):
    """``DenseEinsumMoE`` returning a dict of Python values beside its output: torch.export traces it as written."""

    def forward(self, x):
        return super().forward(x), {"name": "moe", "scale": 0.5}


class SmallStackedMoE(nn.Module):
    """Stacked ``[E, H, I]`` / ``[E, I, H]`` experts of one activation, at the scale of initial weights (std 0.02),
    looped over experts with matmuls: no module to probe them through."""

    def __init__(self, act=F.gelu, gated=False, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__()
        self.act, self.gated, self.top_k = act, gated, top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.up = nn.Parameter(torch.randn(num_experts, hidden, (2 if gated else 1) * inter) * 0.02)
        self.down = nn.Parameter(torch.randn(num_experts, inter, hidden) * 0.02)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.gate(x).softmax(-1).topk(self.top_k, -1)
        out = torch.zeros_like(x)
        for e in range(self.up.shape[0]):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            h = x[token] @ self.up[e]
            if self.gated:
                g, u = h.chunk(2, -1)
                h = self.act(g) * u
            else:
                h = self.act(h)
            out.index_add_(0, token, (h @ self.down[e]) * weights[token, slot, None])
        return out.reshape(shape)


class UnevenWidthMoE(LoopMoE):
    """Experts of different intermediate sizes (pruned or grown experts); gated SiLU, or biased plain GELU."""

    def __init__(self, hidden=24, widths=(16, 40, 24, 8, 40, 32), top_k=2, gated=True):
        super().__init__(hidden, max(widths), len(widths), top_k)
        self.experts = nn.ModuleList(MLP(hidden, w) if gated else GeluMLP(hidden, w) for w in widths)


class GeluMLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inter)
        self.fc2 = nn.Linear(inter, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ScaledMLP(MLP):
    """An expert that scales its output: by a constant in its code, or by a learned per-feature scale (a layer
    scale) when ``layer_scale``."""

    def __init__(self, hidden, inter, layer_scale=False):
        super().__init__(hidden, inter)
        self.scale = nn.Parameter(torch.rand(hidden) + 0.5) if layer_scale else None

    def forward(self, x):
        y = super().forward(x)
        return y * self.scale if self.scale is not None else 2.0 * y


class ScaledExpertsMoE(LoopMoE):
    """Experts that scale their output (``ScaledMLP``): all of them, or only the one at ``only``."""

    def __init__(self, layer_scale=False, only=None):
        super().__init__()
        for e in range(len(self.experts)) if only is None else [only]:
            self.experts[e] = ScaledMLP(24, 40, layer_scale)


class ClampedMLP(MLP):
    """An expert that clamps its output: no constant scale of its output projection gives it."""

    def forward(self, x):
        return super().forward(x).clamp(-0.05, 0.05)


class ParameterMLP(nn.Module):
    """An expert of bare parameters, no Linear: gated SiLU or plain GELU, applied with ``F.linear`` (weights
    ``[out, in]``) or with ``x @ w`` (``[in, out]``), with biases or not."""

    def __init__(self, hidden, inter, gated=True, matmul=False, bias=False):
        super().__init__()
        self.gated, self.matmul = gated, matmul
        shape = (lambda out, inp: (inp, out)) if matmul else (lambda out, inp: (out, inp))
        self.w_in = nn.Parameter(torch.randn(*shape(inter, hidden)) * hidden ** -0.5)
        self.w_gate = nn.Parameter(torch.randn(*shape(inter, hidden)) * hidden ** -0.5) if gated else None
        self.w_out = nn.Parameter(torch.randn(*shape(hidden, inter)) * inter ** -0.5)
        self.b_in = nn.Parameter(0.1 * torch.randn(inter)) if bias else None
        self.b_out = nn.Parameter(0.1 * torch.randn(hidden)) if bias else None

    def _project(self, x, w, b=None):
        return (x @ w if self.matmul else F.linear(x, w)) + (0 if b is None else b)

    def forward(self, x):
        h = self._project(x, self.w_in, self.b_in)
        h = F.silu(self._project(x, self.w_gate)) * h if self.gated else F.gelu(h)
        return self._project(h, self.w_out, self.b_out)


class ParameterExpertsMoE(LoopMoE):
    """``LoopMoE`` whose experts are ``ParameterMLP``s."""

    def __init__(self, **kind):
        super().__init__()
        self.experts = nn.ModuleList(ParameterMLP(24, 40, **kind) for _ in range(len(self.experts)))


class VmapModel(TinyModel):
    """Weighs positions with a ``torch.vmap`` outside its MoE block, as attention-mask builders do: torch.export
    traces the vmap into the program as calls that open and close a vmap level, calls without users."""

    def forward(self, ids):
        h = self.embed(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)
        decay = torch.vmap(lambda p: torch.exp(-0.05 * p.float()))(positions)
        h = h * decay[None, :, None].to(h.dtype)
        h = h + self.moe(self.norm(h))
        return self.head(h)


class NotesMoE(LoopMoE):
    """Takes a dict beside its input, as Gemma 4's layers take one for their keys and values: the first block
    called notes its output there, and every later one adds a share of that note."""

    def forward(self, x, notes):
        y = super().forward(x)
        if "first" in notes:
            return y + 0.5 * notes["first"]
        notes["first"] = y
        return y


class SharedNotesModel(TinyModel):
    """Hands one dict (or a ``UserDict``, which is no dict) to its two ``NotesMoE`` blocks on each call."""

    def __init__(self, user_dict: bool = False):
        super().__init__(NotesMoE())
        self.second = NotesMoE()
        self.user_dict = user_dict

    def forward(self, ids):
        notes = collections.UserDict() if self.user_dict else {}
        h = self.embed(ids)
        h = h + self.moe(self.norm(h), notes)
        h = h + self.second(self.norm(h), notes)
        return self.head(h)


class ClampedSwigluMLP(nn.Module):
    """MiniMax-M3's shared expert: one projection for gate and up, and GPT-OSS's clamped swiglu at the alpha and
    limit it names (a small limit, so that the clamps bite at ordinary inputs)."""

    def __init__(self, hidden=24, inter=32, alpha=1.702, limit=0.5):
        super().__init__()
        self.swiglu_alpha, self.swiglu_limit = alpha, limit
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        gate = gate.clamp(max=self.swiglu_limit)
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return self.down_proj((up + 1.0) * gate * torch.sigmoid(gate * self.swiglu_alpha))


class ClampedSharedMoE(LoopMoE):
    """``LoopMoE`` plus a ``ClampedSwigluMLP`` shared expert of the routed experts' width."""

    def __init__(self):
        super().__init__()
        self.shared_expert = ClampedSwigluMLP(inter=40)

    def forward(self, x):
        return super().forward(x) + self.shared_expert(x)


class Softcap(nn.Module):
    def __init__(self, cap: float):
        super().__init__()
        self.softcap = cap

    def forward(self, v):
        return torch.tanh(v / self.softcap) * self.softcap


class SoftcappedMLP(MLP):
    """A SwiGLU whose linear gate factor and up are soft-capped, the sigmoid seeing the raw gate (Inkling 2's
    experts); small caps, so that they bite at ordinary inputs."""

    def __init__(self, hidden, inter, gate_cap=0.6, up_cap=0.4):
        super().__init__(hidden, inter)
        self.gate_softcap, self.up_softcap = Softcap(gate_cap), Softcap(up_cap)

    def forward(self, x):
        gate = self.w1(x)
        return self.w2(self.gate_softcap(gate) * torch.sigmoid(gate) * self.up_softcap(self.w3(x)))


class SoftcappedMoE(LoopMoE):
    """``LoopMoE`` of ``SoftcappedMLP`` experts."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(SoftcappedMLP(24, 40) for _ in range(len(self.experts)))


class SoftcappedStackedMoE(BmmMoE):
    """``BmmMoE`` (stacked experts) whose SwiGLU is soft-capped by a module of its own."""

    def __init__(self):
        super().__init__()
        self.act_fn = nn.ModuleDict({"gate_softcap": Softcap(0.6), "up_softcap": Softcap(0.4)})

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top, idx = torch.topk(self.router(x), self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        flat = idx.reshape(-1)
        xs = x.repeat_interleave(self.top_k, dim=0).unsqueeze(1)
        gate = torch.bmm(xs, self.w_gate[flat])
        h = self.act_fn["gate_softcap"](gate) * torch.sigmoid(gate) * self.act_fn["up_softcap"](
            torch.bmm(xs, self.w_up[flat]))
        y = torch.bmm(h, self.w_down[flat]).squeeze(1)
        return (y.view(-1, self.top_k, shape[-1]) * weights.unsqueeze(-1)).sum(1).reshape(shape)


class ReusedBlockModel(TinyModel):
    """Calls its one MoE block twice (a weight-shared layer, as looped or universal transformers apply one)."""

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.moe(self.norm(h))
        h = h + self.moe(self.norm(h))
        return self.head(h)


class SharedAcrossLengthsModel(TinyModel):
    """Calls its one MoE block on two sequences of their own lengths (an encoder's and a decoder's)."""

    def forward(self, ids, decoder_ids):
        h = self.embed(ids)
        h = h + self.moe(self.norm(h))
        d = self.embed(decoder_ids) + h.mean(1, keepdim=True)
        d = d + self.moe(self.norm(d))
        return self.head(d)


class SharedRoutingModel(nn.Module):
    """Two MoE blocks that share one router and one expert bank: their weights are the same tensors."""

    def __init__(self, hidden=24, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.first, self.second = LoopMoE(hidden), LoopMoE(hidden)
        self.second.gate, self.second.experts = self.first.gate, self.first.experts
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.first(h)
        h = h + self.second(0.5 * h)
        return self.head(h)


class SortedTopkMoE(LoopMoE):
    """The top k read off a descending sort of the probabilities, not ``torch.topk``."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, order = F.softmax(self.gate(x), dim=-1).sort(-1, descending=True)
        weights, chosen = probs[:, :self.top_k], order[:, :self.top_k]
        return weighted_experts(self.experts, x, weights / weights.sum(-1, keepdim=True), chosen).reshape(shape)


class ArgmaxMoE(LoopMoE):
    """Top-1 by ``argmax``, its probability gathered, each expert's rows written by index (``out[t] = ...``)."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1)
        chosen = probs.argmax(-1)
        weight = probs.gather(1, chosen[:, None])
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token = torch.nonzero(chosen == e).squeeze(1)
            out[token] = expert(x[token]) * weight[token]
        return out.reshape(shape)


class GatheredWeightsMoE(nn.Module):
    """Each token's experts' weights gathered by index (``w_in[ids]``, ``[T, k, ., .]``) and applied by einsum: no
    loop over experts."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) / hidden ** 0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, inter) / inter ** 0.5)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, ids = self.router(x).topk(self.top_k, -1)
        gate, up = torch.einsum("tkoh,th->tko", self.w_in[ids], x).chunk(2, -1)
        y = torch.einsum("tkhi,tki->tkh", self.w_out[ids], F.silu(gate) * up)
        return (y * logits.softmax(-1)[..., None]).sum(1).reshape(shape)


class LowRankMoE(LoopMoE):
    """Experts of two Linear layers and no activation between them (low-rank adapters as experts)."""

    def __init__(self, hidden=24, rank=4, num_experts=6, top_k=2):
        super().__init__(hidden, rank, num_experts, top_k)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, rank, bias=False),
                                                   nn.Linear(rank, hidden, bias=False)) for _ in range(num_experts))


class EveryExpertMoE(LoopMoE):
    """k = E: every expert on every token, weighted by the softmax."""

    renormalize = False

    def __init__(self):
        super().__init__(num_experts=4, top_k=4)


class ChannelsFirstMoE(LoopMoE):
    """Called on ``[B, H, L]`` (a convolutional model's layout), moving the hidden size last inside."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ChannelsFirstModel(TinyModel):
    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.moe(self.norm(h).transpose(1, 2)).transpose(1, 2)
        return self.head(h)


def tie_experts(lists: list[nn.ModuleList], pairs: dict[int, int]) -> None:
    """Entry ``e`` of each list becomes the module at ``pairs[e]``: experts merged after training (the router keeps
    its slots, several of them sharing one expert's weights)."""
    for lst in lists:
        for e, other in pairs.items():
            lst[e] = lst[other]


class MergedExpertsMoE(LoopMoE):
    """``LoopMoE`` whose router slots 3 and 5 share the experts of slots 1 and 0."""

    def __init__(self):
        super().__init__()
        tie_experts([self.experts], {3: 1, 5: 0})


USER_BLOCKS = {"loop": LoopMoE, "scaled_output": ScaledOutputMoE, "gshard": GShardMoE, "bmm": BmmMoE,
               "block_bias": BlockBiasMoE, "input_scaled": InputScaledMoE, "squared_relu": SquaredReluMoE,
               "post_norm": PostNormMoE, "sequential_gelu": SequentialGeluMoE,
               "projection_lists": ProjectionListsMoE, "residual_inside": ResidualInsideMoE,
               "post_norm_residual": PostNormResidualMoE,
               "dense_gate": DenseGateMoE, "dense_einsum": DenseEinsumMoE, "uneven_width": UnevenWidthMoE,
               "scaled_experts": ScaledExpertsMoE, "sorted_topk": SortedTopkMoE, "argmax": ArgmaxMoE,
               "gathered_weights": GatheredWeightsMoE, "low_rank": LowRankMoE, "every_expert": EveryExpertMoE,
               "merged_experts": MergedExpertsMoE}


class OtherOutputsMoE(LoopMoE):
    """Returns a dict of Python values beside its output, as some research code does."""

    def forward(self, x):
        return super().forward(x), {"name": "moe", "scale": 0.5}


class OtherOutputsModel(TinyModel):
    """Reads the ``scale`` an ``OtherOutputsMoE`` returns beside its output."""

    def forward(self, ids):
        h = self.embed(ids)
        y, info = self.moe(self.norm(h))
        return self.head(h + y * info["scale"])


class AuxOutputsMoE(LoopMoE):
    """Returns ``(y, (router probabilities, load-balancing loss))``, as research code does for training: the loss is
    no canonical output, so a model that reads it gets the block as written."""

    def forward(self, x):
        probs = F.softmax(self.gate(x.reshape(-1, x.shape[-1])), dim=-1)
        aux = probs.mean(0).pow(2).sum() * probs.shape[-1]
        return super().forward(x), (probs, aux)


class AuxModel(TinyModel):
    """Reads the block's outputs as ``read`` says: ``"y"`` (drops the rest), ``"probs"`` or ``"aux"`` (returns the
    router probabilities' mean or the loss beside the logits)."""

    def __init__(self, block: nn.Module, read: str):
        super().__init__(block)
        self.read = read

    def forward(self, ids):
        h = self.embed(ids)
        y, (probs, aux) = self.moe(self.norm(h))
        h = h + y
        if self.read == "y":
            return self.head(h)
        return self.head(h), (probs.mean(0) if self.read == "probs" else aux)


class NoneBesideMoE(AuxOutputsMoE):
    """Returns ``(y, None, aux_loss)``, as attention and MoE modules return ``None`` for what a flag turned off."""

    def forward(self, x):
        y, (_, aux) = super().forward(x)
        return y, None, aux


class NoneBesideModel(TinyModel):
    """Reads the loss beside the logits, or drops it."""

    def __init__(self, block: nn.Module, read_aux: bool):
        super().__init__(block)
        self.read_aux = read_aux

    def forward(self, ids):
        h = self.embed(ids)
        y, _, aux = self.moe(self.norm(h))
        logits = self.head(h + y)
        return (logits, aux) if self.read_aux else logits


class InlineGroupsMoE(LoopMoE):
    """Group-limited routing written with constants in the block's own code (no attribute names the groups): the
    experts in 4 groups of consecutive ids, the 2 groups of the best single scores kept."""

    def __init__(self, hidden=24, inter=40, num_experts=16, top_k=4):
        super().__init__(hidden, inter, num_experts, top_k)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1)
        best_groups = probs.view(-1, 4, 4).amax(-1).topk(2, dim=-1).indices
        keep = torch.zeros(x.shape[0], 4, dtype=torch.bool, device=x.device).scatter_(1, best_groups, True)
        probs = probs.masked_fill(~keep.repeat_interleave(4, dim=1), 0.0)
        weights, chosen = torch.topk(probs, 4, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class ExpertChoiceMoE(LoopMoE):
    """Experts choose their tokens (expert-choice routing): each expert takes the ``capacity`` tokens of its best
    scores, so a token may reach any number of experts. No token-choice form computes it; equal tokens (an id
    repeated in a batch) tie in each expert's top-k over tokens."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores = self.gate(x).softmax(-1)
        capacity = max(1, x.shape[0] * self.top_k // len(self.experts))
        weights, tokens = scores.t().topk(min(capacity, x.shape[0]), dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out.index_add_(0, tokens[e], expert(x[tokens[e]]) * weights[e, :, None])
        return out.reshape(shape)


class PreNormBareRouterMoE(LoopMoE):
    """A pre-norm inside the block and a router weight the block holds itself, read through ``F.linear``: no
    router module call shows what the router reads, the experts' inputs do."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        del self.gate
        self.router_weight = nn.Parameter(torch.randn(num_experts, hidden) * 0.3)
        self.in_norm = nn.LayerNorm(hidden)
        with torch.no_grad():
            self.in_norm.weight.uniform_(0.5, 1.5)
            self.in_norm.bias.normal_()

    def forward(self, x):
        shape = x.shape
        t = self.in_norm(x).reshape(-1, shape[-1])
        weights, chosen = torch.topk(F.softmax(F.linear(t, self.router_weight), dim=-1), self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(t[token]) * weights[token, slot, None])
        return x + out.reshape(shape)


class IdsReferenceMLPBlock(ReferenceMLPBlock):
    """OpenAI's reference ``MLPBlock`` handed the token ids too, which it does not read."""

    def forward(self, x, input_ids=None):
        return super().forward(x)


class RoutedExperts(nn.Module):
    """Experts a caller routes, ``experts(x, ids, weights)``: a ModuleList of MLPs and the usual loop."""

    def __init__(self, hidden=24, inter=40, num_experts=6, mlp=MLP):
        super().__init__()
        self.experts = nn.ModuleList(mlp(hidden, inter) for _ in range(num_experts))

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None].to(x.dtype))
        return out


class StackedRoutedExperts(nn.Module):
    """Stacked experts a caller routes with keywords, weights first: ``experts(x, weights=..., ids=...)``."""

    def __init__(self, hidden=24, inter=40, num_experts=6):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) * hidden ** -0.5)
        self.down = nn.Parameter(torch.randn(num_experts, hidden, inter) * inter ** -0.5)

    def forward(self, x, weights, ids):
        out = torch.zeros_like(x)
        for e in range(self.gate_up.shape[0]):
            token, slot = torch.where(ids == e)
            gate, up = F.linear(x[token], self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.gelu(gate) * up, self.down[e])
            out.index_add_(0, token, y * weights[token, slot, None].to(x.dtype))
        return out


class FlatRoutedExperts(nn.Module):
    """Experts a caller routes, ``experts(x, ids, weights)``, their weights stored flat, ``[E*F, H]`` (DBRX's
    layout), with no router beside them to count them: only settings do (``num_experts``, and a per-token count
    that is no expert count)."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__()
        self.num_experts, self.num_experts_per_tok, self.inter = num_experts, top_k, inter
        self.w_gate = nn.Parameter(torch.randn(num_experts * inter, hidden) * hidden ** -0.5)
        self.w_up = nn.Parameter(torch.randn(num_experts * inter, hidden) * hidden ** -0.5)
        self.w_down = nn.Parameter(torch.randn(num_experts * inter, hidden) * inter ** -0.5)

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(ids == e)
            rows = slice(e * self.inter, (e + 1) * self.inter)
            h = F.silu(x[token] @ self.w_gate[rows].T) * (x[token] @ self.w_up[rows].T)
            out.index_add_(0, token, (h @ self.w_down[rows]) * weights[token, slot, None].to(x.dtype))
        return out


class NormedRoutedExperts(nn.Module):
    """Stacked experts a caller routes, ``experts(x, ids, weights)``, each expert's output RMS-normalized and
    scaled by a weight of its own ([E, H], shaped like a router; Ergo's post-expert norm): no canonical expert, and a
    router-shaped weight that routes nothing."""

    def __init__(self, hidden=24, inter=40, num_experts=6):
        super().__init__()
        self.up = nn.Parameter(torch.randn(num_experts, inter, hidden) * hidden ** -0.5)
        self.down = nn.Parameter(torch.randn(num_experts, hidden, inter) * inter ** -0.5)
        self.norm_weight = nn.Parameter(torch.rand(num_experts, hidden) + 0.5)

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for e in range(self.up.shape[0]):
            token, slot = torch.where(ids == e)
            y = F.linear(F.relu(F.linear(x[token], self.up[e])), self.down[e])
            y = F.rms_norm(y, (x.shape[-1],)) * self.norm_weight[e]
            out.index_add_(0, token, y * weights[token, slot, None].to(x.dtype))
        return out


class DefaultedNormedRoutedExperts(NormedRoutedExperts):
    """``NormedRoutedExperts`` whose routing arguments have defaults: by its signature, it could be a block."""

    def forward(self, x, ids=None, weights=None):
        return super().forward(x, ids, weights)


class ExpertOutputNorm(nn.Module):
    """RMSNorm of expert output rows with a weight per expert ([E, H]), called with the rows' expert ids (Ergo's
    ``post_expert_norm``)."""

    def __init__(self, hidden, num_experts, eps=1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(num_experts, hidden) + 0.5)
        self.eps = eps

    def forward(self, rows, expert_ids):
        return (F.rms_norm(rows.float(), (rows.shape[-1],), eps=self.eps) * self.weight[expert_ids]).to(rows.dtype)


class ScaleThenNorm(nn.Module):
    """Scales rows by ``1 + weight``, then RMS-normalizes them, by hand (Muse Spark's ``post_expert_norm``)."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden) * 0.3)
        self.eps = eps

    def forward(self, rows):
        scaled = rows.float() * (1.0 + self.weight.float())
        return (scaled * torch.rsqrt(scaled.pow(2).mean(-1, keepdim=True) + self.eps)).to(rows.dtype)


class PostNormedRoutedExperts(nn.Module):
    """Stacked squared-ReLU experts a caller routes, ``experts(x, ids, weights)``, each pair's output put through a
    module of the bank before it is weighted: ``per_expert`` an RMSNorm with a weight per expert (Ergo's), else a
    scale-then-normalize shared by all (Muse Spark's)."""

    def __init__(self, hidden=24, inter=40, num_experts=6, per_expert=True):
        super().__init__()
        self.up = nn.Parameter(torch.randn(num_experts, hidden, inter) * hidden ** -0.5)
        self.down = nn.Parameter(torch.randn(num_experts, inter, hidden) * inter ** -0.5)
        self.post_norm = ExpertOutputNorm(hidden, num_experts) if per_expert else ScaleThenNorm(hidden)
        self.per_expert = per_expert

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for e in range(self.up.shape[0]):
            token, slot = torch.where(ids == e)
            y = F.relu(x[token] @ self.up[e]).square() @ self.down[e]
            y = self.post_norm(y, torch.full_like(token, e)) if self.per_expert else self.post_norm(y)
            out.index_add_(0, token, y * weights[token, slot, None].to(x.dtype))
        return out


class PostNormedMoE(nn.Module):
    """A block whose router reads its input and whose experts read a projection of it into their own width, back
    out after (Muse Spark's layout), or the input itself (``project=False``, Ergo's)."""

    def __init__(self, hidden=24, width=16, num_experts=6, top_k=2, per_expert=True, project=True):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        width = width if project else hidden
        self.pre_expert_proj = nn.Linear(hidden, width, bias=False) if project else nn.Identity()
        self.experts = PostNormedRoutedExperts(width, num_experts=num_experts, per_expert=per_expert)
        self.post_expert_proj = nn.Linear(width, hidden, bias=False) if project else nn.Identity()

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        scores = self.gate(flat).sigmoid()
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        y = self.post_expert_proj(self.experts(self.pre_expert_proj(flat), ids, weights))
        return y.reshape(x.shape)


class InputWeightedRoutedExperts(RoutedExperts):
    """Each routing weight scales its expert's input (Llama 4's experts)."""

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out.index_add_(0, token, expert(x[token] * weights[token, slot, None].to(x.dtype)))
        return out


class UnweightedRoutedExperts(RoutedExperts):
    """Sums its experts' outputs without the routing weights it is handed: no canonical combine does."""

    def forward(self, x, ids, weights):
        return super().forward(x, ids, torch.ones_like(weights))


class InlineRoutedLayer(nn.Module):
    """A decoder-style layer that mixes tokens, then routes inline and calls its experts itself (Gemma 4's
    layout), with a routing no canonical pattern has (square roots of the top-k probabilities): no MoE block as a
    whole, but its experts are."""

    def __init__(self, experts: nn.Module | None = None, hidden=24, num_experts=6, top_k=2, ids_dtype=torch.long,
                 routing: str = "sqrt"):
        super().__init__()
        self.top_k, self.ids_dtype, self.routing = top_k, ids_dtype, routing
        self.mix = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.score_bias = nn.Parameter(torch.randn(num_experts) * 0.1)
        self.per_expert_scale = nn.Parameter(torch.rand(num_experts) + 0.5)
        self.experts = experts if experts is not None else RoutedExperts(hidden, num_experts=num_experts)

    def route(self, flat):
        """``sqrt``: square roots of the top-k softmax probabilities (no canonical routing); ``softmax``: the
        top-k probabilities renormalised (Mixtral's); ``sigmoid_bias``: sigmoid scores, the top-k chosen by scores
        plus a bias, their unbiased scores renormalised and scaled (DeepSeek-V3's without groups);
        ``softmax_expert_scale``: Mixtral's, each weight then times its expert's own factor (Gemma 4's);
        ``softmax_fp32``: Mixtral's on logits of the router weight cast to fp32 in the graph (Ernie 4.5 VL's)."""
        if self.routing == "softmax_fp32":
            weights, ids = torch.topk(F.linear(flat.float(), self.router.weight.float()).softmax(-1), self.top_k, -1)
            return weights / weights.sum(-1, keepdim=True), ids
        logits = self.router(flat)
        if self.routing == "sigmoid_bias":
            scores = logits.sigmoid()
            ids = torch.topk(scores + self.score_bias, self.top_k, dim=-1).indices
            weights = scores.gather(-1, ids)
            return 2.5 * weights / weights.sum(-1, keepdim=True), ids
        weights, ids = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        if self.routing == "softmax":
            return (weights / weights.sum(-1, keepdim=True)).to(flat.dtype), ids
        if self.routing == "softmax_expert_scale":
            return weights / weights.sum(-1, keepdim=True) * self.per_expert_scale[ids], ids
        return weights.sqrt(), ids

    def forward(self, x):
        h = x + self.mix(x.flip(-2))
        flat = self.norm(h).reshape(-1, h.shape[-1])
        weights, ids = self.route(flat)
        ids = ids.to(self.ids_dtype)
        if isinstance(self.experts, StackedRoutedExperts):
            y = self.experts(flat, weights=weights, ids=ids)
        else:
            y = self.experts(flat, ids, weights)
        return h + y.reshape(h.shape)


class Notebook:
    """A cache-like container that rebuilds itself from its tensors, reading them (Hugging Face's DynamicCache
    does): registered with pytree, so a graph leaf cannot rebuild it around graph values."""

    def __init__(self, scale: torch.Tensor):
        self.scale = scale
        self.dtype = scale.dtype


torch.utils._pytree.register_pytree_node(Notebook, lambda n: ([n.scale], None), lambda leaves, _: Notebook(leaves[0]))


class NotebookLayer(InlineRoutedLayer):
    """An inline-routed layer (its experts a caller-routed bank) that is handed a ``Notebook``."""

    def forward(self, x, notebook):
        return super().forward(x) * notebook.scale.to(x.dtype)


class NotebookModel(TinyModel):
    def __init__(self):
        super().__init__(NotebookLayer())

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.moe(self.norm(h), Notebook(torch.tensor(0.5)))
        return self.head(h)


class RoutingReturnedLayer(InlineRoutedLayer):
    """Returns its experts' ids beside its output, as written (a model that reads its routing): the routing ops
    stay for that reader while the experts take a lifted route."""

    def forward(self, x):
        h = x + self.mix(x.flip(-2))
        flat = self.norm(h).reshape(-1, h.shape[-1])
        weights, ids = self.route(flat)
        return h + self.experts(flat, ids, weights).reshape(h.shape), ids


class DataDependentRoutedLayer(InlineRoutedLayer):
    """Routes with Python control flow on tensor values, which eager runs and torch.export cannot trace: the layer
    exports as a leaf, but not with its routing traced."""

    def route(self, flat):
        weights, ids = super().route(flat)
        if bool((weights > 2).any()):
            weights = weights / 2
        return weights, ids


class CountingMoE(LoopMoE):
    """Counts the tokens each expert receives in a buffer, as load statistics are kept: state a fused op would not
    update."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("expert_tokens", torch.zeros(len(self.experts)))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = torch.topk(F.softmax(self.gate(x), dim=-1), self.top_k, dim=-1)
        self.expert_tokens += torch.bincount(chosen.flatten(), minlength=len(self.experts)).to(x.dtype)
        weights = weights / weights.sum(-1, keepdim=True)
        return weighted_experts(self.experts, x, weights, chosen).reshape(shape)


class StepScaledModel(TinyModel):
    """Counts its calls in a buffer and scales its logits by the count: each call's output depends on the calls
    before it."""

    def __init__(self, block: nn.Module, hidden=24, vocab=50):
        super().__init__(block, hidden, vocab)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, ids):
        self.steps += 1
        return super().forward(ids) * self.steps


class CacheWritingModel(TinyModel):
    """Writes its embeddings into a cache it is handed, in place, and adds a running sum to another."""

    def forward(self, ids, cache, total):
        h = self.embed(ids)
        cache[:, : ids.shape[1]] = h
        total += h.sum()
        return self.head(h + self.moe(self.norm(h))) + total.mean()


class NoisyGateMoE(LoopMoE):
    """Noisy top-k gating (Shazeer et al.): a noise projection only training mode reads, so an eval-mode block
    never touches it."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        self.noise = nn.Linear(hidden, num_experts, bias=False)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        if self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x))
        weights, chosen = logits.topk(self.top_k, dim=-1)
        out = weighted_experts(self.experts, x, weights.softmax(-1), chosen)
        return out.reshape(shape)


class SwitchedOffSharedMoE(LoopMoE):
    """A shared expert a flag turns off (a config read at call time): the block holds its weights and never reads
    them."""

    use_shared = False

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        self.shared = MLP(hidden, inter)

    def forward(self, x):
        out = super().forward(x)
        return out + self.shared(x) if self.use_shared else out


class ManyTokensSharedMoE(SwitchedOffSharedMoE):
    """A shared expert only past a token count the recognition probes stay under."""

    def forward(self, x):
        out = LoopMoE.forward(self, x)
        return out + self.shared(x) if x.reshape(-1, x.shape[-1]).shape[0] > 100 else out


class LegacyRouterMoE(LoopMoE):
    """A router-shaped Linear the block no longer reads, registered before the router it reads (a checkpoint's
    leftover): the router search took the first Linear to E outputs."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__(hidden, inter, num_experts, top_k)
        gate = self.gate
        del self.gate
        self.legacy_gate = nn.Linear(hidden, num_experts, bias=False)
        self.gate = gate
