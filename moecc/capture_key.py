"""The fingerprint that keys the capture cache: everything that decides what ``torch.export`` records.

It covers the code (the source files of every class in the model's module tree and of moecc's capture, the
versions of Python, torch and transformers, functions stored on modules, hooks), the structure (module names
and types, training flags, plain attributes and configs, parameter and buffer names, shapes, dtypes, devices and
tying) and the example (its tree structure, tensor shapes, dtypes and devices, constant values). Weight values
are not in it: the captured graph reads weights through ``get_attr``, and a cache hit binds the model's own."""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
import types
from pathlib import Path

import torch
from torch import nn

from moecc.autocast import autocast_state

FORMAT = 1
_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training"}


@functools.cache
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _class_sources(cls: type) -> list[tuple]:
    """Digests of ``cls`` and its bases: the file that defines each (helpers beside a class live in its file)
    and the code of each method (a class without a readable file, from a notebook or ``exec``, still counts)."""
    out = []
    for c in cls.__mro__:
        if c in (nn.Module, object):
            break
        try:
            path = inspect.getsourcefile(c)
            source = _file_digest(path) if path else "no source file"
        except (TypeError, OSError):
            source = "no source file"
        methods = sorted((k, _code_digest(v)) for k, v in vars(c).items() if inspect.isfunction(v))
        out.append((f"{c.__module__}.{c.__qualname__}", source, tuple(methods)))
    return out


def _code_digest(fn) -> str:
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return f"callable {getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    return "code " + hashlib.sha256(repr(_code_parts(code)).encode()).hexdigest()


def _code_parts(code: types.CodeType) -> tuple:
    """What a code object computes, in a form that is the same in every process. Not ``marshal.dumps``: its bytes
    depend on reference counts (a constant held elsewhere in the process is written as a back-reference), so the
    same method hashed differently once another model's module was loaded. Without the file name: FX names
    generated code "<eval_with_key>.N" with a per-process counter."""
    return (code.co_name, code.co_code, tuple(_const_repr(c) for c in code.co_consts), code.co_names,
            code.co_varnames, code.co_freevars, code.co_cellvars, code.co_argcount, code.co_kwonlyargcount,
            code.co_posonlyargcount, code.co_flags)


def _const_repr(value) -> object:
    if isinstance(value, types.CodeType):
        return _code_parts(value)
    if isinstance(value, (frozenset, set)):  # iteration order follows string hashes, which vary per process
        return ("frozenset", tuple(sorted(repr(_const_repr(v)) for v in value)))
    if isinstance(value, tuple):
        return tuple(_const_repr(v) for v in value)
    return repr(value)


def tensor_bytes(t: torch.Tensor):
    """The tensor's bytes as a NumPy array (no copy where it is contiguous on the CPU)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def tensor_digest(t: torch.Tensor) -> str | None:
    """The sha256 of the tensor's bytes, or None where they are out of reach or do not say it all (a meta or
    sparse tensor; a quantized one, whose integers leave out its scale)."""
    if t.is_meta or t.is_quantized or t.layout != torch.strided:
        return None
    try:
        data = tensor_bytes(t)
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return hashlib.sha256(data).hexdigest()


def describe(value, depth: int = 0):
    """A deterministic description of an attribute value (no object addresses)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > 6:
        return type(value).__qualname__
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    if isinstance(value, torch.Tensor) and (value.is_meta or type(value) is not torch.Tensor
                                            and not isinstance(value, nn.Parameter)):
        return ("tensor", str(value.dtype), value.dim(), str(value.device.type))  # fake, meta or a subclass
    if isinstance(value, torch.Tensor):  # a plain tensor attribute: export bakes its values in as a constant
        return ("tensor", str(value.dtype), tuple(value.shape), str(value.device),
                # bytes out of reach: unique to this object, never stale
                tensor_digest(value) or f"object {id(value)}")
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *[describe(v, depth + 1) for v in value])
    if isinstance(value, (set, frozenset)):
        return ("set", *sorted(repr(describe(v, depth + 1)) for v in value))
    if isinstance(value, dict):
        return ("dict", *sorted((repr(k), repr(describe(v, depth + 1))) for k, v in value.items()))
    if isinstance(value, functools.partial):
        return ("partial", _code_digest(value.func), describe(value.args, depth + 1),
                describe(value.keywords, depth + 1))
    if callable(value) and not isinstance(value, (type, nn.Module)):
        return _code_digest(value)
    if hasattr(value, "to_dict") and hasattr(value, "__dict__"):
        # configuration objects (Hugging Face's PretrainedConfig and the like): public fields, and private ones
        # that name a choice (to_dict drops the attention implementation, which changes the traced graph); private
        # numbers are bookkeeping, some of them per process (GenerationConfig's _original_object_hash)
        fields = {k: v for k, v in vars(value).items()
                  if not k.startswith("_") or v is None or isinstance(v, (str, bool))}
        return (type(value).__qualname__, describe(fields, depth + 1))
    return type(value).__qualname__


def _module_entry(name: str, module: nn.Module) -> tuple:
    # hook dicts are keyed by handle ids, a per-process counter: their hooks are what counts
    attrs = tuple(sorted((k, repr(describe(list(v.values()) if k.endswith("hooks") and isinstance(v, dict) else v)))
                         for k, v in vars(module).items() if k not in _MODULE_INTERNALS))
    return (name, type(module).__module__, type(module).__qualname__, module.training, attrs)


def parts(model: nn.Module, flat_inputs: list, in_spec, block_names: list[str], dynamic_dims=None):
    """The fingerprint's ingredients, in order (readable: tests compare them to find what moved a key)."""
    import moecc.capture as capture_module

    yield ("moecc capture", FORMAT, sys.version_info[:2], torch.__version__, _file_digest(__file__),
           _file_digest(capture_module.__file__), str(torch.get_default_dtype()), autocast_state())
    if "transformers" in sys.modules:
        yield ("transformers", getattr(sys.modules["transformers"], "__version__", "?"))
    yield (str(in_spec), tuple(block_names))
    if dynamic_dims is not None:
        yield ("dynamic dims", tuple(tuple(sorted(d)) for d in dynamic_dims))
    for v in flat_inputs:
        if isinstance(v, torch.Tensor):
            yield ("input", str(v.dtype), tuple(v.shape), str(v.device))
        else:
            yield ("constant", type(v).__qualname__, repr(describe(v)))
    classes = {}
    for name, module in model.named_modules(remove_duplicate=False):
        yield _module_entry(name, module)
        classes[type(module)] = None
    for cls in classes:
        yield tuple(_class_sources(cls))
    first_name: dict[int, str] = {}
    for kind, named in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, t in named:
            tied = first_name.setdefault(id(t), name)
            yield (kind, name, str(t.dtype), tuple(t.shape), str(t.device), t.requires_grad, tied)


def fingerprint(model: nn.Module, flat_inputs: list, in_spec, block_names: list[str], dynamic_dims=None) -> str:
    h = hashlib.sha256()
    for part in parts(model, flat_inputs, in_spec, block_names, dynamic_dims):
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()
