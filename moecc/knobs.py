"""Typed settings read from ``MOECC_*`` environment variables (read when used, so tests can set them)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Knob:
    name: str
    default: object
    kind: type
    doc: str
    choices: tuple[str, ...] = ()  # a str knob's allowed values, when it has a fixed set

    @contextmanager
    def overridden(self, value: str):
        """This knob reads ``value`` inside, and what it read before after."""
        before = os.environ.get(self.name)
        os.environ[self.name] = value
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(self.name, None)
            else:
                os.environ[self.name] = before

    def get(self):
        raw = os.environ.get(self.name)
        if raw is None or raw == "":
            return self.default
        if self.kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{self.name} must be a boolean (1/0, true/false), got {raw!r}")
        if self.kind is int:
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{self.name} must be an integer, got {raw!r}") from None
        if self.kind is float:
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"{self.name} must be a number, got {raw!r}") from None
        if self.choices and raw not in self.choices:
            *rest, last = self.choices
            allowed = f"{', '.join(rest)} or {last}" if rest else last
            raise ValueError(f"{self.name} must be {allowed}, got {raw!r}")
        return raw


DUMP_DIR = Knob("MOECC_DUMP_DIR", None, str, "folder for numbered pass dumps (off when unset)")
LOGS = Knob("MOECC_LOGS", "warning", str, "log level of the moecc loggers: debug, info, warning, error")
VERIFY = Knob("MOECC_VERIFY", True, bool, "after each capture, compare the compiled model with eager on fresh inputs")
CACHE_DIR = Knob("MOECC_CACHE_DIR", None, str,
                 "folder for persistent caches (tuning, captures, ONNX exports); default: user cache dir")
CAPTURE_CACHE = Knob("MOECC_CAPTURE_CACHE", True, bool, "reuse a stored capture of the same model code, structure and "
                     "example shapes instead of running torch.export again")
ONNX_CACHE = Knob("MOECC_ONNX_CACHE", True, bool, "reuse a stored ONNX export of the same lowered program (its code, "
                  "input shapes and tensors) instead of running torch.onnx.export and the ONNX optimizer again; "
                  "an entry holds the graph, not the weights, which come from the program")
ONNX_REPEATS = Knob("MOECC_ONNX_REPEATS", True, bool, "export each distinct layer of a model to ONNX once and copy "
                    "its graph for the layers alike it, instead of exporting every layer (a deep model's cold export "
                    "then takes about the time of its distinct layers)")
WATCH_WEIGHTS = Knob("MOECC_WATCH_WEIGHTS", True, bool, "before each call, check whether the model's parameters, "
                     "buffers, settings (MoE blocks' top_k, plain values its code read: a norm's eps, "
                     "config.sliding_window) or forward hooks changed since compile (compiling again if so); off: "
                     "the copies the program made (expert banks; every weight on ONNX Runtime) keep the values they "
                     "were built with")

RECOGNIZE_SEARCH_S = Knob("MOECC_RECOGNIZE_SEARCH_S", 60.0, float, "seconds recognition may spend searching the "
                          "routing and expert candidates of one MoE block that none fits yet; past them the block "
                          "runs as written, with the reason")

SLOW_STEP_S = Knob("MOECC_SLOW_STEP_S", 30.0, float, "a compile step (capture, lowering, the check on fresh inputs) "
                   "that runs longer than this many seconds warns that it is still running, and again each time "
                   "its time doubles (0: never)")

AUTOTUNE = Knob("MOECC_AUTOTUNE", False, bool, "tune Triton MoE tiles on first use of a shape (cached on disk)")
CUDA_GRAPHS = Knob("MOECC_CUDA_GRAPHS", True, bool, "replay CUDA graphs for small token counts (Triton backend)")
CUDA_GRAPH_MAX_TOKENS = Knob("MOECC_CUDA_GRAPH_MAX_TOKENS", 512, int, "largest token count that uses CUDA graphs")
CUDA_GRAPH_REPEAT_MAX_TOKENS = Knob("MOECC_CUDA_GRAPH_REPEAT_MAX_TOKENS", 2048, int,
                                   "largest token count that uses CUDA graphs from its second call with that shape")
CUDA_GRAPH_PROBE_MAX_TOKENS = Knob("MOECC_CUDA_GRAPH_PROBE_MAX_TOKENS", 16384, int,
                                  "largest token count that uses CUDA graphs from its third call with that shape, "
                                  "where its second call, timed, found the host's launch path the bound (0: never)")
CUDA_GRAPH_MAX_GRAPHS = Knob("MOECC_CUDA_GRAPH_MAX_GRAPHS", 32, int, "CUDA graphs kept per compiled program (LRU)")
TRITON_TMA = Knob("MOECC_TRITON_TMA", "auto", str, "large-tile grouped GEMMs read tiles through TMA descriptors: "
                  "auto (Hopper or newer), on (wherever the tensors allow, also in the interpreter), off",
                  ("auto", "on", "off"))
TRITON_WS = Knob("MOECC_TRITON_WS", "auto", str, "warp-specialized Gluon kernels for 128-row blocks (bf16/fp16, "
                 "sm_90): auto (GEMM 1 from 128 pairs per expert, GEMM 2 with K >= 4096: where they measured "
                 "faster), on (both GEMMs), off", ("auto", "on", "off"))
TRITON_WS_GEMM1_MIN_ROWS = Knob("MOECC_TRITON_WS_GEMM1_MIN_ROWS", 128, int, "with MOECC_TRITON_WS=auto, GEMM 1 takes "
                                "the warp-specialized kernel from this many pairs per expert on average")
TRITON_DECODE_MAX_TOKENS = Knob("MOECC_TRITON_DECODE_MAX_TOKENS", 4, int, "up to this many tokens the Triton experts "
                                "run as two pair-wise GEMV launches, without align or a combine launch, where their "
                                "pairs would read few experts twice (0: never)")
TRITON_PDL = Knob("MOECC_TRITON_PDL", True, bool, "launch the Triton experts' kernels as programmatic dependents of "
                  "the kernel before each (sm_90 or newer): the decode GEMVs (the second streams its weights while "
                  "the first still runs), and align, both GEMMs and the combine of prefill")
TRITON_ROUTER_GEMV = Knob("MOECC_TRITON_ROUTER_GEMV", True, bool, "up to 16 tokens the gating kernel also computes the "
                          "router GEMV for bf16/fp16 logits, rounded to the model's dtype as the eager GEMM rounds "
                          "them (off: those routers stay a GEMM of their own; fp32 logits always fuse)")
ORT_THREADS = Knob("MOECC_ORT_THREADS", 0, int, "intra-op threads of each ONNX Runtime session moecc opens "
                   "(0: ONNX Runtime's default, one per physical core)")
ORT_SPIN = Knob("MOECC_ORT_SPIN", True, bool, "ONNX Runtime's intra-op threads spin-wait for more work after each "
               "run (ONNX Runtime's default: quicker back-to-back calls); 0: they sleep, and torch work in the same "
               "process between calls gets the cores they would hold")
AUTO_MAX_DENSE_WORK = Knob("MOECC_AUTO_MAX_DENSE_WORK", 2.0, float, "backend='auto' on the CPU runs the torch program "
                           "where ONNX Runtime's would read more than this many times its weights per token (MoE "
                           "blocks whose expert weights the graph computes, decomposed into every expert on every "
                           "token); 0: never")
ORT_MOE_OP = Knob("MOECC_ORT_MOE_OP", False, bool, "1: MoE blocks run as com.microsoft.MoE / QMoE where it computes "
                  "them (or is handed their routing); default 0: blocks are routed in plain ONNX ops, a MatMul (or, "
                  "quantized, a com.microsoft.MatMulNBits) per expert on its sorted rows, 1.1x-2.5x faster on the "
                  "CPU (1.7x-7x against QMoE for int4), but for int8 weights with float activations, which take "
                  "QMoE first")

ALL = (DUMP_DIR, LOGS, VERIFY, CACHE_DIR, CAPTURE_CACHE, ONNX_CACHE, WATCH_WEIGHTS, RECOGNIZE_SEARCH_S, SLOW_STEP_S,
       AUTOTUNE, CUDA_GRAPHS, CUDA_GRAPH_MAX_TOKENS, CUDA_GRAPH_REPEAT_MAX_TOKENS, CUDA_GRAPH_PROBE_MAX_TOKENS,
       CUDA_GRAPH_MAX_GRAPHS, TRITON_TMA, TRITON_WS, TRITON_WS_GEMM1_MIN_ROWS,
       TRITON_DECODE_MAX_TOKENS, TRITON_PDL, TRITON_ROUTER_GEMV, ORT_THREADS, ORT_SPIN, AUTO_MAX_DENSE_WORK, ORT_MOE_OP)


def cache_dir() -> Path:
    """``MOECC_CACHE_DIR``, else ``$XDG_CACHE_HOME/moecc`` (``~/.cache/moecc``)."""
    root = CACHE_DIR.get() or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moecc")
    return Path(root)
