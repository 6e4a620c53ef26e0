"""Backends: lower the fused canonical ops of a graph to kernels."""

from moecc.codegen.lower import BACKENDS, lower

__all__ = ["BACKENDS", "lower"]
