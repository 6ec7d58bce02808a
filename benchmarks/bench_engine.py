"""Engine (ONNX Runtime, explicit backward graphs) against Captum (PyTorch autograd).

Same model, same inputs, same thread count. Each side runs in its own process,
as in production, where the serving process never imports PyTorch: PyTorch's
OpenMP threads and ONNX Runtime's thread pool would otherwise spin against each
other. The sides alternate over several rounds (engine, Captum, Captum, engine,
...) so slow phases of a shared machine fall on both; the table gives median
times over all rounds and the Captum / engine ratio (> 1: the engine is faster).

    python benchmarks/bench_engine.py [--threads 1] [--repeats 5] [--rounds 4]
        [--architecture plain|residual|xresnet1d] [--providers ...]

With ``--threads 1`` the engine side also runs a few cases on an engine with ``threads=2``
(single-thread sessions, a pass split across two concurrent runs), and a second table gives
one thread / two threads for them (>= 1: two threads are not slower). The gradient pass /
forward pass ratio is printed for every round as well as over all rounds.

``xresnet1d`` is the PTB-XL benchmark's residual network (training/reference_models.py:
overlapping max-pool stem, bottleneck blocks with projection and pooled shortcuts, concat-
pooling head with BatchNorm and Dropout) at width 32 with two blocks in each of three stages.
Captum runs the gradient methods on the model as given and the rule-based ones (DeepLift,
guided backprop, LRP) on the IR-rebuilt module the export checks them against, where every
ReLU and addition is a module its hooks attach to.
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
from collections.abc import Callable
from pathlib import Path

import numpy as np

N_ECGS = 64
ENGINE_ONLY = (
    "smoothgrad",
    "gradient_shap",
    "deeplift_shap",
    "gradcam",
    "guided_gradcam",
    "kernel_shap",
    "lime",
    "random",
)
IG_BATCHES = (None, 64, 256, 640, 1600)
# Cases also timed on a two-thread engine when the benchmark runs at one thread.
THREAD_CASES = (
    "forward pass, 1 ECG",
    "forward pass, 64 ECGs",
    "gradient pass, 64 ECGs",
    "saliency, 1 ECG",
    "saliency, 64 ECGs",
    "deeplift, 64 ECGs",
    "deeplift (rescale max-pool rule), 64 ECGs",
    "integrated gradients, 50 steps, 64 ECGs",
)
TWO = " @ 2 threads"


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: session creation, allocator, hook registration
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def engine_cases(work: Path, threads: int, providers: list[str] | None) -> dict[str, Callable[[], object]]:

    cases = engine_cases_at(work, threads, providers)
    if threads == 1:
        two = engine_cases_at(work, 2, providers)
        cases.update({f"{name}{TWO}": two[name] for name in THREAD_CASES})
    return cases


def engine_cases_at(work: Path, threads: int, providers: list[str] | None) -> dict[str, Callable[[], object]]:
    from ecgx.service.engine import AttributionEngine

    engine = AttributionEngine(work / "pkg", providers=providers, threads=threads, max_batch=64)
    engine.warm_up()
    x = np.load(work / "x.npy")
    t = np.zeros(len(x), np.int64)
    x1, t1, x4, t4 = x[:1], t[:1], x[:4], t[:4]
    s1, s64 = engine.selectors(t1), engine.selectors(t)
    cases = {
        "forward pass, 1 ECG": lambda: engine.logits(x1),
        "forward pass, 64 ECGs": lambda: engine.logits(x),
        "gradient pass, 1 ECG": lambda: engine.run("gradient", {"x": x1, "seed": s1}, ["gradient"]),
        "gradient pass, 64 ECGs": lambda: engine.run("gradient", {"x": x, "seed": s64}, ["gradient"]),
        "saliency, 1 ECG": lambda: engine.attribute("saliency", x1, t1),
        "saliency, 64 ECGs": lambda: engine.attribute("saliency", x, t),
        "integrated gradients, 50 steps, 64 ECGs": lambda: engine.attribute("integrated_gradients", x, t),
        "deeplift, 1 ECG": lambda: engine.attribute("deeplift", x1, t1, maxpool_rule="gradient"),
        "deeplift, 64 ECGs": lambda: engine.attribute("deeplift", x, t, maxpool_rule="gradient"),
        "deeplift (rescale max-pool rule), 64 ECGs": lambda: engine.attribute("deeplift", x, t),
        "guided backprop, 64 ECGs": lambda: engine.attribute("guided_backprop", x, t),
        "lrp, 64 ECGs": lambda: engine.attribute("lrp", x, t),
        "occlusion 1x50 stride 25, 4 ECGs": lambda: engine.attribute("occlusion", x4, t4),
        "feature ablation 144 segments, 4 ECGs": lambda: engine.attribute("feature_ablation", x4, t4),
    }
    for m in ENGINE_ONLY:
        params = {"seed": 0} if m not in ("gradcam", "guided_gradcam") else {}
        cases[f"{m}, 4 ECGs"] = lambda m=m, params=params: engine.attribute(m, x4, t4, **params)
    return cases


def captum_cases(work: Path, threads: int, repeats: int) -> dict[str, Callable[[], object]]:
    import warnings

    import torch
    from captum.attr import (
        LRP,
        DeepLift,
        FeatureAblation,
        GuidedBackprop,
        IntegratedGradients,
        Occlusion,
        Saliency,
    )

    from ecgx.service.methods.perturbation import segment_mask
    from ecgx.training.export.ir_torch import ir_module
    from ecgx.training.export.reference import attach_epsilon_rules, lrp_model
    from ecgx.training.export.torch_frontend import trace_model

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    saved = torch.load(work / "model.pt", weights_only=True)
    model = build(saved["architecture"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    rules = ir_module(trace_model(model))
    x = torch.tensor(np.load(work / "x.npy"))
    t = torch.zeros(len(x), dtype=torch.int64)
    x1, t1, x4, t4 = x[:1], t[:1], x[:4], t[:4]
    ig = IntegratedGradients(model)
    best = min(
        IG_BATCHES,
        key=lambda b: statistics.median(
            timed(lambda: ig.attribute(x, target=t, n_steps=50, internal_batch_size=b), 2)
        ),
    )
    lrp_ref = lrp_model(rules, 1e-6)
    mask = torch.tensor(segment_mask(50))[None]

    def forward(inputs):
        with torch.no_grad():
            return model(inputs)

    return {
        "forward pass, 1 ECG": lambda: forward(x1),
        "forward pass, 64 ECGs": lambda: forward(x),
        "saliency, 1 ECG": lambda: Saliency(model).attribute(x1, target=t1),
        "saliency, 64 ECGs": lambda: Saliency(model).attribute(x, target=t),
        "integrated gradients, 50 steps, 64 ECGs": lambda: ig.attribute(
            x, target=t, n_steps=50, internal_batch_size=best
        ),
        f"(Captum IG at its best internal_batch_size: {best})": lambda: None,
        "deeplift, 1 ECG": lambda: DeepLift(rules).attribute(x1, target=t1),
        "deeplift, 64 ECGs": lambda: DeepLift(rules).attribute(x, target=t),
        "guided backprop, 64 ECGs": lambda: GuidedBackprop(rules).attribute(x, target=t),
        "lrp, 64 ECGs": lambda: LRP(attach_epsilon_rules(lrp_ref, 1e-6)).attribute(x, target=t),
        "occlusion 1x50 stride 25, 4 ECGs": lambda: Occlusion(model).attribute(
            x4, target=t4, sliding_window_shapes=(1, 50), strides=(1, 25), perturbations_per_eval=16
        ),
        "feature ablation 144 segments, 4 ECGs": lambda: FeatureAblation(model).attribute(
            x4, target=t4, feature_mask=mask, perturbations_per_eval=16
        ),
    }


def run_side(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    if args.side == "engine":
        cases = engine_cases(work, args.threads, args.providers)
        assert "torch" not in sys.modules, "the engine side must not import PyTorch"
    else:
        cases = captum_cases(work, args.threads, args.repeats)
    results = {name: timed(fn, args.repeats) for name, fn in cases.items()}
    print(json.dumps(results))


ARCHITECTURES = ("plain", "residual", "xresnet1d")


def build(architecture: str):
    """The benchmarked network, freshly initialised (weights come from the saved state dict)."""
    from ecgx.training import reference_models
    from ecgx.training.models import ModelConfig, build_model

    if architecture == "xresnet1d":
        return reference_models.xresnet1d(width=32, layers=(2, 2, 2))
    return build_model(ModelConfig(residual=architecture == "residual"))


def prepare(work: Path, architecture: str) -> None:
    import torch

    from ecgx.training import reference_models
    from ecgx.training.data.synth import generate
    from ecgx.training.export import export_package

    torch.manual_seed(0)
    model = reference_models.randomise_batchnorm(build(architecture).eval(), seed=0)
    x = generate(N_ECGS, np.random.default_rng(0)).signals
    np.save(work / "x.npy", x)
    torch.save({"architecture": architecture, "state_dict": model.state_dict()}, work / "model.pt")
    export_package(model, work / "pkg", sample_inputs=x[:8], overwrite=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case per round")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per side")
    p.add_argument("--architecture", choices=ARCHITECTURES, default="plain", help="the network benchmarked")
    p.add_argument("--residual", action="store_true", help="the same as --architecture residual")
    p.add_argument("--providers", nargs="+", default=None)
    p.add_argument("--side", choices=("engine", "captum"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.residual:
        args.architecture = "residual"
    if args.side:
        run_side(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.architecture)
        times: dict[str, dict[str, list[float]]] = {"engine": {}, "captum": {}}
        ratios: list[float] = []  # gradient pass / forward pass, 64 ECGs, per round
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
                    "--repeats",
                    str(args.repeats),
                ] + (["--providers", *args.providers] if args.providers else [])
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                got = json.loads(out.strip().splitlines()[-1])
                for name, ts in got.items():
                    times[side].setdefault(name, []).extend(ts)
                if side == "engine":
                    ratios.append(
                        statistics.median(got["gradient pass, 64 ECGs"])
                        / statistics.median(got["forward pass, 64 ECGs"])
                    )
    report(times, ratios, args)


def report(times: dict[str, dict[str, list[float]]], ratios: list[float], args: argparse.Namespace) -> None:
    import onnxruntime as ort

    med = {side: {k: statistics.median(v) for k, v in t.items()} for side, t in times.items()}
    e, c = med["engine"], med["captum"]
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.machine()}, threads={args.threads}, "
        f"providers={args.providers or 'default'}, onnxruntime {ort.__version__}, "
        f"{args.architecture} network, {args.rounds} rounds x {args.repeats} runs"
    )
    for b in ("1 ECG", "64 ECGs"):
        print(
            f"# gradient pass / forward pass of the package, {b}: "
            f"{e[f'gradient pass, {b}'] / e[f'forward pass, {b}']:.2f}x"
        )
    print(f"# the same, 64 ECGs, per round: {', '.join(f'{r:.2f}x' for r in ratios)}")
    print(next(k for k in c if k.startswith("(Captum IG")))
    print("| case | engine ms | Captum ms | Captum / engine |")
    print("| --- | ---: | ---: | ---: |")
    for name, te in e.items():
        if name.endswith(TWO):
            continue
        tc = c.get(name)
        cap, ratio = (f"{tc * 1e3:.2f}", f"{tc / te:.2f}x") if tc is not None else ("—", "—")
        print(f"| {name} | {te * 1e3:.2f} | {cap} | {ratio} |")
    if any(name.endswith(TWO) for name in e):
        print()
        print("| engine case | 1 thread ms | 2 threads ms | 1 thread / 2 threads |")
        print("| --- | ---: | ---: | ---: |")
        for name in THREAD_CASES:
            one, two = e[name], e[f"{name}{TWO}"]
            print(f"| {name} | {one * 1e3:.2f} | {two * 1e3:.2f} | {one / two:.2f}x |")


if __name__ == "__main__":
    main()
