"""``MOECC_LOGS`` selects the level of the ``moecc`` loggers; output goes through ``logging``."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import threading
import time
import warnings

from moecc import knobs

_configured = False


def configure() -> None:
    global _configured
    level_name = str(knobs.LOGS.get()).upper()
    level = getattr(logging, level_name, None)
    if not isinstance(level, int):
        raise ValueError(f"MOECC_LOGS must be one of debug, info, warning, error; got {knobs.LOGS.get()!r}")
    logger = logging.getLogger("moecc")
    logger.setLevel(level)
    if not _configured and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[moecc %(levelname)s] %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        _configured = True


def hush_torch_deprecations() -> None:
    """Inside a ``warnings.catch_warnings()`` block: ignore what torch warns about its own code. torch 2.13's
    ``run_decompositions`` (and so ``torch.onnx.export``) deep-copies pytree leaf specs, whose class it has
    deprecated, and warns the caller of every export about it."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def quiet_deepcopy(obj, memo: dict | None = None):
    """``copy.deepcopy(obj, memo)`` without torch's warning about its own code: a program ``torch.export`` made holds
    pytree leaf specs, whose copy torch 2.13 warns about (``hush_torch_deprecations``)."""
    with warnings.catch_warnings():
        hush_torch_deprecations()
        return copy.deepcopy(obj, memo)


# torch's loggers that warn while torch.export traces (unbacked symbols, real-tensor propagation): noise to a user
EXPORT_LOGGERS = ("torch._export.non_strict_utils", "torch.fx.experimental.symbolic_shapes", "torch.export")


@contextlib.contextmanager
def quiet(*names: str):
    """Other libraries' loggers ``names`` held at ERROR inside the block, unless moecc logs at debug level: what they
    warn about there is moecc's to handle (torch.export's 0/1-specialized dims) or to ignore (torch.onnx's
    registry, on every export, that torchvision is not installed)."""
    if logging.getLogger("moecc").isEnabledFor(logging.DEBUG):
        yield
        return
    saved = [(n, logging.getLogger(n).level) for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved:
            logging.getLogger(n).setLevel(level)


@contextlib.contextmanager
def stderr_to_debug(logger: logging.Logger, what: str):
    """What a library prints to stderr inside the block goes to ``logger`` at debug level instead (torch.export
    prints the whole partial graph on a data-dependent error, which moecc reports and handles in a line); with
    ``MOECC_LOGS=debug`` it is printed as it comes."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        if buffer.getvalue().strip():
            logger.debug("%s printed:\n%s", what, buffer.getvalue())


_steps = threading.local()  # the slow_step blocks a thread is inside, innermost last


def _seconds(elapsed: float) -> str:
    return f"{elapsed:.0f} s" if elapsed >= 10 else f"{elapsed:.1f} s"


@contextlib.contextmanager
def slow_step(logger: logging.Logger, what: str, hint: str = ""):
    """A step that may run for minutes (capture, lowering a large graph, the check on fresh inputs) says so: past
    ``MOECC_SLOW_STEP_S`` seconds a warning that it is still running, again each time its time doubles, and one
    with its total when it ends; a quick step logs its time at info level only. Of steps inside each other, the
    innermost speaks for them. ``hint``, when given, ends the first warning (what a user can do instead)."""
    after = knobs.SLOW_STEP_S.get()
    start = time.perf_counter()
    done = threading.Event()
    announced = []
    stack = _steps.__dict__.setdefault("stack", [])
    token = object()

    def watch() -> None:
        wait = after
        while not done.wait(wait):
            elapsed = time.perf_counter() - start
            if stack and stack[-1] is token:
                logger.warning("still %s after %s%s", what, _seconds(elapsed),
                               f" ({hint})" if hint and not announced else "")
                announced.append(elapsed)
            wait = elapsed

    watcher = threading.Thread(target=watch, name="moecc-slow-step", daemon=True) if after > 0 else None
    stack.append(token)
    if watcher is not None:
        watcher.start()
    try:
        yield
    finally:
        stack.remove(token)
        done.set()
        if watcher is not None:
            watcher.join()
        logger.log(logging.WARNING if announced else logging.INFO, "%s: %s", what,
                   _seconds(time.perf_counter() - start))
