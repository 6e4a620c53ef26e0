"""The moecc pass pipeline (see README.md beside this file for the IR invariants)."""

from moecc.passes.cleanup import Cleanup
from moecc.passes.fuse_experts import FuseExperts
from moecc.passes.fuse_gating import FuseGating
from moecc.passes.lift_routing import LiftRouting
from moecc.passes.manager import DumpIR, PassManager, Timing
from moecc.passes.place_experts import PlaceExperts
from moecc.passes.recognize import Recognize
from moecc.passes.recognize.memo import RecognitionMemo
from moecc.passes.specialize_capacity import SpecializeCapacity


def default_pipeline(expert_layout: str = "oi", copy_expert_weights: bool | None = None,
                     recognized: RecognitionMemo | None = None):
    """``recognized``: the analyses of the model's earlier captures, which recognition reuses."""
    return [Recognize(recognized), LiftRouting(), FuseGating(), FuseExperts(), SpecializeCapacity(),
            PlaceExperts(expert_layout, copy_expert_weights), Cleanup()]


__all__ = ["Cleanup", "DumpIR", "FuseExperts", "FuseGating", "LiftRouting", "PassManager", "PlaceExperts", "Recognize",
           "SpecializeCapacity", "Timing", "default_pipeline"]
