"""The CNN family: shapes, layer set, config validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ecgx.training.models import Add, ECGNet, ModelConfig, build_model

ALLOWED = (
    nn.Conv1d,
    nn.BatchNorm1d,
    nn.ReLU,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.Linear,
    nn.Dropout,
    nn.Sequential,
    ECGNet,
    Add,
)

CONFIGS = [
    ModelConfig(),
    ModelConfig(residual=True, widths=(16, 32), blocks_per_stage=2, pool="avg"),
    ModelConfig(widths=(8, 8, 8), kernel_size=5, dilation=2, stem_stride=1, batch_norm=False, conv_bias=True),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_logits_shape_and_dynamic_batch(cfg: ModelConfig) -> None:
    model = build_model(cfg).eval()
    for b in (1, 3):
        assert model(torch.randn(b, 12, 600)).shape == (b, 9)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_only_supported_layers_and_unshared_relus(cfg: ModelConfig) -> None:
    model = build_model(cfg)
    from ecgx.training.models import ConvBlock, ResidualBlock

    for m in model.modules():
        assert isinstance(m, (*ALLOWED, ConvBlock, ResidualBlock)), type(m)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len({id(r) for r in relus}) == len(relus)


def test_residual_config_has_skip_connections() -> None:
    from ecgx.training.models import ResidualBlock

    model = build_model(ModelConfig(residual=True))
    assert any(isinstance(m, ResidualBlock) for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_size": 4}, "kernel_size must be a positive odd"),
        ({"pool": "median"}, "pool must be one of"),
        ({"widths": ()}, "at least one stage"),
        ({"dropout": 1.0}, "dropout"),
        ({"widths": (8,) * 9}, "pool the beat away"),
    ],
)
def test_invalid_config_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_unknown_config_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown model setting.*'depth'"):
        ModelConfig.from_dict({"depth": 3})
    assert ModelConfig.from_dict(ModelConfig(residual=True).to_dict()) == ModelConfig(residual=True)
