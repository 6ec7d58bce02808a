"""The gate now against the gate before issue 21 (commit 22cfb1e), side by side (issue 21).

Target: the gate on 256 ECGs, all methods with reference rows and a family of two, at least
2x faster than before on the same machine.

    python benchmarks/bench_gate_speed.py --packages PKGS --out /tmp/bench_gate_speed --ecgs 64

``--packages`` holds seed-0, seed-1, seed-2 (packages or training runs, as ``ecgx experiments``
takes them): seed-0 is gated, the others are its family. The gate of commit ``--base``
(default 22cfb1e, "today" in issue 21) is installed once, not editable, into ``--base-site``
(``git worktree add`` of that commit, then ``pip install --no-deps --target``); each run is
its own Python process, the old one with that folder first on PYTHONPATH, the new one with
this checkout. Both use the same validation ECGs (synthesised with a seed the demo's training
data does not use), the same policy and the same packages; the order alternates over
``--repeats`` so neither always runs on a warmer or quieter machine, and the best of each is
compared. The script says whether the two reports are equal (the time, timings and the row
drawn from fresh operating-system entropy aside).

The 256-ECG target run (about 10 minutes a pair on a quiet 2-vCPU machine):

    python benchmarks/bench_gate_speed.py --packages PKGS --out /tmp/bench_gate_speed --ecgs 256 --repeats 2

``--micro`` (seconds, no packages) times only the two parts sped up in place, the plain path
(as before issue 21) against the reuse path, in CPU seconds: one map's perturbed ECGs for every
strategy, order and step, and ranking randomised maps; it checks both give the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

BASE_COMMIT = "22cfb1e"
PIP_TARGET = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
REPO = Path(__file__).resolve().parent.parent


def comparable(report: dict) -> dict:
    """The report without what differs between any two runs."""
    r = {k: v for k, v in report.items() if k not in ("created", "timings_s")}
    r["references"] = {k: v for k, v in r.get("references", {}).items() if k != "ref:unseeded_random"}
    return r


def child(args: argparse.Namespace) -> None:
    """One gate run in this process (old or new, whichever ``ecgx`` the path gives)."""
    from ecgx.validation.gate import run_gate

    t0 = time.perf_counter()
    run = run_gate(
        args.gated,
        args.data,
        family=args.family,
        policy=args.policy,
        workers=args.workers,
        show_progress=False,
        research=args.ecgs < 256,  # the policy floor asks for 256
    )
    wall = time.perf_counter() - t0
    # CPU seconds of the whole process (every thread): on a shared machine less at the mercy of
    # the neighbours than the wall clock, though not free of them (caches, memory bandwidth).
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    timings = {**run.report["timings_s"], "wall clock": wall, "CPU (process)": cpu}
    out = {"timings": timings, "report": comparable(run.report)}
    args.result.write_text(json.dumps(out, sort_keys=True))


def micro(ecgs: int, repeats: int) -> None:
    """CPU seconds of the two parts sped up in place, plain path vs reuse path, same numbers: one
    map's perturbed ECGs for every strategy, order and step (with a cheap stand-in for the model,
    so the numpy is what is timed), and ranking randomised maps (32 ECGs, 12 x 600)."""
    import numpy as np
    from scipy.stats import rankdata

    from ecgx.validation.perturbation import STANDARD_LEADS, lead_basis, perturbation_curves_on
    from ecgx.validation.randomisation import average_ranks

    class StandIn:
        def logits(self, batch: np.ndarray) -> np.ndarray:
            return np.repeat(batch[:, :, ::37].sum(axis=(1, 2))[:, None], 5, axis=1)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((ecgs, 12, 600)).astype(np.float32)
    target = rng.integers(0, 5, ecgs)
    attribution = np.abs(x) * rng.random(x.shape).astype(np.float32)
    settings = dict(
        strategies=["zero", "lead_mean", "linear", "noisy_linear"],
        window=50,
        steps=12,
        noise_scale=1.0,
        seed=0,
        basis=lead_basis(STANDARD_LEADS),
    )

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        return min(times)

    def curves(reuse: bool):
        return perturbation_curves_on([StandIn()], x, target, attribution, reuse=reuse, **settings)[0]

    plain, reused = curves(False), curves(True)
    same = plain.morf == reused.morf and plain.lerf == reused.lerf
    same = same and all(np.array_equal(plain.score[k], reused.score[k]) for k in plain.score)
    maps = np.abs(rng.standard_normal((32, 7200)).astype(np.float32)).astype(np.float64)
    maps[::3, ::5] = 0.0  # ties
    ranks_same = average_ranks(maps).tobytes() == rankdata(maps, axis=1).tobytes()
    print("| part | plain (CPU s) | reuse (CPU s) | ratio | same numbers |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, old, new, eq in (
        (f"perturbed ECGs, one map, {ecgs} ECGs", lambda: curves(False), lambda: curves(True), same),
        (
            "ranks of 32 maps (x 20)",
            lambda: [rankdata(maps, axis=1) for _ in range(20)],
            lambda: [average_ranks(maps) for _ in range(20)],
            ranks_same,
        ),
    ):
        a, b = best(old), best(new)
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {eq} |")


def install_base(commit: str, site: Path) -> None:
    """The gate of ``commit`` installed (not editable) into ``site``, once."""
    if (site / "ecgx" / "validation" / "gate.py").is_file():
        return
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True)
        try:
            subprocess.run(
                [*PIP_TARGET, str(site), str(tree)],
                check=True,
            )
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)


def run_one(side: str, site: Path, args: argparse.Namespace, packages: list[Path], data: Path) -> dict:
    result = args.out / f"{side}.json"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if side == "before":
        env["PYTHONPATH"] = str(site)
    cmd = [sys.executable, __file__, "--child", "--gated", str(packages[0]), "--data", str(data)]
    cmd += ["--family", *map(str, packages[1:3]), "--policy", str(args.out / "policy.toml")]
    cmd += ["--ecgs", str(args.ecgs), "--result", str(result), "--out", str(args.out)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    # Run from the output folder: the checkout's own folders must not shadow the old install.
    subprocess.run(cmd, check=True, env=env, cwd=args.out)
    return json.loads(result.read_text())


def differences(a: dict, b: dict) -> list[str]:
    """Which top-level parts (and which methods' entries) of two reports differ."""
    keys = sorted(set(a) | set(b))
    diff = [k for k in keys if k != "methods" and a.get(k) != b.get(k)]
    am, bm = a.get("methods", {}), b.get("methods", {})
    diff += [f"methods.{m}" for m in sorted(set(am) | set(bm)) if am.get(m) != bm.get(m)]
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", type=Path, help="folder with seed-<s> packages or runs (>= 3)")
    ap.add_argument("--out", type=Path, required=True, help="scratch folder")
    ap.add_argument("--ecgs", type=int, default=256, help="validation ECGs (default 256)")
    ap.add_argument("--workers", type=int, default=None, help="methods side by side (default: CPU count)")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs, order alternating (default 1)")
    ap.add_argument("--micro", action="store_true", help="time only the parts sped up in place (seconds)")
    ap.add_argument("--first", choices=("before", "now"), default="before", help="which runs first")
    ap.add_argument("--base", default=BASE_COMMIT, help=f"the commit to compare with (default {BASE_COMMIT})")
    ap.add_argument("--base-site", type=Path, default=None, help="its install (default OUT/base-site)")
    # The child process's own arguments.
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gated", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--family", type=Path, nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--policy", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.micro:
        micro(args.ecgs, max(args.repeats, 3))
        return
    if args.packages is None:
        ap.error("--packages is required")

    from ecgx.training.data.synth import synthesize_dataset
    from ecgx.validation.experiments import find_packages

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    site = (args.base_site or args.out / "base-site").resolve()
    install_base(args.base, site)
    data = synthesize_dataset(
        args.out / "validation", args.ecgs, seed=1000, overwrite=True, show_progress=False
    )
    packages = [p.resolve() for p in find_packages(args.packages, args.out / "exported")]
    (args.out / "policy.toml").write_text(f"[gate]\necgs = {args.ecgs}\n")
    timings: dict[str, list[dict[str, float]]] = {"before": [], "now": []}
    reports: dict[str, dict] = {}
    for r in range(args.repeats):
        first = ("before", "now") if args.first == "before" else ("now", "before")
        for side in first if r % 2 == 0 else first[::-1]:
            t0 = time.perf_counter()
            res = run_one(side, site, args, packages, Path(data).resolve())
            print(f"{side}: {time.perf_counter() - t0:.1f} s (process)", file=sys.stderr)
            timings[side].append(res["timings"])
            reports[side] = res["report"]

    machine = platform.processor() or platform.machine()
    cpus = os.cpu_count()
    print(f"## Gate speed, before issue 21 ({args.base}) vs now, {date.today()}, {machine}, {cpus} CPUs")
    print(
        f"package {packages[0].name}, family {len(packages[1:3])}, {args.ecgs} ECGs, all methods and "
        f"reference rows, {args.repeats} pair(s) of runs, order alternating, best of each"
    )
    print("| step | before (s) | now (s) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for step in timings["before"][0]:
        if step not in timings["now"][0]:
            continue
        old = min(t[step] for t in timings["before"])
        new = min(t[step] for t in timings["now"])
        print(f"| {step} | {old:.1f} | {new:.1f} | {old / new if new else float('nan'):.2f}x |")
    diff = differences(reports["before"], reports["now"])
    print(f"reports equal (time, timings and ref:unseeded_random aside): {not diff}")
    if diff:
        print(f"parts that differ: {', '.join(diff)}")


if __name__ == "__main__":
    main()
