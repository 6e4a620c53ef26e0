"""GPU: user blocks compiled in bf16 with the check on fresh inputs on, and their errors against the model in fp32.

    python benchmarks/bf16_fresh_check.py [--backend triton] [--device cuda]

Each block of ``tests/user_modules.py`` named below is built in fp32, copied to bf16 and compiled (the check runs);
a compile the check refuses is printed as FAILED with its message. Then, on three shapes, the relative error of
moecc's bf16 program and of eager bf16 against the fp32 model: where eager's own bf16 rounding ties a top-k (a
sigmoid router's saturated scores), moecc's gating, which scores in fp32, can be the closer one."""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

BLOCKS = {
    "post-norm per expert": ("PostNormedMoE", dict(per_expert=True, project=False)),
    "post-norm projected": ("PostNormedMoE", dict(per_expert=False, project=True)),
    "loop": ("LoopMoE", {}),
    "squared relu": ("SquaredReluMoE", {}),
}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> int:
    import user_modules

    import moecc

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--blocks", nargs="+", default=list(BLOCKS))
    args = ap.parse_args()
    for name in args.blocks:
        cls, kwargs = BLOCKS[name]
        torch.manual_seed(0)
        exact = user_modules.TinyModel(getattr(user_modules, cls)(**kwargs)).eval().to(args.device)
        model = user_modules.TinyModel(getattr(user_modules, cls)(**kwargs)).eval().to(args.device)
        model.load_state_dict(exact.state_dict())
        model = model.to(torch.bfloat16)
        try:
            cm = moecc.compile(model, backend=args.backend)
            with torch.no_grad():
                cm(torch.randint(0, 50, (4, 64), device=args.device))
                rows = []
                for shape in ((3, 11), (1, 3), (4, 64)):
                    x = torch.randint(0, 50, shape, device=args.device)
                    ref = exact(x).float()
                    ours, eager = _rel(cm(x).float(), ref), _rel(model(x).float(), ref)
                    rows.append(f"{shape}: moecc {ours:.1e}, eager {eager:.1e}")
            print(f"{name:<22} checked and compiled; against fp32: " + "; ".join(rows), flush=True)
        except Exception as exc:  # noqa: BLE001 - reported, the next block goes on
            print(f"{name:<22} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
