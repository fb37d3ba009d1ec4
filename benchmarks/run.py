"""`python -m benchmarks.run ...` is `ptft bench ...` (see ptft_jax/bench/benchmark.py)."""
import sys

from ptft_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
