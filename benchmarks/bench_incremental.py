"""Perturbation methods: incremental graphs vs the plain forward graph vs Captum, side by side (issue #21).

One model (bench_engine's network), exported twice: with the incremental graphs and without them
(an older package: the methods take the plain forward path). Occlusion (window 50, stride 25) and
feature ablation (144 segments) on 1 and 64 ECGs run on both packages and in Captum at its best
``perturbations_per_eval`` (each candidate timed once, the fastest kept); Kernel SHAP and LIME (200
samples) run on the current engine and on the engine before issue #21 (the methods' module as of
``--before``, loaded from git, on the same package and settings). Each side runs in its own process
(the engine process never imports PyTorch); sides alternate over rounds; medians are reported.

    python benchmarks/bench_incremental.py [--threads 1] [--repeats 3] [--rounds 2] [--before 283f5c0]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_engine  # this folder's benchmark: prepare, build, timed

PPE = {1: (16, 64, 256), 64: (1, 4, 16)}  # Captum's perturbations_per_eval candidates per batch size
SIZES = (1, 64)
SAMPLES = 200  # Kernel SHAP / LIME coalitions per ECG
CLASSES = {"kernel_shap": "KernelShap", "lime": "Lime"}


def _before_methods(rev: str) -> dict:
    """Kernel SHAP and LIME as implemented at git revision ``rev`` (not registered)."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(
        ["git", "show", f"{rev}:service/methods/perturbation.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout
    src = src.replace("from ecgx.service.methods.registry import register", "register = lambda c: c")
    ns: dict = {"__name__": f"perturbation_{rev}"}
    exec(compile(src, f"perturbation.py@{rev}", "exec"), ns)
    return {m: ns[c]() for m, c in CLASSES.items()}


def engine_cases(work: Path, threads: int, repeats: int, before: str) -> dict[str, list[float]]:
    from ecgx.service.engine import AttributionEngine
    from ecgx.service.methods import get_method

    def engine(pkg: str) -> AttributionEngine:
        e = AttributionEngine(work / pkg, threads=threads, max_batch=64, max_request_rows=None)
        e.warm_up()
        return e

    incremental, plain = engine("pkg"), engine("pkg_older")
    old = _before_methods(before)
    x = np.load(work / "x.npy")
    t = np.zeros(len(x), np.int64)
    out: dict[str, list[float]] = {}
    for n in SIZES:
        xn, tn = x[:n], t[:n]
        for method in ("occlusion", "feature_ablation"):
            for side, e in (("incremental", incremental), ("plain", plain)):
                out[f"{method}, {n} ECG|{side}"] = bench_engine.timed(
                    lambda e=e, m=method, xn=xn, tn=tn: e.attribute(m, xn, tn), repeats
                )
        for method in CLASSES:
            params = {"n_samples": SAMPLES, "seed": 0}
            out[f"{method}, {n} ECG|now"] = bench_engine.timed(
                lambda m=method, xn=xn, tn=tn, kw=params: incremental.attribute(m, xn, tn, **kw), repeats
            )
            impl = get_method(method)
            settings = impl.settings(xn, params)
            out[f"{method}, {n} ECG|before"] = bench_engine.timed(
                lambda m=method, s=settings, xn=xn, tn=tn: old[m].attribute(incremental, xn, tn, s), repeats
            )
    assert "torch" not in sys.modules, "the engine side must not import PyTorch"
    return out


def captum_cases(work: Path, threads: int, repeats: int) -> dict[str, list[float]]:
    import warnings

    import torch
    from captum.attr import FeatureAblation, Occlusion

    from ecgx.service.methods.perturbation import segment_mask

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    saved = torch.load(work / "model.pt", weights_only=True)
    model = bench_engine.build(saved["architecture"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    x = torch.tensor(np.load(work / "x.npy"))
    t = torch.zeros(len(x), dtype=torch.int64)
    mask = torch.tensor(segment_mask(50))[None]
    out: dict[str, list[float]] = {}
    for n in SIZES:
        xn, tn = x[:n], t[:n]
        cases = {
            "occlusion": lambda p, xn=xn, tn=tn: Occlusion(model).attribute(
                xn, target=tn, sliding_window_shapes=(1, 50), strides=(1, 25), perturbations_per_eval=p
            ),
            "feature_ablation": lambda p, xn=xn, tn=tn: FeatureAblation(model).attribute(
                xn, target=tn, feature_mask=mask, perturbations_per_eval=p
            ),
        }
        for method, fn in cases.items():
            with torch.no_grad():
                best = min(PPE[n], key=lambda p, fn=fn: bench_engine.timed(lambda fn=fn, p=p: fn(p), 1)[0])
                out[f"{method}, {n} ECG|captum"] = bench_engine.timed(lambda fn=fn, p=best: fn(p), repeats)
            out[f"{method}, {n} ECG|captum ppe"] = [float(best)]
    return out


def prepare(work: Path) -> None:
    """bench_engine's model and inputs; the package with every graph and one without the incremental ones."""
    bench_engine.prepare(work, "plain")
    import torch

    from ecgx.service.methods.perturbation import INCREMENTAL_GRAPHS
    from ecgx.training.export import export_package
    from ecgx.training.export.graphs import GRAPHS

    saved = torch.load(work / "model.pt", weights_only=True)
    model = bench_engine.build(saved["architecture"])
    model.load_state_dict(saved["state_dict"])
    x = np.load(work / "x.npy")
    older = [g for g in GRAPHS if g not in INCREMENTAL_GRAPHS]
    export_package(model.eval(), work / "pkg_older", sample_inputs=x[:8], overwrite=True, graphs=older)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--before", default="283f5c0", help="git revision of the methods before issue #21")
    p.add_argument("--side", choices=("engine", "captum"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        work = Path(args.workdir)
        if args.side == "engine":
            out = engine_cases(work, args.threads, args.repeats, args.before)
        else:
            out = captum_cases(work, args.threads, args.repeats)
        print(json.dumps(out))
        return
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp))
        for r in range(args.rounds):
            for side in ("engine", "captum") if r % 2 == 0 else ("captum", "engine"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--side",
                    side,
                    "--workdir",
                    tmp,
                    "--threads",
                    str(args.threads),
                ]
                cmd += ["--repeats", str(args.repeats), "--before", args.before]
                res = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                for k, v in json.loads(res.strip().splitlines()[-1]).items():
                    times.setdefault(k, []).extend(v)
    report(times, args)


def report(times: dict[str, list[float]], args: argparse.Namespace) -> None:
    import onnxruntime as ort

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.machine()}, threads={args.threads}, onnxruntime "
        f"{ort.__version__}, plain network, {args.rounds} rounds x {args.repeats} runs"
    )
    print(
        "| case | incremental ms | plain forward ms | Captum ms (best ppe) | Captum / incremental "
        "| plain / incremental |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for n in SIZES:
        for m in ("occlusion", "feature_ablation"):
            k = f"{m}, {n} ECG"
            inc, pl, cap = med[f"{k}|incremental"], med[f"{k}|plain"], med[f"{k}|captum"]
            ppe = int(max(times[f"{k}|captum ppe"], key=times[f"{k}|captum ppe"].count))
            print(
                f"| {k}{'s' if n > 1 else ''} | {inc * 1e3:.1f} | {pl * 1e3:.1f} | {cap * 1e3:.1f} ({ppe}) "
                f"| {cap / inc:.2f}x | {pl / inc:.2f}x |"
            )
    print()
    print(f"| case ({SAMPLES} samples) | now ms | before ({args.before}) ms | before / now |")
    print("| --- | ---: | ---: | ---: |")
    for n in SIZES:
        for m in CLASSES:
            k = f"{m}, {n} ECG"
            now, before = med[f"{k}|now"], med[f"{k}|before"]
            print(
                f"| {k}{'s' if n > 1 else ''} | {now * 1e3:.1f} | {before * 1e3:.1f} | {before / now:.2f}x |"
            )


if __name__ == "__main__":
    main()
