"""The thin runtime that executes compiled graphs."""

from moecc.runtime.compiled import CompiledModule

__all__ = ["CompiledModule"]
