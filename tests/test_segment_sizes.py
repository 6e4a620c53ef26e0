"""``moecc/codegen/onnx/segment_sizes.py``: a symbolic size, as torch prints it, written again as FX ops."""

import math

import pytest
import torch
from torch import fx

from moecc.codegen.onnx import segment_sizes

CASES = {
    "Mod(64 - (Mod(s85, 64)), 64)": lambda s85, s1: (64 - s85 % 64) % 64,  # a chunked scan's padding
    "floor(s85/256 + (Mod(256 - Mod(s85, 256), 256))/256)": lambda s85, s1: (s85 + (256 - s85 % 256) % 256) // 256,
    "2*s1 + s85 - 3": lambda s85, s1: 2 * s1 + s85 - 3,
    "ceiling(s85/3)": lambda s85, s1: math.ceil(s85 / 3),
    "FloorDiv(s85, 7) + Max(s1, 4)": lambda s85, s1: s85 // 7 + max(s1, 4),
    "s1**2": lambda s85, s1: s1 * s1,
    "floor(s85/s1)": lambda s85, s1: s85 // s1,
    "floor(s85/(-2))": lambda s85, s1: s85 // -2,
}


@pytest.mark.parametrize("text", CASES)
def test_a_size_is_computed_again_from_its_symbols(text):
    expr = segment_sizes.parse(text)
    assert set(segment_sizes.symbols(expr)) <= {"s85", "s1"}
    graph = fx.Graph()
    dims = {"s85": graph.placeholder("s85"), "s1": graph.placeholder("s1")}
    graph.output(segment_sizes.emit(graph, expr, dims))
    size = fx.GraphModule(torch.nn.Module(), graph)
    for s85, s1 in [(5, 2), (256, 3), (300, 9), (1, 1)]:
        assert size(s85, s1) == CASES[text](s85, s1)


def test_what_it_cannot_write_says_so():
    graph = fx.Graph()
    with pytest.raises(segment_sizes.Unwritable, match="sqrt|Pow"):
        segment_sizes.emit(graph, segment_sizes.parse("sqrt(s85)"), {"s85": graph.placeholder("s85")})
    with pytest.raises(segment_sizes.Unwritable, match="Float"):
        segment_sizes.emit(graph, segment_sizes.parse("floor(s85/2.5)"), {"s85": graph.placeholder("a")})
