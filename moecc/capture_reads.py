"""The plain settings (numbers, strings, flags, None) and plain tensor attributes a model's call reads, wherever
they live.

``torch.export`` bakes every value the traced Python code reads into the program as a constant: a norm's
``eps``, an attention's ``scaling``, a Hugging Face config read in ``forward`` (``config.sliding_window``), a
class attribute a block reads (``renormalize``) and the user later sets on the instance, a tensor held as a plain
attribute rather than a buffer (``torch.export`` lifts it as a constant). The eager model reads them
anew at each call, so a change after compile must compile again, as ``torch.compile`` guards on them
(``runtime.weights.WeightWatch``).

The eager call every capture makes on the example inputs records them (``recording``): for its length each module
of the model, and each object that a read reaches through a module's attribute (a config, its sub-configs), is
given a subclass of its own class whose ``__getattribute__`` notes the plain values read (as FSDP2 gives modules
classes of its own). Private names are not recorded. What the call writes itself (a counter it reads and bumps, a
tensor it keeps) is state, not a setting: a name the call assigns, or whose value differs at the end of the call
from what was read first, is left out."""

from __future__ import annotations

import contextlib
import enum
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

_PLAIN = (bool, int, float, str, type(None))
_NOT_FOLLOWED = (nn.Module, torch.Tensor, type, types.FunctionType, types.MethodType, types.BuiltinFunctionType,
                 types.ModuleType, threading.Thread)


_MAX_ITEMS = 256  # a longer list is data, not a setting (and checking it at every read would cost)


def plain(value: object) -> bool:
    """A value a setting can be: a number, a string, a flag, None, an enum member, or a short tuple or list of those
    (``config.layer_types``)."""
    return (type(value) in _PLAIN or isinstance(value, enum.Enum)
            or (type(value) in (tuple, list) and len(value) <= _MAX_ITEMS and all(type(v) in _PLAIN for v in value)))


@dataclass
class Read:
    """One object's attributes a call read: their values when first read, and the modules whose code read them."""

    obj: object
    path: str
    values: dict[str, object] = field(default_factory=dict)
    readers: dict[str, set[int]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # plain tensor attributes (no buffers)

    def holds(self, name: str) -> bool:
        """Whether the attribute still has the value read (a tensor: the very tensor)."""
        if name in self.tensors:
            return _own_dict(self.obj).get(name) is self.tensors[name]
        return _same(getattr(self.obj, name, _MISSING), self.values[name])


class _Recorder:
    def __init__(self) -> None:
        self.reads: dict[int, Read] = {}
        self.paths: dict[int, str] = {}
        self.swapped: list[tuple[object, type, _Recorder | None]] = []  # and the recorder it had
        self.classes: dict[type, type] = {}  # not kept past the call: GraphModules have a class each
        self.written: set[tuple[int, str]] = set()  # (id(obj), name) the call assigned: its state
        self.calls = threading.local()  # the ids of the modules being called, innermost last

    def stack(self) -> list[int]:
        if not hasattr(self.calls, "stack"):
            self.calls.stack = []
        return self.calls.stack

    def follow(self, obj: object, path: str) -> None:
        """Record reads of ``obj``'s attributes from now on, naming them under ``path``."""
        if id(obj) in self.paths:
            return
        cls = type(obj)
        try:
            if cls not in self.classes:
                self.classes[cls] = _recording_class(cls)
            obj.__class__ = self.classes[cls]
        except Exception:  # noqa: BLE001 - a class that takes no subclass or a layout that cannot change: not followed
            return
        self.paths[id(obj)] = path
        self.swapped.append((obj, cls, _RECORDERS.get(id(obj))))
        _RECORDERS[id(obj)] = self

    def saw(self, obj: object, name: str, value: object) -> None:
        stack = self.stack()
        reader = stack[-1] if stack else id(obj)
        if plain(value):
            read = self._read(obj)
            # a copy of a list: the live one may be changed in place
            read.values.setdefault(name, list(value) if type(value) is list else value)
            read.readers.setdefault(name, set()).add(reader)
        elif isinstance(value, torch.Tensor):
            if name in _own_dict(obj):  # not a property's result (a module's parameters and buffers are not seen)
                read = self._read(obj)
                read.tensors.setdefault(name, value)
                read.readers.setdefault(name, set()).add(reader)
        elif not isinstance(value, _NOT_FOLLOWED) and hasattr(value, "__dict__") and not callable(value):
            path = self.paths[id(obj)]
            self.follow(value, f"{path}.{name}" if path else name)

    def _read(self, obj: object) -> Read:
        read = self.reads.get(id(obj))
        if read is None:
            read = self.reads[id(obj)] = Read(obj, self.paths[id(obj)])
        return read

    def restore(self) -> None:
        for obj, cls, outer in reversed(self.swapped):
            if outer is None:
                _RECORDERS.pop(id(obj), None)
            else:  # a model compiled inside the call of another being recorded
                _RECORDERS[id(obj)] = outer
            obj.__class__ = cls
        self.swapped.clear()


_RECORDERS: dict[int, _Recorder] = {}  # by id of the object followed
_LOCK = threading.RLock()


def _recording_class(cls: type) -> type:
    """``cls`` with a ``__getattribute__`` that tells the object's recorder each public attribute read, and for
    modules a ``_call_impl`` that keeps which module's code is running."""
    base_get = cls.__getattribute__

    def __getattribute__(self, name):
        value = base_get(self, name)
        if name[0] != "_" and (recorder := _RECORDERS.get(id(self))) is not None:
            recorder.saw(self, name, value)
        return value

    base_set = cls.__setattr__

    def __setattr__(self, name, value):
        base_set(self, name, value)
        if (recorder := _RECORDERS.get(id(self))) is not None:
            recorder.written.add((id(self), name))

    namespace = {"__getattribute__": __getattribute__, "__setattr__": __setattr__, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__, "__slots__": ()}
    if issubclass(cls, nn.Module):
        base_call = cls._call_impl

        def _call_impl(self, *args, **kwargs):
            recorder = _RECORDERS.get(id(self))
            if recorder is None:
                return base_call(self, *args, **kwargs)
            stack = recorder.stack()
            stack.append(id(self))
            try:
                return base_call(self, *args, **kwargs)
            finally:
                stack.pop()

        namespace["_call_impl"] = _call_impl
    return type(cls)(cls.__name__, (cls,), namespace)


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[list[Read]]:
    """While the body runs, note the plain values read from ``model``'s modules and the objects reached through
    them; the list yielded holds them once the body is done."""
    found: list[Read] = []
    recorder = _Recorder()
    # one recording at a time (nested ones in one thread are fine): classes swapped by two threads at once could be
    # put back out of turn, leaving an object its recording class
    _LOCK.acquire()
    try:
        for path, module in model.named_modules(remove_duplicate=True):
            recorder.follow(module, path)
        yield found
    finally:
        recorder.restore()
        _LOCK.release()
    for read in recorder.reads.values():  # what the call assigned, or changed after reading it, is its state
        for name in [n for n in read.readers if (id(read.obj), n) in recorder.written or not read.holds(n)]:
            read.values.pop(name, None)
            read.tensors.pop(name, None)
            del read.readers[name]
    found.extend(read for read in recorder.reads.values() if read.values or read.tensors)


def _own_dict(obj: object) -> dict:
    try:
        return object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return {}


_MISSING = object()


def _same(a: object, b: object) -> bool:
    return a is b or (type(a) is type(b) and a == b)


def baked(reads: list[Read], live: set[int], state: frozenset = frozenset()) -> list[Read]:
    """The reads a program holds as constants: all but those only the code of ``live`` modules made (modules a
    torch program calls as they are read their settings as they run) and the ``(id(module), name)`` in ``state``
    (``weights.written_by_calls``), with values that still hold (the compile's other calls wrote the others)."""
    out = []
    for read in reads:
        kept = {name for name, readers in read.readers.items()
                if (id(read.obj), name) not in state and not readers <= live and read.holds(name)}
        values = {name: value for name, value in read.values.items() if name in kept}
        tensors = {name: t for name, t in read.tensors.items() if name in kept}
        if values or tensors:
            out.append(Read(read.obj, read.path, values, {n: read.readers[n] for n in (*values, *tensors)}, tensors))
    return out
