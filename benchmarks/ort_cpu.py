"""CPU benchmark of the ONNX Runtime backend (same as ``moecc bench``).

    python benchmarks/ort_cpu.py [--tokens 1 16 128 512] [--shapes olmoe mixtral_small] [--layers 4]"""

import sys

from moecc.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
