"""The check against eager: fresh inputs of the captured shapes, then of other shapes where the program takes them."""

import logging

import pytest
import torch
from torch import nn
from user_modules import BmmMoE, TinyModel

import moecc
from moecc.runtime.verify import check_other_shape, verify


class LengthBranch(TinyModel):
    """A model whose code branches on the sequence length: export fixes that length in the program."""

    def __init__(self):
        super().__init__(BmmMoE())
        self.pos = nn.Parameter(torch.randn(8, 24) * 0.1)

    def forward(self, ids):
        h = self.embed(ids)
        if ids.shape[1] == 8:
            h = h + self.pos
        h = h + self.moe(self.norm(h))
        return self.head(h)


def test_a_size_export_fixed_is_not_taken_as_symbolic():
    """The captured program only holds the branch of length 8: other lengths get captures of their own, also when
    the capture comes back from the capture cache (which stores sizes as text)."""
    torch.manual_seed(0)
    model = LengthBranch().eval()
    for _ in range(2):  # the second compile is a capture-cache hit
        cm = moecc.compile(model, backend="reference")
        for shape in ((2, 8), (3, 8), (2, 5)):
            x = torch.randint(0, 50, shape)
            torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-6)
        assert cm._entries[0].shapes == [(None, 8)]
        assert cm.captures == 2


def _unchecked():
    """(model, compiled model, its entry for (2, 8) tokens), compiled without the check."""
    torch.manual_seed(0)
    model = TinyModel(BmmMoE()).eval()
    cm = moecc.compile(model, backend="reference", verify=False)
    cm(torch.randint(0, 50, (2, 8)))
    return model, cm, cm._entries[0]


def _check_pins_to_its_own_shape(model, cm, entry, caplog):
    """``verify`` keeps ``entry`` for (2, 8) only, says so, and another shape gets a capture of its own."""
    with caplog.at_level(logging.WARNING, logger="moecc.runtime"):
        verify(model, entry)
    assert "kept for its captured input shapes only" in caplog.text
    assert entry.shapes == [(2, 8)]
    x = torch.randint(0, 50, (3, 5))
    torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-6)
    assert cm.captures == 2


def test_a_program_wrong_at_other_shapes_is_kept_for_its_own(caplog):
    model, cm, entry = _unchecked()
    assert entry.shapes == [(None, None)] and check_other_shape(model, entry) is None
    program = entry.runner
    entry.runner = lambda x: tuple(o if x.shape == (2, 8) else o * 1.5 for o in program(x))  # right at (2, 8) only
    why, raised = check_other_shape(model, entry)
    assert "input shapes [(5, 11)]" in why and not raised
    _check_pins_to_its_own_shape(model, cm, entry, caplog)


def test_a_program_wrong_for_some_values_is_rejected():
    """Other numbers at another shape may be other numbers for other values (JetMoE's ONNX program agreed with
    eager on some draws of its own shape): more draws of its own shape decide, and one wrong draw rejects it."""
    model, cm, entry = _unchecked()
    program = entry.runner
    seen = []

    def runner(x):  # right on the first two draws of its shape, wrong on every other input
        seen.append(x)
        return tuple(o if len(seen) <= 2 else o * 1.5 for o in program(x))

    entry.runner = runner
    with pytest.raises(moecc.MoeccError, match="disagrees with eager on fresh inputs"):
        verify(model, entry)


def test_a_program_that_fails_at_other_shapes_is_kept_for_its_own(caplog):
    model, cm, entry = _unchecked()
    program = entry.runner

    def runner(x):
        if x.shape != (2, 8):
            raise IndexError("index 7 is out of bounds for dimension 0 with size 5")
        return program(x)

    entry.runner = runner
    why, raised = check_other_shape(model, entry)
    assert "it fails (index 7 is out of bounds" in why and raised
    _check_pins_to_its_own_shape(model, cm, entry, caplog)


def test_auto_falls_back_to_torch_when_the_onnx_program_disagrees(monkeypatch):
    """An exported ONNX graph can differ from eager outside the MoE blocks (ONNX Runtime's top-k breaks ties its
    own way): ``backend="auto"`` then runs the torch program; an explicit backend says so and stops."""
    import moecc.runtime.compiled as compiled

    real = compiled.lower

    class Off(nn.Module):
        def __init__(self, program):
            super().__init__()
            self.program = program

        def forward(self, *xs):
            return tuple(o * 1.5 for o in self.program(*xs))

    monkeypatch.setattr(compiled, "lower", lambda gm, backend, *a: Off(real(gm, "reference")) if
                        backend == "onnxruntime" else real(gm, backend, *a))
    torch.manual_seed(0)
    model = TinyModel(BmmMoE()).eval()
    x = torch.randint(0, 50, (2, 8))
    cm = moecc.compile(model)
    torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-6)
    assert cm._entries[0].backend == "torch"

    with pytest.raises(moecc.MoeccError, match="disagrees with eager"):
        moecc.compile(model, backend="onnxruntime")(x)


class EvenTokensDoubled(TinyModel):
    """Outside its MoE block, a size that depends on values: the rows of even token ids (``nonzero``)."""

    def __init__(self):
        super().__init__(BmmMoE())

    def forward(self, ids):
        h = self.embed(ids).reshape(-1, 24)
        even = torch.nonzero(ids.reshape(-1) % 2 == 0).squeeze(1)
        h = h.index_add(0, even, h[even]).reshape(*ids.shape, 24)
        h = h + self.moe(self.norm(h))
        return self.head(h)


def test_auto_keeps_programs_with_value_dependent_sizes_on_torch():
    """ONNX Runtime ran JetMoE's expert loop (split sizes from ``tolist()``) with other numbers than eager on some
    inputs: under ``backend="auto"`` a program with sizes that depend on values runs on torch."""
    from moecc.runtime.compiled import data_dependent_sizes

    torch.manual_seed(0)
    model = EvenTokensDoubled().eval()
    cm = moecc.compile(model)
    x = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-6)
    (layer,) = cm.moe_layers
    assert layer.fused and cm._entries[0].backend == "torch"
    assert data_dependent_sizes(cm._entries[0].gm)


def test_left_padding_is_not_compared_and_still_matches_eager_on_onnxruntime():
    """With left padding, a padded position's query attends to no key. torch's attention gives it zeros; ONNX's
    translation of attention gave it an even mix of every key, so moecc lowers attention itself for ONNX Runtime.
    The check still leaves out the positions the attention mask pads (nobody reads them) and compares every other
    one; the ONNX program is kept and agrees with eager everywhere, padding included."""
    from hf_models import make_model

    model = make_model("mixtral")
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :5] = 0
    cm = moecc.compile(model, backend="onnxruntime")
    got = cm(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert cm._entries[0].backend == "onnxruntime"
    want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_padding_mask_finds_the_attention_mask_by_name_or_position():
    from hf_models import make_model

    from moecc.runtime.verify import _unpadded, padding_mask

    model = make_model("mixtral")
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    for args, kwargs in (((ids,), {"attention_mask": mask}), ((ids, mask), {})):
        kept = padding_mask(model, args, kwargs)
        assert kept.tolist() == mask.bool().tolist()
    assert padding_mask(model, (ids,), {"attention_mask": torch.ones_like(mask)}) is None
    assert padding_mask(model, (ids,), {}) is None
    logits = torch.arange(2 * 4 * 3.0).reshape(2, 4, 3)
    assert _unpadded(logits, kept).shape == (7, 3)
    assert _unpadded(torch.ones(5), kept).shape == (5,)  # not [batch, seq, ...]: compared whole


def test_an_fp32_output_of_a_bf16_model_is_held_to_the_models_rounding():
    """A bf16 model's fp32 outputs (router logits, an auxiliary loss) carry bf16 rounding from the layers before
    them: the check bounds them as bf16, where an fp32 model's are bounded as fp32."""
    from types import SimpleNamespace

    from torch.utils import _pytree as pytree

    from moecc.runtime.verify import _disagreement

    class Head(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4, dtype=dtype))

        def forward(self, x):
            return (x * self.w).float()

    x = torch.randn(3, 4)
    flat, spec = pytree.tree_flatten(((x,), {}))
    for dtype, agrees in ((torch.bfloat16, True), (torch.float32, False)):
        model = Head(dtype)
        noisy = SimpleNamespace(in_spec=spec, tensor_pos=[0], layers={},
                                runner=lambda t, m=model: [m(t) * (1 + 1e-3)])
        assert (_disagreement(model, noisy, flat, None) is None) == agrees


def test_rounding_sensitivity_is_the_widest_of_several_noise_draws():
    """On a small bf16 input one token whose top-k is a near tie decides how far the outputs may move, and one draw
    of noise tips it or not: the sensitivity is the most that any of a few draws moves them."""
    from user_modules import LoopMoE

    from moecc.runtime import verify as v

    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval().to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ref = [model(ids)]
    draws = [v._moved_by_noise(model, ["moe"], (ids,), {}, ref, None, seed)
             for seed in range(99, 99 + v.SENSITIVITY_DRAWS)]
    assert v.SENSITIVITY_DRAWS >= 3 and len(set(draws)) > 1, draws
    assert v.rounding_sensitivity(model, ["moe"], lambda: ((ids,), {}), ref) == max(draws) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_program_closer_to_the_model_in_fp32_than_eager_is_not_wrong(dtype):
    """A router whose scores round to ties in low precision (a saturated sigmoid: 1.0 for several experts) makes
    eager's top-k pick by index, far from the model computed exactly. A program whose gating scores in fp32 picks
    the model's own choice and disagrees with eager by far more than the low-precision bound: it is checked against
    the model in fp32 and passes, as close to it as the rounding of its output allows. A program that is wrong
    there too still fails, saying how far each is from the exact model."""
    import copy
    from types import SimpleNamespace

    from torch.utils import _pytree as pytree
    from user_modules import PostNormedMoE

    from moecc.runtime.verify import _disagreement

    torch.manual_seed(0)
    exact = TinyModel(PostNormedMoE(per_expert=True, project=False)).eval()
    with torch.no_grad():
        exact.moe.gate.weight.mul_(30)  # logits of tens: sigmoid rounds to 1.0 in bf16 and fp16
    model = copy.deepcopy(exact).to(dtype)
    ids = torch.randint(0, 50, (4, 64))
    flat, spec = pytree.tree_flatten(((ids,), {}))
    with torch.no_grad():
        assert _rel(model(ids).float(), exact(ids)) > 0.05  # eager itself strays past the bound
    close = SimpleNamespace(in_spec=spec, tensor_pos=[0], layers={},
                            runner=lambda t: [exact(t).to(dtype)])
    assert _disagreement(model, close, flat, None) is None
    wrong = SimpleNamespace(in_spec=spec, tensor_pos=[0], layers={},
                            runner=lambda t: [(exact(t) * 1.5).to(dtype)])
    why = _disagreement(model, wrong, flat, None)
    assert why is not None and "from the model computed in fp32, where eager in" in why, why


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
