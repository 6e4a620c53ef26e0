"""moecc: a compiler for Mixture-of-Experts inference."""

import moecc.dynamo
import moecc.ops  # noqa: F401 - registers the canonical torch.ops.moecc ops
from moecc.api import compile  # noqa: A004
from moecc.artifact import export, load
from moecc.errors import (
    ArtifactError,
    BackendError,
    CacheError,
    CaptureError,
    DisagreementError,
    ExportError,
    MoeccError,
    PassError,
)
from moecc.ir import MoELayerInfo

moecc.dynamo.register_unless_installed()

__version__ = "0.1.0"
__all__ = ["ArtifactError", "BackendError", "CacheError", "CaptureError", "DisagreementError", "ExportError",
           "MoELayerInfo", "MoeccError", "PassError", "compile", "export", "load", "__version__"]
