"""The ONNX optimizer without onnxscript's multi-output rewrite rules (moecc/codegen/onnx/optimize.py)."""

import pytest
import torch
from hf_models import make_inputs, make_model
from onnxscript import rewriter
from onnxscript.rewriter import _rewrite_rule

import moecc
from moecc.codegen.onnx.optimize import optimize, single_output_rules


def _outputs(rule) -> int:
    return rule._target_pattern.num_outputs


def test_the_default_rules_lose_only_those_of_several_outputs():
    rules = rewriter._DEFAULT_REWRITE_RULES
    kept = single_output_rules(rules)
    assert "SlicesSplit" in {rule.name for rule in rules} - {rule.name for rule in kept}
    assert all(_outputs(rule) == 1 for rule in kept)
    assert len(kept) == sum(_outputs(rule) == 1 for rule in rules) < len(rules)


class _Program:
    def __init__(self, fail: bool = False):
        self.fail = fail
        self.ran = False
        self.seen = None

    def optimize(self):
        self.ran = True
        self.seen = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
        if self.fail:
            raise RuntimeError("optimizer failed")


def test_the_optimizer_runs_with_single_output_rules_and_the_defaults_come_back():
    rules = rewriter._DEFAULT_REWRITE_RULES
    program = _Program()
    optimize(program)
    assert program.seen == single_output_rules(rules)
    assert rewriter._DEFAULT_REWRITE_RULES is rules
    with pytest.raises(RuntimeError, match="optimizer failed"):
        optimize(_Program(fail=True))
    assert rewriter._DEFAULT_REWRITE_RULES is rules


def test_an_onnxscript_without_the_rules_attribute_runs_its_own(monkeypatch):
    monkeypatch.delattr(rewriter, "_DEFAULT_REWRITE_RULES")
    program = _Program()
    optimize(program)
    assert program.ran and program.seen is None
    assert not hasattr(rewriter, "_DEFAULT_REWRITE_RULES")


def test_a_lowering_tries_no_multi_output_rule_and_matches_eager(monkeypatch):
    """A tiny Mixtral: its rotary embeddings slice halves, which the left-out rule would have paired up."""
    tried = []
    real = _rewrite_rule.RewriteRule.try_rewrite

    def try_rewrite(self, *args, **kwargs):
        tried.append(_outputs(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_rewrite_rule.RewriteRule, "try_rewrite", try_rewrite)
    monkeypatch.setenv("MOECC_ONNX_CACHE", "0")  # an earlier test's export of the same program skips the optimizer
    model = make_model("mixtral")
    cm = moecc.compile(model, backend="onnxruntime")
    fresh = make_inputs("mixtral", 2, 6, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(cm(**fresh).logits, model(**fresh).logits, rtol=1e-4, atol=1e-5)
    assert cm._entries[0].backend == "onnxruntime"
    assert tried and set(tried) == {1}
