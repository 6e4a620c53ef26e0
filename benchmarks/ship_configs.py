"""Merge a tuning cache (``$MOECC_CACHE_DIR/triton_configs.json``) into the shipped defaults.

    python benchmarks/ship_configs.py path/to/triton_configs.json

Shipped keys drop the Triton version: the tiles stay good leads across releases, and a user's own tuning (keyed
with the version) always takes precedence."""

from __future__ import annotations

import json
import sys

from moecc.codegen.triton.configs import SHIPPED


def main() -> None:
    shipped = json.loads(SHIPPED.read_text()) if SHIPPED.exists() else {}
    for path in sys.argv[1:]:
        for key, cfg in json.loads(open(path).read()).items():
            device, _triton, rest = key.split("|", 2)
            shipped[f"{device}|{rest}"] = cfg
    SHIPPED.write_text(json.dumps(shipped, indent=1, sort_keys=True) + "\n")
    print(f"{len(shipped)} shipped configs in {SHIPPED}")


if __name__ == "__main__":
    main()
