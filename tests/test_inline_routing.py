"""Routing a block computes in its own forward, which no canonical routing reproduces, read off its code: its
experts fuse, fed by the block's own routing ops (``moecc/passes/recognize/inline_routing.py``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_modules import MLP, TinyModel, weighted_experts

import moecc
from moecc.passes.recognize.inline_routing import routing_programs

HIDDEN, EXPERTS, TOP_K = 24, 6, 2


def _softplus(block, logits, x):
    w, ids = F.softplus(logits).topk(TOP_K, -1)
    return w / w.sum(-1, keepdim=True), ids


def _threshold(block, logits, x):
    w, ids = logits.softmax(-1).topk(TOP_K, -1)
    return torch.where(w < 0.2, torch.zeros_like(w), w), ids


def _centroids(block, logits, x):
    w, ids = (-torch.cdist(x, block.gate.weight)).topk(TOP_K, -1)
    return w.softmax(-1), ids


def _cosine(block, logits, x):
    scores = F.normalize(x, dim=-1) @ F.normalize(block.gate.weight, dim=-1).t()
    w, ids = (scores / 0.3).softmax(-1).topk(TOP_K, -1)
    return w, ids


def _temperature_buffer(block, logits, x):
    w, ids = torch.sigmoid(logits / block.temperature).topk(TOP_K, -1)
    return w.square(), ids


def _sorted(block, logits, x):
    values, order = torch.tanh(logits).sort(-1, descending=True)
    return values[:, :TOP_K] + 1, order[:, :TOP_K]


def _second_masked_in_place(block, logits, x):
    w, ids = logits.softmax(-1).topk(TOP_K, -1)
    keep = torch.ones_like(w)
    keep[:, 1] = (w[:, 1] > 0.2).float()
    w = w * keep
    return w / w.sum(-1, keepdim=True), ids


def _nucleus(block, logits, x):
    """Experts until their probabilities reach one half, at most k + 1: a constant written in place, which the
    export lifts into an attribute the block does not hold."""
    w, order = logits.softmax(-1).sort(-1, descending=True)
    keep = (w.cumsum(-1) - w) < 0.5
    keep[:, TOP_K + 1:] = False
    return (w * keep)[:, :TOP_K + 1], order[:, :TOP_K + 1]


ROUTINGS = {"softplus": _softplus, "nucleus": _nucleus, "threshold": _threshold, "centroids": _centroids,
            "cosine": _cosine, "temperature_buffer": _temperature_buffer, "sorted": _sorted,
            "second_masked_in_place": _second_masked_in_place}


class OwnRoutingMoE(nn.Module):
    """The usual loop over a ModuleList of experts, routed by code of the block's own that no canonical routing
    matches."""

    def __init__(self, routing: str, stacked: bool = False, skip_empty: bool = False):
        super().__init__()
        self.skip_empty = skip_empty
        self.routing = ROUTINGS[routing]
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.register_buffer("temperature", torch.tensor(0.7))
        self.stacked = stacked
        if stacked:
            self.w_gate_up = nn.Parameter(torch.randn(EXPERTS, 2 * 40, HIDDEN) / HIDDEN ** 0.5)
            self.w_down = nn.Parameter(torch.randn(EXPERTS, HIDDEN, 40) / 40 ** 0.5)
        else:
            self.experts = nn.ModuleList(MLP(HIDDEN, 40) for _ in range(EXPERTS))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.routing(self, self.gate(x), x)
        if self.skip_empty:  # a branch on a size of the routing's values, which stops a plain torch.export
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                token, slot = torch.where(chosen == e)
                if token.numel() == 0:
                    continue
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
            return out.reshape(shape)
        if not self.stacked:
            return weighted_experts(self.experts, x, weights, chosen).reshape(shape)
        out = torch.zeros_like(x)
        for e in range(EXPERTS):
            token, slot = torch.where(chosen == e)
            gate, up = (x[token] @ self.w_gate_up[e].t()).chunk(2, -1)
            out.index_add_(0, token, (F.silu(gate) * up) @ self.w_down[e].t() * weights[token, slot, None])
        return out.reshape(shape)


def _device(backend: str) -> str:
    if backend != "triton":
        return "cpu"
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _compiled(model, backend: str, device: str):
    cm = moecc.compile(model, backend=backend)
    cm(torch.randint(0, 50, (2, 16), device=device))
    (layer,) = cm.moe_layers
    return cm, layer


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_a_blocks_own_routing_feeds_its_fused_experts(routing, backend):
    torch.manual_seed(0)
    model = TinyModel(OwnRoutingMoE(routing)).eval()
    cm, layer = _compiled(model, backend, "cpu")
    assert layer.fused, layer.reason
    assert "router kept as its own graph ops" in layer.routing, layer.routing
    if backend == "auto":  # the routing's own ops export to ONNX: ONNX Runtime runs it
        assert cm._entries[0].backend == "onnxruntime", layer.lowering
    for shape in ((3, 11), (1, 7), (1, 1), (4, 32)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("routing", ["softplus", "second_masked_in_place"])
def test_a_blocks_own_routing_feeds_fused_triton_experts(routing):
    device = _device("triton")
    torch.manual_seed(0)
    model = TinyModel(OwnRoutingMoE(routing)).eval().to(device)
    cm, layer = _compiled(model, "triton", device)
    assert layer.fused and cm._entries[0].backend == "triton", layer
    for shape in ((3, 11), (1, 1)):
        x = torch.randint(0, 50, shape, device=device)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


def test_stacked_experts_routed_by_the_blocks_own_code_are_fused():
    torch.manual_seed(0)
    model = TinyModel(OwnRoutingMoE("softplus", stacked=True)).eval()
    cm, layer = _compiled(model, "torch", "cpu")
    assert layer.fused, layer.reason
    x = torch.randint(0, 50, (3, 9))
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


def test_the_routing_is_read_off_a_loop_that_skips_experts_no_token_chose():
    """``if token.numel() == 0: continue`` stops torch.export; the forward is exported again with the example's
    values deciding that branch, which the routing before the loop does not read."""
    torch.manual_seed(0)
    model = TinyModel(OwnRoutingMoE("softplus", skip_empty=True)).eval()
    cm, layer = _compiled(model, "torch", "cpu")
    assert layer.fused, layer.reason
    for shape in ((3, 11), (1, 1)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_write_into_the_weights_is_part_of_the_routing_read_off_the_code():
    """``keep[:, 1] = ...`` writes into a tensor the weights are computed from: the export is functionalized, so
    the candidate read off the code computes the write, on tokens where it matters."""
    torch.manual_seed(0)
    block = OwnRoutingMoE("second_masked_in_place").eval()
    programs = routing_programs(block, torch.empty(0), 2, HIDDEN, EXPERTS)
    assert programs, programs.reason
    x = torch.randn(400, HIDDEN) * 3
    want_w, want_ids = _second_masked_in_place(block, block.gate(x), x)
    assert bool((want_w[:, 1] == 0).any()), "no token of the test input is masked"
    program, k = next(iter(programs.value))
    w, ids = program(x)
    assert k == TOP_K
    torch.testing.assert_close(ids, want_ids)
    torch.testing.assert_close(w, want_w)


def test_compiling_a_blocks_own_routing_passes_on_no_warning_of_torchs_own_code():
    """torch 2.13 warns, at each ``run_decompositions`` (the routing's export, ``torch.onnx.export``), that its own
    code copies a deprecated class: nothing the user can act on."""
    torch.manual_seed(0)
    model = TinyModel(OwnRoutingMoE("nucleus")).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm, layer = _compiled(model, "onnxruntime", "cpu")
    assert layer.fused, layer.reason
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]


class BatchCentredMoE(OwnRoutingMoE):
    """Logits centred over the batch: one token's routing depends on the others of its position, which the
    program read off the code, fed the tokens as one sequence, does not compute alike."""

    def forward(self, x):
        logits = self.gate(x)
        logits = logits - logits.mean(0, keepdim=True)
        weights, chosen = logits.softmax(-1).topk(TOP_K, -1)
        flat = x.reshape(-1, x.shape[-1])
        out = weighted_experts(self.experts, flat, weights.reshape(-1, TOP_K), chosen.reshape(-1, TOP_K))
        return out.reshape(x.shape)


def test_a_routing_read_off_the_code_that_does_not_reproduce_the_block_runs_it_as_written():
    torch.manual_seed(0)
    model = TinyModel(BatchCentredMoE("softplus")).eval()
    cm, layer = _compiled(model, "torch", "cpu")
    assert not layer.fused
    assert "the routing read off its forward" in layer.reason, layer.reason
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x), model(x))


def test_in_bf16_a_canonical_neighbour_of_the_blocks_own_routing_gives_way_to_it(monkeypatch):
    """bf16's probe bound admits softmax for a renormalised softplus (weights some 10 % apart): the routing read off
    the block's code is tried too, and taken where it routes otherwise on the tokens both send alike."""
    import moecc.passes.recognize.block as block_module
    from moecc.passes.recognize.block import analyze_block

    compared = []
    routes_otherwise = block_module._routes_otherwise
    monkeypatch.setattr(block_module, "_routes_otherwise",
                        lambda own, fitted, x: compared.append(fitted.routing.describe()) or routes_otherwise(
                            own, fitted, x))
    torch.manual_seed(0)
    block = OwnRoutingMoE("softplus").eval().to(torch.bfloat16)
    r = analyze_block(block, torch.randn(1, 8, HIDDEN, dtype=torch.bfloat16))
    assert r, r.reason
    assert compared and compared[0].startswith("softmax"), compared
    assert "router kept as its own graph ops" in r.value.routing.describe()
    model = TinyModel(OwnRoutingMoE("softplus")).eval().to(torch.bfloat16)
    cm, layer = _compiled(model, "torch", "cpu")
    assert "router kept as its own graph ops" in layer.routing, layer.routing
    x = torch.randint(0, 50, (3, 11))
    torch.testing.assert_close(cm(x).float(), model(x).float(), rtol=2e-2, atol=2e-2)


class OwnRoutingVariantsMoE(nn.Module):
    """Softplus routing written in the block, with what else blocks do around it: a shared expert, the router's
    logits returned beside the output, a top-1 read off an argmax, or a capacity that drops tokens (which the
    routing's own ops do not compute, so the block runs as written)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(MLP(HIDDEN, 40) for _ in range(EXPERTS))
        if kind == "shared":
            self.shared = MLP(HIDDEN, 32)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        if self.kind == "argmax":
            chosen = logits.argmax(-1, keepdim=True)
            weights = F.softplus(logits.gather(-1, chosen))
        else:
            weights, chosen = F.softplus(logits).topk(TOP_K, -1)
        if self.kind == "capacity":
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                token, slot = torch.where(chosen == e)
                token, slot = token[:3], slot[:3]
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
            return out.reshape(shape)
        y = weighted_experts(self.experts, x, weights, chosen)
        if self.kind == "shared":
            y = y + self.shared(x)
        if self.kind == "logits":
            return y.reshape(shape), logits
        return y.reshape(shape)


class ReadsLogitsModel(TinyModel):
    def forward(self, ids):
        h = self.embed(ids)
        y, logits = self.moe(self.norm(h))
        return self.head(h + y + 0.01 * logits.sum(-1).reshape(y.shape[:-1])[..., None])


@pytest.mark.parametrize("kind,fused", [("shared", True), ("logits", True), ("argmax", True), ("capacity", False)])
def test_a_blocks_own_routing_with_what_blocks_do_around_it(kind, fused):
    torch.manual_seed(0)
    block = OwnRoutingVariantsMoE(kind)
    model = (ReadsLogitsModel if kind == "logits" else TinyModel)(block).eval()
    cm, layer = _compiled(model, "torch", "cpu")
    assert layer.fused == fused, layer.reason
    for shape in ((3, 11), (1, 1)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


def test_blocks_of_the_same_structure_take_their_own_routing_without_a_search(monkeypatch):
    """The first block searches every canonical candidate (thousands for a stacked bank) before its own routing;
    the next blocks of the same code and shapes are offered their own routing first."""
    import moecc.passes.recognize.block as block_module

    searched = []
    search = block_module._searched_routing
    monkeypatch.setattr(block_module, "_searched_routing",
                        lambda *args, **kwargs: searched.append(1) or search(*args, **kwargs))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, HIDDEN)
            self.blocks = nn.ModuleList(OwnRoutingMoE("softplus", stacked=True) for _ in range(3))

        def forward(self, ids):
            h = self.embed(ids)
            for block in self.blocks:
                h = h + block(h)
            return h

    torch.manual_seed(0)
    model = Stack().eval()
    cm = moecc.compile(model, backend="torch")
    x = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
    assert all(layer.fused for layer in cm.moe_layers), [layer.reason for layer in cm.moe_layers]
    assert len(searched) == 1, searched
