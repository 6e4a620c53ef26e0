"""Expert activations past silu, gelu and relu (``moecc/activations.py``): the Triton kernels against the reference
op, and models whose experts apply them (a Hugging Face ``hidden_act``, a user's ``nn.LeakyReLU(0.3)``) fused on
every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import make_inputs, make_model
from torch import nn
from user_modules import LoopMoE, SmallStackedMoE, TinyModel

import moecc
from moecc.activations import BY_NAME, MORE_ACTIVATIONS
from moecc.experts import from_canonical
from moecc.routing import route_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# each activation at a parameter other than its default, where it has one
PARAMS = {"swish": 0.8, "leaky_relu": 0.3, "elu": 0.5}


def _moe_args(t, e, k, h, inter, gated, act, param, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    w, ids = route_reference(torch.randn(t, e, generator=g), None, k, "softmax", False, True, 1, 1, 1.0)
    u = 2 * inter if gated else inter
    # pre-activations of about 2: every branch of the piecewise ones (relu6, hardswish, elu) is taken
    w_up, w_down = torch.randn(e, u, h, generator=g) * 0.4, torch.randn(e, h, inter, generator=g) * 0.2
    b_up, b_down = torch.randn(e, u, generator=g), torch.randn(e, h, generator=g)
    return [x, w, ids, w_up, w_down, b_up, b_down, act, gated, param, 0.0, -1, 0.0, 0, 0, "token", "oi"]


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("act", MORE_ACTIVATIONS)
@pytest.mark.parametrize("t", [1, 37])  # one token takes the decode GEMVs, 37 the grouped GEMMs
def test_triton_kernels_compute_each_activation(act, gated, t):
    pytest.importorskip("triton")
    from moecc.codegen.triton.moe import fused_moe_triton

    args = _moe_args(t, 5, 2, 24, 20, gated, act, PARAMS.get(act, 1.0), seed=len(act))
    ref = torch.ops.moecc.fused_moe(*args)
    got = fused_moe_triton(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]).float().cpu()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_reference_softplus_and_mish_stay_finite_far_out():
    h = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0])
    for act in ("softplus", "mish", "elu", "selu", "swish"):
        assert torch.isfinite(BY_NAME[act].fn(h, 1.0)).all()


# Hugging Face activation names (ACT2FN) and the canonical activation each is recognized as
HF_ACTS = {"quick_gelu": "swish(1.702)", "mish": "mish", "leaky_relu": "leaky_relu(0.01)", "relu6": "relu6",
           "tanh": "tanh", "sigmoid": "sigmoid", "linear": "identity", "gelu_fast": "gelu_tanh",
           "hardswish": "hardswish", "prelu": "leaky_relu(0.25)"}


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("hidden_act", sorted(HF_ACTS))
def test_hf_experts_of_another_hidden_act_fuse(hidden_act, backend):
    model = make_model("mixtral", hidden_act=hidden_act)
    cm = moecc.compile(model, backend=backend)
    cm(**make_inputs("mixtral", 2, 8))
    for layer in cm.moe_layers:
        assert layer.fused, layer.reason
        assert layer.activation == f"gated-{HF_ACTS[hidden_act]}", layer.activation
    if backend == "onnxruntime":  # the experts export routed, in plain ONNX ops, with their activation
        assert cm.moe_layers[0].lowering.startswith("routed in plain ONNX ops"), cm.moe_layers[0].lowering
    fresh = make_inputs("mixtral", 3, 5, seed=1)
    torch.testing.assert_close(cm(**fresh).logits, model(**fresh).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "mish"])
def test_hf_experts_of_another_hidden_act_on_triton(hidden_act):
    pytest.importorskip("triton")
    model = make_model("mixtral", hidden_act=hidden_act).to(DEVICE)
    on = lambda inputs: {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}  # noqa: E731
    cm = moecc.compile(model, backend="triton")
    cm(**on(make_inputs("mixtral", 2, 8)))
    assert all(layer.fused for layer in cm.moe_layers)
    fresh = on(make_inputs("mixtral", 3, 5, seed=1))
    torch.testing.assert_close(cm(**fresh).logits, model(**fresh).logits, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("hidden_act", ["xielu", "laplace", "gelu_10"])  # gelu_10: clipped at 10, seen wide
def test_an_activation_outside_the_table_runs_as_written(hidden_act, moecc_warnings):
    model = make_model("mixtral", hidden_act=hidden_act)
    cm = moecc.compile(model, backend="torch")
    inputs = make_inputs("mixtral", 2, 8)
    torch.testing.assert_close(cm(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert not any(layer.fused for layer in cm.moe_layers)
    assert any("matches no canonical expert" in (layer.reason or "") for layer in cm.moe_layers)


class ActMLP(nn.Module):
    def __init__(self, hidden, inter, act: nn.Module, gated: bool):
        super().__init__()
        self.gated, self.act = gated, act
        self.up = nn.Linear(hidden, inter)
        self.gate = nn.Linear(hidden, inter) if gated else None
        self.down = nn.Linear(inter, hidden)

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))
        return self.down(h)


class ActLoopMoE(LoopMoE):
    def __init__(self, act: nn.Module, gated: bool):
        super().__init__()
        self.experts = nn.ModuleList(ActMLP(24, 40, act, gated) for _ in range(6))


USER_ACTS = {"leaky 0.3": (lambda: nn.LeakyReLU(0.3), "leaky_relu(0.3)"),
             "elu 0.5": (lambda: nn.ELU(0.5), "elu(0.5)"),
             "prelu": (lambda: nn.PReLU(init=0.1), "leaky_relu(0.1)"),
             "mish": (nn.Mish, "mish"), "hardswish": (nn.Hardswish, "hardswish"),
             "selu": (nn.SELU, "selu"), "softplus": (nn.Softplus, "softplus"), "identity": (nn.Identity, "identity")}


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("name", sorted(USER_ACTS))
def test_a_users_activation_module_fuses_at_its_own_parameter(name, gated):
    make_act, expected = USER_ACTS[name]
    torch.manual_seed(0)
    model = TinyModel(ActLoopMoE(make_act(), gated)).eval()
    cm = moecc.compile(model, backend="onnxruntime")
    cm(torch.randint(0, 50, (2, 9)))
    (layer,) = cm.moe_layers
    assert layer.fused, layer.reason
    assert layer.activation == ("gated-" if gated else "") + expected + " +bias", layer.activation
    x = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act,expected", [(F.mish, "mish"), (lambda h: F.leaky_relu(h, 0.2), "leaky_relu(0.2)"),
                                          (torch.tanh, "tanh"), (F.relu6, "relu6")])
@pytest.mark.parametrize("gated", [True, False])
def test_stacked_experts_with_a_functional_activation_fuse(act, expected, gated):
    torch.manual_seed(0)
    model = TinyModel(SmallStackedMoE(act=act, gated=gated)).eval()
    cm = moecc.compile(model, backend="torch")
    cm(torch.randint(0, 50, (2, 9)))
    (layer,) = cm.moe_layers
    assert layer.fused, layer.reason
    assert layer.activation == ("gated-" if gated else "") + expected, layer.activation
    x = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("act", MORE_ACTIVATIONS)
def test_warp_specialized_gemms_compute_each_activation(act, gated, monkeypatch):
    from moecc.codegen.triton import moe, ws_gemm
    from moecc.codegen.triton.configs import TileConfig
    from moecc.codegen.triton.moe import fused_moe_triton

    monkeypatch.setenv("MOECC_TRITON_WS", "on")
    monkeypatch.setenv("MOECC_TRITON_DECODE_MAX_TOKENS", "0")
    # the warp-specialized kernels take 128-row blocks; an H100's shipped tiles for this shape have 64
    rows_128 = TileConfig(block_m=128, block_n=128, block_k=64)
    monkeypatch.setattr(moe, "pick_configs", lambda *a: (rows_128, rows_128))
    calls = []
    gemm1 = ws_gemm.gemm1
    monkeypatch.setattr(ws_gemm, "gemm1", lambda *a, **kw: calls.append(1) or gemm1(*a, **kw))
    args = _moe_args(300, 8, 2, 256, 192, gated, act, PARAMS.get(act, 1.0), seed=len(act))
    ref = torch.ops.moecc.fused_moe(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                      for a in args]).float()
    if gated:  # the layout place_experts gives the warp-specialized GEMM 1
        args[3], args[4], args[5] = from_canonical(args[3], args[4], args[5], "oi_gu")
        args[-1] = "oi_gu"
    dev = [a.cuda().to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() and i != 1 else
           a.cuda() if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    got = fused_moe_triton(*dev).float().cpu()
    assert calls, "the warp-specialized GEMM 1 did not run"
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("hidden_act", ["mish", "quick_gelu", "gelu", "silu"])
def test_bf16_takes_the_activation_not_its_neighbour(hidden_act):
    """bf16's probe bound admits silu for mish and gelu for quick GELU: the closer activation must win."""
    model = make_model("mixtral", hidden_act=hidden_act).to(torch.bfloat16)
    cm = moecc.compile(model, backend="torch")
    cm(**make_inputs("mixtral", 2, 8))
    expected = {"quick_gelu": "swish(1.702)"}.get(hidden_act, hidden_act)
    assert [layer.activation for layer in cm.moe_layers] == [f"gated-{expected}"] * len(cm.moe_layers)
