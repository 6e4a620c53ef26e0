"""PassManager: runs passes in order and lets instruments (dumps, timing) watch; a failing pass is named."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from torch import fx

from moecc.dump import TensorStore, write_sample, write_stage
from moecc.errors import PassError
from moecc.passes.base import MoePass, PassResult
from moecc.passes.graph_utils import recompile_once

log = logging.getLogger("moecc.passes")


class Instrument:
    """``runs_module``: it calls each pass's output module or reads its ``code``, which the passes then regenerate
    after each pass rather than once after the last. An instrument that reads only the graph says False."""

    runs_module = True

    def on_start(self, gm: fx.GraphModule) -> None: ...
    def after_pass(self, index: int, p: MoePass, result: PassResult, seconds: float) -> None: ...
    def on_finish(self, gm: fx.GraphModule) -> None: ...


class Timing(Instrument):
    runs_module = False

    def __init__(self) -> None:
        self.records: list[dict] = []

    def after_pass(self, index, p, result, seconds):
        self.records.append({"index": index, "pass": p.name, "seconds": round(seconds, 6),
                             "modified": bool(result.modified), "stats": _jsonable(p.stats)})
        log.info("pass %03d %-20s %8.2f ms modified=%s %s", index, p.name, seconds * 1e3, result.modified,
                 p.stats or "")


class DumpIR(Instrument):
    """``000_capture.py``, ``001_<pass>.py``, ... plus ``passes.json``; weights shared in one file."""

    runs_module = False  # a stage's code is written from its graph

    def __init__(self, folder: str | Path, inputs: list, reference: list, timing: Timing) -> None:
        self.folder = Path(folder)
        self.store = TensorStore()
        self.inputs, self.reference, self.timing = inputs, reference, timing
        self.files: list[str] = []

    def on_start(self, gm):
        write_sample(self.folder, self.inputs, self.reference)
        self.files.append(write_stage(self.folder, 0, "capture", gm, self.store).name)

    def after_pass(self, index, p, result, seconds):
        self.files.append(write_stage(self.folder, index, p.name, result.graph_module, self.store).name)

    def on_finish(self, gm):
        self.store.save(self.folder)
        layers = {k: v.as_dict() for k, v in gm.meta.get("moecc_layers", {}).items()}
        from moecc.report import graph_summary

        summary = {"stages": self.files, "passes": self.timing.records, "moe_layers": layers,
                   "graph": graph_summary(gm)}
        (self.folder / "passes.json").write_text(json.dumps(summary, indent=2))
        log.info("dumps written to %s", self.folder)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


class PassManager:
    def __init__(self, passes: list[MoePass], instruments: list[Instrument] | None = None,
                 repro_dir: str | Path | None = None) -> None:
        self.passes = passes
        self.instruments = instruments or []
        self.repro_dir = repro_dir

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        for ins in self.instruments:
            ins.on_start(gm)
        modified = False
        # unless an instrument runs each pass's module, the code is regenerated once, after the last pass
        with nullcontext() if any(ins.runs_module for ins in self.instruments) else recompile_once(gm):
            for index, p in enumerate(self.passes, start=1):
                start = time.perf_counter()
                try:
                    result = p(gm)
                except Exception as exc:
                    path = self._save_repro(index, p, gm)
                    raise PassError(f"pass {index:03d} {p.name!r} failed: {exc}\n"
                                    f"Its input graph is saved at {path} for a repro.") from exc
                seconds = time.perf_counter() - start
                gm = result.graph_module
                modified |= result.modified
                for ins in self.instruments:
                    ins.after_pass(index, p, result, seconds)
        for ins in self.instruments:
            ins.on_finish(gm)
        return PassResult(gm, modified)

    def _save_repro(self, index: int, p: MoePass, gm: fx.GraphModule) -> Path:
        folder = Path(self.repro_dir) if self.repro_dir else Path(tempfile.mkdtemp(prefix="moecc_repro_"))
        store = TensorStore()
        try:
            path = write_stage(folder, index, f"failed_{p.name}_input", gm, store)
            store.save(folder)
        except Exception:  # noqa: BLE001 - the repro is best effort; the pass error matters more
            path = folder / f"{index:03d}_failed_{p.name}_input.txt"
            gm.recompile()  # the code may be older than the graph the failing pass left
            path.write_text(gm.code)
        return path
