"""Tile configs for the grouped GEMMs: shipped defaults for Hopper, a heuristic elsewhere, and a persistent
autotuning cache keyed by (GPU, Triton version, dtype, E, N, K, token bucket), each entry noting the top-k it was
tuned at."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from moecc import knobs
from moecc.files import replace_whole

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter runs the kernels (CPU tests)

log = logging.getLogger("moecc.codegen.triton")


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@functools.cache
def sm90_or_newer(device_index: int) -> bool:
    """Hopper or newer: TMA descriptors, programmatic dependent launch."""
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


@functools.cache
def tf32_tensor_cores(device_index: int) -> bool:
    """Ampere or newer: tensor cores that multiply TF32 (and so fp32 as three TF32 products)."""
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


@functools.cache
def shared_memory_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


@functools.cache
def fit_shared_memory(cfg: TileConfig, elt_bytes: int, b_tiles: int, limit: int) -> TileConfig:
    """``cfg`` with fewer pipeline stages, then a shorter K step, until its tiles fit ``limit`` bytes of shared
    memory: tiles tuned for 2-byte types need twice the room in fp32. The pipeliner keeps ``num_stages - 1`` tiles
    in flight; the launch still retries smaller tiles if the compiler disagrees (``shrink``)."""
    def need(c: TileConfig) -> int:
        return (c.num_stages - 1) * (c.block_m + b_tiles * c.block_n) * c.block_k * elt_bytes

    while need(cfg) > limit - 8 * 1024 and (smaller := shrink(cfg)) is not None:
        cfg = smaller
    return cfg


# fp32 accumulator elements a thread may hold: every tile the tuner measured fastest for a `tl.dot` GEMM stays
# within it, and a gated GEMM 1 tile of 128 x 256 with 8 warps (two accumulators, 256 a thread) took Mixtral's
# GEMM 1 at 1024 tokens 7.6 ms on an H200 against 0.5 ms for 128 x 128, its registers spilled
MAX_ACCUMULATORS_PER_THREAD = 128


@functools.lru_cache(maxsize=None)
def within_registers(cfg: TileConfig, accumulators: int) -> TileConfig:
    """``cfg`` with its columns halved until its ``accumulators`` fp32 tiles (2 for a gated GEMM 1) hold at most
    ``MAX_ACCUMULATORS_PER_THREAD`` elements a thread. Shipped or tuned tiles can exceed it where the tuner timed
    another kernel than the one that runs them (the Gluon GEMMs take none of a tile's sizes but its rows)."""
    threads = 32 * cfg.num_warps
    while cfg.block_n > 16 and accumulators * cfg.block_m * cfg.block_n > MAX_ACCUMULATORS_PER_THREAD * threads:
        cfg = replace(cfg, block_n=cfg.block_n // 2)
    return cfg


def shrink(cfg: TileConfig) -> TileConfig | None:
    """The next smaller tile: one pipeline stage less, then half the K step; None when nothing is left."""
    if cfg.num_stages > 2:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_k > 16:
        return replace(cfg, block_k=cfg.block_k // 2)
    return None


def token_bucket(tokens: int) -> int:
    return 1 if tokens <= 1 else 1 << (tokens - 1).bit_length()


def heuristic(rows_per_expert: float, dtype: torch.dtype, interpret: bool) -> TileConfig:
    """A reasonable config without tuning: small row blocks for decode, large tiles for prefill. fp32 (which no
    shipped table holds) takes narrower tiles with a K step of 32: each of its dots is three TF32 products of split
    operands (``grouped_gemm._precision``), and on an H200 these tiles were the fastest of four sets in all eight
    cells measured (Mixtral and Qwen3-MoE at 8 to 4096 tokens), 1.3-2.1x faster than the 16-bit set, which spent
    42 ms on Qwen3-MoE's 512 tokens against 1.4 (``benchmarks/RESULTS.md``, session 25)."""
    if interpret:
        return TileConfig(16, 32, 32, 1, 1, 1)
    tiles = HEURISTIC_FP32 if dtype == torch.float32 else HEURISTIC_16BIT
    return next(tile for most_rows, tile in tiles if rows_per_expert <= most_rows)


# (rows per expert at most, tile): the heuristic's tiles
HEURISTIC_16BIT = [(16, TileConfig(16, 64, 128, 1, 4, 4)), (64, TileConfig(32, 64, 128, 4, 4, 4)),
                   (256, TileConfig(64, 128, 64, 8, 4, 4)), (math.inf, TileConfig(128, 128, 64, 8, 8, 4))]
HEURISTIC_FP32 = [(16, TileConfig(16, 64, 32, 1, 4, 3)), (64, TileConfig(32, 64, 32, 4, 4, 3)),
                  (256, TileConfig(64, 64, 32, 8, 4, 3)), (math.inf, TileConfig(128, 64, 32, 8, 8, 3))]


SHIPPED = Path(__file__).with_name("configs.json")


def _key(device_name: str, dtype: torch.dtype, e: int, n: int, k: int, bucket: int, which: str) -> str:
    import triton

    dt = str(dtype).replace("torch.", "")
    return f"{device_name}|triton {triton.__version__}|{dt}|E{e}|N{n}|K{k}|T{bucket}|{which}"


def _shipped_key(device_name: str, dtype: torch.dtype, e: int, n: int, k: int, bucket: int, which: str) -> str:
    return f"{device_name}|{str(dtype).replace('torch.', '')}|E{e}|N{n}|K{k}|T{bucket}|{which}"


_memory: dict[tuple[str, int | None], TileConfig | None] = {}
_tables: dict[Path, dict] = {}
_chosen: dict[tuple, tuple[TileConfig, TileConfig]] = {}


def _table(path: Path) -> dict:
    if path not in _tables:
        _tables[path] = _read_table(path)
    return _tables[path]


def _read_table(path: Path) -> dict:
    """A table of tiles from disk: empty where there is none, or where it cannot be read (a damaged tuning cache is
    told about and ignored, and the next tuning writes it anew)."""
    if not path.exists():
        return {}
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            raise ValueError(f"a JSON {type(table).__name__}, not a table of tiles")
        return table
    except (OSError, ValueError) as exc:
        log.warning("ignoring the Triton tile table %s, which cannot be read: %s", path, exc)
        return {}


@contextlib.contextmanager
def _locked(path: Path):
    """Holds an advisory lock on ``path``'s lock file where the platform has one: processes tuning at once (workers
    of one server) add their tiles to the table in turn, none dropping another's."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _config(entry: dict) -> TileConfig:
    return TileConfig(**{name: entry[name] for name in TileConfig.__dataclass_fields__ if name in entry})


def _fits_top_k(entry: dict, top_k: int | None) -> bool:
    """Whether a table entry was tuned at this many pairs per token (entries without ``top_k`` fit any): the tiles
    follow the rows per expert, and a token bucket holds k times as many pairs at top-k as at top-1."""
    return top_k is None or entry.get("top_k") in (None, top_k)


def lookup(device_name: str, dtype, e, n, k, bucket, which, top_k: int | None = None) -> TileConfig | None:
    """The tuned (user cache) or shipped config for exactly this key and ``top_k`` (pairs per token, shared
    experts included), else None; misses are remembered too."""
    key = _key(device_name, dtype, e, n, k, bucket, which)
    if (key, top_k) not in _memory:
        found = None
        for entry in (_table(knobs.cache_dir() / "triton_configs.json").get(key),
                      _table(SHIPPED).get(_shipped_key(device_name, dtype, e, n, k, bucket, which))):
            if entry and _fits_top_k(entry, top_k):
                found = _config(entry)
                break
        _memory[(key, top_k)] = found
    return _memory[(key, top_k)]


def _family(device_name: str) -> str | None:
    """GPUs with the same multiprocessor (shared memory, tensor cores), whose tiles transfer."""
    for family, marks in (("hopper", ("H100", "H200", "H800", "H20", "GH200")), ("ampere", ("A100", "A800"))):
        if any(m in device_name for m in marks):
            return family
    return None


# which shipped dtype's tiles a dtype may start from, and at what distance: fp16 and bf16 run the same tensor-core
# instructions at the same element size, so their tiles transfer (only bf16 is shipped)
DTYPE_STEPS = {"float16": {"bfloat16": 0.5}, "bfloat16": {"float16": 0.5}}


def dtype_step(dtype, table_dtype: str) -> float | None:
    """Distance from ``dtype``'s tiles to those tuned for ``table_dtype``; None where they do not transfer."""
    dt = str(dtype).replace("torch.", "")
    return 0.0 if dt == table_dtype else DTYPE_STEPS.get(dt, {}).get(table_dtype)


def nearest_shipped(device_name: str, dtype, e, n, k, bucket, which, top_k: int | None = None) -> TileConfig | None:
    """The shipped config of the most similar shape on this device and dtype (rows per expert first, then N and
    K, then the expert count; tiles of a dtype that runs alike, ``DTYPE_STEPS``, count as a step further), or on a
    GPU of the same family when this one has none: an untuned shape starts from
    what was tuned for its neighbours rather than from a generic heuristic. Rows per expert count pairs
    (``bucket * top_k / e``) where the entry and the call both know their top-k, else tokens. The expert count
    breaks ties: Mixtral at 1024 tokens (256 rows per expert) is as far from its own 512-token tiles as from those
    of a 16-expert shape at 4096, whose GEMM 1 tiles took it 7.6 ms on an H200 against 0.5 for its own."""
    devices = {key.split("|", 1)[0] for key in _table(SHIPPED)}
    same = [device_name] if device_name in devices else [d for d in devices if _family(d) == _family(device_name)]
    best, best_d = None, float("inf")
    for key, entry in _table(SHIPPED).items():
        device, key_dt, rest = key.split("|", 2)
        step = dtype_step(dtype, key_dt)
        if device not in same or step is None or not key.endswith(f"|{which}"):
            continue
        e2, n2, k2, t2 = (int(part[1:]) for part in rest.split("|")[:4])
        per_token, per_token2 = (top_k, entry["top_k"]) if top_k and entry.get("top_k") else (1, 1)
        d = (abs(math.log2(bucket * per_token / e) - math.log2(t2 * per_token2 / e2))
             + 0.5 * abs(math.log2(n / n2)) + 0.5 * abs(math.log2(k / k2)) + 0.25 * abs(math.log2(e / e2)) + step)
        if d < best_d:
            best, best_d = _config(entry), d
    return best


def choose(device_name: str, dtype, e: int, hidden: int, inter: int, tokens: int,
           pairs: int) -> tuple[TileConfig, TileConfig]:
    """(GEMM 1, GEMM 2) tiles: tuned or shipped for this key, else the nearest shipped shape, else the heuristic.
    Both GEMMs walk the same aligned rows, so GEMM 2 takes GEMM 1's block_m. Memoized: this runs per call."""
    bucket = token_bucket(tokens)
    top_k = max(1, round(pairs / tokens)) if tokens > 0 else None
    memo = (device_name, dtype, e, hidden, inter, bucket, token_bucket(pairs), top_k)
    if memo not in _chosen:
        cfgs = []
        for which, n, k in (("gemm1", inter, hidden), ("gemm2", hidden, inter)):
            cfg = lookup(device_name, dtype, e, n, k, bucket, which, top_k)
            cfg = cfg or nearest_shipped(device_name, dtype, e, n, k, bucket, which, top_k)
            cfgs.append(cfg or heuristic(pairs / max(e, 1), dtype, False))
        c1, c2 = cfgs
        if c2.block_m != c1.block_m:
            c2 = replace(c2, block_m=c1.block_m)
        _chosen[memo] = (c1, c2)
    return _chosen[memo]


def store(device_name: str, dtype, e, n, k, bucket, which, cfg: TileConfig, top_k: int | None = None) -> None:
    """Save a tuned config in the user cache, with the top-k (pairs per token) it was tuned at."""
    key = _key(device_name, dtype, e, n, k, bucket, which)
    for memo in [m for m in _memory if m[0] == key]:
        del _memory[memo]
    _chosen.clear()
    path = knobs.cache_dir() / "triton_configs.json"
    entry = {**asdict(cfg), **({"top_k": top_k} if top_k else {})}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            table = _read_table(path)  # as it is now: another process may have added tiles since this one read it
            table[key] = entry
            replace_whole(path, lambda tmp: tmp.write_text(json.dumps(table, indent=1, sort_keys=True)))
    except OSError as exc:  # a read-only or full disk: the tile still serves this process
        log.warning("could not store a tuned Triton tile in %s (%s): it serves this process only", path, exc)
        table = {**_table(path), key: entry}
    _tables[path] = table


# per block_m, the tiles worth timing on Hopper-class GPUs: narrow row blocks stream weights (decode), wide
# ones are compute tiles (prefill)
CANDIDATES: dict[int, list[TileConfig]] = {m: [TileConfig(m, *rest) for rest in tiles] for m, tiles in {
    16: [(64, 128, 1, 4, 4), (128, 128, 1, 4, 3), (64, 256, 1, 4, 3), (128, 64, 1, 4, 5), (32, 256, 1, 4, 4),
         (256, 64, 1, 4, 4), (64, 128, 1, 4, 6), (16, 256, 1, 2, 3), (16, 512, 1, 2, 2), (32, 256, 1, 4, 2),
         (32, 128, 1, 4, 3), (32, 512, 1, 4, 2)],
    32: [(64, 128, 4, 4, 4), (128, 64, 4, 4, 4), (128, 128, 4, 4, 3), (64, 256, 4, 4, 3), (256, 64, 4, 8, 4)],
    64: [(64, 64, 8, 4, 4), (128, 64, 8, 4, 4), (128, 128, 8, 8, 3), (256, 64, 8, 8, 3), (128, 64, 16, 4, 5),
         (256, 64, 16, 8, 4)],
    128: [(128, 64, 8, 8, 4), (256, 64, 8, 8, 3), (128, 128, 8, 8, 3), (128, 64, 16, 4, 4), (256, 64, 16, 8, 4),
          (256, 128, 8, 8, 3), (128, 64, 16, 8, 4), (128, 64, 8, 8, 3)],
}.items()}


def block_m_candidates(rows_per_expert: float) -> list[int]:
    """Row-block heights worth trying: padding an expert's rows to more than twice their count wastes the tile."""
    return [m for m in sorted(CANDIDATES) if m == 16 or m <= 2 * rows_per_expert]
