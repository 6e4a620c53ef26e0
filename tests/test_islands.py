"""Programs whose blocks left as written cannot go into an ONNX graph: ONNX Runtime runs the graph between them and
torch runs the blocks (``moecc/codegen/onnx/islands.py``), where the whole program ran on torch before."""

import pytest
import torch
from hf_models import make_inputs, make_model

import moecc
from moecc.codegen.onnx.lower import OrtModule


def _sessions(cm) -> int:
    (entry,) = cm._entries
    return sum(isinstance(m, OrtModule) for m in entry.gm.modules())


@pytest.mark.parametrize("backend", ["auto", "onnxruntime"])
def test_a_block_whose_export_fails_runs_on_torch_between_onnx_graphs(backend):
    """An expert loop over ``torch.where`` defeats the ONNX export: the block runs on torch, the embedding, norm and
    head on ONNX Runtime, and the program matches eager on shapes it was not captured for."""
    from user_modules import AuxModel, AuxOutputsMoE

    torch.manual_seed(0)
    model = AuxModel(AuxOutputsMoE(), "aux").eval()  # the loss it reads keeps the block as written
    cm = moecc.compile(model, backend=backend)
    with torch.no_grad():
        for shape in ((2, 16), (3, 11), (4, 7)):
            x = torch.randint(0, 50, shape)
            for r, g in zip(torch.utils._pytree.tree_leaves(model(x)), torch.utils._pytree.tree_leaves(cm(x))):
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert [e.backend for e in cm._entries] == ["onnxruntime"] and cm.captures == 1
    assert _sessions(cm) == 2
    # torch runs after each part: their threads sleep after a run (spinning made the torch block 3x slower)
    assert not any(m.spin for m in cm._entries[0].gm.modules() if isinstance(m, OrtModule))
    (layer,) = cm.moe_layers
    assert not layer.fused
    assert layer.lowering.startswith("torch, between ONNX Runtime graphs (moe does not export to ONNX alone")


def test_a_hugging_face_block_left_as_written_runs_on_torch_between_onnx_graphs():
    """A hook on Mixtral's experts leaves its block as written; its experts' ops have no ONNX function, so
    ``backend="onnxruntime"`` raised a BackendError. The other layer stays fused on ONNX Runtime."""
    model = make_model("mixtral").eval()
    model.model.layers[1].mlp.experts.register_forward_hook(lambda module, args, out: out * 2)
    cm = moecc.compile(model, backend="onnxruntime")
    with torch.no_grad():
        for seed, (batch, seq) in enumerate([(2, 8), (3, 5), (4, 9)]):
            kwargs = make_inputs("mixtral", batch, seq, seed)
            torch.testing.assert_close(cm(**kwargs).logits, model(**kwargs).logits, rtol=1e-4, atol=1e-5)
    assert cm.captures == 1 and _sessions(cm) == 2
    layers = {layer.name: layer for layer in cm.moe_layers}
    assert layers["model.layers.0.mlp"].fused
    assert layers["model.layers.1.mlp"].lowering.startswith("torch, between ONNX Runtime graphs")


class _FlatBlockModel(torch.nn.Module):
    """Takes the batch and sequence sizes before its MoE block and reads them again after it, so that the sizes
    computed in one ONNX Runtime part are needed in the next."""

    def __init__(self):
        super().__init__()
        from user_modules import LoopMoE

        self.embed = torch.nn.Embedding(50, 24)
        self.moe = LoopMoE()
        self.head = torch.nn.Linear(24, 50)

    def forward(self, ids):
        h = self.embed(ids)
        batch, seq, hidden = h.shape
        y = self.moe(h.reshape(batch * seq, hidden))
        return self.head(h + y.reshape(batch, seq, hidden) * (seq / 4))


def test_sizes_read_on_both_sides_of_a_block_are_computed_in_each_part():
    """An ONNX graph takes and gives tensors only: the sizes the graph after the block reads are computed there
    again, and the program follows new batch and sequence sizes."""
    torch.manual_seed(0)
    model = _FlatBlockModel().eval()
    model.moe.register_forward_hook(lambda module, args, out: out + 1)  # left as written; its loop does not export
    cm = moecc.compile(model, backend="onnxruntime")
    with torch.no_grad():
        for shape in ((2, 9), (3, 5), (4, 12)):
            x = torch.randint(0, 50, shape)
            torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)
    assert cm.captures == 1 and _sessions(cm) == 2


def test_the_split_leaves_the_program_it_was_handed_as_it_was(tmp_path):
    """The split computes sizes again in each part that reads them, in a copy: a compile whose split fails exports
    the program whole, and that must be the program as captured."""
    from moecc.capture import capture
    from moecc.codegen.onnx.islands import blocks_on_torch

    torch.manual_seed(0)
    model = _FlatBlockModel().eval()
    example = [torch.randint(0, 50, (2, 9))]
    gm = capture(model, tuple(example), {}).gm
    code = gm.code
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    split = blocks_on_torch(gm, example, calls, str(tmp_path), lambda part, args, path: part)
    assert sum(1 for n in split.graph.nodes if n.op == "call_module") == 3  # before, the block, after
    assert gm.code == code and [n for n in gm.graph.nodes if n.op == "call_module"] == calls
