"""A persistent cache of captures, so that compiling the same model again skips ``torch.export``.

An entry is the captured graph before any pass (``000_capture``), keyed by ``capture_key.fingerprint``: its nodes
as JSON (ops by qualified name, arguments, each value's shape and dtype) and, in a safetensors file beside it,
the tensor constants the graph made. A hit rebuilds the graph and binds the model's own parameters, buffers and
MoE blocks by name. What the recognize pass and the runtime read from ``node.meta["val"]`` (shape, dtype,
device; a symbolic dim is a ``SymbolicDim``, never an int) comes back as a ``ValueInfo``.

A graph that holds something this format does not store (a higher-order op, an unknown argument type) is simply
not cached; the reason is logged at info level. A capture that was refused is kept as its reason
(``save_refusal``), so that compiling the model again runs it blockwise without exporting it again. The newest
``MAX_ENTRIES`` entries are kept (a hit counts as new). Knobs: ``MOECC_CAPTURE_CACHE`` (on by default), and
``MOECC_CACHE_DIR`` (``captures/`` under it)."""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from moecc import knobs
from moecc.files import replace_whole

log = logging.getLogger("moecc.capture")


class Unstorable(Exception):
    """The graph holds something the cache format does not store."""


@dataclass(frozen=True)
class SymbolicDim:
    expr: str

    def __str__(self) -> str:
        return self.expr


@dataclass(frozen=True)
class ValueInfo:
    """What a cached graph keeps of an exported node's value: shape (int or ``SymbolicDim``), dtype, device."""
    shape: tuple
    dtype: torch.dtype
    device: torch.device

    def dim(self) -> int:
        return len(self.shape)


MAX_ENTRIES = 256
MAX_CONSTANT_BYTES = 1 << 24


def _folder() -> Path:
    return knobs.cache_dir() / "captures"


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise Unstorable(f"unknown dtype {name}")
    return dtype


def _encode(v):
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return {"float": repr(v)}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, tuple):
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _encode(x) for k, x in v.items()}}
    if isinstance(v, slice):
        return {"slice": [_encode(v.start), _encode(v.stop), _encode(v.step)]}
    for kind in (torch.dtype, torch.layout, torch.memory_format):
        if isinstance(v, kind):
            return {kind.__name__: str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    raise Unstorable(f"an argument of type {type(v).__qualname__}")


def _decode(v, env: dict):
    if isinstance(v, list):
        return [_decode(x, env) for x in v]
    if not isinstance(v, dict):
        return v
    (kind, x), = v.items()
    if kind == "node":
        return env[x]
    if kind == "float":
        return float(x)
    if kind == "tuple":
        return tuple(_decode(y, env) for y in x)
    if kind == "dict":
        return {k: _decode(y, env) for k, y in x.items()}
    if kind == "slice":
        return slice(*(_decode(y, env) for y in x))
    if kind == "dtype":
        return _dtype(x)
    if kind in ("layout", "memory_format"):
        return getattr(torch, x)
    if kind == "device":
        return torch.device(x)
    raise Unstorable(f"unknown entry {kind}")


def _encode_target(node: fx.Node):
    if node.op != "call_function":
        return node.target
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return {"op": f"{target._schema.name}.{target._overloadname}"}
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if module and name and _resolve(module, name) is target:
        return {"function": f"{module}:{name}"}
    raise Unstorable(f"the call target {target!r}")


def _resolve(module: str, qualname: str):
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        return None


def _decode_target(target):
    if not isinstance(target, dict):
        return target
    if "op" in target:
        qualified, overload = target["op"].rsplit(".", 1)
        namespace, name = qualified.split("::")
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    fn = _resolve(*target["function"].split(":"))
    if fn is None:
        raise Unstorable(f"{target['function']} is gone")
    return fn


def _decode_dim(d):
    """An int, or a ``SymbolicDim``; a symbolic size that export specialized to a number ("8") is that int."""
    if isinstance(d, int):
        return d
    expr = d["sym"]
    return int(expr) if expr.lstrip("-").isdigit() else SymbolicDim(expr)


def _encode_dim(d):
    return d if isinstance(d, int) else {"sym": str(d)}


def _encode_value(v):
    if isinstance(v, torch.Tensor):
        return {"tensor": [[_encode_dim(d) for d in v.shape], str(v.dtype).removeprefix("torch."), str(v.device)]}
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return {"sym": str(v)}
    if isinstance(v, (list, tuple)):
        return [_encode_value(x) for x in v]
    if v is None or isinstance(v, (bool, int, float)):
        return v
    return None


def _decode_value(v):
    if isinstance(v, list):
        return [_decode_value(x) for x in v]
    if isinstance(v, dict) and "tensor" in v:
        shape, dtype, device = v["tensor"]
        return ValueInfo(tuple(_decode_dim(d) for d in shape), _dtype(dtype), torch.device(device))
    if isinstance(v, dict):
        return SymbolicDim(v["sym"])
    return v


def _model_tensor(model: nn.Module, target: str):
    """The model's own tensor at ``target`` (``model.<path>``, as the capture names it), else None."""
    if not target.startswith("model."):
        return None
    obj = model
    for part in target.split(".")[1:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def _owner(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    """The module holding a ``get_attr`` target, and the attribute's name there."""
    owner, _, name = target.rpartition(".")
    return gm.get_submodule(owner), name


def _same_tensor(a, b) -> bool:
    if a is None or b is None:
        return False
    return a is b or (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
                      and a.device == b.device and a.storage_offset() == b.storage_offset()
                      and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def save(key: str, gm: fx.GraphModule, blocks: dict[str, str], model: nn.Module) -> None:
    """Store ``gm`` (a fresh capture) under ``key``; logs why when it cannot."""
    try:
        nodes, constants, kinds = [], {}, {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                owner, name = _owner(gm, node.target)
                value = getattr(owner, name)
                if not _same_tensor(_model_tensor(model, node.target), value):
                    if not isinstance(value, torch.Tensor):
                        raise Unstorable(f"get_attr {node.target} of type {type(value).__qualname__}")
                    constants[node.target] = value
                kinds[node.target] = ("parameter" if name in owner._parameters else
                                      "buffer" if name in owner._buffers else "attribute")
            elif node.op == "call_module" and node.target not in blocks:
                raise Unstorable(f"the submodule call {node.target}")
            nodes.append({"op": node.op, "name": node.name, "target": _encode_target(node),
                          "args": _encode(node.args), "kwargs": _encode(node.kwargs),
                          "val": _encode_value(node.meta.get("val")), "block": node.meta.get("moecc_block"),
                          "module": node.meta.get("moecc_module")})
        constant_bytes = sum(t.numel() * t.element_size() for t in constants.values())
        if constant_bytes > MAX_CONSTANT_BYTES:
            # weight-sized constants may be copies of weights, which a hit must not carry over to another model
            raise Unstorable(f"{constant_bytes / 2**20:.1f} MiB of tensor constants")
    except Unstorable as exc:
        log.info("capture not cached: the graph holds %s", exc)
        return
    folder = _folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if constants:
            from safetensors.torch import save_file

            # copies: constants may share storage (tensors a hook swapped in, lifted under two names), which
            # safetensors refuses to write
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in constants.items()}
            replace_whole(folder / f"{key}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        entry = {"nodes": nodes, "blocks": blocks, "kinds": kinds,
                 "constants": {k: str(v.device) for k, v in constants.items()}}
        replace_whole(folder / f"{key}.json", lambda tmp: tmp.write_text(json.dumps(entry)))
        _prune(folder)
    except Exception as exc:  # noqa: BLE001 - a capture that cannot be cached still runs
        log.warning("could not write the capture cache in %s: %s", folder, exc)


def save_refusal(key: str, reason: str) -> None:
    """Store under ``key`` that this capture was refused (``torch.export`` failed, or its program computes other
    numbers than eager), with the reason: the next compile of the same model and inputs runs it blockwise at once
    instead of exporting it again. A refusal is the careful answer (the model runs as written, its blocks compiled
    alone), so keeping one is never wrong, only slower where a later export would have succeeded: the key follows
    the code, the torch and transformers versions and the inputs' structure, which is what such a failure turns
    on."""
    folder = _folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        replace_whole(folder / f"{key}.json", lambda tmp: tmp.write_text(json.dumps({"refused": reason})))
        (folder / f"{key}.safetensors").unlink(missing_ok=True)
        _prune(folder)
    except Exception as exc:  # noqa: BLE001 - a capture that cannot be cached still runs
        log.warning("could not write the capture cache in %s: %s", folder, exc)


@dataclass(frozen=True)
class Refusal:
    """What ``load`` returns for a capture that was refused before (``save_refusal``)."""
    reason: str


def _prune(folder: Path) -> None:
    """Keep the most recently used entries (a hit refreshes an entry's time)."""
    entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
    for old in entries[:max(0, len(entries) - MAX_ENTRIES)]:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def load(key: str, model: nn.Module) -> tuple[fx.GraphModule, dict[str, str]] | Refusal | None:
    """The graph stored under ``key`` bound to ``model``'s tensors and blocks, with its blocks map; a ``Refusal``
    where the capture was refused before; None on a miss (or an entry that does not fit this model, which is then
    ignored)."""
    path = _folder() / f"{key}.json"
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
        if isinstance(entry.get("refused"), str):
            path.touch()
            return Refusal(entry["refused"])
        constants = {}
        if entry["constants"]:
            from safetensors.torch import load_file

            stored = load_file(str(path.with_suffix(".safetensors")))
            constants = {k: stored[k].to(device) for k, device in entry["constants"].items()}
        gm = _rebuild(entry, model, constants)
        path.touch()
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign entry must never fail a compile
        log.warning("ignoring the capture cache entry %s: %s", path, exc)
        return None
    return gm, entry["blocks"]


def _rebuild(entry: dict, model: nn.Module, constants: dict) -> fx.GraphModule:
    graph, env, root = fx.Graph(), {}, nn.Module()
    for rec in entry["nodes"]:
        target = _decode_target(rec["target"])
        if rec["op"] == "get_attr":
            value = constants[target] if target in constants else _model_tensor(model, target)
            if value is None:
                raise Unstorable(f"the model has no tensor {target}")
            _place(root, target, value)
        elif rec["op"] == "call_module":
            _place(root, target, model.get_submodule(entry["blocks"][target]))
        node = graph.create_node(rec["op"], target, _decode(rec["args"], env), _decode(rec["kwargs"], env),
                                 name=rec["name"])
        if node.name != rec["name"]:
            raise Unstorable(f"node {rec['name']} came back as {node.name}")
        if rec["val"] is not None:
            node.meta["val"] = _decode_value(rec["val"])
        if rec["block"] is not None:
            node.meta["moecc_block"] = rec["block"]
        if rec.get("module") is not None:
            node.meta["moecc_module"] = rec["module"]
        env[node.name] = node
    graph.lint()
    gm = fx.GraphModule(root, graph)
    for target, kind in entry["kinds"].items():  # as the capture had them (GraphModule makes tensors buffers)
        owner, name = _owner(gm, target)
        if kind == "attribute" and name in owner._buffers:
            setattr(owner, name, owner._buffers.pop(name))
        elif kind == "buffer" and name not in owner._buffers:
            value = getattr(owner, name)
            delattr(owner, name)
            owner.register_buffer(name, value)
    return gm


def _place(root: nn.Module, target: str, value) -> None:
    *path, name = target.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, nn.Module):
        owner.add_module(name, value)
    else:
        setattr(owner, name, value)
