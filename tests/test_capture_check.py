"""The check that an exported program computes what the model computes in eager, on the inputs it was made from
(``moecc/capture_check.py``): it judges as the check on fresh inputs does."""

import torch
from torch import nn
from torch.utils import _pytree as pytree

from moecc.capture_check import traced_apart


class Tagger(nn.Module):
    """[batch, seq] ids and an attention mask in, [batch, seq, 4] out."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, input_ids, attention_mask):
        return (self.drop(self.embed(input_ids)),)


def _apart(model, got, attention_mask=None):
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    flat, in_spec = pytree.tree_flatten(((ids,), {"attention_mask": mask}))
    return traced_apart(model, in_spec, flat, [0, 1], (got(model(ids, mask)[0]),))


def test_a_program_that_agrees_passes():
    model = Tagger().eval()
    assert _apart(model, lambda y: y.clone()) is None


def test_a_program_that_computes_otherwise_is_named():
    model = Tagger().eval()
    assert "relative error" in _apart(model, lambda y: y * 1.01)


def test_positions_an_attention_mask_pads_are_not_compared():
    """Left padding: a padded query attends to no key, whose answer each attention implementation picks for itself."""
    model = Tagger().eval()
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])

    def padded_otherwise(y):
        y = y.clone()
        y[0, :2] = 7.0
        return y

    assert _apart(model, padded_otherwise, mask) is None
    assert _apart(model, padded_otherwise) is not None  # the same rows, not padding


def test_an_output_of_another_shape_is_named():
    model = Tagger().eval()
    assert "of shape [2, 16]" in _apart(model, lambda y: y.reshape(2, 16))


def test_not_judged_where_eager_varies_or_in_bf16():
    assert _apart(Tagger().train(), lambda y: y * 2) is None  # dropout: the check on fresh inputs says so
    assert _apart(Tagger().eval().bfloat16(), lambda y: y * 2) is None
