"""How separable the synthetic classes are for a linear model on raw samples (issue #10).

    python benchmarks/bench_separability.py --n 4000 --seed 0

Generates ``n`` beats, standardises the 12 x 600 raw samples (per feature, from
the training split), fits one L2-regularised logistic regression per class on a
75 % train split and prints the test AUROC per class, plus the mask area per
class (mean share of the 12 x 600 map a present class's mask covers).

If a linear model on raw samples reached near-perfect AUROC, the classes would
differ by fixed waveforms at fixed places, and a CNN's high accuracy (or an
attribution method's "localisation") would say little. Published 12-lead models
on real data reach about 0.85-0.97 on the hard classes; the synthetic data
should leave the linear model below that.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from ecgx.core.schema import CLASS_KEYS  # noqa: E402
from ecgx.training.data.synth import GENERATOR_VERSION, generate  # noqa: E402


def linear_aurocs(x: np.ndarray, y: np.ndarray, train_share: float = 0.75, c: float = 0.01) -> list[float]:
    """Per-class test AUROC of a logistic regression on standardised raw samples."""
    x = x.reshape(len(x), -1).astype(np.float64)
    cut = int(train_share * len(x))
    mu, sd = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    z = (x - mu) / sd
    out = []
    for k in range(y.shape[1]):
        model = LogisticRegression(C=c, max_iter=300)
        model.fit(z[:cut], y[:cut, k])
        out.append(float(roc_auc_score(y[cut:, k], model.decision_function(z[cut:]))))
    return out


def mask_areas(masks: np.ndarray, labels: np.ndarray) -> list[float]:
    """Per class, the mean share of the 12 x 600 map its mask covers, over beats with the class."""
    out = []
    for k in range(labels.shape[1]):
        rows = labels[:, k] == 1
        bits = (masks[rows] >> k) & 1
        out.append(float(bits.mean()) if rows.any() else float("nan"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="beats to generate (default 4000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--c", type=float, default=0.01, help="inverse L2 strength (default 0.01)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    batch = generate(args.n, np.random.default_rng(args.seed))
    aurocs = linear_aurocs(batch.signals, batch.labels, c=args.c)
    areas = mask_areas(batch.masks, batch.labels)
    print(f"generator {GENERATOR_VERSION}, {args.n} beats, seed {args.seed}, C={args.c}")
    print(f"{'class':6s} {'prev':>5s} {'linear AUROC':>12s} {'mask area':>9s}")
    for key, prev, auc, area in zip(CLASS_KEYS, batch.labels.mean(0), aurocs, areas, strict=True):
        print(f"{key:6s} {prev:5.2f} {auc:12.3f} {area:9.3f}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
