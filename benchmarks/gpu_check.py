"""GPU readiness of a trained package: parity of CUDA and TensorRT against CPU, the gate's
verdicts on GPU against CPU, and the engine and service benchmarks (issue #21).

    python benchmarks/gpu_check.py --package demo/packages/seed-0 --data demo/validation \\
        --family demo/packages/seed-1 --out gpu_check.md
    python benchmarks/gpu_check.py --package PKG --cpu-only      # dry run, no GPU needed

``benchmarks/gpu_check.sh`` runs it with the demo's outputs. For every graph of the package, the
same inputs (real validation ECGs where the graph takes ECGs, a fixed random draw otherwise) go
through a CPU session and one session per GPU variant: CUDA with TF32 on and off, TensorRT with
FP16 off and on (CUDA and CPU behind it for what TensorRT does not take). Each variant is
configured by provider options (:mod:`ecgx.service.providers`: engine and timing caches under
``--cache-dir``), warmed up once, then timed. The error of an output is max |gpu - cpu| over
max |cpu| (the output's own scale: an element-wise ratio explodes where the CPU value is near
zero). Then the gate runs on GPU and on CPU with the same methods, and the verdicts are compared
method by method; then bench_engine.py and bench_service.py run (they pick the GPU providers
themselves, ``ecgx serve`` included).

``--cpu-only``: a dry run on this machine's CPU provider in place of every GPU variant (the
same code path, options and table; errors are then 0), and the gate and benchmark steps only
printed. Without it, a machine with no GPU provider gets a clear message and exit status 3.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ecgx.core.package_reader import ModelPackage, load_package
from ecgx.service.providers import (
    CPU,
    CUDA,
    INPUT_DTYPES,
    TENSORRT,
    ProviderSettings,
    gpu_providers_available,
    session_providers,
    warm_up,
)

NO_GPU = 3  # exit status: no GPU provider in this onnxruntime build
BENCH = Path(__file__).resolve().parent
# The methods the gate compares by default: those ecgx demo --quick gates (minutes on a GPU).
GATE_METHODS = ("saliency", "input_x_gradient", "gradient_shap", "gradcam", "lrp")


@dataclass(frozen=True)
class Variant:
    """One way of running the graphs: a label, the providers in order and their settings."""

    label: str
    providers: tuple[str, ...]
    settings: ProviderSettings


def variants(gpu: list[str], cache_dir: Path, cpu_only: bool) -> list[Variant]:
    """CUDA TF32 on/off and TensorRT FP16 off/on, for the GPU providers present; with
    ``cpu_only`` every variant runs on the CPU provider (a dry run of the same path)."""
    out = []
    if CUDA in gpu or cpu_only:
        for tf32 in (True, False):
            out.append(
                Variant(f"CUDA, TF32 {'on' if tf32 else 'off'}", (CUDA, CPU), ProviderSettings(tf32=tf32))
            )
    if TENSORRT in gpu or cpu_only:
        for fp16 in (False, True):
            settings = ProviderSettings(fp16=fp16, tf32=False, cache_dir=cache_dir)
            out.append(Variant(f"TensorRT, FP16 {'on' if fp16 else 'off'}", (TENSORRT, CUDA, CPU), settings))
    if cpu_only:
        out = [Variant(f"{v.label} [dry run: CPU]", (CPU,), v.settings) for v in out]
    return out


def session(pkg: ModelPackage, graph: str, providers: tuple[str, ...], settings: ProviderSettings):
    """A session of one package graph, its parameters from the verified weights (as the engine does)."""
    opts = ort.SessionOptions()
    names = list(pkg.graph_parameters.get(graph, ()))
    views = pkg.parameter_views()
    if names:
        opts.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(views[n]) for n in names])
    return ort.InferenceSession(
        pkg.graph_bytes(graph), opts, providers=session_providers(providers, settings)
    )


def feeds(sess, ecgs: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The graph's inputs for ``len(ecgs)`` rows: the ECGs where the shape matches, else a fixed draw."""
    out = {}
    batch = len(ecgs)
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else batch for d in i.shape]
        if i.type == "tensor(float)":
            if tuple(shape[1:]) == ecgs.shape[1:]:
                out[i.name] = ecgs.astype(np.float32)
            else:
                out[i.name] = rng.standard_normal(shape).astype(np.float32)
        elif i.type in INPUT_DTYPES:  # class indices, switches: zeros (the first class, off)
            out[i.name] = np.zeros(shape, dtype=INPUT_DTYPES[i.type])
        else:
            raise SystemExit(f"graph input {i.name!r} of type {i.type}: gpu_check cannot build it")
    return out


def relative_error(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """The largest, over outputs, of max |got - ref| / max |ref|."""
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        err = float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def parity(
    pkg: ModelPackage, ecgs: np.ndarray, runs: list[Variant]
) -> list[tuple[str, list[tuple[float, float]]]]:
    """Per graph: (relative error, ms per run) of each variant against the CPU session."""
    rows = []
    for graph in sorted(pkg.manifest["graphs"]):
        cpu = session(pkg, graph, (CPU,), ProviderSettings())
        x = feeds(cpu, ecgs, np.random.default_rng(0))
        ref = cpu.run(None, x)
        cells = []
        for v in runs:
            sess = session(pkg, graph, v.providers, v.settings)
            warm_up(sess)  # as at model load: engine builds and kernel choice are not timed
            t0 = time.perf_counter()
            got = sess.run(None, x)
            cells.append((relative_error(got, ref), 1000 * (time.perf_counter() - t0)))
        rows.append((graph, cells))
        print(
            f"parity {graph}: "
            + ", ".join(f"{v.label} {e:.1e}" for v, (e, _) in zip(runs, cells, strict=True)),
            flush=True,
        )
    return rows


def gate_comparison(
    pkg: Path, data: Path, family: list[Path], methods: tuple[str, ...], gpu: list[str]
) -> list[tuple[str, str, str]]:
    """The gate's verdict per method on the GPU providers and on CPU (same data, methods, policy)."""
    from ecgx.validation.gate import run_gate

    verdicts = {}
    for name, providers in (("gpu", [*gpu, CPU]), ("cpu", [CPU])):
        t0 = time.perf_counter()
        run = run_gate(pkg, data, family=family, methods=methods, providers=providers, show_progress=False)
        verdicts[name] = {m: e["verdict"] for m, e in run.report["methods"].items()}
        print(f"gate on {name}: {run.report['verdict']} in {time.perf_counter() - t0:.0f} s", flush=True)
    return [(m, verdicts["gpu"].get(m, "-"), verdicts["cpu"][m]) for m in verdicts["cpu"]]


def bench_commands(gpu: list[str], quick: bool) -> list[list[str]]:
    """The engine and service benchmarks on the GPU providers."""
    seconds = ["--seconds", "10", "--warmup", "3"] if quick else []
    return [
        [
            sys.executable,
            str(BENCH / "bench_engine.py"),
            "--providers",
            *gpu,
            CPU,
            "--repeats",
            "3",
            "--rounds",
            "2",
        ],
        [sys.executable, str(BENCH / "bench_service.py"), "--clients", "1", "64", *seconds],
    ]


def table(pkg: Path, runs: list[Variant], rows, gate_rows, cpu_only: bool) -> str:
    device = "dry run on CPU (no GPU)" if cpu_only else ", ".join(gpu_providers_available())
    lines = [
        f"## GPU check of {pkg}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `python benchmarks/gpu_check.py --package {pkg}{' --cpu-only' if cpu_only else ''}`. "
        f"onnxruntime {ort.__version__} ({device}), {platform.node()}, Python {platform.python_version()}.",
        "Error: max |provider - CPU| / max |CPU| per graph (all outputs); time: one warm run, ms.",
        "",
        "| graph | " + " | ".join(v.label for v in runs) + " |",
        "| --- |" + " --- |" * len(runs),
    ]
    for graph, cells in rows:
        lines.append(f"| {graph} | " + " | ".join(f"{e:.1e} ({ms:.1f} ms)" for e, ms in cells) + " |")
    if gate_rows:
        lines += ["", "| method | gate on GPU | gate on CPU | same |", "| --- | --- | --- | --- |"]
        lines += [f"| {m} | {g} | {c} | {'yes' if g == c else 'NO'} |" for m, g, c in gate_rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", type=Path, required=True, help="a trained, exported package")
    p.add_argument("--data", type=Path, help="validation dataset (real ECGs for parity; the gate's data)")
    p.add_argument("--family", type=Path, nargs="*", default=[], help="sibling packages (the gate's family)")
    p.add_argument("--gate-methods", nargs="+", default=list(GATE_METHODS))
    p.add_argument("--batch", type=int, default=8, help="ECGs per parity run")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/ecgx-trt-cache"), help="TensorRT caches")
    p.add_argument("--cpu-only", action="store_true", help="dry run on the CPU provider (no GPU needed)")
    p.add_argument("--skip-gate", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--quick-bench", action="store_true", help="short service benchmark cells (10 s)")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    gpu = gpu_providers_available()
    if not gpu and not args.cpu_only:
        print(
            f"gpu_check: no GPU execution provider in this onnxruntime {ort.__version__} "
            f"(it offers {ort.get_available_providers()}). Install onnxruntime-gpu on a machine with an "
            "NVIDIA GPU and CUDA (pip uninstall onnxruntime && pip install onnxruntime-gpu), or pass "
            "--cpu-only for a dry run of the script on CPU.",
            file=sys.stderr,
        )
        return NO_GPU
    pkg = load_package(args.package)
    rng = np.random.default_rng(1)
    if args.data is not None:
        from ecgx.core.dataset import load_dataset

        ecgs = np.asarray(load_dataset(args.data).signals[: args.batch], dtype=np.float32)
    else:
        ecgs = rng.standard_normal((args.batch, *pkg.input_shape)).astype(np.float32) * 0.3
    runs = variants(gpu, args.cache_dir, args.cpu_only)
    rows = parity(pkg, ecgs, runs)
    gate_rows = []
    if args.cpu_only or args.skip_gate or args.data is None or not args.family:
        print("gate on GPU vs CPU: skipped (needs --data and --family, and a GPU)")
    else:
        gate_rows = gate_comparison(args.package, args.data, args.family, tuple(args.gate_methods), gpu)
    text = table(args.package, runs, rows, gate_rows, args.cpu_only)
    print(text, flush=True)
    if args.out is not None:
        args.out.write_text(text)
    for cmd in [] if args.skip_bench else bench_commands(gpu, args.quick_bench):
        if args.cpu_only:
            print("benchmark (dry run, not run): " + " ".join(cmd[1:]))
            continue
        print("benchmark: " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=False)
    mismatched = [m for m, g, c in gate_rows if g != c]
    if mismatched:
        print(f"gate verdicts differ on GPU for: {', '.join(mismatched)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
