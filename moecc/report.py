"""What ``moecc inspect`` shows: a graph summary, tables of MoE layers and passes, and an HTML page."""

from __future__ import annotations

import html
import json
from pathlib import Path

from torch import fx


def graph_summary(gm: fx.GraphModule) -> list[dict]:
    """Nodes in order: name, kind (the op), inputs, and whether it is a moecc MoE op."""
    nodes = []
    for n in gm.graph.nodes:
        if n.op in ("get_attr",):
            continue
        target = n.target if n.op == "call_module" else getattr(n.target, "__name__", str(n.target))
        kind = str(n.target) if str(n.target).startswith("moecc.") else target if n.op != "output" else "output"
        inputs = [a.name for a in n.all_input_nodes if a.op != "get_attr"]
        nodes.append({"name": n.name, "op": str(kind), "inputs": inputs,
                      "moe": str(n.target).startswith("moecc.") or n.op == "call_module"})
    return nodes


def read_record(path: Path) -> dict:
    """An artifact's manifest.json or a dump folder's passes.json, as one shape."""
    path = Path(path)
    if (path / "manifest.json").exists():
        m = json.loads((path / "manifest.json").read_text())
        return {"kind": "artifact", "backend": m["backend"], "moe_layers": m["moe_layers"], "passes": m["passes"],
                "graph": m.get("graph", []), "files": m.get("files", {})}
    if (path / "passes.json").exists():
        m = json.loads((path / "passes.json").read_text())
        layers = m["moe_layers"]
        return {"kind": "dumps", "backend": "", "moe_layers": list(layers.values()) if isinstance(layers, dict)
                else layers, "passes": m["passes"], "graph": m.get("graph", []), "stages": m.get("stages", [])}
    raise FileNotFoundError(f"{path} is neither a moecc artifact (manifest.json) nor a dump folder (passes.json)")


def record_folders(path: Path) -> list[Path]:
    """``path`` when it holds a record (``read_record``), else its sub-folders that do: a blockwise compile dumps
    each MoE block in a ``block_<name>`` folder of its own."""
    path = Path(path)
    if (path / "manifest.json").exists() or (path / "passes.json").exists() or not path.is_dir():
        return [path]
    inner = sorted(p for p in path.iterdir() if p.is_dir() and (p / "passes.json").exists())
    return inner or [path]


def _why(layer: dict) -> str:
    """How a layer was lowered (and quantized), or why it was left as written."""
    why = layer.get("reason") or layer.get("lowering", "")
    return f"{why} [{layer['quantization']}]" if layer.get("quantization") else why


def _name(layer: dict) -> str:
    """A layer's path, with its block's where its experts were fused without the block."""
    return f"{layer['name']} (in {layer['block']})" if layer.get("block") else layer["name"]


def print_tables(record: dict, console=None) -> None:
    import sys

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # a pipe or a file gets full rows rather than an 80-column wrap
    console = console or Console(width=None if sys.stdout.isatty() else 220)
    t = Table(title=f"MoE layers ({record['kind']}{', ' + record['backend'] if record['backend'] else ''})")
    for col in ("layer", "E", "k", "H", "I", "routing", "experts", "shared", "capacity", "fused", "lowering / reason"):
        t.add_column(col)
    for layer in record["moe_layers"]:
        why = _why(layer)
        # cells are text, not rich markup: reasons hold brackets ("no [E=6, H=24] weight", "[int4 block 32]")
        t.add_row(*map(escape, (_name(layer), str(layer["num_experts"]), str(layer["top_k"]),
                                str(layer["hidden_size"]), str(layer["intermediate_size"]), layer["routing"],
                                layer["activation"], str(layer["shared_experts"]), layer.get("capacity", ""),
                                "yes" if layer["fused"] else "no", why)))
    console.print(t)
    p = Table(title="passes")
    for col in ("#", "pass", "ms", "modified", "matched"):
        p.add_column(col)
    for rec in record["passes"]:
        p.add_row(f"{rec['index']:03d}", rec["pass"], f"{rec['seconds'] * 1e3:.1f}", str(rec["modified"]),
                  escape(json.dumps(rec.get("stats", {}))[:80]))
    console.print(p)


def _graph_svg(nodes: list[dict]) -> str:
    row, width = 22, 560
    index = {n["name"]: i for i, n in enumerate(nodes)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{row * len(nodes) + 10}">']
    for i, n in enumerate(nodes):
        for src in n["inputs"]:
            j = index.get(src)
            if j is None:
                continue
            x = 150 - min(140, 6 * (i - j))
            parts.append(f'<path d="M160 {j * row + 14} C{x} {j * row + 14} {x} {i * row + 14} 160 {i * row + 14}" '
                         'fill="none" stroke="#bbb"/>')
    for i, n in enumerate(nodes):
        fill = "#f4a340" if n["moe"] else "#e8eef7"
        parts.append(f'<rect x="160" y="{i * row + 4}" width="390" height="{row - 4}" rx="4" fill="{fill}"/>'
                     f'<text x="166" y="{i * row + 18}" font-size="12" font-family="monospace">'
                     f'{html.escape(n["name"])} = {html.escape(n["op"])[:40]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _histogram_svg(counts: list[int]) -> str:
    if not counts:
        return "<p>no calibration load recorded</p>"
    top, bar, height = max(counts) or 1, 24, 120
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{bar * len(counts) + 10}" height="{height + 30}">']
    for e, c in enumerate(counts):
        h = int(height * c / top)
        parts.append(f'<rect x="{5 + e * bar}" y="{height - h + 5}" width="{bar - 4}" height="{h}" fill="#4a7bd0">'
                     f'<title>expert {e}: {c}</title></rect>'
                     f'<text x="{5 + e * bar}" y="{height + 22}" font-size="10">{e}</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_html(record: dict, out: Path) -> Path:
    layers = "".join(
        f"<h3>{html.escape(_name(layer))}</h3><p>{html.escape(layer['routing'])}, "
        f"{html.escape(layer['activation'])}, fused={layer['fused']} {html.escape(_why(layer))}</p>"
        f"<p>tokens per expert on the calibration batch:</p>{_histogram_svg(layer.get('expert_load', []))}"
        for layer in record["moe_layers"])
    passes = "".join(f"<tr><td>{r['index']:03d}</td><td>{html.escape(r['pass'])}</td>"
                     f"<td>{r['seconds'] * 1e3:.1f} ms</td><td>{r['modified']}</td></tr>" for r in record["passes"])
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>moecc inspect</title></head><body>"
            f"<h1>moecc {record['kind']}</h1><h2>MoE layers</h2>{layers}"
            f"<h2>passes</h2><table>{passes}</table>"
            f"<h2>graph</h2><p>MoE nodes are orange.</p>{_graph_svg(record['graph'])}</body></html>")
    out = Path(out)
    out.write_text(page)
    return out
