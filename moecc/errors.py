"""moecc's exceptions."""

import re


class MoeccError(RuntimeError):
    pass


class CaptureError(MoeccError):
    """The model could not be captured; the message names the module, the cause and what to try."""


class ExportError(CaptureError):
    """``torch.export`` could not capture the whole model. ``blocks``: the MoE blocks (name, module) that capture
    kept opaque, which can still be compiled each alone; ``unfused``: blocks left as written, and why."""

    blocks: list = []
    unfused: dict = {}


class DisagreementError(MoeccError):
    """A compiled program disagrees with eager on fresh inputs. ``detail``: by how much (``relative error ...``);
    ``inputs``: the model's flat inputs it disagrees on."""

    detail: str = ""
    inputs: list | None = None


class PassError(MoeccError):
    """A pass failed; the message names the pass and where its input graph was saved."""


class BackendError(MoeccError):
    """A backend could not lower the graph; the message says why and which backend to use instead."""


class CacheError(MoeccError):
    """A call passes a KV cache that a captured program cannot carry; the message says why."""


class ArtifactError(MoeccError):
    """An exported artifact is missing, tampered with or from an incompatible version; it is never run."""


def first_line(exc: BaseException) -> str:
    """The first line of the innermost cause (the exporter wraps the op it could not convert in two layers of
    "next steps"), without the terminal colours torch.onnx puts in it."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip(".")
