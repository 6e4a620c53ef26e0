"""A fused block that passed recognition's probes and differs on the model's own inputs: the check on fresh inputs
finds it, and it runs as written (``moecc/runtime/localize.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from user_modules import LoopMoE, TinyModel, weighted_experts

import moecc
from moecc.runtime.localize import disagreeing_blocks

CLAMP = 4.0


class ClampedMoE(LoopMoE):
    """Clamps its output at a size that recognition's random probes stay under and the model's activations do
    not: on the probes the block is a plain softmax top-2 block. Its loop is one torch.export traces, so that
    ``moecc.export`` can write it as written."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = F.softmax(self.gate(x), dim=-1).topk(2, dim=-1)
        out = weighted_experts(self.experts, x, weights / weights.sum(-1, keepdim=True), chosen)
        return out.clamp(-CLAMP, CLAMP).reshape(shape)


class SmallSecondDroppedMoE(LoopMoE):
    """Drops its second expert where that one's weight is under 5 %: random probes, whose logits are small, almost
    never give such a weight, and the model's large activations often do."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = F.softmax(self.gate(x), dim=-1).topk(2, dim=-1)
        keep = torch.ones_like(weights)
        keep[:, 1] = (weights[:, 1] >= 0.05).to(weights.dtype)
        weights = weights * keep
        return weighted_experts(self.experts, x, weights / weights.sum(-1, keepdim=True), chosen).reshape(shape)


class LoudModel(TinyModel):
    """Hands its MoE blocks activations 40x those of a norm's output."""

    def __init__(self, block=None):
        super().__init__(ClampedMoE() if block is None else block)
        self.plain = LoopMoE()

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.moe(40 * self.norm(h))
        h = h + self.plain(self.norm(h))
        return self.head(h)


def _layers(cm) -> dict:
    return {layer.name: layer for layer in cm.moe_layers}


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_block_that_differs_on_the_models_inputs_runs_as_written(backend, moecc_warnings):
    torch.manual_seed(0)
    model = LoudModel().eval()
    cm = moecc.compile(model, backend=backend)
    cm(torch.randint(0, 50, (2, 16)))
    layers = _layers(cm)
    assert not layers["moe"].fused
    assert "differs from the block on the model's own inputs" in layers["moe"].reason, layers["moe"].reason
    assert layers["plain"].fused, layers["plain"].reason  # the other block stays fused
    assert "MoE block moe left as written: its fused form" in moecc_warnings.text
    for shape in ((3, 11), (1, 5), (2, 16)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-4)


def test_an_export_leaves_the_block_as_written_too(tmp_path):
    torch.manual_seed(0)
    model = LoudModel().eval()
    x = torch.randint(0, 50, (2, 16))
    path = moecc.export(model, (x,), tmp_path / "loud", backend="torch")
    loaded = moecc.load(path)
    layers = {layer["name"]: layer for layer in loaded.manifest["moe_layers"]}
    assert not layers["moe"]["fused"] and layers["plain"]["fused"], layers
    x2 = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(loaded(x2), model(x2), rtol=1e-4, atol=1e-4)


def test_no_block_is_blamed_where_every_fused_form_agrees():
    from moecc.runtime.compiled import build

    torch.manual_seed(0)
    model = LoudModel(LoopMoE()).eval()
    x = torch.randint(0, 50, (2, 16))
    entry, info = build(model, (x,), {}, "torch", {}, None)
    assert set(info.canonical) == {"moe", "plain"}
    flat = [torch.randint(0, 50, (2, 16))]
    assert disagreeing_blocks(model, info.canonical, flat, entry.in_spec) == {}


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_canonical_routing_that_differs_on_the_models_inputs_gives_way_to_the_blocks_own(backend,
                                                                                          moecc_warnings):
    """The plain softmax top-2 passes the probes; the check finds it differs, and recognition then reads the
    block's routing off its code: the experts stay fused, fed by it."""
    torch.manual_seed(0)
    model = LoudModel(SmallSecondDroppedMoE()).eval()
    cm = moecc.compile(model, backend=backend)
    cm(torch.randint(0, 50, (2, 16)))
    moe = _layers(cm)["moe"]
    assert moe.fused, moe.reason
    assert "router kept as its own graph ops" in moe.routing and "differed from it on fresh inputs" in moe.routing
    assert "recognizing it again with its routing as written" in moecc_warnings.text
    for shape in ((3, 11), (1, 5), (2, 16)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-4)
