"""The 1-D CNN family for 12-lead median beats.

Built only from the layers the ONNX backward-graph export supports (DESIGN.md):
Conv1d, BatchNorm1d, ReLU, MaxPool1d, AvgPool1d, AdaptiveAvgPool1d, Linear,
Dropout and residual addition (:class:`Add`). Every ReLU is its own module instance (never
reused) because attribution rules (guided backprop, DeepLIFT, LRP) are applied
per ReLU module, in the export and in the Captum reference alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from ecgx.core.errors import InvalidArgument
from ecgx.core.schema import BEAT_SAMPLES, N_CLASSES, N_LEADS

POOL_KINDS = ("max", "avg")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one member of the CNN family.

    The network is a stem convolution, then one stage per entry of ``widths``
    (``blocks_per_stage`` conv blocks, then a pooling that halves the length),
    then global average pooling, dropout and a linear layer to the 9 logits.
    """

    widths: tuple[int, ...] = (32, 64, 64, 96)
    blocks_per_stage: int = 1
    kernel_size: int = 7
    stem_stride: int = 2
    dilation: int = 1
    residual: bool = False
    pool: str = "max"
    batch_norm: bool = True
    conv_bias: bool = False
    dropout: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        _check(len(self.widths) >= 1, "widths must list at least one stage width")
        _check(all(w >= 1 for w in self.widths), f"widths must be positive, got {self.widths}")
        _check(self.blocks_per_stage >= 1, f"blocks_per_stage must be >= 1, got {self.blocks_per_stage}")
        _check(
            self.kernel_size >= 1 and self.kernel_size % 2 == 1,
            f"kernel_size must be a positive odd number ('same' padding), got {self.kernel_size}",
        )
        _check(self.stem_stride in (1, 2, 4), f"stem_stride must be 1, 2 or 4, got {self.stem_stride}")
        _check(self.dilation >= 1, f"dilation must be >= 1, got {self.dilation}")
        _check(self.pool in POOL_KINDS, f"pool must be one of {POOL_KINDS}, got {self.pool!r}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        length = BEAT_SAMPLES // self.stem_stride // 2 ** len(self.widths)
        _check(
            length >= 1, f"{len(self.widths)} stages after stem_stride {self.stem_stride} pool the beat away"
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a config-file table, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidArgument(f"unknown model setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)


class ConvBlock(nn.Sequential):
    """Conv1d -> BatchNorm1d -> ReLU with 'same' padding."""

    def __init__(self, c_in: int, c_out: int, cfg: ModelConfig, stride: int = 1):
        pad = cfg.dilation * (cfg.kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv1d(
                c_in,
                c_out,
                cfg.kernel_size,
                stride=stride,
                padding=pad,
                dilation=cfg.dilation,
                bias=cfg.conv_bias or not cfg.batch_norm,
            )
        ]
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(c_out))
        layers.append(nn.ReLU())
        super().__init__(*layers)


class Add(nn.Module):
    """Residual addition as a module, so attribution rules (LRP's epsilon rule) can attach to it."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class ResidualBlock(nn.Module):
    """Two convolutions with a skip connection: relu(body(x) + shortcut(x)).

    The shortcut is the identity when shapes match, else a 1x1 convolution
    (+ BatchNorm), as in ResNet.
    """

    def __init__(self, c_in: int, c_out: int, cfg: ModelConfig):
        super().__init__()
        pad = cfg.dilation * (cfg.kernel_size - 1) // 2
        bias = cfg.conv_bias or not cfg.batch_norm
        body: list[nn.Module] = [ConvBlock(c_in, c_out, cfg)]
        body.append(nn.Conv1d(c_out, c_out, cfg.kernel_size, padding=pad, dilation=cfg.dilation, bias=bias))
        if cfg.batch_norm:
            body.append(nn.BatchNorm1d(c_out))
        self.body = nn.Sequential(*body)
        # No module on an identity shortcut: the block input itself is added, so LRP
        # sees one tensor feeding two layers rather than an extra pass-through layer.
        self.shortcut: nn.Sequential | None = None
        if c_in != c_out:
            short: list[nn.Module] = [nn.Conv1d(c_in, c_out, 1, bias=bias)]
            if cfg.batch_norm:
                short.append(nn.BatchNorm1d(c_out))
            self.shortcut = nn.Sequential(*short)
        self.add = Add()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.add(self.body(x), skip))


class ECGNet(nn.Module):
    """A 1-D CNN mapping (B, 12, 600) millivolts to (B, 9) logits."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.config = cfg or ModelConfig()
        cfg = self.config
        layers: list[nn.Module] = [ConvBlock(N_LEADS, cfg.widths[0], cfg, stride=cfg.stem_stride)]
        c_in = cfg.widths[0]
        for width in cfg.widths:
            for _ in range(cfg.blocks_per_stage):
                block = ResidualBlock(c_in, width, cfg) if cfg.residual else ConvBlock(c_in, width, cfg)
                layers.append(block)
                c_in = width
            layers.append(nn.MaxPool1d(2) if cfg.pool == "max" else nn.AvgPool1d(2))
        self.features = nn.Sequential(*layers)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(c_in, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gap(self.features(x)).flatten(1)
        return self.classifier(self.dropout(h))


def build_model(cfg: ModelConfig | None = None) -> ECGNet:
    """Build a freshly initialised model of the family."""
    return ECGNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
