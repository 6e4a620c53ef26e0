"""The check of a compiled program against eager: on fresh inputs of the captured shapes (routing that differs from
the capture's), then on inputs of other shapes where the program takes symbolic ones.

A program exported with symbolic dims can still hold one shape's arithmetic (an index into a cache): ONNX Runtime
then fails at other shapes, or a guard export could not keep (a branch on ``seq == 8``) makes it compute other
numbers there. Such a program is pinned to the captured shapes (``pin_shapes``), so that every other shape gets its
own capture and its own check."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import sympy
import torch
from torch import nn
from torch.utils import _pytree as pytree

from moecc import module_state
from moecc.errors import DisagreementError, MoeccError
from moecc.logs import quiet_deepcopy

log = logging.getLogger("moecc.runtime")

# fresh inputs of the captured shapes: a program that holds one input's routing (an expert loop whose sizes an
# export kept) can agree with eager on one draw and not on the next (JetMoE's ONNX program did, on about half)
FRESH_DRAWS = 2
EXTRA_DRAWS = 4  # more of them when the program disagrees at other shapes
# the sizes each symbol takes in the other shapes checked: a little larger (odd: catches even-size assumptions),
# then about twice as large (a window, a top-k or a chunk that the captured size did not exceed)
OTHER_SIZES = (lambda n: n + 3, lambda n: 2 * n + 1)


def verify(model: nn.Module, entry, tolerance: float | None = None) -> None:
    """``check_fresh``, then ``check_other_shape``. A program that fails or disagrees at another shape is pinned to
    its own shapes; one that disagrees is first checked on ``EXTRA_DRAWS`` more draws of its own shape, since other
    numbers at other shapes may as well be other numbers for other values (JetMoE's ONNX program agreed on some
    draws of its own shape and not on others)."""
    check_fresh(model, entry, tolerance)
    failure = check_other_shape(model, entry, tolerance)
    if failure is None:
        return
    why, raised = failure
    if not raised:
        check_fresh(model, entry, tolerance, range(FRESH_DRAWS, FRESH_DRAWS + EXTRA_DRAWS))
    log.warning("the compiled %s is kept for its captured input shapes only: at other shapes %s; each new shape is "
                "captured and checked on its own", type(model).__name__, why)
    pin_shapes(entry)


def check_fresh(model: nn.Module, entry, tolerance: float | None = None, draws=range(FRESH_DRAWS)) -> None:
    """Compare with eager on fresh inputs (``draws``) whose routing differs from the capture's. In bf16/fp16 the
    bound also allows for the model's own rounding sensitivity (``rounding_sensitivity``), measured on the same
    inputs."""
    for draw in draws:
        flat = _fresh_like(entry.example_inputs, draw)
        why = _disagreement(model, entry, flat, tolerance)
        if why is not None:
            random = _eager_varies(model, entry, flat, tolerance)
            if random is not None:
                mode = " (it is in training mode: call model.eval() first)" if model.training else ""
                raise MoeccError(f"{type(model).__name__} itself gives other outputs each time it is called on the "
                                 f"same inputs ({random}){mode}: dropout or noise is active, and moecc compiles "
                                 "a deterministic inference program, which no check can compare with eager")
            err = DisagreementError(f"the compiled {type(model).__name__} disagrees with eager on fresh inputs "
                                    f"({why}). This is a moecc bug: please report it with MOECC_DUMP_DIR set. "
                                    "Compile with fuse=False to run without MoE fusion.")
            err.detail = why
            err.inputs = flat
            raise err


def _eager_varies(model: nn.Module, entry, flat: list, tolerance: float | None) -> str | None:
    """How far two eager calls on the same inputs are apart, when more than the check allows; else None."""
    outs = []
    for _ in range(2):
        args, kwargs = pytree.tree_unflatten(flat, entry.in_spec)  # containers of their own: a cache grows in place
        with torch.no_grad(), _as_found(model, flat):
            outs.append(pytree.tree_leaves(model(*args, **kwargs)))
    for a, b in zip(*outs):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            err = _rel(a, b)
            if not err <= _bound(a.dtype, tolerance):
                return f"relative difference {err:.2e}"
    return None


def check_other_shape(model: nn.Module, entry, tolerance: float | None = None) -> tuple[str, bool] | None:
    """(why, whether it raised) when the program fails or disagrees with eager on fresh inputs of other shapes
    (every symbolic size grown by each rule of ``OTHER_SIZES``); None when it agrees, has no symbolic sizes, or
    eager itself does not run there."""
    for grow in OTHER_SIZES:
        flat = _other_shape_like(entry, grow)
        if flat is None:
            return None
        args, kwargs = pytree.tree_unflatten(flat, entry.in_spec)
        try:
            with torch.no_grad(), _as_found(model, flat):
                ref = pytree.tree_leaves(model(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - the model's own limits (positions, caches): nothing to compare
            log.debug("no check at another shape: eager fails there (%s)", exc)
            continue
        shape = [tuple(flat[i].shape) for i in entry.tensor_pos]
        try:
            why = _disagreement(model, entry, flat, tolerance, ref)
        except Exception as exc:  # noqa: BLE001 - e.g. ONNX Runtime indexing past a size baked in at export
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"it fails ({first[:300]}) at input shapes {shape}", True
        if why is not None:
            return f"{why} at input shapes {shape}", False
    return None


def pin_shapes(entry) -> None:
    entry.shapes = [tuple(t.shape) for t in (entry.example_inputs[i] for i in entry.tensor_pos)]
    entry.symbols = [tuple(None for _ in s) for s in entry.shapes]
    entry.graphs = None


@dataclass
class CheckedProgram:
    """What the check runs against eager, when it is not a compiled entry: a program called with the tensors of
    ``flat`` at ``tensor_pos`` (the inputs ``in_spec`` flattens), its fused blocks in ``layers``."""

    in_spec: object
    runner: object
    tensor_pos: list
    layers: dict = field(default_factory=dict)


def _disagreement(model: nn.Module, entry, flat: list, tolerance: float | None, ref: list | None = None) -> str | None:
    """Why the program's outputs on ``flat`` are not eager's (``ref``, computed here when not given), or None."""
    args, kwargs = pytree.tree_unflatten(flat, entry.in_spec)
    with torch.no_grad():
        if ref is None:
            with _as_found(model, flat):
                ref = pytree.tree_leaves(model(*args, **kwargs))
        got = list(entry.runner(*[flat[i] for i in entry.tensor_pos]))
    kept = padding_mask(model, args, kwargs)
    sensitivity = None
    exact: list | None = None
    low = _low_precision(model)
    for i, (r, g) in enumerate(zip(ref, got)):
        if isinstance(r, torch.Tensor) and r.is_floating_point():
            if not isinstance(g, torch.Tensor) or g.shape != r.shape:
                return f"output {i} is {_described(g)} where eager's is {_described(r)}"
            err = _rel(_unpadded(g, kept), _unpadded(r, kept))
            # an fp32 output of a bf16 model (router logits, an auxiliary loss) carries the model's rounding
            dtype = low if low is not None and r.dtype in (torch.float32, torch.float64) else r.dtype
            tol = _bound(dtype, tolerance)
            if not err <= tol and dtype in (torch.bfloat16, torch.float16) and tolerance is None:
                if sensitivity is None:
                    names = [info.name for info in entry.layers.values() if info.fused]
                    # each call on containers of its own: eager updates a KV cache in ``args`` in place
                    again = lambda: pytree.tree_unflatten(flat, entry.in_spec)  # noqa: E731
                    sensitivity = rounding_sensitivity(model, names, again, ref, kept) if names else 0.0
                tol = max(tol, 3 * sensitivity)
            if err <= tol:
                continue
            why = (f"relative error {err:.2e} > {tol:g}"
                   + (f", 3x the model's own rounding sensitivity {sensitivity:.2e}" if sensitivity else ""))
            if low is not None and tolerance is None:
                if exact is None:
                    exact = _in_fp32(model, flat, entry.in_spec) or []
                if i < len(exact) and isinstance(exact[i], torch.Tensor) and exact[i].shape == r.shape:
                    ours = _rel(_unpadded(g, kept), _unpadded(exact[i], kept))
                    eager = _rel(_unpadded(r, kept), _unpadded(exact[i], kept))
                    if ours <= max(tol, eager):
                        log.debug("output %d: %s from eager in %s, but %.2e from the model in fp32 (eager: %.2e)",
                                  i, why, low, ours, eager)
                        continue
                    why += (f"; {ours:.2e} from the model computed in fp32, where eager in "
                            f"{str(low).removeprefix('torch.')} is {eager:.2e} from it")
            return why
    return None


def _in_fp32(model: nn.Module, flat: list, in_spec) -> list | None:
    """The outputs of a float32 copy of a bf16/fp16 ``model`` on ``flat`` (floating inputs cast, exactly), or None
    where the copy cannot be made or run (memory). Eager in low precision can stray further from the exact function
    than a compiled program does (a near tie of bf16 scores, which torch's top-k breaks by index, where moecc's
    gating scores in fp32 pick the larger): a program as close to this reference as eager is, or within the bound,
    is not wrong."""
    try:
        exact = quiet_deepcopy(model).float()
        cast = [v.float() if isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16) else v
                for v in flat]
        args, kwargs = pytree.tree_unflatten(cast, in_spec)
        with torch.no_grad():
            return pytree.tree_leaves(exact(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - out of memory, a model that cannot be copied or run in fp32
        log.debug("no fp32 reference for the check: %s", exc)
        return None


def _described(v) -> str:
    return f"of shape {list(v.shape)}" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"


def _as_found(model: nn.Module, flat: list):
    """An eager call that leaves the model's buffers and its inputs as it found them, for the program to start from
    the same state (a step count, a cache written in place)."""
    return module_state.kept(model, flat)


def _fresh_like(inputs: list, draw: int = 0) -> list:
    """New inputs of the same shapes whose values (so whose routing) differ from the capture's."""
    g = torch.Generator().manual_seed(4321 + draw)
    return [_fresh(v, tuple(v.shape), g) if isinstance(v, torch.Tensor) else v for v in inputs]


def _fresh(v: torch.Tensor, shape: tuple, g: torch.Generator) -> torch.Tensor:
    """Fresh values of ``v``'s kind at ``shape``: random floats of its scale, random ids below its largest; masks
    and flags keep their pattern (tiled or cut to the shape)."""
    if v.is_floating_point():
        scale = float(v.float().std()) if v.numel() > 1 else 1.0
        return (torch.randn(shape, generator=g) * scale).to(v)
    if v.dtype in (torch.int64, torch.int32) and v.numel() and v.max() > 1:
        return torch.randint(0, int(v.max()) + 1, shape, generator=g).to(v)
    return _resized(v, shape)


def _resized(v: torch.Tensor, shape: tuple) -> torch.Tensor:
    for dim, size in enumerate(shape):
        if v.shape[dim] != size and v.shape[dim] > 0:
            v = torch.cat([v] * -(-size // v.shape[dim]), dim).narrow(dim, 0, size)
    return v.contiguous()


def _other_shape_like(entry, grow) -> list | None:
    """Fresh inputs with every symbolic size ``grow(size)``, sizes that are expressions of symbols following; None
    when there is no symbol, or one whose captured size no plain dim gives."""
    symbols = getattr(entry, "symbols", None)
    if not symbols or all(s is None for dims in symbols for s in dims):
        return None
    tensors = [entry.example_inputs[i] for i in entry.tensor_pos]
    values: dict = {}
    for t, dims in zip(tensors, symbols):
        for size, expr in zip(t.shape, dims):
            if expr is not None and sympy.sympify(expr).is_Symbol:
                values[sympy.Symbol(expr)] = grow(int(size))
    flat = list(entry.example_inputs)
    g = torch.Generator().manual_seed(4322)
    for pos, t, dims in zip(entry.tensor_pos, tensors, symbols):
        shape = []
        for size, expr in zip(t.shape, dims):
            if expr is None:
                shape.append(int(size))
                continue
            e = sympy.sympify(expr)
            if not e.free_symbols <= set(values):
                return None
            shape.append(int(e.subs(values)))
        flat[pos] = _fresh(t, tuple(shape), g)
    return flat


def _low_precision(model: nn.Module) -> torch.dtype | None:
    """bf16 or fp16 when the model's parameters hold it (bf16 first), else None."""
    dtypes = {p.dtype for p in model.parameters()}
    return next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), None)


def _bound(dtype: torch.dtype, tolerance: float | None) -> float:
    """The relative error the check allows an output of ``dtype`` (before a bf16/fp16 rounding sensitivity)."""
    return tolerance or (1e-4 if dtype in (torch.float32, torch.float64) else 5e-2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance of ``a`` from ``b``; a NaN or an infinity in both at one position agrees there (a model
    whose own outputs hold them), in one alone makes the distance infinite."""
    a, b = a.double(), b.double()
    same = (a == b) | (a.isnan() & b.isnan())
    odd = ~same & ~(a.isfinite() & b.isfinite())
    if bool(odd.any()):
        return float("inf")
    diff = torch.where(same, 0.0, a - b)
    return (diff.norm() / (torch.where(b.isfinite(), b, 0.0).norm() + 1e-30)).item()


def padding_mask(model: nn.Module, args, kwargs) -> torch.Tensor | None:
    """The positions a Hugging Face-style ``attention_mask`` keeps ([batch, seq], True where not padding), when the
    call has one with padding. A position it masks out is padding whose outputs nobody reads, and with left padding
    its query attends to no key at all: a softmax over nothing, whose answer each attention implementation picks
    for itself (torch's is zero, and moecc's ONNX lowering keeps it), so the check does not compare them."""
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = kwargs
    mask = bound.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.is_floating_point() or bool(mask.all()):
        return None
    return mask != 0


def _unpadded(t: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """``t`` at the kept positions of its leading [batch, seq] dims, or of the [batch, heads, seq, head_dim] of a KV
    cache (a padded position's keys and values come from its hidden states); all of it when neither is the mask's."""
    if kept is None or t.dim() < 2:
        return t
    if tuple(t.shape[:2]) == tuple(kept.shape):
        return t[kept.to(t.device)]
    if t.dim() == 4 and (t.shape[0], t.shape[2]) == tuple(kept.shape):
        return t.transpose(1, 2)[kept.to(t.device)]
    return t


SENSITIVITY_DRAWS = 3  # a near tie flips under some noise draws and not others: the widest of a few is the spread


def rounding_sensitivity(model: nn.Module, block_names: list[str], call, ref: list,
                         kept: torch.Tensor | None = None) -> float:
    """How far the model's own outputs move when each MoE block's input carries noise of one rounding step of its
    dtype, the most over ``SENSITIVITY_DRAWS`` draws: the spread that two correct low-precision implementations may
    show (a token whose top-k is a near tie can pick other experts, and that difference grows through the layers
    after it). On a small input one such token decides it, and one draw of noise may or may not tip it. ``call()``
    gives the call's (args, kwargs), on containers of their own each time (a KV cache grows in place)."""
    return max(_moved_by_noise(model, block_names, *call(), ref, kept, seed)
               for seed in range(99, 99 + SENSITIVITY_DRAWS))


def _moved_by_noise(model: nn.Module, block_names: list[str], args, kwargs, ref: list, kept, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)

    def jitter(_mod, inputs):
        out = []
        for v in inputs:
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype in (torch.bfloat16, torch.float16):
                eps = torch.finfo(v.dtype).eps
                noise = torch.randn(v.shape, generator=g).to(v.device, torch.float32) * eps
                v = (v.float() * (1 + noise)).to(v.dtype)
            out.append(v)
        return tuple(out)

    hooks = [model.get_submodule(name).register_forward_pre_hook(jitter) for name in block_names]
    try:
        with torch.no_grad():
            moved = pytree.tree_leaves(model(*args, **kwargs))
    finally:
        for h in hooks:
            h.remove()
    return max((_rel(_unpadded(m, kept), _unpadded(r, kept)) for m, r in zip(moved, ref)
                if isinstance(r, torch.Tensor) and r.is_floating_point()), default=0.0)


# ops whose answer among equal values is each implementation's own: torch does not promise which index wins a tie
TIE_BREAKING = {"topk", "sort", "argsort", "argmax", "argmin", "kthvalue", "mode", "max.dim", "min.dim"}


def tie_breaking_ops(gm: torch.fx.GraphModule) -> list[str]:
    """The ops of ``gm`` that pick among equal values (top-k, sort, argmax...), as ``op in module path``. Left in a
    program after fusion, they sit outside the fused MoE blocks (a DeepSeek-V3.2 indexer's top-k over scores that a
    ReLU leaves at zero): translated to ONNX, they break ties their own way."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        op = node.target._schema.name.split("::")[-1]
        if op not in TIE_BREAKING and f"{op}.{node.target._overloadname}" not in TIE_BREAKING:
            continue
        where = node.meta.get("moecc_module")
        entry = f"{op} in {where}" if where else f"{op} in the model's forward" if where == "" else node.name
        if entry not in found:
            found.append(entry)
    return found
