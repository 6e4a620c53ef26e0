import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("MOECC_LOGS", "error")
# tuned tiles and captures stay inside the test session (compiles of the same tiny model then hit the capture cache)
os.environ.setdefault("MOECC_CACHE_DIR", tempfile.mkdtemp(prefix="moecc-tests-"))
if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; must be set before moecc's Triton modules are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
