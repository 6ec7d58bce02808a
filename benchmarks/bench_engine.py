"""Engine (ONNX Runtime, explicit backward graphs) against Captum (PyTorch autograd), side by side.

Same model, same inputs, same thread count, one run. Prints a table of median
times and the Captum / engine ratio (> 1: the engine is faster). Usage:

    python benchmarks/bench_engine.py [--threads 2] [--repeats 7] [--residual] [--providers P ...]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from captum.attr import LRP as CaptumLRP
from captum.attr import DeepLift, FeatureAblation, GuidedBackprop, IntegratedGradients, Occlusion, Saliency

from service.engine import AttributionEngine
from service.methods.perturbation import segment_mask
from training.data.synth import generate
from training.export import export_package
from training.export.reference import attach_epsilon_rules, lrp_model
from training.models import ModelConfig, build_model


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: session creation, allocator, hook registration
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def best_internal_batch(model, x, target, repeats) -> tuple[float, int | None]:
    ig = IntegratedGradients(model)
    results = []
    for ibs in (None, 64, 256, 640, 1600):
        t = median_seconds(
            lambda ibs=ibs: ig.attribute(x, target=target, n_steps=50, internal_batch_size=ibs), repeats
        )
        results.append((t, ibs))
    return min(results, key=lambda r: r[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--residual", action="store_true")
    p.add_argument("--providers", nargs="+", default=None)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(residual=args.residual)).eval()
    x64 = generate(64, np.random.default_rng(0)).signals
    target64 = np.zeros(64, np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = export_package(model, Path(tmp) / "pkg", sample_inputs=x64[:4])
        engine = AttributionEngine(pkg, providers=args.providers, threads=args.threads, max_batch=64)
        engine.warm_up()
        rows = run_all(model, engine, x64, target64, args.repeats)
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.machine()}, threads={args.threads}, "
        f"providers={engine.providers}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"{'residual' if args.residual else 'plain'} default CNN"
    )
    print("| case | engine ms | Captum ms | Captum / engine |")
    print("| --- | ---: | ---: | ---: |")
    for name, te, tc in rows:
        ratio = f"{tc / te:.2f}x" if tc else "—"
        captum = f"{tc * 1e3:.1f}" if tc else "—"
        print(f"| {name} | {te * 1e3:.1f} | {captum} | {ratio} |")


def run_all(model, engine, x64, target64, repeats):
    xt64, tt64 = torch.tensor(x64), torch.tensor(target64)
    x1, t1, xt1, tt1 = x64[:1], target64[:1], xt64[:1], tt64[:1]
    rows = []

    def add(name, engine_fn, captum_fn=None):
        te = median_seconds(engine_fn, repeats)
        tc = median_seconds(captum_fn, repeats) if captum_fn else None
        rows.append((name, te, tc))

    with torch.no_grad():
        add("forward pass, 1 ECG", lambda: engine.logits(x1), lambda: model(xt1))
        add("forward pass, 64 ECGs", lambda: engine.logits(x64), lambda: model(xt64))
    seeds1, seeds64 = engine.seeds(t1), engine.seeds(target64)
    add(
        "gradient pass, 1 ECG (ORT graph only)",
        lambda: engine.run("gradient", {"x": x1, "seed": seeds1}, ["gradient"]),
    )
    add(
        "gradient pass, 64 ECGs (ORT graph only)",
        lambda: engine.run("gradient", {"x": x64, "seed": seeds64}, ["gradient"]),
    )
    add(
        "saliency, 1 ECG",
        lambda: engine.attribute("saliency", x1, t1),
        lambda: Saliency(model).attribute(xt1, target=tt1),
    )
    add(
        "saliency, 64 ECGs",
        lambda: engine.attribute("saliency", x64, target64),
        lambda: Saliency(model).attribute(xt64, target=tt64),
    )
    t_ig, ibs = best_internal_batch(model, xt64, tt64, max(3, repeats // 2))
    te = median_seconds(lambda: engine.attribute("integrated_gradients", x64, target64, n_steps=50), repeats)
    rows.append((f"integrated gradients, 50 steps, 64 ECGs (Captum internal_batch_size={ibs})", te, t_ig))
    add(
        "deeplift, 1 ECG",
        lambda: engine.attribute("deeplift", x1, t1, maxpool_rule="gradient"),
        lambda: DeepLift(model).attribute(xt1, target=tt1),
    )
    add(
        "deeplift, 64 ECGs",
        lambda: engine.attribute("deeplift", x64, target64, maxpool_rule="gradient"),
        lambda: DeepLift(model).attribute(xt64, target=tt64),
    )
    add(
        "guided backprop, 64 ECGs",
        lambda: engine.attribute("guided_backprop", x64, target64),
        lambda: GuidedBackprop(model).attribute(xt64, target=tt64),
    )
    lrp_ref = lrp_model(model, 1e-6)
    add(
        "lrp, 64 ECGs",
        lambda: engine.attribute("lrp", x64, target64),
        lambda: CaptumLRP(attach_epsilon_rules(lrp_ref, 1e-6)).attribute(xt64, target=tt64),
    )
    occ = Occlusion(model)
    add(
        "occlusion 1x50 stride 25, 4 ECGs",
        lambda: engine.attribute("occlusion", x64[:4], target64[:4]),
        lambda: occ.attribute(
            xt64[:4],
            target=tt64[:4],
            sliding_window_shapes=(1, 50),
            strides=(1, 25),
            perturbations_per_eval=16,
        ),
    )
    mask = torch.tensor(segment_mask(50))[None]
    add(
        "feature ablation 144 segments, 4 ECGs",
        lambda: engine.attribute("feature_ablation", x64[:4], target64[:4]),
        lambda: FeatureAblation(model).attribute(
            xt64[:4], target=tt64[:4], feature_mask=mask, perturbations_per_eval=16
        ),
    )
    for method in (
        "smoothgrad",
        "gradient_shap",
        "deeplift_shap",
        "gradcam",
        "guided_gradcam",
        "kernel_shap",
        "lime",
        "random",
    ):
        add(
            f"{method}, 4 ECGs (engine only)",
            lambda m=method: (
                engine.attribute(m, x64[:4], target64[:4], seed=0)
                if m not in ("gradcam", "guided_gradcam")
                else engine.attribute(m, x64[:4], target64[:4])
            ),
        )
    return rows


if __name__ == "__main__":
    main()
