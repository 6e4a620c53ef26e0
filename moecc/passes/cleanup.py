"""cleanup: drop dead nodes and the sub-modules and weights nothing reads any more."""

from __future__ import annotations

from torch import fx

from moecc.passes.base import MoePass, PassResult


class Cleanup(MoePass):
    name = "cleanup"

    def run(self, gm: fx.GraphModule) -> PassResult:
        before = len(gm.graph.nodes)
        changed = gm.graph.eliminate_dead_code()
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        removed = 0
        for mod_name, mod in list(gm.named_modules()):
            for pname, _ in list(mod.named_parameters(recurse=False)):
                full = f"{mod_name}.{pname}" if mod_name else pname
                if full not in used and mod_name.endswith("_moe"):
                    delattr(mod, pname)
                    removed += 1
        changed = gm.delete_all_unused_submodules() or changed or removed > 0
        gm.graph.lint()
        gm.recompile()
        self.stats = {"nodes_removed": before - len(gm.graph.nodes), "weights_dropped": removed}
        return PassResult(gm, bool(changed) or before != len(gm.graph.nodes))
