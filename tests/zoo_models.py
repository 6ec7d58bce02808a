"""Published ECG architectures re-implemented small for the export's tests (issue #25).

Each follows its paper's or benchmark code's layer pattern at a reduced width; the patterns are what
the export must handle, not the capacity. Models are BatchNorm-calibrated on synthetic ECGs (a few
forward passes in training mode), so their activations look like a trained network's rather than
a fresh initialisation's (BatchNorm at identity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar

import numpy as np
import torch
from torch import nn


class AdaptiveConcatPool1d(nn.Module):
    """fastai's concat pooling: global max and global average, side by side."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [nn.functional.adaptive_max_pool1d(x, 1), nn.functional.adaptive_avg_pool1d(x, 1)], 1
        )


def _conv_bn_relu(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    # The PTB-XL benchmark's _conv1d: padding (k - 1) // 2, no bias before BatchNorm.
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, padding=(kernel - 1) // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(),
    )


class FcnWang(nn.Module):
    """fcn_wang of the PTB-XL benchmark (Strodthoff et al. 2021, after Wang et al. 2017): three
    conv-BN-ReLU blocks (kernels 8, 5, 3; filters 128, 256, 128 in the paper, scaled by ``width``),
    concat pooling, BatchNorm, dropout and a linear head. Its ReLUs see many pre-activations near zero:
    the model that provoked float32 near-ties in issue #25."""

    def __init__(self, leads: int = 12, classes: int = 5, width: float = 0.25) -> None:
        super().__init__()
        f = [max(4, round(c * width)) for c in (128, 256, 128)]
        self.features = nn.Sequential(
            _conv_bn_relu(leads, f[0], 8), _conv_bn_relu(f[0], f[1], 5), _conv_bn_relu(f[1], f[2], 3)
        )
        self.pool = AdaptiveConcatPool1d()
        self.head = nn.Sequential(
            nn.Flatten(), nn.BatchNorm1d(2 * f[2]), nn.Dropout(0.5), nn.Linear(2 * f[2], classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def synthetic_ecgs(n: int, leads: int, samples: int, seed: int) -> np.ndarray:
    """Random ECG-like strips: a beat train with random rate, amplitude and noise per lead."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples)[None, None, :]
    period = rng.uniform(0.5, 1.2, (n, 1, 1)) * samples / 2.5
    phase = rng.uniform(0, 1, (n, leads, 1)) * period
    beat = np.exp(-(((t + phase) % period - period / 2) ** 2) / (2 * (samples / 120) ** 2))
    amp = rng.normal(0.8, 0.4, (n, leads, 1))
    wave = 0.2 * np.sin(2 * np.pi * t / period * 1.7 + phase)
    return (amp * beat + wave + rng.normal(0, 0.03, (n, leads, samples))).astype(np.float32)


def calibrated(model: nn.Module, leads: int, samples: int, seed: int = 0, batches: int = 4) -> nn.Module:
    """``model`` with its BatchNorm statistics set on synthetic ECGs, in eval mode."""
    torch.manual_seed(seed)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average over the calibration batches
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    with torch.no_grad():
        for b in range(batches):
            model(torch.from_numpy(synthetic_ecgs(32, leads, samples, seed * 100 + b)))
    return model.eval()


def fcn_wang(
    leads: int = 12, samples: int = 250, classes: int = 5, width: float = 0.25, seed: int = 0
) -> nn.Module:
    torch.manual_seed(seed)
    return calibrated(FcnWang(leads, classes, width), leads, samples, seed)


def provoke_relu_ties(model: nn.Module) -> nn.Module:
    """Set the first BatchNorm's channel 0 so that a zero input maps to +1.2e-8 in float64 and to
    -8.5e-9 in PyTorch's float32 BatchNorm (the folded bias, computed in float64 and rounded once, keeps
    the float64 sign): on a flat stretch of signal every unit of that channel sits on a ReLU near-tie,
    which float32 PyTorch resolves the wrong way. The mean was found by a search over float32 values;
    ``tests/training/test_float32_parity.py`` checks that it still provokes the flip."""
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    with torch.no_grad():
        bn.weight[0], bn.bias[0], bn.running_var[0] = 1.1, 0.3, 0.7
        bn.running_mean[0] = float(np.float32(0.3 * np.sqrt(0.7 + bn.eps) / 1.1))
    return model


def with_flat_tail(x: np.ndarray, fraction: float = 0.3) -> np.ndarray:
    """``x`` with its last ``fraction`` of samples zero: a record shorter than the model's window,
    zero-padded to it (as loaders of PTB-XL-style strips do)."""
    out = x.copy()
    out[..., round(x.shape[-1] * (1 - fraction)) :] = 0.0
    return out


# --------------------------------------------------------------------------- patterns (issue #25)


class ShapeIfBlock(nn.Module):
    """torch_ecg's ResNet block pattern: the shortcut is fitted to the branch by an ``if`` on shapes
    (``if identity.shape[-1] < out.shape[-1]``), which torch.fx cannot trace symbolically."""

    def __init__(self, channels: int = 8, leads: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv1d(leads, channels, 5, padding=2)
        self.conv = nn.Conv1d(channels, channels, 4, padding=2)  # one sample longer than its input
        self.bn = nn.BatchNorm1d(channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = torch.relu(self.stem(x))
        out = self.bn(self.conv(identity))
        if identity.shape[-1] < out.shape[-1]:
            identity = nn.functional.pad(identity, (0, out.shape[-1] - identity.shape[-1]))
        out = torch.relu(out + identity)
        return self.fc(nn.functional.adaptive_avg_pool1d(out, 1).flatten(1))


class EinopsLikeRearrange(nn.Module):
    """einops' ``Rearrange("b c l -> b l c")`` as it runs: reads ``x.shape``, then permutes (the
    shape read is what stops torch.fx: ``KeyError: Proxy(getattr_1)`` in issue #25)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, length = x.shape
        return x.permute(0, 2, 1).reshape(b, length, c)


class RoundTrips(nn.Module):
    """No-op rearrangements between layers: a rearrangement and its inverse (einops-style modules,
    transpose twice), a singleton unsqueeze then squeeze, and an explicit 1-D max pool (which the
    dynamo ONNX exporter spells Unsqueeze -> 2-D MaxPool -> Squeeze)."""

    def __init__(self, leads: int = 12, classes: int = 5, use_einops: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(leads, 8, 5, padding=2)
        if use_einops:
            from einops.layers.torch import Rearrange

            self.to_time_major, self.to_channel_major = (
                Rearrange("b c l -> b l c"),
                Rearrange("b l c -> b c l"),
            )
        else:
            self.to_time_major, self.to_channel_major = EinopsLikeRearrange(), EinopsLikeRearrange()
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = self.to_channel_major(self.to_time_major(h))
        h = torch.relu(self.conv2(h.transpose(1, 2).transpose(1, 2)))
        h = self.pool(h.unsqueeze(1).squeeze(1))
        return self.fc(h.mean(-1))


class LayersInForward(nn.Module):
    """Parameter-free layers built inside forward(): ``nn.AdaptiveAvgPool1d(1)(x)``, ``nn.ReLU()(x)``,
    ``nn.MaxPool1d(2)(x)`` (torch.fx refuses them as modules that are not submodules)."""

    def __init__(self, leads: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv1d(leads, 8, 5, padding=2)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.MaxPool1d(2)(nn.ReLU()(self.conv(x)))
        return self.fc(nn.AdaptiveAvgPool1d(1)(h).flatten(1))


class ParametersInForward(nn.Module):
    """A layer with parameters built inside forward(): new random weights on every call."""

    def __init__(self, leads: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(8, classes)
        self.leads = leads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.Conv1d(self.leads, 8, 5)(x).mean(-1))


class RibeiroHead(nn.Module):
    """The ending of Ribeiro et al.'s ResNet (Nat. Commun. 2020): the last block's ReLU feeds a
    flatten and a linear head directly. GradCAM's channel weights there are the head's weights
    averaged over time, the same for every ECG; where they are all negative for a class (as here,
    by construction: issue #25 saw it on the trained network for every class) the map at that ReLU
    is zero on every ECG, while the layer before it still shows where the evidence is."""

    def __init__(self, leads: int = 12, samples: int = 64, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(leads, 8, 5, padding=2)
        self.conv2 = nn.Conv1d(8, 8, 5, padding=2, stride=samples // 4)
        self.fc = nn.Linear(8 * 4, classes)
        with torch.no_grad():
            self.fc.weight.copy_(-self.fc.weight.abs())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(h.flatten(1))


def pattern_factory(name: str, seed: int = 0) -> nn.Module:
    """The pattern models by name (a ``module:factory`` spec calls this through a wrapper)."""
    torch.manual_seed(seed)
    models = {
        "shape_if": ShapeIfBlock,
        "round_trips": RoundTrips,
        "layers_in_forward": LayersInForward,
    }
    return models[name]().eval()


def shape_if() -> nn.Module:
    return pattern_factory("shape_if")


def round_trips() -> nn.Module:
    return pattern_factory("round_trips")


def layers_in_forward() -> nn.Module:
    return pattern_factory("layers_in_forward")


# --------------------------------------------------------------------------- the zoo (issue #25)
# The PTB-XL benchmark's models (Strodthoff et al. 2021, github.com/helme/ecg_ptbxl_benchmarking,
# code/models/*.py), torch_ecg-like models and Ribeiro et al.'s ResNet, re-implemented from the
# papers and the benchmark code's layer patterns. ``width`` scales every channel count (1.0 is the
# published width; CI uses small ones); the head's hidden layer scales with it.


def _ch(c: int, width: float) -> int:
    return max(4, round(c * width))


def _conv1d(
    c_in: int,
    c_out: int,
    kernel: int = 3,
    stride: int = 1,
    dilation: int = 1,
    act: bool = True,
    bn: bool = True,
    drop_p: float = 0.0,
) -> nn.Sequential:
    """The benchmark's ``_conv1d``: [dropout], conv (padding (k - 1) // 2, no bias before BN), [BN],
    [ReLU]."""
    layers: list[nn.Module] = [nn.Dropout(drop_p)] if drop_p > 0 else []
    layers.append(
        nn.Conv1d(
            c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2, dilation=dilation, bias=not bn
        )
    )
    if bn:
        layers.append(nn.BatchNorm1d(c_out))
    if act:
        layers.append(nn.ReLU(True))
    return nn.Sequential(*layers)


def _head1d(
    nf: int, classes: int, hidden: list[int], ps: float = 0.5, concat_pooling: bool = True
) -> nn.Sequential:
    """The benchmark's ``create_head1d``: concat pooling, flatten, then BN-dropout-linear(-ReLU) layers."""
    sizes = [2 * nf if concat_pooling else nf, *hidden, classes]
    drops = [ps / 2] * (len(sizes) - 2) + [ps]
    layers: list[nn.Module] = [
        AdaptiveConcatPool1d() if concat_pooling else nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
    ]
    for i, (n_in, n_out, p) in enumerate(zip(sizes[:-1], sizes[1:], drops, strict=True)):
        layers += [nn.BatchNorm1d(n_in), nn.Dropout(p), nn.Linear(n_in, n_out)]
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(True))
    return nn.Sequential(*layers)


class SqueezeExcite1d(nn.Module):
    """The benchmark's SqueezeExcite1d: channel gates from the time average through two parameter
    matrices applied with ``torch.matmul`` (no nn.Linear), ReLU then sigmoid, multiplied onto ``x``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        reduced = max(1, channels // reduction)
        self.w1 = nn.Parameter(torch.randn(reduced, channels).unsqueeze(0) / channels**0.5)
        self.w2 = nn.Parameter(torch.randn(channels, reduced).unsqueeze(0) / reduced**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.mean(x, dim=2, keepdim=True)
        intermed = nn.functional.relu(torch.matmul(self.w1, z))
        s = torch.sigmoid(torch.matmul(self.w2, intermed))
        return s * x


class BasicConv1d(nn.Sequential):
    """The benchmark's ``basic_conv1d``: a stack of ``_conv1d`` layers (optionally SE blocks and max
    pools between them, optionally a first layer split into a 1x1 then a temporal conv) and the head."""

    def __init__(
        self,
        filters: list[int],
        kernel: int | list[int],
        stride: int,
        leads: int,
        classes: int,
        pool: int = 0,
        pool_stride: int = 1,
        se_reduction: int = 0,
        split_first_layer: bool = False,
        drop_p: float = 0.0,
        hidden: list[int] | None = None,
    ) -> None:
        kernels = kernel if isinstance(kernel, list) else [kernel] * len(filters)
        layers: list[nn.Module] = []
        for i, (c_out, k) in enumerate(zip(filters, kernels, strict=True)):
            c_in = leads if i == 0 else filters[i - 1]
            if i == 0 and split_first_layer:
                layers.append(
                    nn.Sequential(
                        _conv1d(leads, c_out, 1, act=False, bn=False),
                        _conv1d(c_out, c_out, k, stride, drop_p=drop_p),
                    )
                )
            else:
                layers.append(_conv1d(c_in, c_out, k, stride, drop_p=drop_p))
            if se_reduction > 0:
                layers.append(SqueezeExcite1d(c_out, se_reduction))
            if pool > 0 and i < len(filters) - 1:
                layers.append(nn.MaxPool1d(pool, stride=pool_stride, padding=(pool - 1) // 2))
        layers.append(_head1d(filters[-1], classes, hidden or []))
        super().__init__(*layers)


def schirrmeister_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    """Schirrmeister et al.'s deep ConvNet as the benchmark uses it: filters 25, 50, 100, 200, kernel 10,
    stride 3, max pools of 3, the first layer split, dropout 0.5."""
    f = [_ch(c, width) for c in (25, 50, 100, 200)]
    return BasicConv1d(
        f, 10, 3, leads, classes, pool=3, split_first_layer=True, drop_p=0.5, hidden=[_ch(128, width)]
    )


def sen_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    """The benchmark's squeeze-and-excitation net "sen": five conv layers of 128 filters, stride 2,
    each followed by SqueezeExcite1d (reduction 16)."""
    return BasicConv1d(
        [_ch(128, width)] * 5,
        3,
        2,
        leads,
        classes,
        se_reduction=4 if width < 0.5 else 16,
        hidden=[_ch(128, width)],
    )


def basic1d_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    """The benchmark's basic1d: five conv layers of 128 filters, kernel 3, stride 2."""
    return BasicConv1d([_ch(128, width)] * 5, 3, 2, leads, classes, hidden=[_ch(128, width)])


class AdaptiveConcatPoolRNN(nn.Module):
    """The benchmark's RNN head pooling: average, max and the last time step (for a bidirectional
    RNN the forward half's last step and the backward half's first), side by side. The pools are
    constructed in forward(), as in the benchmark code."""

    def __init__(self, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t1 = nn.AdaptiveAvgPool1d(1)(x)
        t2 = nn.AdaptiveMaxPool1d(1)(x)
        if not self.bidirectional:
            t3 = x[:, :, -1]
        else:
            half = x.size(1) // 2  # the benchmark's code has x.size(1) here, an empty second half
            t3 = torch.cat([x[:, :half, -1], x[:, half:, 0]], 1)
        return torch.cat([t1.squeeze(-1), t2.squeeze(-1), t3], 1)


class RNN1d(nn.Module):
    """The benchmark's RNN1d: transpose to time-major features, a 2-layer LSTM or GRU (batch_first),
    transpose back, concat-RNN pooling and a BN-dropout-linear head."""

    def __init__(
        self,
        leads: int = 12,
        classes: int = 5,
        lstm: bool = True,
        hidden: int = 256,
        layers: int = 2,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        cell = nn.LSTM if lstm else nn.GRU
        self.rnn = cell(leads, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        nf = hidden * (2 if bidirectional else 1)
        self.pool = AdaptiveConcatPoolRNN(bidirectional)
        self.head = nn.Sequential(nn.BatchNorm1d(3 * nf), nn.Dropout(0.5), nn.Linear(3 * nf, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x.transpose(1, 2))
        return self.head(self.pool(h.transpose(1, 2)))


def lstm_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    return RNN1d(leads, classes, lstm=True, hidden=_ch(256, width))


def gru_bidir_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    return RNN1d(leads, classes, lstm=False, hidden=_ch(256, width), bidirectional=True)


def _zoo_factory(build):  # a factory of calibrated zoo models
    def factory(
        leads: int = 12, samples: int = 250, classes: int = 5, width: float = 0.25, seed: int = 0
    ) -> nn.Module:
        torch.manual_seed(seed)
        return calibrated(build(leads, classes, width), leads, samples, seed)

    factory.__name__ = factory.__qualname__ = build.__name__.removesuffix("_net")
    factory.__doc__ = f"{build.__name__} at ``width``, BatchNorm-calibrated on synthetic ECGs, in eval mode."
    return factory


sen = _zoo_factory(sen_net)
lstm = _zoo_factory(lstm_net)
gru_bidir = _zoo_factory(gru_bidir_net)
schirrmeister = _zoo_factory(schirrmeister_net)
basic1d = _zoo_factory(basic1d_net)


# xresnet1d (fastai's XResNet in 1-D, as the benchmark's xresnet1d.py): a 3-conv stem, a max pool,
# bottleneck blocks (expansion 4) whose shortcut is an average pool (ceil mode) and a 1x1 conv
# where the shape changes, and the benchmark's concat-pooling head.


def _conv_layer(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False),
        nn.BatchNorm1d(c_out),
    ]
    return nn.Sequential(*layers, nn.ReLU(True)) if act else nn.Sequential(*layers)


class XResBlock(nn.Module):
    def __init__(self, c_in: int, hidden: int, c_out: int, stride: int, kernel: int) -> None:
        super().__init__()
        self.convpath = nn.Sequential(
            _conv_layer(c_in, hidden, 1),
            _conv_layer(hidden, hidden, kernel, stride),
            _conv_layer(hidden, c_out, 1, act=False),
        )
        idpath: list[nn.Module] = [nn.AvgPool1d(stride, ceil_mode=True)] if stride != 1 else []
        if c_in != c_out:
            idpath.append(_conv_layer(c_in, c_out, 1, act=False))
        self.idpath = nn.Sequential(*idpath)
        self.act = nn.ReLU(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.convpath(x) + self.idpath(x))


class XResNet1d(nn.Sequential):
    def __init__(
        self, layers: list[int], leads: int = 12, classes: int = 5, width: float = 1.0, kernel: int = 5
    ) -> None:
        stem = [_ch(32, width), _ch(32, width), _ch(64, width)]
        mods: list[nn.Module] = [
            _conv_layer(c_in, c_out, kernel, 2 if i == 0 else 1)
            for i, (c_in, c_out) in enumerate(zip([leads, *stem[:-1]], stem, strict=True))
        ]
        mods.append(nn.MaxPool1d(3, stride=2, padding=1))
        c_in = stem[-1]
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            hidden = _ch(planes, width)
            for b in range(n):
                mods.append(XResBlock(c_in, hidden, 4 * hidden, 2 if (i > 0 and b == 0) else 1, kernel))
                c_in = 4 * hidden
        mods.append(_head1d(c_in, classes, [_ch(128, width)]))
        super().__init__(*mods)


def xresnet1d50_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    """xresnet1d50: bottleneck blocks [3, 4, 6, 3], kernel 5 (the benchmark's best model family)."""
    return XResNet1d([3, 4, 6, 3], leads, classes, width)


# inception1d (the benchmark's inception1d.py, after InceptionTime): blocks of a bottleneck conv and
# three long convs (kernels 39, 19, 9) plus a max-pool-then-1x1 branch, concatenated, BN-ReLU;
# a residual shortcut (1x1 conv + BN, add, ReLU) every third block.


class InceptionBlock1d(nn.Module):
    def __init__(
        self, c_in: int, filters: int, bottleneck: int, kernels: tuple[int, ...] = (39, 19, 9)
    ) -> None:
        super().__init__()
        self.bottleneck = nn.Conv1d(c_in, bottleneck, 1, bias=False)
        self.convs = nn.ModuleList(
            nn.Conv1d(bottleneck, filters, k, padding=(k - 1) // 2, bias=False) for k in kernels
        )
        self.conv_bottle = nn.Sequential(
            nn.MaxPool1d(3, 1, padding=1), nn.Conv1d(c_in, filters, 1, bias=False)
        )
        self.bn_relu = nn.Sequential(nn.BatchNorm1d((len(kernels) + 1) * filters), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottled = self.bottleneck(x)
        return self.bn_relu(torch.cat([c(bottled) for c in self.convs] + [self.conv_bottle(x)], dim=1))


class Shortcut1d(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.act_fn = nn.ReLU(True)
        self.conv = nn.Conv1d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.act_fn(out + self.bn(self.conv(inp)))


class Inception1d(nn.Module):
    def __init__(self, leads: int = 12, classes: int = 5, width: float = 1.0, depth: int = 6) -> None:
        super().__init__()
        filters, bottleneck = _ch(32, width), _ch(32, width)
        n = 4 * filters
        self.im = nn.ModuleList(
            InceptionBlock1d(leads if d == 0 else n, filters, bottleneck) for d in range(depth)
        )
        self.sk = nn.ModuleList(Shortcut1d(leads if d == 0 else n, n) for d in range(depth // 3))
        self.head = _head1d(n, classes, [_ch(128, width)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_res = x
        for d, block in enumerate(self.im):
            x = block(x)
            if d % 3 == 2:
                x = self.sk[d // 3](input_res, x)
                input_res = x.clone()  # as the benchmark code has it
        return self.head(x)


def inception1d_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    return Inception1d(leads, classes, width)


# resnet1d_wang (the benchmark's resnet1d.py after Wang et al. 2017): a kernel-7 stem without pooling,
# basic blocks with kernels 5 and 3 at a fixed width of 128, the concat-pooling head.


class BasicBlock1d(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, kernels: tuple[int, int] = (5, 3)) -> None:
        super().__init__()
        k1, k2 = kernels
        self.conv1 = nn.Conv1d(c_in, c_out, k1, stride=stride, padding=(k1 - 1) // 2, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.relu = nn.ReLU(True)
        self.conv2 = nn.Conv1d(c_out, c_out, k2, padding=(k2 - 1) // 2, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.downsample = (
            nn.Sequential(nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm1d(c_out))
            if stride != 1 or c_in != c_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += residual
        return self.relu(out)


def resnet1d_wang_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    c = _ch(128, width)
    return nn.Sequential(
        _conv_layer(leads, c, 7),
        BasicBlock1d(c, c, 1),
        BasicBlock1d(c, c, 1),
        BasicBlock1d(c, c, 1),
        _head1d(c, classes, [_ch(128, width)]),
    )


xresnet1d50 = _zoo_factory(xresnet1d50_net)
inception1d = _zoo_factory(inception1d_net)
resnet1d_wang = _zoo_factory(resnet1d_wang_net)


# torch_ecg-like models (Wen Hao's torch_ecg, MIT licence; re-implemented after its configs): the
# ResNet block with the shape-dependent shortcut fit, the multi-scopic CNN (Cai et al. 2020) and
# ECG_CRNN's default SE attention; and Ribeiro et al.'s ResNet (Nat. Commun. 2020).


class TorchEcgResBlock(nn.Module):
    """torch_ecg's ResNetBasicBlock: two convs, a shortcut of max pool then 1x1 conv where the shape
    changes, fitted to the branch by an ``if`` on shapes (zero padding)."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int = 15) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            _conv_layer(c_in, c_out, kernel, stride), _conv_layer(c_out, c_out, kernel, act=False)
        )
        shortcut: list[nn.Module] = [nn.MaxPool1d(stride, stride)] if stride > 1 else []
        if c_in != c_out:
            shortcut += [nn.Conv1d(c_in, c_out, 1, bias=False), nn.BatchNorm1d(c_out)]
        self.shortcut = nn.Sequential(*shortcut)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        identity = self.shortcut(x)
        if identity.shape[-1] < out.shape[-1]:
            identity = nn.functional.pad(identity, (0, out.shape[-1] - identity.shape[-1]))
        elif identity.shape[-1] > out.shape[-1]:
            out = nn.functional.pad(out, (0, identity.shape[-1] - out.shape[-1]))
        return self.act(out + identity)


def resnet_nature_comm_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    """torch_ecg's resnet_nature_comm config: a kernel-15 stem, four stages of (64, 128, 196, 256)
    filters down-sampling by 4 (the Nature Communications ResNet of Ribeiro et al. in torch_ecg's
    blocks), global average pooling and a linear head."""
    c = [_ch(v, width) for v in (64, 64, 128, 196, 256)]
    blocks = [TorchEcgResBlock(c_in, c_out, 4) for c_in, c_out in pairwise(c)]
    return nn.Sequential(
        _conv_layer(leads, c[0], 15),
        *blocks,
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(c[-1], classes),
    )


class MultiScopic(nn.Module):
    """torch_ecg's MultiScopicCNN (Cai et al. 2020, CPSC 2019): three branches of growing dilation
    (1, 2, 4), each blocks of dilated conv-BN-ReLU and a max pool, concatenated on channels."""

    def __init__(self, leads: int, width: float) -> None:
        super().__init__()
        filters = [_ch(v, width) for v in (64, 128, 256)]
        self.branches = nn.ModuleList()
        for dilation in (1, 2, 4):
            layers: list[nn.Module] = []
            c_in = leads
            for c_out in filters:
                layers += [
                    nn.Conv1d(c_in, c_out, 11, padding=5 * dilation, dilation=dilation, bias=False),
                    nn.BatchNorm1d(c_out),
                    nn.ReLU(),
                    nn.MaxPool1d(2, 2),
                ]
                c_in = c_out
            self.branches.append(nn.Sequential(*layers))
        self.out_channels = 3 * filters[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


def multi_scopic_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    cnn = MultiScopic(leads, width)
    return nn.Sequential(cnn, nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(cnn.out_channels, classes))


class SEBlock(nn.Module):
    """torch_ecg's SEBlock (ECG_CRNN's default attention): time average, linear-ReLU-linear-sigmoid
    channel gates (no bias), multiplied onto ``x``."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        reduced = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, reduced, bias=False),
            nn.ReLU(),
            nn.Linear(reduced, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.pool(x).squeeze(-1))
        return x * y.unsqueeze(-1)


class EcgCrnn(nn.Module):
    """torch_ecg's ECG_CRNN at its default attention: a CNN (torch_ecg ResNet blocks), SE attention,
    global max pooling and a linear classifier (no RNN: the config's rnn is "none")."""

    def __init__(self, leads: int = 12, classes: int = 5, width: float = 0.25) -> None:
        super().__init__()
        c = [_ch(v, width) for v in (64, 64, 128, 256)]
        blocks = [TorchEcgResBlock(c_in, c_out, 2, kernel=9) for c_in, c_out in pairwise(c)]
        self.cnn = nn.Sequential(_conv_layer(leads, c[0], 15, 2), *blocks)
        self.attn = SEBlock(c[-1])
        self.pool = nn.AdaptiveMaxPool1d(1)
        self.clf = nn.Linear(c[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf(self.pool(self.attn(self.cnn(x))).flatten(1))


def ecg_crnn_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    return EcgCrnn(leads, classes, width)


def _ribeiro_padding(downsample: int, kernel: int) -> int:
    return max(0, (kernel - downsample + 1) // 2)


class RibeiroResBlock(nn.Module):
    """Ribeiro et al.'s ResBlock1d (github.com/antonior92/automatic-ecg-diagnosis, PyTorch version):
    pre-activation style, two inputs (x, y): the skip y is max-pooled (and 1x1-convolved) and added
    before the second BN-ReLU; returns the new (x, y)."""

    def __init__(
        self, c_in: int, c_out: int, downsample: int, kernel: int = 17, dropout: float = 0.8
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, kernel, padding=_ribeiro_padding(1, kernel), bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.relu = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        padding = _ribeiro_padding(downsample, kernel)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel, stride=downsample, padding=padding, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.dropout2 = nn.Dropout(dropout)
        skip: list[nn.Module] = [nn.MaxPool1d(downsample, stride=downsample)] if downsample > 1 else []
        if c_in != c_out:
            skip.append(nn.Conv1d(c_in, c_out, 1, bias=False))
        self.skip = nn.Sequential(*skip)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.skip(y)
        x = self.dropout1(self.relu(self.bn1(self.conv1(x))))
        x = self.conv2(x)
        x = x + y
        y = x
        x = self.dropout2(self.relu(self.bn2(x)))
        return x, y


class RibeiroResNet(nn.Module):
    """Ribeiro et al.'s ResNet: a conv-BN-ReLU stem, four residual blocks of (128, 196, 256, 320)
    filters down-sampling to the given lengths, flatten and a linear head (the ending
    :class:`RibeiroHead` isolates). 4096 samples: lengths 4096, 1024, 256, 64, 16 (the paper); 600
    samples: 600, 150, 75, 25, 5."""

    LENGTHS: ClassVar[dict[int, tuple[int, ...]]] = {
        4096: (4096, 1024, 256, 64, 16),
        600: (600, 150, 75, 25, 5),
    }

    def __init__(self, leads: int = 12, classes: int = 5, width: float = 0.25, samples: int = 4096) -> None:
        super().__init__()
        lengths = self.LENGTHS[samples]
        c = [_ch(v, width) for v in (64, 128, 196, 256, 320)]
        self.conv1 = nn.Conv1d(leads, c[0], 17, padding=_ribeiro_padding(1, 17), bias=False)
        self.bn1 = nn.BatchNorm1d(c[0])
        self.relu = nn.ReLU()
        self.blocks = nn.ModuleList(
            RibeiroResBlock(c[i], c[i + 1], lengths[i] // lengths[i + 1]) for i in range(len(c) - 1)
        )
        self.lin = nn.Linear(c[-1] * lengths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        y = x
        for block in self.blocks:
            x, y = block(x, y)
        return self.lin(x.view(x.size(0), -1))


def ribeiro600_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    return RibeiroResNet(leads, classes, width, samples=600)


def ribeiro4096_net(leads: int = 12, classes: int = 5, width: float = 0.25) -> nn.Module:
    return RibeiroResNet(leads, classes, width, samples=4096)


resnet_nature_comm = _zoo_factory(resnet_nature_comm_net)
multi_scopic = _zoo_factory(multi_scopic_net)
ecg_crnn = _zoo_factory(ecg_crnn_net)
ribeiro600 = _zoo_factory(ribeiro600_net)
ribeiro4096 = _zoo_factory(ribeiro4096_net)


@dataclass(frozen=True)
class ZooEntry:
    """One zoo network: its calibrated factory, its input (leads, samples) and sampling rate, and
    whether the export's IR reads it (``full``: every method; the recurrent nets export partially,
    with the forward-only methods)."""

    factory: Callable[..., nn.Module]
    samples: int = 250
    rate_hz: float = 100.0
    full: bool = True


ZOO: dict[str, ZooEntry] = {
    "fcn_wang": ZooEntry(fcn_wang),
    "xresnet1d50": ZooEntry(xresnet1d50),
    "inception1d": ZooEntry(inception1d),
    "resnet1d_wang": ZooEntry(resnet1d_wang),
    "schirrmeister": ZooEntry(schirrmeister),
    "basic1d": ZooEntry(basic1d),
    "sen": ZooEntry(sen),
    "lstm": ZooEntry(lstm, full=False),
    "gru_bidir": ZooEntry(gru_bidir, full=False),
    "ecg_crnn": ZooEntry(ecg_crnn, samples=1000, rate_hz=500.0),
    "resnet_nature_comm": ZooEntry(resnet_nature_comm, samples=1000, rate_hz=500.0),
    "multi_scopic": ZooEntry(multi_scopic, samples=1000, rate_hz=500.0),
    "ribeiro600": ZooEntry(ribeiro600, samples=600, rate_hz=400.0),
    "ribeiro4096": ZooEntry(ribeiro4096, samples=4096, rate_hz=400.0),
}


def zoo_model(name: str, width: float = 0.125, seed: int = 0, leads: int = 12, classes: int = 5) -> nn.Module:
    """The zoo network ``name`` at ``width``, calibrated on synthetic ECGs of its length, in eval mode."""
    entry = ZOO[name]
    return entry.factory(leads=leads, samples=entry.samples, classes=classes, width=width, seed=seed)


# The width CI exports the zoo at; the benchmark's full width is 1.0.
CI_WIDTH = 0.125


def _ci_factory(name: str) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        return zoo_model(name, width=CI_WIDTH)

    factory.__name__ = factory.__qualname__ = f"{name}_ci"
    factory.__doc__ = f"The zoo's {name} at CI_WIDTH: the ``zoo_models:{name}_ci`` factory spec."
    return factory


# ``zoo_models:<name>_ci``: zero-argument factories, as a ``module:factory`` spec calls them.
globals().update({f"{name}_ci": _ci_factory(name) for name in ZOO})
