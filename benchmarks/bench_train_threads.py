"""Training speed by torch thread count, on a quiet machine and beside a busy one.

Each run is a fresh process that trains the default model (README config) for a fixed
number of epochs on the same synthetic beats with ``torch.set_num_threads(T)``; the
"busy" condition starts one CPU-bound process beside it (another tenant, a test run),
as on a shared 2-core machine. Rounds alternate the settings so drift hits all alike.

    python benchmarks/bench_train_threads.py --n 4000 --epochs 3 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRAIN_ONE = """
import json, sys, time, torch
from ecgx.training.config import TrainConfig
from ecgx.training.models import ModelConfig
from ecgx.training.train import train_run
data, out, threads, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
cfg = TrainConfig(max_epochs=epochs, patience=epochs, threads=threads)
t0 = time.perf_counter()
train_run(data, [0], out, ModelConfig(), cfg, overwrite=True, show_progress=False)
print(json.dumps({"seconds_per_epoch": (time.perf_counter() - t0) / epochs}))
"""

BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end: pass\n"


def run_once(data: Path, out: Path, threads: int, epochs: int, busy: bool) -> float:
    hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        result = subprocess.run(
            [sys.executable, "-c", TRAIN_ONE, str(data), str(out), str(threads), str(epochs)],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds_per_epoch"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000, help="synthetic beats (70 %% train)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dir", type=Path, default=Path("/tmp/ecgx_bench_threads"))
    args = p.parse_args()
    from ecgx.training.data.synth import synthesize_dataset

    data = args.dir / "data"
    if not (data / "meta.json").is_file():
        synthesize_dataset(data, args.n, seed=0, overwrite=True, show_progress=False)
    times: dict[tuple[bool, int], list[float]] = {}
    for r in range(args.rounds):
        for busy in (False, True):
            for threads in args.threads if r % 2 == 0 else reversed(args.threads):
                t = run_once(data, args.dir / "run", threads, args.epochs, busy)
                times.setdefault((busy, threads), []).append(t)
                state = "busy " if busy else "quiet"
                print(f"round {r} {state} threads={threads}: {t:.2f} s/epoch", flush=True)
    day = time.strftime("%Y-%m-%d")
    print(f"\n{day}, {args.n} beats, {args.epochs} epochs, median of {args.rounds} rounds")
    for busy in (False, True):
        base = statistics.median(times[(busy, args.threads[0])])
        for threads in args.threads:
            med = statistics.median(times[(busy, threads)])
            label = "beside a busy process" if busy else "quiet machine"
            ratio = f"{med / base:.2f}x threads={args.threads[0]}"
            print(f"  {label:22s} threads={threads}: {med:6.2f} s/epoch  ({ratio})")


if __name__ == "__main__":
    main()
