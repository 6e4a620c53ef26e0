"""Runtime support for dump files: load a stage's weights and check it against the captured reference."""

from __future__ import annotations

from pathlib import Path

import torch

from moecc.dump import INPUTS, MODULES, REFERENCE, WEIGHTS


def load_stage(module: torch.nn.Module, file: str, weights: dict[str, str], modules: dict[str, str]) -> None:
    from safetensors.torch import load_file

    folder = Path(file).resolve().parent
    tensors = load_file(folder / WEIGHTS)
    for attr, key in weights.items():
        module.register_buffer(attr, tensors[key])
    if modules:
        try:
            subs = torch.load(folder / MODULES, weights_only=False)
        except (ModuleNotFoundError, AttributeError) as exc:
            # the stage keeps modules of the caller's own code (MoE blocks left as written, or not yet lifted)
            raise RuntimeError(f"this stage holds modules of your own code, which {MODULES} saves by reference to "
                               f"their classes: run it where that code imports, e.g. with its folder on PYTHONPATH "
                               f"({exc})") from exc
        for attr, key in modules.items():
            if isinstance(subs[key], str):
                raise RuntimeError(f"this stage cannot be rebuilt: {subs[key]}")
            module.add_module(attr, subs[key])


def run_check(stage_cls, file: str, rtol: float = 1e-4) -> int:
    folder = Path(file).resolve().parent
    inputs = torch.load(folder / INPUTS, weights_only=False)
    reference = torch.load(folder / REFERENCE, weights_only=False)
    stage = stage_cls().eval()
    with torch.no_grad():
        outputs = stage(*inputs)
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    ok = len(outputs) == len(reference)
    worst = 0.0
    for got, ref in zip(outputs, reference):
        if isinstance(ref, torch.Tensor):
            if got.shape != ref.shape:
                ok = False
                continue
            denom = ref.double().norm().item() or 1.0
            err = (got.double() - ref.double()).norm().item() / denom
            worst = max(worst, err)
            ok = ok and err <= rtol
    print(f"{Path(file).name}: {'OK' if ok else 'MISMATCH'} ({len(outputs)} outputs, worst relative error {worst:.2e})")
    return 0 if ok else 1
