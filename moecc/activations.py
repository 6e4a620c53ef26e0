"""The elementwise activations an expert may apply, each with its plain-torch semantics.

An activation is a name and one float parameter (``ExpertSpec.alpha``): the slope of a leaky ReLU, the alpha of an
ELU, the beta of a swish (quick GELU is a swish of beta 1.702). Activations without a parameter ignore it. The
Triton kernels (``codegen/triton``) implement every name here, under the same ids as ``TRITON_IDS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[Tensor, float], Tensor]
    # parameters a recognizer tries when the module names none; None: the activation has no parameter
    params: tuple[float, ...] | None = None


_TABLE = (
    Activation("silu", lambda h, _: F.silu(h)),
    Activation("gelu", lambda h, _: F.gelu(h)),
    Activation("gelu_tanh", lambda h, _: F.gelu(h, approximate="tanh")),
    Activation("relu", lambda h, _: torch.relu(h)),
    # Nemotron-H's squared ReLU
    Activation("relu2", lambda h, _: torch.relu(h).square()),
    Activation("identity", lambda h, _: h),
    # x * sigmoid(beta * x); beta 1.702 is quick GELU (CLIP's)
    Activation("swish", lambda h, beta: h * torch.sigmoid(beta * h), (1.702,)),
    Activation("sigmoid", lambda h, _: torch.sigmoid(h)),
    Activation("tanh", lambda h, _: torch.tanh(h)),
    Activation("mish", lambda h, _: F.mish(h)),
    Activation("relu6", lambda h, _: F.relu6(h)),
    Activation("hardswish", lambda h, _: F.hardswish(h)),
    Activation("softplus", lambda h, _: F.softplus(h)),
    Activation("leaky_relu", lambda h, slope: F.leaky_relu(h, slope), (0.01, 0.1, 0.2)),
    Activation("elu", lambda h, alpha: F.elu(h, alpha), (1.0,)),
    Activation("selu", lambda h, _: torch.selu(h)),
)

BY_NAME = {a.name: a for a in _TABLE}
# the activations every expert search tries first: the common ones, as cheap to search as before the others existed
PLAIN_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
# tried when none of the plain ones fits
MORE_ACTIVATIONS = tuple(a.name for a in _TABLE if a.name not in PLAIN_ACTIVATIONS)
# gated only. swiglu_oai: GPT-OSS's, (up + 1) * gate * sigmoid(alpha * gate), with the clamp at ``limit``.
# swiglu_softcap: softcap(gate, alpha) * sigmoid(gate) * softcap(up, limit), softcap(v, c) = c * tanh(v / c)
# (Inkling 2's); its alpha and limit are the two caps, and nothing is clamped.
GATED_ONLY = ("swiglu_oai", "swiglu_softcap")
ACTIVATIONS = (*PLAIN_ACTIVATIONS, *MORE_ACTIVATIONS, *GATED_ONLY)
TRITON_IDS = {name: i for i, name in enumerate(("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai", "relu2",
                                                   "swiglu_softcap", *MORE_ACTIVATIONS))}


def apply(h: Tensor, name: str, param: float = 1.0) -> Tensor:
    act = BY_NAME.get(name)
    if act is None:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return act.fn(h, param)


def parametric(name: str) -> bool:
    return name in BY_NAME and BY_NAME[name].params is not None


def describe(name: str, param: float) -> str:
    return f"{name}({param:g})" if parametric(name) else name


def candidates(names: tuple[str, ...], named: dict[str, tuple[float, ...]] | None = None) -> list[tuple[str, float]]:
    """(name, parameter) pairs to try: each activation of ``names`` at the parameters ``named`` gives for it (what
    a module was seen to compute), else at its own default ones."""
    named = named or {}
    return [(n, p) for n in names for p in (named.get(n) or BY_NAME[n].params or (1.0,))]
