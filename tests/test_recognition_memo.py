"""A compiled model's later captures reuse what recognition found in its earlier ones, while nothing it read of a
block has changed (``passes.recognize.memo``)."""

import pytest
import torch
from torch import nn
from user_modules import MLP, LoopMoE, TinyModel

import moecc
import moecc.passes.recognize as recognize
from moecc.passes.recognize.memo import stamp


@pytest.fixture
def analyses(monkeypatch):
    """The blocks recognition analyzed, in order."""
    seen = []
    analyze = recognize._analyze_keeping_state

    def counted(block, node):
        seen.append(node.meta["moecc_block"])
        return analyze(block, node)

    monkeypatch.setattr(recognize, "_analyze_keeping_state", counted)
    return seen


def _check(cm, model, shape):
    x = torch.randint(0, 50, shape)
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_new_capture_reuses_the_analysis_of_an_unchanged_block(backend, analyses):
    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval()
    cm = moecc.compile(model, backend=backend)
    _check(cm, model, (2, 16))
    _check(cm, model, (1, 1))  # a batch and a sequence of one: a capture of its own
    assert cm.captures == 2
    assert analyses == ["moe"]
    assert cm.moe_layers[0].fused and cm.moe_layers[0].routing == "softmax->top2 renorm"


def test_a_changed_weight_or_setting_is_analyzed_again(analyses):
    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval()
    cm = moecc.compile(model, backend="torch")
    _check(cm, model, (2, 16))
    with torch.no_grad():
        model.moe.experts[1].w2.weight.mul_(2.0)
    _check(cm, model, (2, 16))
    assert analyses == ["moe", "moe"]
    model.moe.top_k = 1
    _check(cm, model, (3, 7))
    assert analyses == ["moe", "moe", "moe"]
    assert cm.moe_layers[0].top_k == 1


class _LayerNormExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(24)
        self.mlp = MLP(24, 40)

    def forward(self, x):
        return self.mlp(self.norm(x))


def test_a_block_left_as_written_is_not_searched_again_nor_warned_about_again(analyses, moecc_warnings):
    torch.manual_seed(0)
    block = LoopMoE()
    block.experts = nn.ModuleList(_LayerNormExpert() for _ in range(6))
    model = TinyModel(block).eval()
    cm = moecc.compile(model, backend="torch")
    _check(cm, model, (2, 16))
    _check(cm, model, (1, 1))
    assert cm.captures == 2 and analyses == ["moe"]
    assert not cm.moe_layers[0].fused and "LayerNormExpert" in cm.moe_layers[0].reason
    told = [r for r in moecc_warnings.records if "left as written" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in told]


def test_a_stamp_changes_with_what_an_analysis_reads():
    torch.manual_seed(0)
    block = LoopMoE()
    before = stamp(block)
    assert stamp(block) == before
    with torch.no_grad():
        block.gate.weight.add_(1.0)
    assert stamp(block) != before
    before = stamp(block)
    block.renormalize = False
    assert stamp(block) != before
    before = stamp(block)
    block.experts[0].w1.weight = nn.Parameter(block.experts[0].w1.weight.detach().clone())
    assert stamp(block) != before
    with torch.inference_mode():
        block.register_buffer("scale", torch.ones(()))
    assert stamp(block) is None


def test_blocks_compiled_alone_reuse_their_analyses_across_captures(analyses):
    from user_modules import ValueBranchModel

    torch.manual_seed(0)
    model = ValueBranchModel(LoopMoE).eval()
    cm = moecc.compile(model, backend="torch")
    _check(cm, model, (2, 16))
    _check(cm, model, (1, 1))
    assert sorted(analyses) == ["block", "block"]  # each block alone is a model whose one block is "block"
    assert [layer.fused for layer in cm.moe_layers] == [True, True]


def test_a_stamp_changes_with_a_function_or_hook_put_on_the_block():
    torch.manual_seed(0)
    block = LoopMoE()
    before = stamp(block)
    block.apply_expert = lambda expert, x, weight: expert(x) * weight * 2
    assert stamp(block) != before
    before = stamp(block)
    handle = block.experts[0].register_forward_hook(lambda m, a, out: out * 2)
    assert stamp(block) != before
    handle.remove()
    assert stamp(block) == before


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_router_program_reused_is_a_copy_that_no_capture_changed(backend, analyses):
    """A router module kept as its own graph (an MLP scoring the experts): the passes after recognize rewrite the
    program a capture inlines (its last Linear fuses with the route, and cleanup drops it), so each capture takes a
    copy of the one kept."""
    from user_modules import ScoringModuleMoE

    torch.manual_seed(0)
    model = TinyModel(ScoringModuleMoE("mlp", 24, "logits")).eval()
    cm = moecc.compile(model, backend=backend)
    for shape in ((2, 16), (1, 1), (1, 5), (3, 11)):
        _check(cm, model, shape)
    assert cm.captures == 3 and analyses == ["moe"]


def test_copies_of_programs_torch_exported_pass_on_no_warning_of_torchs_own_code():
    """A router program torch.export made holds pytree leaf specs, whose copy torch 2.13 warns about: a capture
    taking its copy of the kept program, and a user's ``copy.deepcopy`` of the compiled model, pass that on."""
    import copy
    import warnings

    from user_modules import ScoringModuleMoE

    torch.manual_seed(0)
    model = TinyModel(ScoringModuleMoE("mlp", 24, "logits")).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = moecc.compile(model, backend="torch")
        for shape in ((2, 16), (1, 1)):
            _check(cm, model, shape)
        twin = copy.deepcopy(cm)
        _check(twin, model, (1, 5))
    assert cm.captures == 2
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]
