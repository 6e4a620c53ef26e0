"""Write a graph module as a readable, runnable Python file: one numbered file per pipeline stage.

Every stage file defines ``Stage(nn.Module)`` whose ``forward`` is the stage's graph code, loads its weights
from the one ``weights.safetensors`` shared by all stages, and when run as a script checks itself against the
reference outputs saved at capture (exit 0 only on a match)."""

from __future__ import annotations

import json
import pickle
import re
import textwrap
from pathlib import Path

import torch
from torch import fx

from moecc.logs import quiet_deepcopy

WEIGHTS = "weights.safetensors"
MODULES = "modules.pt"
INPUTS = "inputs.pt"
REFERENCE = "reference.pt"


class TensorStore:
    """Assigns each distinct tensor one key; all stages share the keys and one weights file."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: dict[str, torch.nn.Module] = {}
        self._keys: dict[tuple, str] = {}

    def key(self, t: torch.Tensor) -> str:
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        if ident not in self._keys:
            self._keys[ident] = f"t{len(self._keys)}"
            self.tensors[self._keys[ident]] = t
        return self._keys[ident]

    def module_key(self, m: torch.nn.Module) -> str:
        for k, v in self.modules.items():
            if v is m:
                return k
        key = f"m{len(self.modules)}"
        self.modules[key] = m
        return key

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous().clone() for k, v in self.tensors.items()}, folder / WEIGHTS)
        if self.modules:
            saved = {}
            for key, module in self.modules.items():
                try:
                    saved[key] = _picklable(module)
                    pickle.dumps(saved[key])
                except Exception as exc:  # noqa: BLE001 - that stage says why it cannot be rebuilt
                    saved[key] = f"{type(module).__name__} could not be saved: {exc}"
            torch.save(saved, folder / MODULES)


def _picklable(module: torch.nn.Module) -> torch.nn.Module:
    """A copy without hooks (libraries install hooks that are local functions, which pickle cannot save)."""
    copy_ = quiet_deepcopy(module)
    for m in copy_.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                      "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            if isinstance(getattr(m, hooks, None), dict):
                getattr(m, hooks).clear()
    return copy_


def _resolve(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _import_line(name: str, obj) -> str:
    if name == "torch":
        return "import torch"
    module = getattr(obj, "__module__", None) or type(obj).__module__
    qual = getattr(obj, "__qualname__", None)
    if isinstance(qual, str) and "<" not in qual:
        if "." not in qual:
            return f"from {module} import {qual} as {name}"
    for modname in (module, type(obj).__module__):
        try:
            mod = __import__(modname, fromlist=["_"])
        except ImportError:
            continue
        for attr, value in vars(mod).items():
            if value is obj:
                return f"from {modname} import {attr} as {name}"
    raise ValueError(f"cannot write an import for {name} ({obj!r})")


def stage_source(gm: fx.GraphModule, store: TensorStore, title: str) -> str:
    from moecc.passes.graph_utils import copy_graph  # moecc.passes imports this module

    graph = copy_graph(gm.graph)
    attrs: dict[str, str] = {}
    modules: dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        obj = _resolve(gm, node.target)
        if isinstance(obj, torch.Tensor):
            key = store.key(obj)
            attrs[f"w_{key}"] = key
            node.target = f"w_{key}"
        else:
            key = store.module_key(obj)
            modules[f"sub_{key}"] = key
            node.target = f"sub_{key}"
    code = graph.python_code("self")
    imports = sorted({_import_line(n, o) for n, o in code.globals.items() if n not in ("inf", "nan", "NoneType",
                                                                                    "device", "fx_pytree", "pytree")})
    body = textwrap.indent(code.src.strip(), "    ")
    return f'''"""moecc stage {title}.

Run it: `python {title}.py` rebuilds this stage from the shared weights, runs the captured sample input and
exits 0 only if the outputs match the reference saved at capture."""
import sys

import torch
from torch import device, inf, nan  # noqa: F401 - graph code may name them

import moecc  # noqa: F401 - registers the torch.ops.moecc ops
from moecc.dump_support import load_stage, run_check
{chr(10).join(imports)}

WEIGHTS = {json.dumps(attrs, indent=4)}
MODULES = {json.dumps(modules, indent=4)}


class Stage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        load_stage(self, __file__, WEIGHTS, MODULES)

{body}


if __name__ == "__main__":
    sys.exit(run_check(Stage, __file__))
'''


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name)


def write_stage(folder: Path, index: int, name: str, gm: fx.GraphModule, store: TensorStore) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{index:03d}_{safe_name(name)}"
    path = folder / f"{title}.py"
    path.write_text(stage_source(gm, store, title))
    return path


def write_sample(folder: Path, inputs: list, reference: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save([t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in inputs], folder / INPUTS)
    torch.save([t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in reference], folder / REFERENCE)
