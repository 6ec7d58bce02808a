"""The gate with its shared work reused against the same gate recomputing everything (issue 21).

Target: the gate on 256 ECGs, all methods with reference rows and a family of two, at least
2x faster with reuse than without, side by side on the same machine.

    python benchmarks/bench_gate_reuse.py --packages demo/packages --out /tmp/bench_gate_reuse

``--packages`` holds seed-0, seed-1, seed-2 (``ecgx demo`` writes them): seed-0 is gated,
the others are its family. Both runs use the same validation ECGs (synthesised with a seed
the demo's training data does not use) and the same policy; the order alternates over
``--repeats`` so neither always runs on a warmer machine. The reports must be equal apart
from timings and the row drawn from fresh entropy; the script says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

from ecgx.training.data.synth import synthesize_dataset
from ecgx.validation.experiments import find_packages
from ecgx.validation.gate import run_gate


def comparable(report: dict) -> str:
    r = {k: v for k, v in report.items() if k not in ("created", "timings_s")}
    r["references"] = {k: v for k, v in r["references"].items() if k != "ref:unseeded_random"}
    return json.dumps(r, sort_keys=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", type=Path, required=True, help="folder with seed-<s> packages (>= 3)")
    ap.add_argument("--out", type=Path, required=True, help="scratch folder")
    ap.add_argument("--ecgs", type=int, default=256, help="validation ECGs (default 256)")
    ap.add_argument("--workers", type=int, default=None, help="methods side by side (default: CPU count)")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs, order alternating (default 1)")
    args = ap.parse_args()

    data = synthesize_dataset(
        args.out / "validation", args.ecgs, seed=1000, overwrite=True, show_progress=False
    )
    packages = find_packages(args.packages, args.out / "exported")
    policy = args.out / "policy.toml"
    policy.write_text(f"[gate]\necgs = {args.ecgs}\n")
    timings: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    reports: dict[bool, str] = {}
    for r in range(args.repeats):
        for reuse in (False, True) if r % 2 == 0 else (True, False):
            t0 = time.perf_counter()
            run = run_gate(
                packages[0],
                data,
                family=packages[1:3],
                policy=policy,
                workers=args.workers,
                show_progress=False,
                research=args.ecgs < 256,  # the policy floor asks for 256
                reuse=reuse,
            )
            timings[reuse].append({**run.report["timings_s"], "wall clock": time.perf_counter() - t0})
            reports[reuse] = comparable(run.report)

    machine = platform.processor() or platform.machine()
    print(f"## Gate reuse benchmark, {date.today()}, {machine}, {os.cpu_count()} CPUs")
    print(
        f"package {packages[0].name}, family {len(packages[1:3])}, {args.ecgs} ECGs, all methods and "
        f"reference rows, {args.repeats} pair(s) of runs, best of each"
    )
    print("| step | recompute (s) | reuse (s) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for step in timings[False][0]:
        old = min(t[step] for t in timings[False])
        new = min(t[step] for t in timings[True])
        print(f"| {step} | {old:.1f} | {new:.1f} | {old / new if new else float('nan'):.2f}x |")
    print(f"reports equal (timings and ref:unseeded_random aside): {reports[False] == reports[True]}")


if __name__ == "__main__":
    main()
