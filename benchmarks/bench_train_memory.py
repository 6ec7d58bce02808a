"""Training reads memory-mapped data: process memory stays far below the dataset size.

Synthesises a dataset of --n beats on disk, trains one short epoch on it and
reports the peak anonymous (heap) memory of the process next to the size of the
arrays on disk. File pages of the memory map are shared with the page cache and
reclaimable, so they are not the process's own memory; RssAnon is.

    python benchmarks/bench_train_memory.py --n 100000 --dir /tmp/bench_mem
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path

from ecgx.training.config import TrainConfig
from ecgx.training.data.synth import synthesize_dataset
from ecgx.training.models import ModelConfig
from ecgx.training.train import train_run


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_anon_mb()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_anon_mb())
            time.sleep(0.05)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dir", type=Path, default=Path("/tmp/ecgx_bench_mem"))
    p.add_argument("--beats-per-epoch", type=int, default=20_000)
    args = p.parse_args()
    data = args.dir / "data"
    if not (data / "meta.json").is_file():
        t0 = time.perf_counter()
        synthesize_dataset(data, args.n, seed=0, overwrite=True)
        print(f"synthesised {args.n} beats in {time.perf_counter() - t0:.0f} s")
    on_disk = sum(f.stat().st_size for f in data.glob("*.npy")) / 2**20
    before = rss_anon_mb()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    cfg = TrainConfig(max_epochs=1, max_beats_per_epoch=args.beats_per_epoch)
    train_run(data, [0], args.dir / "run", ModelConfig(), cfg, overwrite=True)
    sampler.stop.set()
    sampler.join()
    print(f"dataset: {args.n} beats, {on_disk:.0f} MiB on disk (signals + labels + masks)")
    print(
        f"RssAnon before training {before:.0f} MiB, peak during training {sampler.peak:.0f} MiB "
        f"({sampler.peak / on_disk:.2f}x the dataset), one epoch of {args.beats_per_epoch} beats "
        f"+ validation + test in {time.perf_counter() - t0:.0f} s"
    )
    shutil.rmtree(args.dir / "run", ignore_errors=True)


if __name__ == "__main__":
    main()
