"""Demo: compile a tiny Mixtral-style model and a user-written MoE module, check them against eager, print dumps."""

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from hf_models import make_inputs, make_model  # noqa: E402
from user_modules import LoopMoE, TinyModel  # noqa: E402

import moecc  # noqa: E402


@torch.no_grad()  # moecc programs are for inference: their outputs carry no gradient
def check(name, model, first, fresh, dump_dir):
    cm = moecc.compile(model, dump_dir=dump_dir)
    cm(**first) if isinstance(first, dict) else cm(first)
    ref = model(**fresh) if isinstance(fresh, dict) else model(fresh)
    got = cm(**fresh) if isinstance(fresh, dict) else cm(fresh)
    ref, got = (ref.logits, got.logits) if hasattr(ref, "logits") else (ref, got)
    err = ((got - ref).norm() / ref.norm()).item()
    print(f"\n{name}: relative error vs eager on fresh inputs {err:.2e}")
    for layer in cm.moe_layers:
        print(f"  {layer.name}: E={layer.num_experts} k={layer.top_k} {layer.routing}, {layer.activation}, "
              f"shared={layer.shared_experts}, fused={layer.fused} {layer.reason}")
    print(f"  dumps: {dump_dir}  (run any NNN_<pass>.py there to re-check that stage)")
    assert err < 1e-5


if __name__ == "__main__":
    root = tempfile.mkdtemp(prefix="moecc_demo_")
    check("tiny Mixtral", make_model("mixtral"), make_inputs("mixtral", 2, 8), make_inputs("mixtral", 3, 5, 1),
          os.path.join(root, "mixtral"))
    torch.manual_seed(0)
    check("user LoopMoE", TinyModel(LoopMoE()).eval(), torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (3, 5)),
          os.path.join(root, "user_loop"))
