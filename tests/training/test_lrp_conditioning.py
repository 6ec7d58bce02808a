"""LRP-epsilon at small epsilon is ill-conditioned in float32; the export's check knows where.

Issue #8: trained models failed the export's LRP check on some machines because a unit
whose output lies within a few epsilon of zero amplifies float32 rounding. These tests pin
down the diagnosis (the conditioning estimate flags exactly such units), the check's
figures in the error message, and that trained models of several seeds and thread counts
export.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ecgx.training.config import TrainConfig
from ecgx.training.data.synth import generate, synthesize_dataset
from ecgx.training.export import export_checkpoint, export_package
from ecgx.training.export.parity import REL_TOL, describe_parity_failure, per_sample_parity
from ecgx.training.export.reference import ill_conditioned_samples
from ecgx.training.models import ModelConfig
from ecgx.training.train import CHECKPOINT_FILE, seed_dir, train_run


class OneConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, 2, 1, bias=True)
        self.relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(2, 9)

    def forward(self, x):
        return self.fc(self.gap(self.relu(self.conv(x))).flatten(1))


def _planted(z_at_sample: float) -> tuple[nn.Module, np.ndarray]:
    """A model whose unit 0 at time 0 of sample 1 sums large terms to ``z_at_sample``."""
    model = OneConv().eval()
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.weight[0, 0, 0], model.conv.weight[0, 1, 0] = 1.0, -1.0
        model.conv.weight[1, 2, 0] = 1.0
        model.conv.bias.zero_()
    x = np.full((2, 12, 600), 0.5, np.float32)
    x[:, 1] = 0.0  # unit 0 = lead I - lead II = 0.5 everywhere...
    x[1, 0, 0], x[1, 1, 0] = 5.0, 5.0 - z_at_sample  # ...but 5 - (5 - z) at sample 1, time 0
    return model, x


def test_a_unit_within_a_few_epsilon_of_zero_is_flagged_and_a_clear_one_is_not() -> None:
    model, x = _planted(2e-6)
    assert ill_conditioned_samples(model, x, 1e-6, REL_TOL).tolist() == [False, True]
    # The same unit is well-conditioned once epsilon is far above float32's rounding of it.
    assert ill_conditioned_samples(model, x, 1e-2, REL_TOL).tolist() == [False, False]
    # A unit far below zero is off in every float32 implementation: nothing to flag.
    model, x = _planted(-0.5)
    assert ill_conditioned_samples(model, x, 1e-6, REL_TOL).tolist() == [False, False]


def test_failure_message_shows_the_failing_samples_own_figures() -> None:
    ref = np.random.default_rng(0).normal(size=(8, 12, 600))
    got = ref.copy()
    got[5, 2, :30] += 0.05 * np.abs(ref).max()  # 30 of 7200 elements off: 0.42 %
    check = per_sample_parity(got, ref)
    line = describe_parity_failure("lrp", check)
    assert not check["ok"]
    assert line.startswith("lrp: sample 5: 0.42% of elements") and "max 5.00e-02" in line
    assert check["max_rel_error"] < 1e-12  # the agreeing samples' figures stay apart


def test_a_graph_that_is_wrong_everywhere_is_left_out_at_the_well_conditioned_epsilon(
    monkeypatch, tmp_path: Path
) -> None:
    import json

    from ecgx.core.errors import FailedPrecondition
    from ecgx.service.engine import AttributionEngine
    from ecgx.training.export import onnx_graphs

    # Relevance that skips the division by the layer output is wrong on every sample.
    def no_division(self, b, op, g, ins, out):
        shares = onnx_graphs.transpose_op(b, op, g)
        return [b.op("Mul", [c, a]) for c, a in zip(shares, ins, strict=True)]

    monkeypatch.setattr(onnx_graphs.EpsilonRule, "layer", no_division)
    torch.manual_seed(0)
    pkg = export_package(
        OneConv().eval(), tmp_path / "pkg", sample_inputs=generate(4, np.random.default_rng(1)).signals
    )
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert re.search(r"lrp: sample 0: .*% of elements off", manifest["unavailable"]["lrp"]["reason"])
    assert not (pkg / "lrp.onnx").exists() and (pkg / "gradient.onnx").is_file()
    with pytest.raises(FailedPrecondition, match="method 'lrp' is unavailable"):
        AttributionEngine(pkg).attribute("lrp", generate(1, np.random.default_rng(2)).signals, 0)


@pytest.mark.parametrize("threads", [0, 1, 2, 4])
def test_trained_models_export_whatever_the_thread_count(threads: int, tmp_path: Path) -> None:
    """Train two seeds with ``threads`` torch threads (0: torch's default); export each, checking 64 beats."""
    data = synthesize_dataset(tmp_path / "data", 600, seed=3, show_progress=False)
    model = ModelConfig(widths=(8, 16, 16), stem_stride=2)
    cfg = TrainConfig(max_epochs=4, threads=threads)
    train_run(data, [0, 1], tmp_path / "runs", model, cfg, show_progress=False)
    beats = generate(64, np.random.default_rng(threads)).signals
    for seed in (0, 1):
        ckpt = seed_dir(tmp_path / "runs", seed) / CHECKPOINT_FILE
        pkg = export_checkpoint(ckpt, tmp_path / f"pkg-{seed}", sample_inputs=beats)
        assert (pkg / "manifest.json").is_file()


def test_on_trained_models_every_lrp_disagreement_is_a_flagged_sample(trained_family) -> None:
    """256 beats through each trained seed at the served epsilon: ONNX Runtime and Captum may
    differ only on samples the conditioning estimate flags, and those are a minority."""
    import onnxruntime as ort

    from ecgx.training.checkpoint import load_checkpoint
    from ecgx.training.export.parity import parity, parity_ok
    from ecgx.training.export.reference import captum_attribution, near_tie_samples

    x = generate(256, np.random.default_rng(7)).signals
    target = np.arange(len(x)) % 9
    seed = np.eye(9, dtype=np.float32)[target]
    for s in (0, 1, 2):
        model, _ = load_checkpoint(seed_dir(trained_family["runs"], s) / CHECKPOINT_FILE)
        sess = ort.InferenceSession(str(trained_family[f"seed-{s}"] / "lrp.onnx"))
        got = sess.run(None, {"x": x, "seed": seed, "epsilon": np.array(1e-6, np.float32)})[1]
        ref = captum_attribution(model, "lrp", x, target, epsilon=1e-6)
        disagree = np.array([not parity_ok(parity(g, r)) for g, r in zip(got, ref, strict=True)])
        flagged = ill_conditioned_samples(model, x, 1e-6, REL_TOL) | near_tie_samples(model, x)
        assert not (disagree & ~flagged).any(), (
            f"seed {s}: unflagged disagreement {np.flatnonzero(disagree & ~flagged)}"
        )
        assert flagged.mean() < 0.5
