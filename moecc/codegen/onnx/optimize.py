"""The ONNX optimizer every exported program goes through: torch.onnx's (onnxscript's constant folding and rewrite
rules), without the rewrite rules of several outputs.

onnxscript matches a rule whose pattern has several outputs by trying every pair of candidate nodes. Its one such
default rule, ``SlicesSplit`` (two Slices of one value's halves into a Split), made 529,516 tries over the 680
Slices of a tiny Qwen3-Next (its linear attention's loops unrolled): 23 s in each of the optimizer's two rounds, half
of a 100 s lowering, for no Split at all. A Split in place of two Slices saves ONNX Runtime one small kernel, so
those rules are left out everywhere rather than above some graph size."""

from __future__ import annotations

import threading

from onnxscript import rewriter

# the optimizer reads its rules from this module attribute when it runs; one swap at a time, whatever the thread
_RULES_LOCK = threading.Lock()


def _outputs(rule) -> int:
    return getattr(getattr(rule, "_target_pattern", None), "num_outputs", 1)


def single_output_rules(rules):
    """``rules`` without those whose pattern has several outputs."""
    return tuple(rule for rule in rules if _outputs(rule) == 1)


def optimize(program) -> None:
    """``program.optimize()`` (a ``torch.onnx.ONNXProgram``) with ``single_output_rules`` of the default rules. An
    onnxscript that keeps its rules elsewhere runs them all."""
    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:
        program.optimize()
        return
    with _RULES_LOCK:
        rewriter._DEFAULT_REWRITE_RULES = single_output_rules(rules)
        try:
            program.optimize()
        finally:
            rewriter._DEFAULT_REWRITE_RULES = rules
