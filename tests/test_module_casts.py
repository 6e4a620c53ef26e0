"""Modules that cast themselves inside forward, and expert banks that hold a module of their own beside the experts
(NLLB-MoE's layout, built here from plain torch; the family itself: ``test_nllb_moe``)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_modules import MLP, TinyModel

import moecc
from moecc.module_casts import changes_nothing, idle_module_casts


def test_a_cast_to_what_a_module_already_is_returns_it_untouched_and_other_casts_still_convert():
    lin, plain_to = nn.Linear(4, 3), nn.Module.to
    weight = lin.weight
    assert changes_nothing(lin, torch.float32) and changes_nothing(lin, "cpu") and changes_nothing(lin, dtype=None)
    assert not changes_nothing(lin, torch.float64) and not changes_nothing(lin, memory_format=torch.channels_last)
    with idle_module_casts(), idle_module_casts():
        assert lin.to(torch.float32) is lin and lin.weight is weight
        assert lin.to(torch.float64).weight.dtype == torch.float64
    assert nn.Module.to is plain_to


def test_integer_buffers_do_not_stop_a_cast_that_changes_nothing():
    """``Module.to(dtype)`` casts floating tensors only: an index buffer does not make a float cast a change."""
    lin = nn.Linear(4, 3)
    lin.register_buffer("ids", torch.arange(3))
    assert changes_nothing(lin, torch.float32)


class CastingRouter(nn.Module):
    """Casts its classifier to its routing dtype on every call, as Switch Transformers' and NLLB-MoE's routers do."""

    def __init__(self, hidden, num_experts):
        super().__init__()
        self.classifier = nn.Linear(hidden, num_experts, bias=False)
        self.dtype = torch.float32

    def forward(self, x):
        self.classifier = self.classifier.to(self.dtype)
        return F.softmax(self.classifier(x.to(self.dtype)), dim=-1).to(x.dtype)


class DictBankMoE(nn.Module):
    """NLLB-MoE's layout: experts in a ModuleDict by name (``expert_<i>``) that also holds the bank's token dropout."""

    def __init__(self, hidden=24, inter=40, num_experts=6, top_k=2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = CastingRouter(hidden, num_experts)
        self.experts = nn.ModuleDict({f"expert_{e}": MLP(hidden, inter) for e in range(num_experts)})
        self.experts.token_dropout = nn.Dropout(0.2)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = torch.topk(self.router(x), self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(chosen == e)
            y = self.experts[f"expert_{e}"](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, self.experts.token_dropout(y))
        return out.reshape(shape)


class CastingHeadModel(TinyModel):
    """A module outside the MoE block cast to its own dtype in forward: the whole model's capture met it."""

    def forward(self, ids):
        self.head = self.head.to(self.embed.weight.dtype)
        return super().forward(ids)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_bank_holding_its_dropout_beside_its_experts_is_fused(backend):
    torch.manual_seed(0)
    model = CastingHeadModel(DictBankMoE()).eval()
    cm = moecc.compile(model, backend=backend)
    cm(torch.randint(0, 50, (2, 16)))
    (layer,) = cm.moe_layers
    assert layer.fused and layer.num_experts == 6 and layer.top_k == 2, layer.reason
    for shape in ((3, 11), (4, 7)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
    assert cm.captures == 1
