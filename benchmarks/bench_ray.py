"""Ray on one machine and what it projects to (issue 24): the gate locally vs on a local 2-worker
Ray cluster, batch attribution throughput per Ray worker, and the projected time of the study's
873,710 beats x 12 methods on N workers. One command measures everything and prints a markdown
section for benchmarks/RESULTS.md:

    python benchmarks/bench_ray.py --packages PKGS --out /tmp/bench_ray

``--packages`` holds seed-0 (gated) and, if present, seed-1 and seed-2 (its family), packages or
training runs as ``ecgx experiments`` takes them (bench_gate_speed.py does the same). The
validation ECGs are synthesised with seed 1000 (not the demo's training seeds).

1. The gate, ``--ecgs`` ECGs (default 1,024) and ``--methods``, twice, each in its own Python
   process: locally with 2 workers (threads) and with ``--ray`` on the cluster with 2 workers
   (actors). The ratio is Ray's overhead on one machine (the same two cores either way, so
   nothing to gain); the script checks that both reports carry the same numbers (the time,
   timings, the unseeded reference row and the ``execution`` record aside).
2. ``ecgx attribute``'s sharded run (validation/batch_attribute.py) with ONE Ray worker, per
   method: a run of one shard and a run of ``--attr-ecgs`` ECGs, differenced, give the steady
   ECGs per second per worker (the actor's start and engine load, paid once per worker in a long
   run, drop out).
3. On paper: 873,710 beats x 12 methods on N = 1, 8, 64, 512 workers, from the measured
   per-worker seconds per ECG (the mean over the measured methods, times 12), assuming linear
   scaling (independent shards, no shared state) and the gate's measured overhead ratio as the
   cost of Ray per worker. Real clusters add data reading and scheduling at scale; say so.

The cluster is a private local head (``ray start --head --num-cpus 2`` in its own temp dir and
process group, tests/ray_helpers.py), stopped at the end; ``--ray ADDRESS`` uses a running one.
Time: the gate is most of it (its perturbation check grows with ECGs x methods); see
benchmarks/RESULTS.md for a measured run and its command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STUDY_BEATS = 873_710
STUDY_METHODS = 12
PROJECT_WORKERS = (1, 8, 64, 512)
GATE_WORKERS = 2
# Two cheap methods (a gradient and a layer method): the gate's perturbation check grows with ECGs x
# methods, and with all 16 methods 1,024 ECGs take hours on 2 cores. Ray's overhead per call is
# what the ratio measures, and it does not depend on which methods run.
DEFAULT_GATE_METHODS = ("saliency", "gradcam")
VOLATILE = ("created", "timings_s", "execution")


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    """The report without what differs between two runs (and where it ran)."""
    r = {k: v for k, v in report.items() if k not in VOLATILE}
    r["references"] = {k: v for k, v in r.get("references", {}).items() if k != "ref:unseeded_random"}
    r["package"] = {k: v for k, v in r["package"].items() if k != "path"}
    return r


def gate_child(args: argparse.Namespace) -> None:
    """One gate run in this process, locally or on Ray (``--ray``)."""
    from ecgx.validation.gate import run_gate

    t0 = time.perf_counter()
    run = run_gate(
        args.gated,
        args.data,
        family=args.family or (),
        policy=args.policy,
        methods=args.methods,
        workers=GATE_WORKERS,
        show_progress=False,
        research=args.ecgs < 256,  # the policy floor asks for 256
        ray=args.ray,
    )
    wall = time.perf_counter() - t0
    out = {"wall": wall, "timings": run.report["timings_s"], "report": comparable(run.report)}
    out["execution"] = run.report.get("execution")
    args.result.write_text(json.dumps(out, sort_keys=True))


def run_gate_process(args: argparse.Namespace, packages: list[Path], data: Path, ray: str | None) -> dict:
    result = args.out / f"gate-{'ray' if ray else 'local'}.json"
    cmd = [sys.executable, __file__, "--child", "--gated", str(packages[0]), "--data", str(data)]
    cmd += ["--family", *map(str, packages[1:3]), "--policy", str(args.out / "policy.toml")]
    cmd += ["--ecgs", str(args.ecgs), "--result", str(result), "--out", str(args.out)]
    cmd += ["--methods", *args.methods, *(["--ray", ray] if ray else [])]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(result.read_text())


def timed_run(
    args: argparse.Namespace, gated: Path, data: Path, address: str, method: str, count: int
) -> float:
    """Seconds of one sharded run of ``count`` ECGs on one Ray worker (actor start included)."""
    from ecgx.service.methods import get_method
    from ecgx.validation.batch_attribute import Backend, make_spec, run_sharded

    params = {"seed": 0} if get_method(method).stochastic else {}
    spec, source = make_spec(
        package=gated,
        data=str(data),
        method=method,
        params=params,
        target=None,
        start=0,
        count=count,
        shard_size=args.shard_size,
    )
    t0 = time.perf_counter()
    run_sharded(
        spec,
        source,
        args.out / "attributions" / f"{method}-{count}",
        overwrite=True,
        backend=Backend("ray", address, 1),
        show_progress=False,
    )
    return time.perf_counter() - t0


def attribution_rates(args: argparse.Namespace, gated: Path, data: Path, address: str) -> dict[str, float]:
    """Steady ECGs per second per Ray worker for each method: runs of one shard and of
    ``--attr-ecgs`` ECGs on one actor, differenced, so the actor's start and engine load (paid once
    per worker in a long run) drop out."""
    import ray

    from ecgx.core.package_reader import load_package
    from ecgx.service.methods import unavailable_methods

    skip = unavailable_methods(load_package(gated))
    rates = {}
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    try:
        for method in args.attr_methods:
            if method in skip:
                print(f"{method}: not in this package ({skip[method]})", file=sys.stderr)
                continue
            small = timed_run(args, gated, data, address, method, args.shard_size)
            large = timed_run(args, gated, data, address, method, args.attr_ecgs)
            extra = args.attr_ecgs - args.shard_size
            # Under load the difference can come out negative: then the whole run's rate (marked).
            steady = extra / (large - small) if large > small else args.attr_ecgs / large
            rates[method] = steady
            if large <= small:
                args.whole_run.add(method)
            print(
                f"{method}: {steady:.2f} ECGs/s on one worker ({args.shard_size} ECGs {small:.1f} s, "
                f"{args.attr_ecgs} ECGs {large:.1f} s)",
                file=sys.stderr,
            )
    finally:
        ray.shutdown()
    return rates


def differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def human(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def report(args: argparse.Namespace, gates: dict[str, dict], rates: dict[str, float], workers: int) -> None:
    local, on_ray = gates["local"], gates["ray"]
    overhead = on_ray["wall"] / local["wall"]
    diff = differences(local["report"], on_ray["report"])
    machine = platform.processor() or platform.machine()
    print(
        f"## Ray on one machine, and 873,710 beats on N workers (issue 24), {date.today()}, {machine}, ",
        end="",
    )
    print(f"{os.cpu_count()} CPUs")
    print()
    print(f"Command: `python benchmarks/bench_ray.py {' '.join(args.argv)}`")
    print()
    print(
        f"The gate, {args.ecgs} ECGs, methods {', '.join(args.methods)}, family {args.family_size}: "
        f"locally with {GATE_WORKERS} workers vs on a local Ray cluster (`ray start --head --num-cpus 2`) "
        f"with {workers} workers"
    )
    print()
    print("| run | wall clock (s) |")
    print("| --- | ---: |")
    print(f"| local, {GATE_WORKERS} threads | {local['wall']:.1f} |")
    print(f"| Ray, {workers} actors ({on_ray.get('execution')}) | {on_ray['wall']:.1f} |")
    print(f"| **Ray / local** | **{overhead:.2f}x** |")
    print()
    print(f"Same numbers in both reports (time, timings, execution record aside): {not diff}")
    if diff:
        print(f"parts that differ: {', '.join(diff)}")
    print()
    if not rates:
        return
    print(f"Batch attribution (`ecgx attribute --ray`), {args.attr_ecgs} ECGs per method, ONE Ray worker:")
    print()
    print("| method | ECGs/s per worker | s per ECG |")
    print("| --- | ---: | ---: |")
    for method, rate in rates.items():
        mark = " *" if method in args.whole_run else ""
        print(f"| {method}{mark} | {rate:.2f} | {1 / rate:.3f} |")
    per_ecg = STUDY_METHODS * sum(1 / r for r in rates.values()) / len(rates)
    if args.whole_run:
        print()
        print(
            "\\* the longer run was not slower than the one-shard run (load): the rate of the whole "
            "longer run, actor start included"
        )
    print()
    print(
        f"Projection, on paper: {STUDY_BEATS:,} beats x {STUDY_METHODS} methods = "
        f"{STUDY_BEATS * STUDY_METHODS:,} attributions at {per_ecg:.3f} worker-seconds per beat for 12 "
        f"methods (the mean of the {len(rates)} measured methods x 12), linear in workers; the last "
        f"column adds the gate's Ray/local ratio ({overhead:.2f}x) as Ray's cost"
    )
    print()
    print("| workers | time | with Ray's ratio |")
    print("| ---: | ---: | ---: |")
    for n in PROJECT_WORKERS:
        t = STUDY_BEATS * per_ecg / n
        print(f"| {n} | {human(t)} | {human(t * max(overhead, 1.0))} |")
    print()
    print(
        "Assumes every worker as fast as this machine's one core and nothing shared: at 512 workers "
        "the reading of the data (one shard per task) and the driver's writing of Parquet shards are "
        "not measured here."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", type=Path, help="folder with seed-<s> packages or runs (seed-0 gated)")
    ap.add_argument("--out", type=Path, required=True, help="scratch folder")
    ap.add_argument("--ecgs", type=int, default=1024, help="validation ECGs for the gate (default 1024)")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_GATE_METHODS), help="methods to gate")
    ap.add_argument("--attr-ecgs", type=int, default=128, help="ECGs per method for throughput (default 128)")
    ap.add_argument("--attr-methods", nargs="*", default=None, help="methods to time (default: all 16)")
    ap.add_argument("--shard-size", type=int, default=32, help="ECGs per shard (default 32)")
    ap.add_argument("--ray", default=None, help="a running cluster's address (default: start a local one)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gated", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--family", type=Path, nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--policy", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        gate_child(args)
        return
    if args.packages is None:
        ap.error("--packages is required")
    args.argv = sys.argv[1:]
    args.whole_run = set()

    from ecgx.service.methods import METHOD_NAMES
    from ecgx.training.data.synth import synthesize_dataset
    from ecgx.validation.experiments import find_packages

    if args.attr_methods is None:
        args.attr_methods = [m for m in METHOD_NAMES if m != "random"]
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    n = max(args.ecgs, args.attr_ecgs)
    data = Path(
        synthesize_dataset(args.out / "validation", n, seed=1000, overwrite=True, show_progress=False)
    ).resolve()
    packages = [p.resolve() for p in find_packages(args.packages, args.out / "exported")]
    args.family_size = len(packages[1:3])
    (args.out / "policy.toml").write_text(f"[gate]\necgs = {args.ecgs}\n")

    sys.path.insert(0, str(REPO / "tests"))
    from ray_helpers import local_ray_cluster  # the shared machine's safe start and stop

    with local_ray_cluster(num_cpus=2) if args.ray is None else _existing(args.ray) as cluster:
        gates = {}
        for side in ("local", "ray"):
            t0 = time.perf_counter()
            gates[side] = run_gate_process(args, packages, data, cluster.address if side == "ray" else None)
            print(f"gate {side}: {time.perf_counter() - t0:.1f} s (process)", file=sys.stderr)
        rates = attribution_rates(args, packages[0], data, cluster.address)
    workers = (gates["ray"].get("execution") or {}).get("workers", GATE_WORKERS)
    report(args, gates, rates, workers)


class _existing:
    """A running cluster given by ``--ray``: nothing to start or stop."""

    def __init__(self, address: str):
        self.address = address

    def __enter__(self) -> _existing:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
