import logging
import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("MOECC_LOGS", "error")
# tuned tiles and captures stay inside the test session (compiles of the same tiny model then hit the capture cache)
os.environ.setdefault("MOECC_CACHE_DIR", tempfile.mkdtemp(prefix="moecc-tests-"))
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    # pytest -n: each worker takes its share of the cores, or torch's and ONNX Runtime's pools spin against each other
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("MOECC_ORT_THREADS", str(_THREADS))
if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; must be set before moecc's Triton modules are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _language_snapshot():
    """triton.language's namespaces as imported: Triton's interpreter patches them while a kernel runs, and a
    kernel that calls a ``@jit`` library function (``tl.sum``, ``tl.cumsum``) leaves that call's patches in place
    (3.9: ``InterpretedFunction.__call__`` never restores them), so a real compile later in the session (the
    Gluon kernels in ``test_ws_gemm``) would build through the interpreter's semantics."""
    try:
        import triton.language as tl
    except ImportError:
        return []
    spaces = [tl, tl.core, tl.math, tl.core.tensor, tl.core.dtype, getattr(tl.core, "tensor_descriptor_base", None)]
    return [(space, dict(vars(space))) for space in spaces if space is not None]


def _patch_each_language_once_per_kernel():
    """Triton's interpreter patches triton.language's namespaces for a kernel's run, then again on every call of a
    ``@jit`` device function inside it (3.9: ``InterpretedFunction.__call__`` -> ``_patch_lang``, each an
    ``inspect.getmembers`` of four namespaces): a third of the interpreter's time in moecc's kernels, whose helpers
    are called per tile. Within one run a namespace already patched is patched the same way again, so those calls
    are skipped; a device function whose module sees another namespace (``triton.language.core`` from
    ``tl.sum``) still patches it, as before. Without these internals the interpreter is left as it is."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    real_patch, executor = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "GridExecutor", None)
    if real_patch is None or executor is None or not hasattr(interpreter, "_LangPatchScope"):
        return
    import triton.language as tl

    patched_in_run = []  # one set of namespace ids per kernel run in progress
    langs_of_module = {}

    def patch_lang(fn):
        key = id(fn.__globals__)
        if key not in langs_of_module:
            langs_of_module[key] = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        langs = langs_of_module[key]
        if patched_in_run and langs <= patched_in_run[-1]:
            return interpreter._LangPatchScope()
        scope = real_patch(fn)
        if patched_in_run:
            patched_in_run[-1].update(langs)
        return scope

    real_call = executor.__call__

    def run_kernel(self, *args, **kwargs):
        patched_in_run.append(set())
        try:
            return real_call(self, *args, **kwargs)
        finally:
            patched_in_run.pop()

    interpreter._patch_lang = patch_lang
    executor.__call__ = run_kernel


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_each_language_once_per_kernel()
_LANGUAGE = _language_snapshot()
_MISSING = object()


@pytest.fixture(autouse=True)
def _pristine_triton_language():
    """Each test starts from triton.language as imported (see ``_language_snapshot``)."""
    for space, names in _LANGUAGE:
        for name, value in names.items():
            if vars(space).get(name, _MISSING) is not value:
                setattr(space, name, value)
    yield



@pytest.fixture
def moecc_warnings(caplog, monkeypatch):
    """``caplog`` with moecc's warnings in it: the ``moecc`` logger has a handler of its own and does not
    propagate, and each compile sets its level from ``MOECC_LOGS``."""
    monkeypatch.setenv("MOECC_LOGS", "warning")
    logger = logging.getLogger("moecc")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # caplog's handler also sits on the root logger: each record would count twice
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def exports(monkeypatch, tmp_path):
    """A fresh cache folder (so that every lowering for ONNX Runtime exports), and the count of
    ``torch.onnx.export`` calls made."""
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path / "cache"))
    count = []
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: count.append(1) or real(*a, **k))
    return count
