"""The pass contract: a callable that takes a GraphModule and returns a PassResult(graph_module, modified)."""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from moecc.ir import MoELayerInfo

__all__ = ["MoePass", "PassResult", "layers_of"]


def layers_of(gm: fx.GraphModule) -> dict[str, MoELayerInfo]:
    """Per-block records that travel with the graph (keyed by the block's module path)."""
    return gm.meta.setdefault("moecc_layers", {})


class MoePass:
    """One job per pass. ``stats`` says what the last run matched, for the pass summary."""

    name = "pass"

    def __init__(self) -> None:
        self.stats: dict = {}

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.stats = {}
        return self.run(gm)

    def run(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError
