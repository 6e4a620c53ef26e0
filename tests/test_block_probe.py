"""Blocks left as written are exported alone before the whole program (``moecc/codegen/onnx/block_probe.py``): one
that does not export sends the program straight to the split, without paying for the whole export's failure."""

import pytest
import torch
from torch import fx
from user_modules import AuxModel, AuxOutputsMoE, DenseGateMoE, LoopMoE, TinyModel

import moecc
from moecc.codegen.onnx import block_probe, lower


@pytest.fixture
def exported(monkeypatch, tmp_path):
    """What each ``torch.onnx.export`` call was handed, from a fresh cache: ``"block"`` (block calls alone),
    ``"ops"`` (no block call) or ``"whole"`` (both)."""
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path / "cache"))
    kinds = []
    real = torch.onnx.export

    def export(gm, *args, **kwargs):
        ops = {n.op for n in gm.graph.nodes}
        kinds.append({(True, False): "block", (False, True): "ops"}.get(
            ("call_module" in ops, "call_function" in ops), "whole"))
        return real(gm, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    return kinds


def _same(model, cm, shapes):
    with torch.no_grad():
        for shape in shapes:
            x = torch.randint(0, 50, shape)
            for r, g in zip(torch.utils._pytree.tree_leaves(model(x)), torch.utils._pytree.tree_leaves(cm(x))):
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_a_block_that_does_not_export_alone_splits_the_program_without_its_whole_export(exported):
    """An expert loop over ``torch.where`` fails alone as it fails in the whole program: the whole program is never
    exported, and the reason names the block."""
    torch.manual_seed(0)
    model = AuxModel(AuxOutputsMoE(), "aux").eval()
    cm = moecc.compile(model, backend="onnxruntime")
    _same(model, cm, [(2, 16), (3, 7)])
    assert exported[0] == "block" and "whole" not in exported
    assert exported.count("ops") == 2  # the parts before and after the block
    (layer,) = cm.moe_layers
    assert layer.lowering.startswith("torch, between ONNX Runtime graphs (moe does not export to ONNX alone: ")


def test_a_block_that_exports_alone_goes_into_the_whole_export(exported):
    """A hook leaves a dense block as written, and it traces: the probe passes and decides nothing, so the whole
    program is exported into one graph as before."""
    torch.manual_seed(0)
    model = TinyModel(DenseGateMoE()).eval()
    model.moe.register_forward_hook(lambda module, args, out: out + 1)
    cm = moecc.compile(model, backend="onnxruntime")
    _same(model, cm, [(2, 16), (3, 7)])
    (layer,) = cm.moe_layers
    assert not layer.fused
    assert exported == ["block", "whole"], exported
    assert not (layer.lowering or "").startswith("torch, between")


class _TwoLoopBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 24)
        self.first, self.second = LoopMoE(), LoopMoE()
        self.head = torch.nn.Linear(24, 50)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.first(h)
        return self.head(h + self.second(h))


def test_one_call_of_each_block_class_is_probed(exported):
    """Calls of one class run the same code: the second block is not exported alone."""
    torch.manual_seed(0)
    model = _TwoLoopBlocks().eval()
    for block in (model.first, model.second):
        block.register_forward_hook(lambda module, args, out: out + 1)
    cm = moecc.compile(model, backend="onnxruntime")
    _same(model, cm, [(2, 9), (3, 5)])
    assert exported.count("block") == 1 and "whole" not in exported
    assert all(layer.lowering.startswith("torch, between ONNX Runtime graphs (first does not export")
               for layer in cm.moe_layers)


def test_a_split_that_fails_after_the_probe_exports_the_whole_program(exported, monkeypatch):
    """The probe only orders the attempts: where the split then fails, the whole export is still tried, and its
    failure is the one told."""
    def no_split(*args, **kwargs):
        raise RuntimeError("cannot split")

    monkeypatch.setattr(lower, "blocks_on_torch", no_split)
    torch.manual_seed(0)
    model = AuxModel(AuxOutputsMoE(), "aux").eval()
    with pytest.raises(moecc.BackendError, match="ONNX export failed") as error:
        moecc.compile(model, backend="onnxruntime")(torch.randint(0, 50, (2, 16)))
    assert "cannot split" not in str(error.value)
    assert exported == ["block", "whole"]


def test_a_whole_export_that_fails_where_the_probe_passed_still_splits(exported, monkeypatch):
    """The split after a failed whole export stays: a block can export alone and fail in the program."""
    monkeypatch.setattr(lower, "block_that_does_not_export", lambda *args: None)
    torch.manual_seed(0)
    model = AuxModel(AuxOutputsMoE(), "aux").eval()
    cm = moecc.compile(model, backend="onnxruntime")
    _same(model, cm, [(2, 16)])
    assert exported == ["whole", "ops", "ops"]
    assert cm.moe_layers[0].lowering.startswith("torch, between ONNX Runtime graphs (the whole export failed: ")


def test_a_call_reading_a_size_is_not_cut_out_alone():
    """An ONNX graph takes tensors only: a block call handed a size has no program of its own."""
    class Scaled(torch.nn.Module):
        def forward(self, x, n):
            return x * n

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Scaled()

        def forward(self, x):
            return self.block(x, x.shape[0]) + self.block(x, x)

    class BlocksAsLeaves(fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, Scaled) or super().is_leaf_module(module, name)

    model = Model()
    gm = fx.GraphModule(model, BlocksAsLeaves().trace(model))
    sized, tensors = [n for n in gm.graph.nodes if n.op == "call_module"]
    for node in gm.graph.nodes:
        node.meta["val"] = torch.empty(2) if node.name in ("x", "block_1") else 2
    assert block_probe.block_program(gm, sized) is None
    program = block_probe.block_program(gm, tensors)
    x = torch.randn(3)
    torch.testing.assert_close(program(x), x * x)
