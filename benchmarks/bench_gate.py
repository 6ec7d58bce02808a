"""How long the validation gate and the experiments report take (issue #4 targets).

Targets on 2 CPU cores: gating one package for all methods on 256 validation ECGs
within 10 minutes; the experiments report for 3 seeds within 30 minutes.

    python benchmarks/bench_gate.py --packages demo/packages --out /tmp/bench_gate

``--packages`` holds seed-0, seed-1, seed-2 (``ecgx demo`` writes them). The validation
set is synthesised with a seed the demo's training data does not use.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from pathlib import Path

from ecgx.training.data.synth import synthesize_dataset
from ecgx.validation.experiments import find_packages, write_experiments
from ecgx.validation.gate import run_gate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", type=Path, required=True, help="folder with seed-<s> packages (>= 3)")
    ap.add_argument("--out", type=Path, required=True, help="scratch folder")
    ap.add_argument("--ecgs", type=int, default=256, help="validation ECGs (default 256)")
    ap.add_argument("--workers", type=int, default=None, help="methods side by side (default: CPU count)")
    args = ap.parse_args()

    data = synthesize_dataset(
        args.out / "validation", args.ecgs, seed=1000, overwrite=True, show_progress=False
    )
    packages = find_packages(args.packages, args.out / "exported")
    policy = args.out / "policy.toml"
    policy.write_text(f"[gate]\necgs = {args.ecgs}\n")

    t0 = time.perf_counter()
    run = run_gate(
        packages[0], data, family=packages[1:], policy=policy, workers=args.workers, show_progress=False
    )
    gate_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    write_experiments(run, args.out / "report")
    figures_s = time.perf_counter() - t1

    timings = run.report["timings_s"]
    machine = platform.processor() or platform.machine()
    print(f"## Gate benchmark, {date.today()}, {machine}, {os.cpu_count()} CPUs")
    print(f"package {packages[0]}, family {len(packages) - 1}, {len(run.data.x)} ECGs, 17 methods")
    print("| step | seconds |")
    print("| --- | ---: |")
    for step, seconds in timings.items():
        print(f"| {step} | {seconds:.1f} |")
    print(f"| gate, wall clock | {gate_s:.1f} |")
    print(f"| report figures and HTML | {figures_s:.1f} |")
    print(f"| experiments report for {len(packages)} seeds (gate + figures) | {gate_s + figures_s:.1f} |")
    print(f"verdict {run.report['verdict']}; methods that pass: {', '.join(run.report['serve'])}")


if __name__ == "__main__":
    main()
