"""Throughput of the synthetic median-beat generator on one CPU core, masks included.

    python benchmarks/bench_synth.py --n 20000

The thread-count variables are set before NumPy is imported, so BLAS runs
single-threaded whatever the shell says: the number is per core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from ecgx.training.data.synth import GENERATOR_VERSION, generate  # noqa: E402


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=_positive, default=20000, help="beats per timed run (default 20000)")
    parser.add_argument(
        "--chunk", type=_positive, default=1024, help="beats per generate() call (default 1024)"
    )
    parser.add_argument("--repeats", type=_positive, default=3, help="timed runs; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    generate(min(args.chunk, 256), np.random.default_rng(args.seed))  # warm-up
    best = float("inf")
    for r in range(args.repeats):
        rng = np.random.default_rng([args.seed, r])
        start = time.perf_counter()
        for begin in range(0, args.n, args.chunk):
            generate(min(args.chunk, args.n - begin), rng)
        best = min(best, time.perf_counter() - start)
    print(
        f"generator {GENERATOR_VERSION}: {args.n} beats in {best:.2f} s "
        f"= {args.n / best:,.0f} beats/s on one core (chunks of {args.chunk}, best of {args.repeats}; "
        f"numpy {np.__version__}, {platform.processor() or platform.machine()})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
