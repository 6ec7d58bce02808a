"""Shared fixtures: small synthetic datasets from the project's generator, and the shared WFDB records."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from ecgx.training.data.synth import synthesize_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Zennit and onnx2torch (the LRP and ONNX-import references) import torchvision, which does not
# install beside the local torch build: a minimal stand-in (tests/stubs/README.md) takes its place.
STUBS = Path(__file__).resolve().parent / "stubs"
if importlib.util.find_spec("torchvision") is None and str(STUBS) not in sys.path:
    sys.path.insert(0, str(STUBS))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared WFDB records not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 synthetic beats, seed 0: enough for mechanics, not for accuracy."""
    out = tmp_path_factory.mktemp("data") / "synth600"
    return synthesize_dataset(out, 600, seed=0, show_progress=False)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported package of a small untrained residual CNN (export itself is tested elsewhere)."""
    import torch

    from ecgx.training.export import export_package
    from ecgx.training.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=(8, 16), stem_stride=4, residual=True))
    return export_package(model, tmp_path_factory.mktemp("pkg") / "tiny")


@pytest.fixture(scope="session")
def trained_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small CNNs trained from seeds 0, 1, 2 and exported, plus 64 validation beats with masks.

    Small and short (about 40 s in all), yet trained: what the gate's checks tell apart
    is a model that learned something from one that did not. On the synthetic data that is
    not trivially separable (generator 2.0), 1,500 beats and 8 epochs left the models
    predicting 11 % of the validation targets; 3,000 and 12 predict about 40 %, which the
    perturbation check (predicted targets only) needs.
    """
    from ecgx.training.config import TrainConfig
    from ecgx.training.export import export_checkpoint
    from ecgx.training.models import ModelConfig
    from ecgx.training.train import CHECKPOINT_FILE, seed_dir, train_run

    root = tmp_path_factory.mktemp("family")
    data = synthesize_dataset(root / "train", 3000, seed=3, show_progress=False)
    validation = synthesize_dataset(root / "validation", 64, seed=4, show_progress=False)
    model = ModelConfig(widths=(8, 16, 16), stem_stride=2)
    train_run(data, [0, 1, 2], root / "runs", model, TrainConfig(max_epochs=12), show_progress=False)
    out = {"data": validation, "runs": root / "runs"}
    for s in (0, 1, 2):
        out[f"seed-{s}"] = export_checkpoint(
            seed_dir(root / "runs", s) / CHECKPOINT_FILE, root / "packages" / f"seed-{s}"
        )
    return out


# The serving tests need a report in which gradcam passes and saliency fails (what a method's
# verdict does to serving is what they test, not the gate). Under the default criteria gradcam
# fails randomisation on this small family (some of its maps are all zero, and undefined
# similarity fails), and on these small models no method beats |x| in perturbation; so here
# only the changed-model check blocks (faithfulness on copies with the output layer or the top
# block randomised, against the control): gradcam's lower end is about 0.10, saliency's -0.14,
# every reference row's below -0.13.
GATE_POLICY = """
[gate]
ecgs = 32
allow_incomplete_data = true
[checks.randomisation]
ecgs = 8
blocking = false
[checks.perturbation]
bootstrap = 100
blocking = false
[checks.changed_model]
bootstrap = 100
"""


@pytest.fixture(scope="session")
def gated(trained_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Keys (trusted and untrusted), the policy, and the unsigned gate report of seed-0 (the
    repository and service tests sign copies of it: tests/service/test_repository.py make_package)."""
    from ecgx.core.signing import load_private_key, load_public_key
    from ecgx.validation.gate import run_gate
    from ecgx.validation.signing import generate_keypair

    tmp = tmp_path_factory.mktemp("gated")
    generate_keypair(tmp / "keys")
    generate_keypair(tmp / "other")
    policy = tmp / "policy.toml"
    policy.write_text(GATE_POLICY)
    run = run_gate(
        trained_family["seed-0"],
        trained_family["data"],
        policy=policy,
        methods=["gradcam", "saliency"],
        workers=1,
        show_progress=False,
        research=True,  # GATE_POLICY is below the floor, to keep the suite fast
    )
    assert run.report["verdict"] == "pass", run.report["headline"]
    # The serving tests use this report as a template (make_package re-signs edited copies) and
    # need one that may serve: the research mark of the small policy is taken off.
    servable = {**run.report, "research": False, "servable": True}
    servable["headline"] = servable["headline"].removeprefix(
        "RESEARCH report, not servable (ecgx validate --research): "
    )
    return {
        "family": trained_family,
        "report": servable,
        "private": load_private_key(tmp / "keys" / "gate_signing_key.pem"),
        "public": load_public_key(tmp / "keys" / "gate_public_key.pem"),
        "public_pem": tmp / "keys" / "gate_public_key.pem",
        "other_private": load_private_key(tmp / "other" / "gate_signing_key.pem"),
        "other_public": load_public_key(tmp / "other" / "gate_public_key.pem"),
        "other_public_pem": tmp / "other" / "gate_public_key.pem",
    }
