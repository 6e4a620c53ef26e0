"""cleanup: drop dead nodes and the sub-modules and weights nothing reads any more."""

from __future__ import annotations

from torch import fx

from moecc.passes.base import MoePass, PassResult
from moecc.passes.graph_utils import eliminate_dead_code, recompile


class Cleanup(MoePass):
    name = "cleanup"

    def run(self, gm: fx.GraphModule) -> PassResult:
        before = len(gm.graph.nodes)
        changed = eliminate_dead_code(gm.graph)
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        removed = 0
        for mod_name, mod in list(gm.named_modules()):
            if any(mod_name == c or mod_name.startswith(f"{c}.") for c in called):
                continue  # a block left as written reads its own weights
            named = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
            for pname, _ in named:
                full = f"{mod_name}.{pname}" if mod_name else pname
                if full not in used:
                    delattr(mod, pname)
                    removed += 1
        changed = gm.delete_all_unused_submodules() or changed or removed > 0
        gm.graph.lint()
        recompile(gm)
        self.stats = {"nodes_removed": before - len(gm.graph.nodes), "weights_dropped": removed}
        return PassResult(gm, bool(changed) or before != len(gm.graph.nodes))
