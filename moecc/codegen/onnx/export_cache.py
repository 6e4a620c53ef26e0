"""A persistent cache of ONNX exports, so that lowering the same program again skips ``torch.onnx.export``.

The export and the ONNX optimizer are most of a compile for ONNX Runtime (a 32-layer model on this project's CPU:
70 of 82 s), and a capture-cache hit skips only ``torch.export``. An entry keeps the exported graph file and a map
of its external data file: each region of it is either the bytes of one of the program's tensors, by name (so an
entry never holds a second copy of the weights), or bytes the entry keeps (a constant the optimizer computed). A
hit writes the graph file and rebuilds the data file from the program's own tensors, byte for byte.

The key covers what the export reads: the lowered program's code, the modules and Python functions it calls, its
inputs (shapes with their symbolic dims, dtypes, and which symbolic dims the example has at size 0 or 1, which
export specializes), moecc's own source, the versions of torch, onnx, onnxscript and onnxruntime, and every tensor
the program holds, by content. Two models of one architecture with different weights never share an entry, so a
constant the optimizer folded from a weight is never stale.

An export that failed is remembered too (``failed.json``: its error, and whether it was a ``BackendError``): the
same program lowered again fails at once with that error instead of paying the export again, and a compile goes on
to what it does after a failed export (the split of ``islands``, or the torch fallback of ``auto``). The key covers
all the export reads, so the same key fails the same way; errors of the machine (out of memory, a full disk) are
never remembered.

Knobs: ``MOECC_ONNX_CACHE`` (on by default), ``MOECC_CACHE_DIR`` (``onnx/`` under it). The newest ``MAX_ENTRIES``
entries are kept (a hit counts as new)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import mmap
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from moecc import knobs
from moecc.capture_key import tensor_bytes, tensor_digest
from moecc.errors import BackendError, first_line
from moecc.logs import slow_step
from moecc.passes.graph_utils import attr_of

log = logging.getLogger("moecc.codegen.onnx")

FORMAT = 1
MAX_ENTRIES = 32
MAX_KEPT_BYTES = 1 << 28  # constants of the export's own past this, and the entry is not worth its disk


class Unkeyable(Exception):
    """The program holds something the key cannot describe, so its export is not cached."""


class FailedBefore(Exception):
    """The export of this program failed before, with this error (``failed.json`` of its entry)."""


@dataclass
class Lookup:
    """A program's key and its tensors by name (what a hit rebuilds the data file from)."""
    key: str
    tensors: dict[str, torch.Tensor]
    digests: dict[str, str]


def folder() -> Path:
    return knobs.cache_dir() / "onnx"


def lookup(gm: fx.GraphModule, example: list, path: str) -> Lookup | None:
    """The key of exporting ``gm`` for ``example`` to ``path``, or None where the cache is off or the program
    cannot be keyed (said at info level)."""
    if not knobs.ONNX_CACHE.get():
        return None
    try:
        tensors = _program_tensors(gm)
        size = sum(_nbytes(t) for t in tensors.values())
        with slow_step(log, f"keying the ONNX export cache ({size / 2**20:.0f} MB of tensors)"):
            # hashlib lets go of the GIL on large buffers: the tensors hash on every core at once
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                digests = dict(zip(tensors, pool.map(_digest, tensors.values())))
            h = hashlib.sha256()
            for part in _parts(gm, example, path, tensors, digests):
                h.update(repr(part).encode())
                h.update(b"\0")
    except Unkeyable as exc:
        log.info("the ONNX export is not cached: %s", exc)
        return None
    return Lookup(h.hexdigest(), tensors, digests)


def restore(found: Lookup, path: str) -> bool:
    """Write the stored export of ``found`` to ``path`` (and its data file beside it); False on a miss, or on an
    entry that cannot be used (which is then ignored, with a warning)."""
    entry = folder() / found.key
    if not (entry / "regions.json").exists():
        return False
    try:
        with slow_step(log, f"writing the ONNX graph from the cache ({found.key[:12]})"):
            meta = json.loads((entry / "regions.json").read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')}, not {FORMAT}")
            _write_data(meta, found.tensors, entry / "kept.bin", Path(path).parent)
            shutil.copyfile(entry / "graph.onnx", path)
        os.utime(entry / "regions.json")
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign entry must never fail a compile
        log.warning("ignoring the ONNX export cache entry %s: %s", entry, exc)
        shutil.rmtree(entry, ignore_errors=True)  # the export that follows stores a good one in its place
        return False
    return True


def failure(found: Lookup) -> tuple[str, bool] | None:
    """The first line of the error a former export of ``found`` failed with, and whether that error was a
    ``BackendError``; None where none failed (or the record cannot be read, which is then ignored)."""
    record = folder() / found.key / "failed.json"
    if not record.exists():
        return None
    try:
        meta = json.loads(record.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')}, not {FORMAT}")
        error, backend = str(meta["error"]), bool(meta["backend_error"])
        os.utime(record)
    except Exception as exc:  # noqa: BLE001 - a damaged record costs one export, never a compile
        log.warning("ignoring the ONNX export cache's record of a failure %s: %s", record, exc)
        shutil.rmtree(record.parent, ignore_errors=True)
        return None
    return error, backend


def remember_failure(found: Lookup, exc: BaseException) -> None:
    """Keep the first line of the error the export of ``found`` failed with. Errors of the machine, not of the
    program (memory, files, an interrupt), are not kept. Never raises."""
    if not isinstance(exc, Exception) or isinstance(exc, (MemoryError, OSError)):
        return

    def write(entry: Path) -> bool:
        (entry / "failed.json").write_text(json.dumps({"format": FORMAT, "error": first_line(exc),
                                                       "backend_error": isinstance(exc, BackendError)}))
        return True

    _write_entry(found.key, write, "a failure not remembered is only exported again")


def store(found: Lookup, path: str) -> None:
    """Keep the export just written to ``path`` under ``found``'s key. Never raises: a failure to cache is
    logged and the compile goes on."""

    def write(entry: Path) -> bool:
        with slow_step(log, f"keeping the ONNX export in the cache ({found.key[:12]})"):
            meta = _map_data(path, found, entry / "kept.bin")
        if meta is None:
            return False
        shutil.copyfile(path, entry / "graph.onnx")
        (entry / "regions.json").write_text(json.dumps(meta))
        return True

    _write_entry(found.key, write, "an export that cannot be cached still runs")


def _write_entry(key: str, write, why_go_on: str) -> None:
    """Make the entry ``key`` from what ``write`` puts in a fresh folder (False: keep nothing), whole or not at all:
    another process may be writing the same entry."""
    root = folder()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=root))
        try:
            if not write(tmp):
                return
            try:
                tmp.rename(root / key)
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(root)
    except Exception as exc:  # noqa: BLE001 - see why_go_on
        log.warning("could not write the ONNX export cache in %s (%s): %s", root, why_go_on, exc)


def _map_data(path: str, found: Lookup, kept_path: Path) -> dict | None:
    """Where each external region of the graph at ``path`` comes from: a tensor of the program by name, or bytes
    written to ``kept_path``. None (said at info level) where the export holds too many bytes of its own."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    by_digest = {}
    for name, digest in found.digests.items():
        by_digest.setdefault(digest, name)
    model = onnx.load(path, load_external_data=False)
    regions, files, kept = [], {}, 0
    base = Path(path).parent
    views = {}
    try:
        with open(kept_path, "wb") as out:
            for tensor in _get_all_tensors(model):
                if not uses_external_data(tensor):
                    continue
                info = {e.key: e.value for e in tensor.external_data}
                location, offset = info["location"], int(info.get("offset", 0))
                if location not in views:
                    data = base / location
                    files[location] = data.stat().st_size
                    with open(data, "rb") as f:
                        views[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if files[location] else b""
                length = int(info["length"]) if "length" in info else files[location] - offset
                chunk = memoryview(views[location])[offset:offset + length]
                name = by_digest.get(hashlib.sha256(chunk).hexdigest())
                if name is not None and _nbytes(found.tensors[name]) == length:
                    regions.append([location, offset, length, name, None])
                else:
                    regions.append([location, offset, length, None, kept])
                    out.write(chunk)
                    kept += length
                chunk.release()
    finally:
        for view in views.values():
            if isinstance(view, mmap.mmap):
                view.close()
    if kept > MAX_KEPT_BYTES:
        log.info("the ONNX export is not cached: it holds %d MB of constants of its own", kept >> 20)
        return None
    return {"format": FORMAT, "files": files, "regions": regions}


def _write_data(meta: dict, tensors: dict[str, torch.Tensor], kept_path: Path, base: Path) -> None:
    by_file: dict[str, list] = {}
    for region in meta["regions"]:
        by_file.setdefault(region[0], []).append(region)
    with open(kept_path, "rb") as kept_file:
        kept = mmap.mmap(kept_file.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(kept_file.fileno()).st_size \
            else b""
        try:
            for location, size in meta["files"].items():
                if os.path.isabs(location) or ".." in Path(location).parts:
                    raise ValueError(f"data file {location!r} outside the graph's folder")
                with open(base / location, "wb") as out:
                    out.truncate(size)
                    for _, offset, length, name, at in sorted(by_file.get(location, []), key=lambda r: r[1]):
                        if name is not None:
                            data = tensor_bytes(tensors[name])
                        else:
                            data = kept[at:at + length]
                        if len(data) != length:
                            raise ValueError(f"region at {offset} of {location} is {length} bytes, its source "
                                             f"{len(data)}")
                        out.seek(offset)
                        out.write(data)
        finally:
            if isinstance(kept, mmap.mmap):
                kept.close()


def _prune(root: Path) -> None:
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=_last_used)
    for old in entries[:max(0, len(entries) - MAX_ENTRIES)]:
        shutil.rmtree(old, ignore_errors=True)


def _last_used(entry: Path) -> float:
    for record in ("regions.json", "failed.json"):
        if (entry / record).exists():
            return (entry / record).stat().st_mtime
    return 0


def _program_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    tensors = dict(gm.named_parameters(remove_duplicate=False))
    tensors.update(gm.named_buffers(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in tensors:
            value = attr_of(gm, node)
            if isinstance(value, torch.Tensor):
                tensors[node.target] = value
    for name, t in tensors.items():
        if type(t) not in (torch.Tensor, nn.Parameter) or t.is_meta or t.layout != torch.strided:
            raise Unkeyable(f"tensor {name} is a {type(t).__name__} ({t.layout}, {t.device}), not plain bytes")
    return tensors


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _digest(t: torch.Tensor) -> str:
    if (digest := tensor_digest(t)) is None:
        raise Unkeyable(f"a {type(t).__name__} ({t.dtype}, {t.layout}, {t.device}) whose bytes are out of reach")
    return digest


@functools.cache
def _versions() -> tuple:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "transformers"):
        try:
            out.append((package, version(package)))
        except PackageNotFoundError:
            out.append((package, None))
    return tuple(out)


@functools.cache
def _moecc_source() -> str:
    """One digest of every source file of moecc: its ops, decompositions and ONNX translations decide the export."""
    import moecc

    root = Path(moecc.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _parts(gm: fx.GraphModule, example: list, path: str, tensors: dict, digests: dict):
    yield ("moecc onnx export", FORMAT, sys.version_info[:2], _versions(), _moecc_source(), os.path.basename(path))
    yield ("by layers", knobs.ONNX_REPEATS.get())  # turned off, it must not read back a stitched graph
    yield from graph_parts(gm, "")
    for t in example:
        if isinstance(t, torch.Tensor):  # size 0 and 1 specialize a symbolic dim when exported
            yield ("example", str(t.dtype), tuple(min(int(d), 2) for d in t.shape), t.device.type)
        else:
            yield ("example constant", repr(t))
    for name in sorted(tensors):
        t = tensors[name]
        yield ("tensor", name, str(t.dtype), tuple(t.shape), digests[name])


def graph_parts(gm: fx.GraphModule, prefix: str):
    """The graph node by node, with nodes named by position (a capture read back from the capture cache names
    them otherwise than a fresh one) and symbolic dims by first appearance (export numbers its symbols per run):
    the export sees neither name."""
    from moecc.capture_key import _class_sources, _code_digest, _module_entry

    index, symbols = {}, {}
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: ("%", index[n]))
        # a tensor written into the arguments: its repr elides the values of a large one
        args = pytree.tree_map_only(torch.Tensor, lambda t: ("tensor", str(t.dtype), tuple(t.shape), _digest(t)), args)
        if node.op == "placeholder":
            val = node.meta.get("val")
            shape = None if val is None else (str(val.dtype), tuple(
                int(d) if isinstance(d, int) else symbols.setdefault(str(d), f"s{len(symbols)}")
                for d in val.shape))
            yield (prefix, i, "input", repr(args), shape)
        elif node.op == "call_module":
            sub = gm.get_submodule(node.target)
            yield (prefix, i, "module", node.target, repr(args))
            if isinstance(sub, fx.GraphModule):
                yield from graph_parts(sub, f"{prefix}{node.target}.")
                continue
            yield (prefix, i, tuple(_module_entry(n, m) for n, m in sub.named_modules(remove_duplicate=False)),
                   tuple(tuple(_class_sources(type(m))) for _, m in sub.named_modules()))
        elif node.op == "call_function":
            target = node.target
            if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
                yield (prefix, i, "op", str(target), repr(args))
            else:
                name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
                yield (prefix, i, "function", name, _code_digest(target), repr(args))
        else:
            yield (prefix, i, node.op, str(node.target), repr(args))
