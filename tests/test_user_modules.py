import pytest
import torch
from user_modules import USER_BLOCKS, TinyModel

import moecc


@pytest.mark.parametrize("kind", sorted(USER_BLOCKS))
def test_user_block_fused_and_exact_on_fresh_shapes(kind):
    torch.manual_seed(0)
    model = TinyModel(USER_BLOCKS[kind]()).eval()
    cm = moecc.compile(model)
    cm(torch.randint(0, 50, (2, 16)))
    (layer,) = cm.moe_layers
    assert layer.fused, layer.reason
    for shape in ((3, 11), (1, 7), (4, 32)):
        x = torch.randint(0, 50, shape)
        ref, got = model(x), cm(x)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_gshard_capacity_formula_is_symbolic():
    torch.manual_seed(0)
    cm = moecc.compile(TinyModel(USER_BLOCKS["gshard"]()).eval())
    cm(torch.randint(0, 50, (2, 16)))
    assert cm.moe_layers[0].capacity == "C = ceiling(T/4)"


class SparseMixerLike(torch.nn.Module):
    """A router no pattern knows (a masked, jittered double softmax): must run exactly as written."""

    def __init__(self, hidden=24, num_experts=4):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, num_experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(hidden, 16), torch.nn.ReLU(),
                                                               torch.nn.Linear(16, hidden)) for _ in range(4))

    def forward(self, x):
        logits = self.gate(x)
        top = logits.max(-1, keepdim=True).values
        w = torch.softmax(logits.masked_fill((top - logits) > 0.3 * top.abs(), -1e9), -1)
        idx = w.argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            sel = idx == e
            out = out + torch.where(sel[..., None], expert(x) * w[..., e:e + 1] ** 0.5, 0)
        return out


def test_unknown_router_runs_as_written_and_says_why():
    torch.manual_seed(0)
    model = TinyModel(SparseMixerLike()).eval()
    cm = moecc.compile(model)
    x = torch.randint(0, 50, (2, 9))
    cm(x)
    (layer,) = cm.moe_layers
    assert not layer.fused and layer.reason
    x2 = torch.randint(0, 50, (3, 5))
    torch.testing.assert_close(cm(x2), model(x2), rtol=1e-5, atol=1e-6)


def test_block_bias_is_found_as_the_selection_bias():
    torch.manual_seed(0)
    cm = moecc.compile(TinyModel(USER_BLOCKS["block_bias"]()).eval(), backend="reference")
    cm(torch.randint(0, 50, (2, 16)))
    (layer,) = cm.moe_layers
    assert layer.fused and "sigmoid" in layer.routing and "selection-bias" in layer.routing, layer.routing


def test_unknown_router_called_with_block_arguments_runs_as_written():
    """A router no pattern matches, called on [B, S, H] with the block's bias as an argument: exported with that
    call's rank and arguments, its (weights, ids) feed the fused experts."""
    from user_modules import BlockBiasMoE

    torch.manual_seed(0)
    model = TinyModel(BlockBiasMoE(temperature=0.7)).eval()
    cm = moecc.compile(model, backend="reference")
    cm(torch.randint(0, 50, (2, 16)))
    (layer,) = cm.moe_layers
    assert layer.fused and "router kept as its own graph ops" in layer.routing, (layer.routing, layer.reason)
    for shape in ((3, 11), (1, 7)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_stack_of_layers_is_no_moe_block():
    """A ModuleList of identical layers looks like an expert list; a weight with one row per layer inside one of
    the layers (DeepSeek-V3.2's indexer has an [n_heads, H] projection) is no router for it."""
    from torch import nn

    from moecc.discover import find_moe_blocks

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(24, 24)
            self.heads = nn.Linear(24, 2)

    model = nn.Module()
    model.layers = nn.ModuleList([Layer(), Layer()])
    assert find_moe_blocks(model) == []
