"""moecc's exceptions."""


class MoeccError(RuntimeError):
    pass


class CaptureError(MoeccError):
    """The model could not be captured; the message names the module, the cause and what to try."""


class PassError(MoeccError):
    """A pass failed; the message names the pass and where its input graph was saved."""
