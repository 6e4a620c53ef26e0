import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("MOECC_LOGS", "error")
if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; must be set before moecc's Triton modules are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
