"""Whether the program ``torch.export`` made computes what the model computes in eager, on the inputs it was made
from.

Some model code takes another path while traced: a branch on ``torch.compiler.is_exporting()`` or on tracing, an
attention mask that a library builds one way in eager and another way under export (Doge's dynamic mask in
transformers 5.17 masks by a causal mask it only has while traced). Every later stage starts from the exported
program, so such a capture would make every program moecc builds from it disagree with eager, whatever the
passes do. Found here, the capture is refused like one ``torch.export`` cannot make, and ``moecc.compile`` runs the
model as written with each MoE block compiled alone."""

from __future__ import annotations

import torch
from torch import nn

from moecc import module_state
from moecc.runtime.verify import CheckedProgram, _disagreement, _eager_varies, _low_precision

# far past the rounding two runs of the same aten ops can differ by, and past a kernel chosen otherwise (export
# materializes the causal mask that eager leaves to the attention kernel)
_BOUND = 1e-3


def traced_apart(model: nn.Module, in_spec, flat: list, tensor_pos: list, got: tuple) -> str | None:
    """Why ``got`` (the program's flat outputs on the tensors of ``flat``, the model's flat inputs) is not eager's,
    when farther apart than rounding, as the check on fresh inputs says it (positions an attention mask pads left
    out). None where they agree, and where eager itself gives other outputs from call to call (dropout: the check
    on fresh inputs says so), and for a model of bf16 or fp16 parameters: there an attention kernel chosen
    otherwise under export (a causal mask materialized where eager leaves it to the kernel) can move a deep
    model's outputs past any fixed bound, and the check on fresh inputs, which measures the model's own rounding
    sensitivity, judges."""
    if _low_precision(model) is not None:
        return None
    program = CheckedProgram(in_spec, lambda *_: got, tensor_pos)
    why = _disagreement(model, program, flat, _BOUND)
    if why is None or _eager_varies(model, program, flat, _BOUND) is not None:
        return None
    return why


def call(model: nn.Module, fn, tensors: list[torch.Tensor]) -> tuple:
    """``fn(*tensors)`` on copies of them, leaving the model's buffers as it found them: a call may write into its
    inputs or update the model's state."""
    with torch.no_grad(), module_state.kept(model, tensors):
        return tuple(fn(*[t.clone() for t in tensors]))
