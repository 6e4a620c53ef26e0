"""Which fused MoE blocks made a compiled program disagree with eager.

Recognition proves a block's canonical form on random probes. A block whose behaviour those probes never reach (a
threshold on its routing weights that the model's own activations cross, a clamp of its output at a size random
tokens stay under) can pass them and still differ on the model's inputs. When the check on fresh inputs then
fails, each fused block's canonical module is run on the inputs that block received in eager on the failing
call, against what the block itself returned: a block whose canonical form differs there is left as written and
the model compiled again, rather than the compile failing as a whole. Where no fused block explains it, the capture
itself is run on that call against eager (``capture_to_blame``): a capture that computes otherwise there is
refused, and the model runs as written with each MoE block compiled alone."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils import _pytree as pytree

from moecc import module_state
from moecc.canonical import CanonicalMoE
from moecc.errors import DisagreementError, ExportError
from moecc.passes.recognize.probe import tensor_leaves
from moecc.routing import SCORES
from moecc.runtime.verify import CheckedProgram, _bound, _disagreement, _rel

log = logging.getLogger("moecc.runtime")


def _calls_of(model: nn.Module, names: list[str], args, kwargs, flat: list) -> dict[str, list]:
    """Each named block's calls in one eager call of the model: ``(args, kwargs, output)``."""
    calls: dict[str, list] = {}
    hooks = []
    for name in names:
        try:
            block = model.get_submodule(name)
        except AttributeError:
            continue
        hooks.append(block.register_forward_hook(
            lambda m, a, kw, out, _n=name: calls.setdefault(_n, []).append((a, kw, out)), with_kwargs=True))
    try:
        with torch.no_grad(), module_state.kept(model, flat):
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _canonical_output(module: nn.Module, analysis, args: tuple, kwargs: dict) -> torch.Tensor:
    leaves = pytree.tree_flatten((tuple(args[1:]), dict(kwargs)))[0]
    others = [leaves[i] for i in analysis.other_positions]
    with torch.no_grad():
        return tensor_leaves(module(args[0], *others))[0]


def disagreeing_blocks(model: nn.Module, canonical: dict, flat: list, in_spec, tolerance: float | None = None
                       ) -> dict[str, str]:
    """block path -> why its fused form is not the block, on the model's call ``flat`` (its inputs, flat by
    ``in_spec``); ``canonical``: block path -> its analysis, as recognition found it (``Recognize.canonical``)."""
    if not canonical:
        return {}
    args, kwargs = pytree.tree_unflatten(flat, in_spec)
    calls = _calls_of(model, list(canonical), args, kwargs, flat)
    found = {}
    for name, block_calls in calls.items():
        analysis = canonical[name]
        module = CanonicalMoE(analysis)
        for a, kw, out in block_calls:
            if not a or not isinstance(a[0], torch.Tensor):
                break
            ref = tensor_leaves(out)[0]
            try:
                got = _canonical_output(module, analysis, a, kw)
            except Exception as exc:  # noqa: BLE001 - a canonical form that cannot take this call is not the block
                found[name] = f"its fused form fails on the input it got ({type(exc).__name__}: {exc})"
                break
            err = _rel(got.reshape(ref.shape), ref) if got.numel() == ref.numel() else float("inf")
            if not err <= _bound(ref.dtype, tolerance):
                found[name] = (f"its fused form ({analysis.routing.describe()}; {analysis.expert.describe()}) passed "
                               "recognition's random probes but differs from the block on the model's own inputs "
                               f"(relative error {err:.2e} in the check on fresh inputs)")
                break
    return found


def verify_leaving_blocks(model: nn.Module, entry, info, tolerance: float | None, rebuild, verify) -> tuple:
    """``verify(model, entry, tolerance)``; where the program disagrees and fused blocks are found to
    (``disagreeing_blocks``), the program is built again by ``rebuild(left, refused)`` and checked again: a block
    fused with a canonical routing is first ``refused`` it (block path -> why), so that its routing as written
    feeds its fused experts; one that still differs, or was fused otherwise, is ``left`` as written. (entry, info)
    of the program that agrees; a disagreement no fused block explains is raised."""
    left: dict[str, str] = {}
    refused: dict[str, str] = {}
    while True:
        try:
            verify(model, entry, tolerance)
            return entry, info
        except DisagreementError as exc:
            found = {} if exc.inputs is None else disagreeing_blocks(model, info.canonical, exc.inputs, entry.in_spec,
                                                                     tolerance)
            found = {name: why for name, why in found.items() if name not in left}
            if not found:
                raise
            for name, why in found.items():
                if info.canonical[name].routing.score in SCORES and name not in refused:
                    log.warning("MoE block %s: %s; recognizing it again with its routing as written", name, why)
                    refused[name] = why
                else:
                    log.warning("MoE block %s left as written: %s", name, why)
                    left[name] = why
            entry, info = rebuild(dict(left), dict(refused))


def capture_to_blame(model: nn.Module, exc: DisagreementError, recapture, tolerance: float | None = None
                     ) -> ExportError | None:
    """An ExportError (the MoE blocks to compile alone in ``blocks``) when the capture itself, every block run as
    written (``recapture()``, a ``moecc.capture.Captured``; from the capture cache, cheap), disagrees with eager on
    the call the compiled program disagreed on (``exc.inputs``): code the model runs otherwise while traced, which
    ``capture_check`` did not see on the example (a bf16 model, or another input); else None."""
    if exc.inputs is None:
        return None
    try:
        cap = recapture()
        why = _disagreement(model, CheckedProgram(cap.in_spec, cap.gm, cap.tensor_pos), exc.inputs, tolerance)
    except Exception as other:  # noqa: BLE001 - the capture that was made once fails again: the first error stands
        log.debug("running the capture on the failing call raised", exc_info=other)
        return None
    if why is None:
        return None
    from moecc.discover import find_moe_blocks

    name = type(model).__name__
    refused = ExportError(f"torch.export captured {name}, but its program, every MoE block run as written, "
                          f"computes other numbers than {name} does in eager ({why}): the model's code takes "
                          "another path while traced")
    refused.unfused = dict(cap.unfused)
    refused.blocks = [(n, b) for n, b in find_moe_blocks(model) if n not in refused.unfused]
    return refused
