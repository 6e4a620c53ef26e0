"""The ``moecc`` command: export, inspect, run, bench."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import torch
import torch.utils._pytree as pytree


def _factory(spec: str):
    """``pkg.module:factory`` or ``path/to/file.py:factory``."""
    if ":" not in spec:
        raise SystemExit(f"moecc: expected a model folder or MODULE:FACTORY, got {spec!r}")
    module_name, attr = spec.rsplit(":", 1)
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name).resolve()
        sys.path.insert(0, str(path.parent))
        loader = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SystemExit(f"moecc: {module_name} has no {attr!r}") from None


def _pretrained(folder: Path, batch: int, seq_len: int, device: str | None, dtype: str | None):
    """A Hugging Face model saved in ``folder`` (``config.json`` beside its weights), loaded from there alone, in
    eval mode, on ``device`` in ``dtype`` (default: the checkpoint's), and an example of random token ids
    ``[batch, seq_len]``. A causal LM where transformers has one for its config, else the bare model."""
    try:
        import transformers
    except ImportError:
        raise SystemExit("moecc: exporting a model folder needs transformers (pip install transformers)") from None
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    causal = type(config) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    device = device or "cpu"
    model = auto.from_pretrained(folder, local_files_only=True, dtype=getattr(torch, dtype) if dtype else "auto")
    model = model.to(device).eval()
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if not vocab:
        raise SystemExit(f"moecc: {folder}'s config gives no vocab_size to draw example token ids from; pass a "
                         "MODULE:FACTORY that returns (model, example) instead")
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids.to(device)}


def _model_and_example(spec: str, batch: int, seq_len: int, device: str | None = None, dtype: str | None = None):
    """(model, example) of ``moecc export``'s first argument: a model folder, or a factory."""
    folder = Path(spec)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise SystemExit(f"moecc: {spec} is a folder without config.json: expected a Hugging Face model folder "
                             "or MODULE:FACTORY")
        return _pretrained(folder, batch, seq_len, device, dtype)
    return _factory(spec)()


def _split_example(example):
    """A factory's example: a tuple of args, a dict of kwargs, or (args, kwargs)."""
    if isinstance(example, dict):
        return (), example
    if isinstance(example, tuple) and len(example) == 2 and isinstance(example[1], dict) and isinstance(
            example[0], (tuple, list)):
        return tuple(example[0]), example[1]
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def cmd_export(a) -> int:
    from rich.console import Console

    import moecc

    console = Console(stderr=True)
    model, example = _model_and_example(a.model, a.batch, a.seq_len, a.device, a.dtype)
    args, kwargs = _split_example(example)
    options = {"verify": not a.no_verify}
    if a.quantize:
        options.update(quantize=a.quantize, quant_block_size=a.block_size)
    calibration = _split_example(torch.load(a.calibration, weights_only=False)) if a.calibration else None
    with console.status("exporting") as status:
        path = moecc.export(model, args, a.output, kwargs=kwargs, backend=a.backend, calibration=calibration,
                            progress=lambda msg: status.update(f"{msg}..."), **options)
    console.print(f"wrote {path}", markup=False)
    return 0


def cmd_inspect(a) -> int:
    from moecc.report import print_tables, read_record, record_folders, write_html

    folders = record_folders(a.path)
    for folder in folders:
        record = read_record(folder)
        if len(folders) > 1:
            print(f"== {folder}")
        print_tables(record)
        if a.html:
            page = Path(a.html)
            if len(folders) > 1:
                page = page.with_name(f"{page.stem}.{folder.name}{page.suffix}")
            print(f"wrote {write_html(record, page)}")
    return 0


def cmd_run(a) -> int:
    import moecc

    model = moecc.load(a.path, device=a.device)
    example = torch.load(a.input, weights_only=False, map_location="cpu")
    # saved inputs run where the program's weights are (those of an artifact exported on a GPU, there)
    device = a.device or model.manifest.get("device", "cpu")
    example = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), example)
    args, kwargs = _split_example(example)
    out = model(*args, **kwargs)
    leaves = out.items() if isinstance(out, dict) else enumerate(out if isinstance(out, tuple) else (out,))
    for name, value in leaves:
        if isinstance(value, torch.Tensor):
            print(f"{name}: {tuple(value.shape)} {str(value.dtype).replace('torch.', '')} "
                  f"mean {value.float().mean().item():.6g} std {value.float().std().item():.6g}")
    if a.output:
        out = out if not isinstance(out, dict) else dict(out)
        torch.save(pytree.tree_map_only(torch.Tensor, lambda t: t.cpu(), out), a.output)  # readable anywhere
        print(f"wrote {a.output}")
    return 0


def cmd_bench(a) -> int:
    from moecc.bench import run_cpu_bench

    run_cpu_bench(tokens=a.tokens, reps=a.reps, shapes=a.shapes, layers=a.layers, variants=a.variants)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="moecc", description="moecc: a compiler for Mixture-of-Experts inference")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="compile a model and write an artifact")
    e.add_argument("model", help="a Hugging Face model folder (config.json and weights), or MODULE:FACTORY: a "
                   "function that returns (model, example inputs)")
    e.add_argument("--batch", type=int, default=2, help="a model folder's example: sequences of random token ids")
    e.add_argument("--seq-len", type=int, default=16, help="a model folder's example: tokens per sequence")
    e.add_argument("--device", help="a model folder's device (cuda for the triton backend); default: cpu")
    e.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="a model folder's dtype; default: its checkpoint's")
    e.add_argument("-o", "--output", required=True, help="artifact folder, or a file ending in .moecc")
    e.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "torch", "triton", "reference"])
    e.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantized experts (onnxruntime)")
    e.add_argument("--block-size", type=int, default=0, help="quantization block size (0: per channel)")
    e.add_argument("--no-verify", action="store_true", help="skip the check against eager on fresh inputs")
    e.add_argument("--calibration", help="a .pt batch (like the example) whose per-expert load `inspect --html` "
                   "draws; default: the example")
    e.set_defaults(func=cmd_export)
    i = sub.add_parser("inspect", help="tables of MoE layers and passes of an artifact or a dump folder")
    i.add_argument("path")
    i.add_argument("--html", help="also write an HTML page (graph picture, per-expert load histograms)")
    i.set_defaults(func=cmd_inspect)
    r = sub.add_parser("run", help="run an artifact on inputs saved with torch.save")
    r.add_argument("path")
    r.add_argument("--input", required=True, help="a .pt file: a tuple of args, a dict of kwargs, or (args, kwargs)")
    r.add_argument("--output", help="save the outputs here")
    r.add_argument("--device", help="where to run the program (torch and Triton programs); default: where it was "
                   "exported")
    r.set_defaults(func=cmd_run)
    b = sub.add_parser("bench", help="CPU benchmark: HF eager and grouped_mm against moecc ORT fp32/int8/int4")
    b.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    b.add_argument("--reps", type=int, default=10)
    b.add_argument("--shapes", nargs="+", default=["olmoe", "mixtral_small"])
    b.add_argument("--layers", type=int, default=4, help="layers of the end-to-end model (0: skip it)")
    b.add_argument("--variants", nargs="+", help="moecc variants to time (default: all; names as the columns)")
    b.set_defaults(func=cmd_bench)
    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except Exception as exc:  # noqa: BLE001 - a CLI reports errors, it does not dump tracebacks
        from moecc.errors import MoeccError

        if isinstance(exc, (MoeccError, FileNotFoundError, ValueError, TypeError)):
            print(f"moecc {a.cmd}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
