"""``torch.compile(model, backend="moecc")``: each graph dynamo hands over is compiled by moecc."""

from __future__ import annotations

import torch


def moecc_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    from moecc.api import compile as moecc_compile

    compiled = moecc_compile(gm, backend=kwargs.get("backend", "torch"), verify=False)

    def run(*args):
        return compiled(*args)

    return run
