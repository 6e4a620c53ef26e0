"""Whether a model's parameters or buffers changed since a program was compiled from them.

A program reads most parameters where the model keeps them, but some it copies at compile time: expert banks
stacked or re-laid out (``place_experts``, shared experts folded into the grouped GEMM) and, on ONNX Runtime, every
weight. A model whose weights change after compile (``load_state_dict``, an in-place update, a parameter assigned
anew, which the program does not see even where it reads the model's tensors in place) would then run with the old
ones; the runtime checks ``WeightWatch.changed`` before each call and compiles again (``MOECC_WATCH_WEIGHTS=0``
turns the check off). Buffers are watched alike: a buffer assigned anew (``model.scale = torch.tensor(2.0)``), or
updated in place where the program holds a copy of it (ONNX Runtime's initializers). Edits through ``param.data``
bypass the version counter that this reads and are not seen, nor are in-place edits of parameters made under
``torch.inference_mode()``, which have no version counter. Forward hooks added or removed after compile are watched
too: ``torch.export`` traced the hooks there were into the program; and so are the plain values the model's code
read, which it baked in as constants (``capture_reads``)."""

from __future__ import annotations

import copy
import itertools
import operator
import time

import torch
from torch import fx, nn

from moecc.hooks import HookWatch


class WeightWatch:
    """Every parameter of the model, as the module that holds it names it: a parameter assigned anew is not the one
    the program reads, whether it reads it in place or copied it. Those whose storage ``program`` does not hold
    (their values were copied, or are unused) also keep their version counter at compile time, since an update in
    place reaches only the program's parameters that it reads in place.

    ``settings_of``: the paths of modules (the MoE blocks) whose settings are watched too: their plain attributes
    (numbers, strings, flags) and their direct children's, as ``block.top_k = 1`` or ``gate.norm_topk_prob = False``
    change the function the program was recognized and built for; and the model's ``training`` flag. Attributes
    in ``call_state`` (``(id(module), name)``, from ``written_by_calls``) are not settings but what the model's own
    calls write (NLLB-MoE's router sets its capacity from each call's token count): they are not watched.

    ``reads``: the plain values the program holds as constants, wherever the model's code read them
    (``capture_reads.baked``): a norm's ``eps``, ``config.sliding_window``."""

    __slots__ = ("_slots", "_settings", "_reads", "_hooks", "_held", "_stamped", "_in_dicts", "_got", "_children",
                 "_children_ids")

    def __init__(self, model: nn.Module, program: object, enabled: bool = True, settings_of=(),
                 call_state: frozenset = frozenset(), reads=()) -> None:
        self._slots = []
        self._settings = []
        self._reads = ([], [], [], [])  # objects, names, values, where: the ``reads`` flat
        self._hooks = None
        self._children = ([], [], [], [])  # each module's ``_modules``, a child's name, the child, its path
        if enabled:
            # a module replaced (``model.norm = LayerNorm(...)``, an expert swapped in a ModuleList) brings its own
            # parameters, which no slot below holds
            for prefix, module in model.named_modules(remove_duplicate=False):
                for name, child in module._modules.items():
                    for column, item in zip(self._children, (module._modules, name, child,
                                                             f"{prefix}.{name}" if prefix else name)):
                        column.append(item)
            self._settings = _settings(model, settings_of, call_state)
            watched = {(id(attrs), name) for _, attrs, _, _, names, _ in self._settings for name in names}
            for read in reads:
                for name, value in read.values.items():
                    if (id(getattr(read.obj, "__dict__", None)), name) not in watched:
                        for column, item in zip(self._reads, (read.obj, name, value, read.path)):
                            column.append(item)
            self._hooks = HookWatch(model)
            held = program_storages(program)
            # an offloaded block the program calls as written has its weights assigned anew by its hooks at every
            # call, and reads them as it runs (no CUDA graph replays it): no change to compile for
            called = {id(m) for m in offloaded_calls(program)}
            for prefix, module in model.named_modules(remove_duplicate=False):
                if id(module) in called:
                    continue
                for tensors in (module._parameters, module._buffers):
                    for name, param in tensors.items():
                        if param is not None:
                            # the data pointer: ``model.half()`` and ``.to()`` swap a tensor's data and keep its
                            # version
                            stamp = None if storage_of(param) in held else _stamp(param)
                            self._slots.append((tensors, name, param, stamp, f"{prefix}.{name}" if prefix else name))
            # plain tensor attributes the code read, which torch.export lifts as constants: held by the object
            # itself (``_index`` looks them up in its ``vars``)
            for read in reads:
                for name, tensor in read.tensors.items():
                    stamp = None if storage_of(tensor) in held else _stamp(tensor)
                    self._slots.append((read.obj, name, tensor, stamp, f"{read.path}.{name}" if read.path else name))
        self._index()

    def _index(self) -> None:
        """The slots as columns, which ``changed`` compares in C loops (``map``): a call of a model of many layers
        checks thousands of them."""
        # by ``id``: a list of ints compares in one C loop, and no tensor's ``__eq__`` runs (the slots keep every
        # object alive, so no id is reused)
        self._held = ([holder if isinstance(holder, dict) else vars(holder) for holder, *_ in self._slots],
                      [name for _, name, *_ in self._slots], [id(param) for _, _, param, *_ in self._slots])
        self._children_ids = [id(child) for child in self._children[2]]
        stamped = [(param, stamp) for _, _, param, stamp, _ in self._slots if stamp is not None]
        versioned = [(p, s) for p, s in stamped if not p.is_inference()]
        unversioned = [(p, s) for p, s in stamped if p.is_inference()]
        self._stamped = ([p for p, _ in versioned], [s[0] for _, s in versioned], [s[1] for _, s in versioned],
                         [p for p, _ in unversioned], [s[1] for _, s in unversioned])
        # a read found in its object's ``vars`` is looked up there (twice as fast as ``getattr``); the others (a
        # class attribute, a config's mapped name, a property) through ``getattr``
        objects, names, values, _ = self._reads
        in_dict = [name in getattr(obj, "__dict__", ()) for obj, name in zip(objects, names)]
        dicts = [vars(obj) if found else None for obj, found in zip(objects, in_dict)]
        self._in_dicts = tuple([item for item, found in zip(column, in_dict) if found]
                               for column in (dicts, names, values))
        self._got = tuple([item for item, found in zip(column, in_dict) if not found] for column in self._reads[:3])

    def cost(self) -> float:
        """Seconds one ``changed`` takes (a model with many small parameters, such as a ``ModuleList`` of experts
        in every layer, pays this on every call)."""
        start = time.perf_counter()
        self.changed()
        return time.perf_counter() - start

    def __len__(self) -> int:
        return len(self._slots)

    def copied(self) -> list[str]:
        """The names of the parameters the program holds copies of (or does not use)."""
        return [qualified for *_, stamp, qualified in self._slots if stamp is not None]

    def __deepcopy__(self, memo: dict) -> WeightWatch:
        """The watch of a copied program and model: a copy's parameters have other data pointers and versions, so
        each stamp is taken anew from the copy where the original still matched its own (a change made before the
        copy is still seen)."""
        new = WeightWatch.__new__(WeightWatch)
        new._slots = []
        # the copy's own ``vars``: a deep copy of the dict is not the one the copied module reads (``nn.Module``'s
        # ``__setstate__`` fills a dict of its own)
        new._settings = [(owner, vars(owner), *rest) for owner, _, *rest in
                         ((copy.deepcopy(owner, memo), *rest) for owner, *rest in self._settings)]
        objects, *rest = self._reads
        new._reads = ([copy.deepcopy(obj, memo) for obj in objects], *map(list, rest))
        new._hooks = copy.deepcopy(self._hooks, memo)
        new._children = tuple([copy.deepcopy(item, memo) for item in column] for column in self._children[:3]) + (
            list(self._children[3]),)
        for holder, name, param, stamp, qualified in self._slots:
            holder_copy, param_copy = copy.deepcopy(holder, memo), copy.deepcopy(param, memo)
            if stamp is not None:
                stamp = _stamp(param_copy) if stamp == _stamp(param) else (-2, -2)
            new._slots.append((holder_copy, name, param_copy, stamp, qualified))
        new._index()
        return new

    def changed(self) -> str | None:
        """The name of a parameter or buffer assigned anew, or of a copied one updated in place or converted, of a
        module replaced, of a setting changed, or where forward hooks were added or removed (``hooks.HookWatch``),
        since compile; else None."""
        dicts, names, param_ids = self._held
        versioned, versions, pointers, unversioned, unversioned_pointers = self._stamped
        if (list(map(id, map(dict.get, dicts, names))) != param_ids
                or list(map(_VERSION, versioned)) != versions or list(map(_POINTER, versioned)) != pointers
                or list(map(_POINTER, unversioned)) != unversioned_pointers):
            return next(qualified for held, (_, name, param, stamp, qualified) in zip(dicts, self._slots)
                        if held.get(name) is not param or (stamp is not None and stamp != _stamp(param)))
        modules, children_names, _, _ = self._children
        if list(map(id, map(dict.get, modules, children_names))) != self._children_ids:
            return next(path for held, name, child, path in zip(*self._children) if held.get(name) is not child)
        for _, attrs, read, values, names, where in self._settings:
            try:
                now = read(attrs)
            except KeyError:  # deleted
                missing = next(n for n in names if n not in attrs)
                return f"{where}.{missing}" if where else missing
            if now != values:
                return next((f"{where}.{n}" if where else n for n, v, w in zip(names, values, now) if v != w), where)
        (dicts, names, values), (objects, got_names, got_values) = self._in_dicts, self._got
        try:
            same = (list(map(dict.get, dicts, names, itertools.repeat(_DELETED))) == values
                    and list(map(getattr, objects, got_names)) == got_values)
        except AttributeError:  # deleted
            same = False
        if not same:
            objects, names, values, wheres = self._reads
            return next(f"{where}.{name}" if where else name
                        for obj, name, value, where in zip(objects, names, values, wheres)
                        if getattr(obj, name, _DELETED) != value)
        return None if self._hooks is None else self._hooks.changed()


_VERSION = operator.attrgetter("_version")
_POINTER = torch.Tensor.data_ptr
_DELETED = object()


_SETTING_TYPES = (bool, int, float, str)


def _plain(name: str, value: object) -> bool:
    """A public attribute of a kind a setting can be (number, string, flag)."""
    return not name.startswith("_") and type(value) in _SETTING_TYPES


def plain_attributes(model: nn.Module) -> dict[int, dict[str, object]]:
    """Each module's plain public attributes (the kinds ``_settings`` watches), by module id."""
    return {id(m): {n: v for n, v in vars(m).items() if _plain(n, v)} for m in model.modules()}


def written_by_calls(model: nn.Module, before: dict[int, dict[str, object]]) -> frozenset:
    """``(id(module), name)`` of the plain attributes that differ from ``before`` (``plain_attributes`` taken
    before the model was called) or were added since: what the model's calls write themselves."""
    written = set()
    for key, attrs in plain_attributes(model).items():
        old = before.get(key, {})
        written.update((key, n) for n, v in attrs.items() if n not in old or old[n] != v)
    return frozenset(written)


def _settings(model: nn.Module, paths, call_state: frozenset = frozenset()) -> list[tuple]:
    """Per module (the model, those at ``paths`` and their direct children but for module lists, which hold
    experts): (the module, its attribute dict, a getter of its plain public attributes, their values, their names,
    its path).
    A getter per module keeps a call's check to one C call per module (about 0.2 us)."""
    modules = [("", model)]
    for path in paths:
        try:
            block = model.get_submodule(path)
        except AttributeError:
            continue
        modules += [(path, block)] + [(f"{path}.{n}" if path else n, m) for n, m in block.named_children()
                                      if not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    out, seen = [], set()
    for where, module in modules:
        if id(module) in seen:
            continue
        seen.add(id(module))
        names = tuple(name for name, value in vars(module).items()
                      if _plain(name, value) and (module is model or name != "training")
                      and (id(module), name) not in call_state)
        if names:
            read = operator.itemgetter(*names)
            values = read(vars(module))
            out.append((module, vars(module), (lambda d, r=read: (r(d),)) if len(names) == 1 else read,
                        (values,) if len(names) == 1 else values, names, where))
    return out


def _stamp(param: torch.Tensor) -> tuple[int, int]:
    # a tensor made under ``torch.inference_mode()`` has no version counter: its in-place updates are not seen
    return (-1 if param.is_inference() else param._version), param.data_ptr()


def storage_of(t: torch.Tensor) -> int | None:
    """The address of the memory a tensor views, or None where it has none (empty, meta, a subclass): tensors of
    one address share memory."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return storage.data_ptr() if storage.nbytes() else None


def _called_blocks(program: object) -> list[nn.Module]:
    """The modules a program's graphs call as they are (blocks left as written)."""
    from moecc.passes.graph_utils import module_calls

    if not isinstance(program, nn.Module):
        return []
    return [block for gm in program.modules() if isinstance(gm, fx.GraphModule)
            for _, block in module_calls(gm) if not isinstance(block, fx.GraphModule)]


def called_live(program: object) -> list[nn.Module]:
    """The modules a program calls as they are, and every module inside them: their code runs at each call, reading
    the model's settings as it does."""
    return [m for block in _called_blocks(program) for m in block.modules()]


def offloaded_calls(program: object) -> list[nn.Module]:
    """The blocks with offloaded weights that a program calls as modules, and every module inside them."""
    from moecc.passes.recognize.block import offloaded_weights

    return [m for block in _called_blocks(program) if offloaded_weights(block) for m in block.modules()]


def program_devices(program: object) -> set[int]:
    """The CUDA devices of the tensors a program module holds (``program_tensors``), by index."""
    return {t.get_device() for t in program_tensors(program) if t.is_cuda}


def program_tensors(program: object) -> list[torch.Tensor]:
    """Every tensor a program module holds: parameters, buffers and tensor attributes its graph reads."""
    if not isinstance(program, nn.Module):
        return []
    tensors = [*program.parameters(), *program.buffers()]
    for module in program.modules():
        tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    return tensors


def program_storages(program: object) -> set[int]:
    """The storages of every tensor a program module holds (``program_tensors``)."""
    return {s for s in map(storage_of, program_tensors(program)) if s}
