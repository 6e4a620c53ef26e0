"""Ahead-of-time artifacts: ``moecc.export`` writes a self-contained folder (or one ``.moecc`` file);
``moecc.load`` runs it in a process that never imports the model's code.

Layout of an artifact folder:
- ``manifest.json``: versions, backend, input/output specs, per-layer MoE specs with capacity formulas and the
  placement plan, the pass list, and the SHA-256 of every other file;
- the program: ``model.onnx`` with its weights as ONNX external data (``model.onnx.data``) for ONNX Runtime,
  or ``program.pt2`` (a ``torch.export`` ExportedProgram, code only) with ``weights.safetensors`` for the torch,
  reference and Triton backends; ``manifest.json`` names the device the weights are loaded to.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree

from moecc import module_state
from moecc.autocast import DEVICE_TYPES, autocast_state
from moecc.errors import ArtifactError, DisagreementError, first_line
from moecc.files import OwnedFolder
from moecc.logs import stderr_to_debug
from moecc.passes.graph_utils import blocks_left_as_written
from moecc.runtime import kv_cache
from moecc.runtime.cudagraphs import GraphCache, replays
from moecc.runtime.keywords import in_order, keyword_order
from moecc.runtime.turns import runs_alone
from moecc.runtime.weights import storage_of

log = logging.getLogger("moecc.artifact")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _paths(tree) -> list[str]:
    return [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(tree)[0]]


def export(model: nn.Module, args, path, kwargs: dict | None = None, backend: str = "auto", progress=None,
           calibration: tuple | None = None, **options) -> Path:
    """Capture, compile and write ``model`` for the example ``args``/``kwargs`` to ``path`` (a folder, or a single
    file when ``path`` ends in ``.moecc``). ``calibration=(args, kwargs)``: the batch whose per-expert load the
    manifest records (default: the example). Returns the path written."""
    from moecc.api import _check_args
    from moecc.runtime.compiled import cache_argument, cache_defaults

    _check_args(model, backend, None, options)
    if not isinstance(args, tuple):
        args = (args,)
    kwargs = dict(kwargs or {})
    defaults = cache_defaults(cache_argument(model), args, kwargs)  # added by loaded calls too
    kwargs.update(defaults)
    if kwargs.get("use_cache") is True or kv_cache.caches_in((args, kwargs)):
        raise ArtifactError("moecc.export writes forward programs without a KV cache: export the call with "
                            "use_cache=False and no cache (generation with a cache runs through moecc.compile(model)"
                            ".generate)")
    path = Path(path)
    if path.suffix != ".moecc":
        _export_to(path, model, args, kwargs, defaults, backend, progress, calibration, options)
    else:
        staging = OwnedFolder("moecc_export_")  # removed whether the export ends well or not
        try:
            folder = _export_to(Path(staging.path), model, args, kwargs, defaults, backend, progress, calibration,
                                options)
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
                for p in folder.iterdir():
                    z.write(p, p.name)
        finally:
            staging.remove()
    (progress or (lambda msg: log.info(msg)))(f"wrote {path}")
    return path


def _export_to(folder: Path, model: nn.Module, args: tuple, kwargs: dict, defaults: dict, backend: str, progress,
               calibration, options: dict) -> Path:
    """``export`` into the artifact folder ``folder``."""
    from moecc import __version__
    from moecc.api import OPTIONS
    from moecc.capture import CaptureHints
    from moecc.runtime.compiled import build, say_if_no_block, torch_instead
    from moecc.runtime.localize import verify_leaving_blocks
    from moecc.runtime.verify import verify

    if folder.exists() and any(folder.iterdir()):
        if not (folder / MANIFEST).exists():
            raise ArtifactError(f"{folder} exists and is not a moecc artifact; refusing to overwrite it")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    step = progress or (lambda msg: log.info(msg))
    # compiling calls the model many times: its buffers and the call's tensors are put back after
    state = pytree.tree_leaves((args, kwargs))
    hints = CaptureHints()
    with module_state.kept(model, state):
        step("capturing and compiling")
        entry, info = build(model, args, kwargs, backend, options, None, str(folder), calibration)
        if options.get("verify", True) and not options.get("quantize"):
            step("checking against eager on fresh inputs")

            def rebuild(backend_now: str):
                shutil.rmtree(folder)  # no file of the program replaced may travel with the new one
                folder.mkdir(parents=True)
                return build(model, args, kwargs, backend_now, options, None, str(folder), calibration, hints)

            def leaving(left: dict[str, str], refused: dict[str, str]):
                nonlocal hints
                hints = CaptureHints(unfused=left, refused_routing=refused)
                names = ", ".join([*left, *refused])
                step(f"compiling again without the fused forms that differed from eager ({names})")
                return rebuild(backend)

            try:
                entry, info = verify_leaving_blocks(model, entry, info, None, leaving, verify)
            except DisagreementError as exc:
                if entry.backend != "onnxruntime":
                    raise
                entry, info = torch_instead(model, exc, info, backend, lambda: rebuild("torch"))
        info.canonical = {}  # the analyses hold expert weights the program has its own copies of
    if options.get("fuse", True):
        say_if_no_block(model, entry)
    step(f"writing the {entry.backend} program")
    if entry.backend in TORCH_PROGRAM_BACKENDS:
        _save_torch_program(entry, folder)
    with torch.no_grad(), module_state.kept(model, state):
        reference = model(*args, **kwargs)
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    manifest = {
        "format_version": FORMAT_VERSION,
        "moecc_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "backend": entry.backend,
        "device": _device_type(entry),
        # traced into the program, which a load runs as it is
        "autocast": [[device, str(dtype)] for device, dtype in entry.autocast],
        "inputs": {
            "spec": pytree.treespec_dumps(entry.in_spec),
            "tensors": [{"index": i, "dtype": str(d).replace("torch.", ""), "shape": list(s)}
                        for i, d, s in zip(entry.tensor_pos, entry.dtypes, entry.shapes)],
            "constants": {str(i): c for i, c in enumerate(entry.consts) if c is not None},
            "defaults": defaults,  # keyword arguments a call leaves out and the export added
        },
        "outputs": {"paths": _paths(reference)},
        "moe_layers": [layer.as_dict() for layer in entry.layers.values()],
        "passes": info.passes,
        "graph": info.graph,
        "options": {k: v for k, v in options.items() if k in OPTIONS},
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return folder


class _WeightsAsInputs(nn.Module):
    """The program with its weights as leading inputs, so the .pt2 holds code only and weights go to safetensors."""

    def __init__(self, gm: nn.Module, names: list[str]):
        super().__init__()
        # not a submodule: torch.export would lift its parameters into the .pt2's state_dict, a second copy of every
        # weight in the artifact although the graph reads the inputs in their place
        self.__dict__["gm"] = gm
        self.names = names

    def forward(self, *args):
        n = len(self.names)
        return torch.func.functional_call(self.gm, dict(zip(self.names, args[:n])), args[n:])


TORCH_PROGRAM_BACKENDS = ("torch", "reference", "triton")  # written as program.pt2 + weights.safetensors


def _device_type(entry) -> str:
    devices = {entry.example_inputs[i].device.type for i in entry.tensor_pos}
    return "cuda" if "cuda" in devices else "cpu"


def _save_torch_program(entry, folder: Path) -> None:
    from safetensors.torch import save_file

    from moecc.capture import unaliased

    state = {**dict(entry.gm.named_parameters()), **dict(entry.gm.named_buffers())}
    names = sorted(state)
    weights = [state[n].detach() for n in names]
    example = unaliased([entry.example_inputs[i] for i in entry.tensor_pos])
    shapes = tuple([None] * len(weights) + [{i: torch.export.Dim.AUTO for i, d in enumerate(s) if d is None}
                                            for s in entry.shapes])
    try:
        with torch.no_grad(), stderr_to_debug(log, "torch.export"):
            ep = torch.export.export(_WeightsAsInputs(entry.gm, names), tuple(weights + example),
                                     dynamic_shapes=(shapes,), strict=False)
    except Exception as exc:
        as_written = blocks_left_as_written(entry.gm)
        why = "; ".join(f"{name}: {entry.layers[name].reason}" for name in as_written
                        if name in entry.layers and entry.layers[name].reason)
        blocks = (f" It holds MoE blocks left as written ({', '.join(as_written)}), whose Python code is traced into "
                  "the program and fails for data-dependent expert loops; an artifact holds no model code to run "
                  f"them from, and moecc.compile runs them as written.{f' Why each was left: {why}.' if why else ''}"
                  ) if as_written else ""
        raise ArtifactError(f"torch.export of the compiled program failed: {first_line(exc)}.{blocks}") from exc
    ep._example_inputs = None  # they would hold a second copy of the weights
    torch.export.save(ep, folder / "program.pt2")
    stored, aliases = _shared_once(names, weights)
    save_file(stored, folder / "weights.safetensors",
              metadata={"order": json.dumps(names), "aliases": json.dumps(aliases)})


def _shared_once(names: list[str], weights: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the tensors to store, name -> stored name of the tensors that are another one's memory): safetensors
    stores no two tensors of one memory, and the blocks of one router or one expert bank (a block the model calls
    twice, experts shared across layers) hold theirs so. A tensor that overlaps another's memory only in part is
    stored as a copy."""
    stored, aliases, seen, storages = {}, {}, {}, set()
    for name, w in zip(names, weights):
        storage = storage_of(w)
        view = (storage, w.storage_offset(), tuple(w.shape), tuple(w.stride()), w.dtype)
        if storage is not None and view in seen:
            aliases[name] = seen[view]
            continue
        stored[name] = w.clone(memory_format=torch.contiguous_format) if storage in storages else w.contiguous()
        if storage is not None:
            seen[view] = name
            storages.add(storage)
    return stored, aliases


def _moved(ep: torch.export.ExportedProgram, exported: str, device: str) -> torch.export.ExportedProgram:
    """``ep`` with the devices of type ``exported`` that its ops name (``arange(device=...)``, checks of their
    outputs' devices) made ``device``: a program traced on one device creates its tensors there, whatever device its
    weights are loaded to."""
    from torch.export.passes import move_to_device_pass

    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    named = set()
    for node in ep.graph.nodes:
        if (d := node.kwargs.get("device")) is not None:
            named.add(torch.device(d))
        named.update(v.device for v in pytree.tree_leaves(node.meta.get("val")) if isinstance(v, torch.Tensor))
    moves = {str(d): str(target) for d in named if d.type == exported and d != target}
    return move_to_device_pass(ep, moves) if moves else ep


def _load_torch_program(folder: Path, backend: str, exported: str, device: str):
    from safetensors import safe_open
    from safetensors.torch import load_file

    import moecc.codegen.torch.moe  # noqa: F401 - registers the ops the program calls
    from moecc.runtime.direct import direct_calls

    if backend == "triton":
        from moecc.codegen.triton import available

        ok, why = available()
        if not ok:
            raise ArtifactError(f"{folder} holds a Triton program, which cannot run here: {why}")
        import moecc.codegen.triton.moe  # noqa: F401
    with safe_open(folder / "weights.safetensors", "pt") as f:
        names = json.loads(f.metadata()["order"])
        aliases = json.loads(f.metadata().get("aliases", "{}"))
    tensors = load_file(folder / "weights.safetensors", device=device)
    weights = [tensors[aliases.get(n, n)] for n in names]
    program = _moved(torch.export.load(folder / "program.pt2"), exported, device)
    module = direct_calls(program.module(), in_place=True)

    def program(*inputs):
        return module(*weights, *inputs)

    program.writes = module_state.program_writes(module)
    return program


class Outputs(dict):
    """A model's outputs by name, readable as attributes (``out.logits``) or items (``out["logits"]``, ``out[0]``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


def _rebuild(paths: list[str], leaves: list):
    if paths == [""]:
        return leaves[0]
    if all(p.startswith("[") and p.endswith("]") and p[1:-1].isdigit() for p in paths):
        return tuple(leaves)
    names = [p.lstrip(".").strip("[]'\"") for p in paths]
    return Outputs(zip(names, leaves))


class LoadedModel:
    """A loaded artifact: ``m(*args, **kwargs)`` gives the model's outputs."""

    def __init__(self, folder: Path, manifest: dict, program, extracted: OwnedFolder | None = None) -> None:
        self.folder, self.manifest, self.program = folder, manifest, program
        self.extracted = extracted  # the folder a .moecc file was unpacked to: removed with the model
        self.in_spec = pytree.treespec_loads(manifest["inputs"]["spec"])
        self.tensor_pos = [t["index"] for t in manifest["inputs"]["tensors"]]
        self.constants = {int(k): v for k, v in manifest["inputs"]["constants"].items()}
        self.graphs = None
        self.keywords = keyword_order(self.in_spec)
        self._lock = threading.RLock()  # calls from several threads take turns, as a compiled model's do

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}  # a lock cannot be pickled or copied

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _keywords_differ(self, kwargs: dict) -> str:
        if self.keywords is None or set(kwargs) == set(self.keywords):
            return ""
        missing, unexpected = set(self.keywords) - set(kwargs), set(kwargs) - set(self.keywords)
        return "".join([f" (missing keyword arguments: {', '.join(sorted(missing))})" if missing else "",
                        f" (keyword arguments not exported: {', '.join(sorted(unexpected))})" if unexpected else ""])

    @property
    def moe_layers(self) -> list[dict]:
        return self.manifest["moe_layers"]

    def __call__(self, *args, **kwargs):
        kwargs = in_order({**self.manifest["inputs"].get("defaults", {}), **kwargs}, self.keywords)
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise TypeError(f"inputs do not match the exported signature{self._keywords_differ(kwargs)}: exported "
                            f"{self.in_spec}; got {spec}")
        for i, c in self.constants.items():
            if flat[i] != c:
                raise ValueError(f"input #{i} was the constant {c!r} at export, got {flat[i]!r}; re-export for it")
        tensors = [flat[i] for i in self.tensor_pos]
        if not autocast_state():
            return _rebuild(self.manifest["outputs"]["paths"], list(self._run(tensors)))
        with contextlib.ExitStack() as stack:  # the program holds its export's casts; autocast would add its own
            for device in DEVICE_TYPES:
                stack.enter_context(torch.autocast(device, enabled=False))
            return _rebuild(self.manifest["outputs"]["paths"], list(self._run(tensors)))

    def _run(self, tensors: list):
        writes = getattr(self.program, "writes", None)
        with self._lock:
            if not writes and replays(self.manifest["backend"], tensors):
                if self.graphs is None:
                    self.graphs = GraphCache(self.program)
                return self.graphs(tensors)
            if not runs_alone(self.manifest["backend"], writes, tensors):
                return self._call_program(tensors)
        return self._call_program(tensors)  # outside the lock: calls from several threads overlap (``turns``)

    def _call_program(self, tensors: list):
        with torch.no_grad():  # the moecc ops have no backward: no output carries a gradient
            return self.program(*tensors)


def _load_device(path: Path, exported: str, wanted: str | None) -> str:
    device = wanted or exported
    if device.startswith("cuda") and not torch.cuda.is_available():
        hint = "" if wanted else " (pass device='cpu' to run the torch program on the CPU)"
        raise ArtifactError(f"{path} was exported on {exported} and this machine has no CUDA device{hint}")
    return device


def load(path, device: str | None = None) -> LoadedModel:
    """Load an artifact written by ``moecc.export``; raises ``moecc.ArtifactError`` when it cannot be trusted.
    Weights go to the device the model was exported on, or to ``device`` (torch and Triton programs)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"no moecc artifact at {path}")
    folder, extracted = path, None
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ArtifactError(f"{path} is neither an artifact folder nor a .moecc file")
        extracted = OwnedFolder("moecc_load_")  # removed with the loaded model
        folder = Path(extracted.path)
        with zipfile.ZipFile(path) as z:
            z.extractall(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise ArtifactError(f"{path} has no {MANIFEST}: it is not a moecc artifact (re-export it)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc}); the artifact is damaged: "
                            "re-export it") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format {version!r} (written by moecc "
                            f"{manifest.get('moecc_version')}); this moecc reads format {FORMAT_VERSION}. "
                            "Re-export the model with this moecc version.")
    for name, digest in manifest.get("files", {}).items():
        file = folder / name
        if not file.exists():
            raise ArtifactError(f"{path} is missing {name}; copy the whole artifact or re-export it")
        if _sha256(file) != digest:
            raise ArtifactError(f"{name} in {path} does not match its recorded SHA-256: the file was changed or "
                                "damaged, so it is not run. Re-export the model or restore the file.")
    backend = manifest["backend"]
    if backend == "onnxruntime":
        from moecc.codegen.onnx.lower import OrtModule

        program = OrtModule(os.fspath(folder / "model.onnx"), folder=extracted)
    elif backend in TORCH_PROGRAM_BACKENDS:
        exported = manifest.get("device", "cpu")
        program = _load_torch_program(folder, backend, exported, _load_device(path, exported, device))
    else:
        raise ArtifactError(f"{path} was exported for backend {backend!r}, which this moecc cannot run")
    return LoadedModel(folder, manifest, program, extracted)
