"""Tile configs for the grouped GEMMs: shipped defaults for Hopper, a heuristic elsewhere, and a persistent
autotuning cache keyed by (GPU, Triton version, dtype, E, N, K, token bucket)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moecc import knobs

log = logging.getLogger("moecc.codegen.triton")


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def token_bucket(tokens: int) -> int:
    return 1 if tokens <= 1 else 1 << (tokens - 1).bit_length()


def heuristic(rows_per_expert: float, dtype: torch.dtype, interpret: bool) -> TileConfig:
    """A reasonable config without tuning: small row blocks for decode, large tiles for prefill."""
    if interpret:
        return TileConfig(16, 32, 32, 1, 1, 1)
    if rows_per_expert <= 16:
        return TileConfig(16, 64, 128, 1, 4, 4)
    if rows_per_expert <= 64:
        return TileConfig(32, 64, 128, 4, 4, 4)
    if rows_per_expert <= 256:
        return TileConfig(64, 128, 64, 8, 4, 4)
    return TileConfig(128, 128, 64, 8, 8, 4)


SHIPPED = Path(__file__).with_name("configs.json")


def _cache_dir() -> Path:
    root = knobs.CACHE_DIR.get() or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                  "moecc")
    return Path(root)


def _key(device_name: str, dtype: torch.dtype, e: int, n: int, k: int, bucket: int, which: str) -> str:
    import triton

    dt = str(dtype).replace("torch.", "")
    return f"{device_name}|triton {triton.__version__}|{dt}|E{e}|N{n}|K{k}|T{bucket}|{which}"


def _shipped_key(device_name: str, dtype: torch.dtype, e: int, n: int, k: int, bucket: int, which: str) -> str:
    return f"{device_name}|{str(dtype).replace('torch.', '')}|E{e}|N{n}|K{k}|T{bucket}|{which}"


_memory: dict[str, TileConfig] = {}


def lookup(device_name: str, dtype, e, n, k, bucket, which) -> TileConfig | None:
    key = _key(device_name, dtype, e, n, k, bucket, which)
    if key in _memory:
        return _memory[key]
    for path, k2 in ((_cache_dir() / "triton_configs.json", key),
                     (SHIPPED, _shipped_key(device_name, dtype, e, n, k, bucket, which))):
        if path.exists():
            table = json.loads(path.read_text())
            if k2 in table:
                _memory[key] = TileConfig(**table[k2])
                return _memory[key]
    return None


def store(device_name: str, dtype, e, n, k, bucket, which, cfg: TileConfig) -> None:
    key = _key(device_name, dtype, e, n, k, bucket, which)
    _memory[key] = cfg
    path = _cache_dir() / "triton_configs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(path.read_text()) if path.exists() else {}
    table[key] = asdict(cfg)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    tmp.replace(path)


CANDIDATES = [TileConfig(m, n, k, g, w, s) for (m, n, k, g, w, s) in (
    (16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 3), (32, 64, 128, 4, 4, 4), (32, 128, 64, 4, 4, 4),
    (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (64, 128, 128, 8, 8, 3), (128, 128, 64, 8, 8, 4),
    (128, 256, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3))]
