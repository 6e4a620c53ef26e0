"""GPT-OSS's swiglu clamp when the expert bank does not name its limit.

HF's GPT-OSS experts hold ``alpha`` and ``limit`` as attributes, which recognition reads. OpenAI's reference code
passes ``alpha=1.702`` and ``limit=7.0`` as the defaults of its ``swiglu`` function instead, so a bank without a
limit attribute is also tried at those published constants (``stacked.activations``). Unit probes rarely drive a
pre-activation past 7, so a fit there does not show the clamp; ``proven_clamp`` checks the fitted block again on
probes whose gate pre-activations spread about the limit."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from moecc.canonical import BlockAnalysis, CanonicalMoE
from moecc.passes.recognize.amplify import amplifier
from moecc.passes.recognize.probe import close, tensor_leaves

DEFAULT_ALPHA = 1.702
DEFAULT_LIMIT = 7.0
SPREAD_TOKENS = 8  # probe tokens whose gate pre-activations set the probes' scale


def proven_clamp(block: nn.Module, a: BlockAnalysis, inputs: list[torch.Tensor], others=None) -> bool:
    """Whether the block computes ``a``'s clamp: both run on the probe ``inputs`` made to spread the gate's
    pre-activations (their standard deviation about the limit, so that about a third are clamped), and agree.
    ``others`` (``OtherArgs``): the block's other arguments, drawn anew for each probe as recognition draws them."""
    e = a.expert
    x = inputs[0].reshape(-1, e.hidden_size)[:SPREAD_TOKENS]
    with torch.no_grad():
        h = x if a.expert_pre is None else a.expert_pre(x)
        gate = torch.einsum("th,egh->teg", h.float(), a.weights.w_up[:, :e.intermediate_size].float())
    spread = gate.std().item()
    if not spread > 0:
        return False
    canon = CanonicalMoE(replace(a, outputs=("y",), output_tuple=False))
    with amplifier(a.expert_pre, e.limit / spread, inputs[0]) as amplify:
        if amplify is None:
            return False
        with torch.no_grad():
            for i, probe in enumerate(inputs):
                xs = amplify(probe)
                args, kwargs, router_inputs = others.for_input(xs, 200 + i) if others is not None else ((), {}, [])
                if not close(canon(xs, *router_inputs), tensor_leaves(block(xs, *args, **kwargs))[0]):
                    return False
    return True
