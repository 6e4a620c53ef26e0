"""moecc's exceptions."""


class MoeccError(RuntimeError):
    pass


class CaptureError(MoeccError):
    """The model could not be captured; the message names the module, the cause and what to try."""


class PassError(MoeccError):
    """A pass failed; the message names the pass and where its input graph was saved."""


class BackendError(MoeccError):
    """A backend could not lower the graph; the message says why and which backend to use instead."""


class CacheError(MoeccError):
    """A call passes a KV cache that a captured program cannot carry; the message says why."""


class ArtifactError(MoeccError):
    """An exported artifact is missing, tampered with or from an incompatible version; it is never run."""
