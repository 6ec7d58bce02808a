"""Export time of a zoo network, the parity checks as they were before issue #25's round two
against the current ones, side by side in one run (issue #25: "xresnet1d50 under 3 minutes on a
quiet 2-core machine").

    python benchmarks/bench_export.py                      # xresnet1d50, full width, 250 samples
    python benchmarks/bench_export.py --samples 1000       # the 100 Hz, 10 s strip
    python benchmarks/bench_export.py --network inception1d --width 0.25

Each export runs in its own process (same model, same seed, same check ECGs). The baseline is
``training/export/graph_checks.py`` as of commit ``BASELINE`` (before the checks shared sessions,
checked the incremental pair once and ran the LRP composites' reference runs on two threads),
loaded beside the current one and patched into the graph table and the package writer; the rest
of the exporter is today's in both. The script asserts what must not change: every graph file
byte for byte, the graphs left out, and every binding check's verdict. It prints wall-clock and
CPU seconds of each export and the ratio; ``--repeats`` alternates the order.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "ea88367"  # graph_checks.py of round one (float64 parity judging), before the speed-up
CLASSES = [{"key": f"c{i}", "code": str(i), "name": f"class {i}"} for i in range(5)]


def _use_baseline_checks() -> None:
    """Patch the baseline graph_checks.py into the graph table and the package writer."""
    from ecgx.training.export import graphs, package_writer

    source = subprocess.run(
        ["git", "show", f"{BASELINE}:training/export/graph_checks.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "graph_checks_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ecgx.training.export.graph_checks_baseline", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    for name, graph in list(graphs.GRAPHS.items()):
        graphs.GRAPHS[name] = dataclasses.replace(graph, check=getattr(old, graph.check.__name__))
    package_writer.References = old.References


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from zoo_models import ZOO, zoo_model

    from ecgx.training.export import export_package
    from ecgx.training.export.source import from_module

    if args.child == "baseline":
        _use_baseline_checks()
    entry = ZOO[args.network]
    samples = args.samples or entry.samples
    model = (
        entry.factory(samples=samples, width=args.width, seed=0)
        if args.samples
        else zoo_model(args.network, width=args.width)
    )
    src = from_module(model, (12, samples), sampling_rate_hz=entry.rate_hz, classes=CLASSES)
    t0, c0 = time.perf_counter(), time.process_time()
    pkg = export_package(src, args.out, overwrite=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    manifest = json.loads((pkg / "manifest.json").read_text())
    checks = manifest["verification"]["checks"]
    record = {
        "wall_s": wall,
        "cpu_s": cpu,
        "graphs": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(pkg.glob("*.onnx"))},
        "unavailable": sorted(manifest["unavailable"]),
        "verdicts": {k: v["ok"] for k, v in checks.items() if "ok" in v},
    }
    Path(args.record).write_text(json.dumps(record))


def run_one(impl: str, args: argparse.Namespace, scratch: Path) -> dict:
    record = scratch / f"{impl}.json"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--network",
        args.network,
        "--width",
        str(args.width),
        "--samples",
        str(args.samples or 0),
        "--out",
        str(scratch / impl),
        "--record",
        str(record),
    ]
    subprocess.run(cmd, check=True)
    return json.loads(record.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", default="xresnet1d50", help="a tests/zoo_models.py ZOO name")
    ap.add_argument("--width", type=float, default=1.0, help="channel width (1.0: published)")
    ap.add_argument("--samples", type=int, default=250, help="samples per lead (0: the network's own)")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of exports, order alternating")
    ap.add_argument("--child", choices=["baseline", "current"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    runs: dict[str, list[dict]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for impl in ("baseline", "current") if r % 2 == 0 else ("current", "baseline"):
                runs[impl].append(run_one(impl, args, Path(tmp)))
                print(f"{impl}: {runs[impl][-1]['wall_s']:.1f} s wall, {runs[impl][-1]['cpu_s']:.1f} s CPU")
    base, cur = runs["baseline"][0], runs["current"][0]
    for key in ("graphs", "unavailable", "verdicts"):
        assert all(r[key] == base[key] for r in runs["baseline"] + runs["current"]), f"{key} differ"
    b_wall = min(r["wall_s"] for r in runs["baseline"])
    c_wall = min(r["wall_s"] for r in runs["current"])
    b_cpu = min(r["cpu_s"] for r in runs["baseline"])
    c_cpu = min(r["cpu_s"] for r in runs["current"])
    print(
        f"{date.today()} {platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}: "
        f"{args.network} width {args.width} x {args.samples or 'own'} samples: baseline {b_wall:.1f} s "
        f"({b_cpu:.1f} s CPU), current {c_wall:.1f} s ({c_cpu:.1f} s CPU): {b_wall / c_wall:.2f}x "
        "wall clock; "
        f"{len(cur['graphs'])} graphs byte-equal, same graphs left out {cur['unavailable']}, "
        f"{len(cur['verdicts'])} verdicts equal"
    )


if __name__ == "__main__":
    main()
