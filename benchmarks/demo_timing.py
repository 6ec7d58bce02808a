"""Time `ecgx demo` as a new user runs it, and write the figures the README quotes.

    python benchmarks/demo_timing.py --quick            # the first look
    python benchmarks/demo_timing.py                    # the full demo
    python benchmarks/demo_timing.py --out /tmp/demo_timing.md

Runs the demo in a fresh temporary folder as a child process (stdout is not a terminal, as in CI
or under nohup), and records its wall-clock time, the child's peak RSS, the load average while it
ran (sampled every 10 s: on a shared machine the time is an upper bound), its CPU time (user +
system, which others' load does not inflate much), the per-seed test AUROC
(min and mean over the classes, from RUNDIR/seed-<s>/metrics.json), the gate's verdict per
package, the longest silence in its output, the wall and CPU seconds of each step
(OUT/timings.json, written by the demo) and the gate's time per check (its report's timings_s).
Prints a markdown snippet (date, machine, command) and writes it to --out; ``--results`` appends
it to benchmarks/RESULTS.md and ``--readme`` rewrites the README's demo figures (the text between
its ``<!-- demo-timing -->`` markers), so the README quotes the measurement and nothing else.
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
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class LoadSampler:
    """The 1-minute load average every ``interval`` seconds while the demo runs."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval, self.samples = interval, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_demo(out: Path, quick: bool, log: Path) -> tuple[float, int, float]:
    """Wall seconds, exit status and the longest gap between two output lines."""
    cmd = [sys.executable, "-m", "ecgx.cli", "demo", "--out", str(out), *(["--quick"] if quick else [])]
    started = time.perf_counter()
    last, longest = started, 0.0
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
            f.write(line)
        code = proc.wait()
    return time.perf_counter() - started, code, longest


def auroc_rows(out: Path) -> list[tuple[str, float, float]]:
    rows = []
    for metrics in sorted((out / "runs").glob("seed-*/metrics.json")):
        m = json.loads(metrics.read_text())
        rows.append((metrics.parent.name, m["min_test_auroc"], m["mean_test_auroc"]))
    return rows


def verdict_rows(out: Path) -> list[tuple[str, str]]:
    rows = []
    for pkg in sorted((out / "packages").glob("seed-*")):
        gate = pkg / "gate.json"
        if not gate.is_file():
            rows.append((pkg.name, "not gated"))
            continue
        r = json.loads(gate.read_text())
        rows.append((pkg.name, f"{r['verdict']}: {', '.join(r.get('passed', [])) or 'no method'}"))
    return rows


def step_rows(out: Path) -> list[str]:
    """Each demo step's wall and CPU seconds (OUT/timings.json), then the gate's time per check."""
    rows = []
    timings = out / "timings.json"
    if timings.is_file():
        for s in json.loads(timings.read_text())["steps"]:
            rows.append(f"| step {s['step']}: wall / CPU | {s['wall_s']:.0f} s / {s['cpu_s']:.0f} s |")
    for pkg in sorted((out / "packages").glob("seed-*")):
        gate = pkg / "gate.json"
        if gate.is_file():
            t = json.loads(gate.read_text()).get("timings_s", {})
            checks = ", ".join(f"{k} {v:.0f}" for k, v in t.items() if k != "total")
            rows.append(f"| gate {pkg.name} wall s per check (total {t.get('total', 0):.0f} s) | {checks} |")
    return rows


README_START, README_END = "<!-- demo-timing -->", "<!-- /demo-timing -->"


def readme_figures(
    quick: bool, seconds: float, cpu: float, rss_kb: int, loads: list[float], out: Path
) -> str:
    """The README's sentence of demo figures, from this measurement."""
    name = "`ecgx demo --quick`" if quick else "`ecgx demo`"
    aurocs = auroc_rows(out)
    auroc = (
        f"test AUROC min {min(lo for _, lo, _ in aurocs):.2f} / mean "
        f"{sum(m for _, _, m in aurocs) / len(aurocs):.2f} over seeds"
        if aurocs
        else "no AUROC recorded"
    )
    passed = sorted({m for _, v in verdict_rows(out) if ": " in v for m in v.split(": ", 1)[1].split(", ")})
    passed = [m for m in passed if m != "no method"]
    load = sorted(loads)[len(loads) // 2]
    return (
        f"Measured by `python benchmarks/demo_timing.py{' --quick' if quick else ''}` "
        f"({datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} CPUs, load average median {load:.1f}"
        f"{'; shared, so an upper bound' if load > (os.cpu_count() or 1) else ''}): {name} took "
        f"{seconds / 60:.1f} min wall clock for {cpu / 60:.1f} min of CPU time, peak memory "
        f"{rss_kb / 2**20:.1f} GB, {auroc}; its gate passed {', '.join(passed) or 'no method'}."
    )


def update_readme(readme: Path, quick: bool, sentence: str) -> None:
    """Replace this variant's figures between the README's markers (one line per variant)."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} block for the demo figures")
    key = "`ecgx demo --quick`" if quick else "`ecgx demo`"
    lines = [ln for ln in text[start + len(README_START) : end].strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if f" {key} took " not in ln] + [sentence]
    lines.sort(key=lambda ln: "--quick" not in ln)  # the quick one first
    block = README_START + "\n" + "\n".join(lines) + "\n" + README_END
    readme.write_text(text[:start] + block + text[end + len(README_END) :], encoding="utf-8")


def snippet(
    quick: bool,
    seconds: float,
    code: int,
    rss_kb: int,
    loads: list[float],
    silence: float,
    out: Path,
    cpu: float,
) -> str:
    name = "ecgx demo --quick" if quick else "ecgx demo"
    loads_sorted = sorted(loads)
    lines = [
        f"## `{name}` timed by benchmarks/demo_timing.py, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `python benchmarks/demo_timing.py{' --quick' if quick else ''}` (a fresh temporary "
        f"folder, output to a pipe). Machine: {os.cpu_count()} CPUs ({_cpu_model()}), "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}. Load average "
        f"while it ran: {loads_sorted[0]:.1f} to {loads_sorted[-1]:.1f}, median "
        f"{loads_sorted[len(loads_sorted) // 2]:.1f} (on {os.cpu_count()} CPUs; above that, other work "
        "shared the machine and the time is an upper bound).",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| wall clock | {seconds / 60:.1f} min ({seconds:.0f} s){'' if code == 0 else f', EXIT {code}'} |",
        f"| CPU time, user + system (others' load inflates it little) | {cpu / 60:.1f} min ({cpu:.0f} s) |",
        f"| peak RSS (the demo process) | {rss_kb / 2**20:.2f} GB |",
        f"| longest silence in the output | {silence:.0f} s |",
    ]
    lines += [
        f"| test AUROC {s}: min / mean over classes | {lo:.3f} / {mean:.3f} |"
        for s, lo, mean in auroc_rows(out)
    ]
    lines += [f"| gate {p} | {v} |" for p, v in verdict_rows(out)]
    lines += step_rows(out)
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="time `ecgx demo --quick`")
    parser.add_argument("--out", type=Path, help="also write the markdown snippet here")
    parser.add_argument("--keep", type=Path, help="run the demo in this (new) folder and keep it")
    parser.add_argument("--results", action="store_true", help="append the snippet to benchmarks/RESULTS.md")
    parser.add_argument(
        "--readme", action="store_true", help="rewrite the README's demo figures from this run"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ecgx-demo-timing-") as tmp:
        folder = args.keep or Path(tmp) / "demo"
        log = Path(tmp) / "demo.log" if args.keep is None else args.keep.with_suffix(".log")
        with LoadSampler() as load:
            seconds, code, silence = run_demo(folder, args.quick, log)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        rss_kb, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime  # ru_maxrss: kilobytes on Linux
        text = snippet(args.quick, seconds, code, rss_kb, load.samples, silence, folder, cpu)
        sentence = readme_figures(args.quick, seconds, cpu, rss_kb, load.samples, folder)
        if code != 0:
            text += "\nThe demo failed; its last lines:\n\n    " + "\n    ".join(
                log.read_text().splitlines()[-15:]
            )
    print(text)
    print(sentence)
    if args.out is not None:
        args.out.write_text(text)
    if code == 0 and args.results:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + text)
    if code == 0 and args.readme:
        update_readme(ROOT / "README.md", args.quick, sentence)
    return code


if __name__ == "__main__":
    sys.exit(main())
