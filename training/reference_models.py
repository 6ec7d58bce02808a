"""Published ECG architectures, re-implemented at configurable size for export tests.

The export must support the layer vocabulary of the networks hospitals and the
literature actually use (issue #12). These are re-implementations, written from the
papers and the structure of their public code (no code copied), of:

- :func:`xresnet1d`: the 1-D xresnet of the PTB-XL benchmark (Strodthoff et al.
  2021, after fastai's xresnet and He et al.'s "bag of tricks" ResNet-D);
- :func:`inception1d`: the 1-D Inception network of the same benchmark (after
  InceptionTime, Ismail Fawaz et al. 2020);
- :func:`ribeiro_resnet`: the residual network of Ribeiro et al. 2020, Nature
  Communications 11:1760 ("Automatic diagnosis of the 12-lead ECG using a deep
  neural network");
- :func:`grouped_conv_net`: a compact network of depthwise-separable and grouped
  convolutions (the MobileNet / ResNeXt vocabulary common in light-weight ECG models),
  with functional ReLU and pooling and a BatchNorm that cannot be folded.

Layer order, kernel sizes, padding and the shortcut and head structure follow the
originals; widths and depths are small by default so export tests run fast, and every
factory is callable with no arguments (``ecgx export --model
ecgx.training.reference_models:xresnet1d``) and returns a model in eval mode. Weights are
PyTorch's default initialisation; :func:`randomise_batchnorm` gives every BatchNorm
non-trivial statistics so that tests really exercise BatchNorm folding.

Input lengths (samples): ``xresnet1d``, ``inception1d`` and ``grouped_conv_net`` accept
any length of at least :data:`MIN_SAMPLES` (600 and 1000 are tested). ``ribeiro_resnet``
flattens its last feature map into the classifier, as the paper does, so it is built for
one length (``n_samples``, stored as ``model.input_shape``).

These are training-side modules: the serving path never imports this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ecgx.core.errors import InvalidArgument

# The shortest input each length-agnostic architecture is tested and documented for. Shorter
# inputs still run (every stride rounds up) but leave the deepest stages a handful of samples.
MIN_SAMPLES = {"xresnet1d": 64, "inception1d": 16, "grouped_conv_net": 32}


# --------------------------------------------------------------------------- shared pieces


class AdaptiveConcatPool1d(nn.Module):
    """fastai's concat pooling: global max and global average pooling joined along channels
    (max first), ``(B, C, L) -> (B, 2C, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.mp = nn.AdaptiveMaxPool1d(1)
        self.ap = nn.AdaptiveAvgPool1d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], dim=1)


def _concat_pool_head(n_features: int, n_classes: int, hidden: int, dropout: float) -> nn.Sequential:
    """fastai's ``create_head`` with concat pooling and one hidden layer, as used by the
    PTB-XL benchmark: pool, flatten, then (BatchNorm, Dropout, Linear, ReLU) and
    (BatchNorm, Dropout, Linear); the first dropout is half the second, as in fastai."""
    return nn.Sequential(
        AdaptiveConcatPool1d(),
        nn.Flatten(),
        nn.BatchNorm1d(2 * n_features),
        nn.Dropout(dropout / 2),
        nn.Linear(2 * n_features, hidden),
        nn.ReLU(),
        nn.BatchNorm1d(hidden),
        nn.Dropout(dropout),
        nn.Linear(hidden, n_classes),
    )


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """fastai's ConvLayer: a bias-free convolution with 'same' padding, BatchNorm, optional ReLU."""
    layers: list[nn.Module] = [
        nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _positive(**values: int) -> None:
    for name, v in values.items():
        if int(v) < 1:
            raise InvalidArgument(f"{name} must be a positive integer, got {v}")


# --------------------------------------------------------------------------- xresnet1d


class XResBlock1d(nn.Module):
    """A bottleneck block of xresnet (ResNet-D): 1x1 -> k (strided) -> 1x1 convolutions,
    each with BatchNorm (the last without ReLU), plus a shortcut that average-pools the
    identity when the block is strided (``AvgPool1d(2, ceil_mode=True)``) and projects it
    (1x1 convolution + BatchNorm) when the channel count changes; ``relu(body + shortcut)``."""

    def __init__(self, c_in: int, hidden: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.convpath = nn.Sequential(
            _conv_bn(c_in, hidden, 1),
            _conv_bn(hidden, hidden, kernel, stride=stride),
            _conv_bn(hidden, c_out, 1, relu=False),
        )
        shortcut: list[nn.Module] = []
        if stride != 1:
            shortcut.append(nn.AvgPool1d(stride, ceil_mode=True))
        if c_in != c_out:
            shortcut.append(_conv_bn(c_in, c_out, 1, relu=False))
        self.idpath = nn.Sequential(*shortcut)  # empty Sequential: the identity
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convpath(x)
        return self.act(y + self.idpath(x))


class XResNet1d(nn.Module):
    """The 1-D xresnet (see :func:`xresnet1d`)."""

    def __init__(
        self,
        n_leads: int,
        n_classes: int,
        width: int,
        layers: tuple[int, ...],
        expansion: int,
        kernel_size: int,
        concat_head_hidden: int,
        dropout: float,
    ) -> None:
        super().__init__()
        stem = [n_leads, max(1, width // 2), max(1, width // 2), width]
        self.stem = nn.Sequential(
            *[
                _conv_bn(stem[i], stem[i + 1], kernel_size, stride=2 if i == 0 else 1)
                for i in range(len(stem) - 1)
            ]
        )
        self.stem_pool = nn.MaxPool1d(kernel_size=3, stride=2, padding=1)
        # fastai: block widths [64 / expansion, 64, 128, 256, ...] scaled so that 64 -> width; a
        # block's output has width * expansion channels, its bottleneck the unexpanded width.
        sizes = [max(1, width // expansion)] + [width * 2**i for i in range(len(layers))]
        stages = []
        for i, n_blocks in enumerate(layers):
            blocks = []
            for j in range(n_blocks):
                c_in = (sizes[i] if j == 0 else sizes[i + 1]) * expansion
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(XResBlock1d(c_in, sizes[i + 1], sizes[i + 1] * expansion, kernel_size, stride))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = _concat_pool_head(sizes[-1] * expansion, n_classes, concat_head_hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem_pool(self.stem(x))))


def xresnet1d(
    n_leads: int = 12,
    n_classes: int = 9,
    width: int = 16,
    layers: tuple[int, ...] = (1, 1),
    expansion: int = 4,
    kernel_size: int = 5,
    concat_head_hidden: int = 32,
    dropout: float = 0.25,
) -> XResNet1d:
    """xresnet1d of the PTB-XL benchmark (Strodthoff, Wagner, Schaeffter, Samek: "Deep
    learning for ECG analysis: benchmarks and insights from PTB-XL", IEEE JBHI 25(5), 2021),
    the fastai xresnet (He et al., "Bag of tricks for image classification", CVPR 2019) in 1-D.

    Stem: three conv-BN-ReLU (the first with stride 2; channels ``width/2, width/2, width``),
    then ``MaxPool1d(3, stride=2, padding=1)``. One stage per entry of ``layers`` (that many
    bottleneck blocks; stages after the first halve the length in their first block, the
    shortcut then average-pooling the identity with ``ceil_mode``), stage widths ``width *
    2**i`` expanded by ``expansion``. Head: concat pooling, flatten, BN-Dropout-Linear-ReLU,
    BN-Dropout-Linear. xresnet1d101 is ``width=64, layers=(3, 4, 23, 3)``; fastai
    zero-initialises each block's last BatchNorm for training, which this (export-test)
    version does not, so the blocks are non-trivial without training.

    Any input length of at least ``MIN_SAMPLES["xresnet1d"]`` samples (every stride rounds up,
    so the two paths of a block always agree in length).
    """
    _positive(
        n_leads=n_leads, n_classes=n_classes, width=width, expansion=expansion, hidden=concat_head_hidden
    )
    if not layers or any(int(n) < 1 for n in layers):
        raise InvalidArgument(f"layers must be one or more positive block counts, got {layers}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InvalidArgument(f"kernel_size must be odd (symmetric 'same' padding), got {kernel_size}")
    model = XResNet1d(
        n_leads, n_classes, width, tuple(layers), expansion, kernel_size, concat_head_hidden, dropout
    )
    return model.eval()


# --------------------------------------------------------------------------- inception1d


class InceptionBlock1d(nn.Module):
    """An InceptionTime block: a 1x1 bottleneck feeding three parallel convolutions of
    decreasing kernel, and a max-pool -> 1x1 convolution branch on the block input; the
    four branches are concatenated, then BatchNorm and ReLU."""

    def __init__(self, c_in: int, filters: int, kernels: tuple[int, ...], bottleneck: int) -> None:
        super().__init__()
        self.bottleneck = nn.Conv1d(c_in, bottleneck, 1, bias=False)
        self.convs = nn.ModuleList(
            nn.Conv1d(bottleneck, filters, k, padding=(k - 1) // 2, bias=False) for k in kernels
        )
        self.pool_branch = nn.Sequential(
            nn.MaxPool1d(3, stride=1, padding=1), nn.Conv1d(c_in, filters, 1, bias=False)
        )
        self.bn = nn.BatchNorm1d((len(kernels) + 1) * filters)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottled = self.bottleneck(x)
        branches = [conv(bottled) for conv in self.convs] + [self.pool_branch(x)]
        return self.relu(self.bn(torch.cat(branches, dim=1)))


class InceptionShortcut1d(nn.Module):
    """The residual connection every third block: ``relu(out + BN(conv1x1(block input)))``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm1d(c_out)
        self.relu = nn.ReLU()

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.relu(out + self.bn(self.conv(inp)))


class Inception1d(nn.Module):
    """The 1-D Inception network (see :func:`inception1d`)."""

    def __init__(
        self,
        n_leads: int,
        n_classes: int,
        width: int,
        depth: int,
        kernels: tuple[int, ...],
        bottleneck: int,
        concat_head_hidden: int,
        dropout: float,
    ) -> None:
        super().__init__()
        channels = (len(kernels) + 1) * width
        self.blocks = nn.ModuleList(
            InceptionBlock1d(n_leads if d == 0 else channels, width, kernels, bottleneck)
            for d in range(depth)
        )
        self.shortcuts = nn.ModuleList(
            InceptionShortcut1d(n_leads if d == 0 else channels, channels) for d in range(depth // 3)
        )
        self.head = _concat_pool_head(channels, n_classes, concat_head_hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        for d, block in enumerate(self.blocks):  # depth is fixed at construction: fx unrolls the loop
            x = block(x)
            if d % 3 == 2:
                x = self.shortcuts[d // 3](residual, x)
                residual = x.clone()  # as in the benchmark's code (a no-op for the export)
        return self.head(x)


def inception1d(
    n_leads: int = 12,
    n_classes: int = 9,
    width: int = 8,
    depth: int = 3,
    kernel_size: int = 39,
    bottleneck: int = 8,
    concat_head_hidden: int = 32,
    dropout: float = 0.25,
) -> Inception1d:
    """inception1d of the PTB-XL benchmark (Strodthoff et al., IEEE JBHI 2021), after
    InceptionTime (Ismail Fawaz et al., "InceptionTime: finding AlexNet for time series
    classification", Data Min. Knowl. Disc. 34, 2020).

    ``depth`` Inception blocks of ``4 * width`` output channels: a 1x1 bottleneck (``bottleneck``
    channels) feeding convolutions with kernels ``kernel_size, kernel_size // 2, kernel_size //
    4`` (each made odd by subtracting one if even: 39, 19, 9 by default), plus
    ``MaxPool1d(3, stride=1, padding=1)`` -> 1x1 convolution on the block input; concatenation,
    BatchNorm, ReLU. After every third block a shortcut from the input of the three
    (1x1 convolution + BatchNorm) is added, then ReLU. Head: concat pooling as in
    :func:`xresnet1d`. The benchmark's model is ``width=32, depth=6, kernel_size=40,
    bottleneck=32``.

    Every layer keeps the length (stride 1, 'same' padding), so any input length of at least
    ``MIN_SAMPLES["inception1d"]`` samples works.
    """
    _positive(
        n_leads=n_leads,
        n_classes=n_classes,
        width=width,
        depth=depth,
        bottleneck=bottleneck,
        hidden=concat_head_hidden,
    )
    if kernel_size < 4:
        raise InvalidArgument(f"kernel_size must be at least 4 (its quarter is a kernel), got {kernel_size}")
    kernels = tuple(k - 1 if k % 2 == 0 else k for k in (kernel_size, kernel_size // 2, kernel_size // 4))
    model = Inception1d(n_leads, n_classes, width, depth, kernels, bottleneck, concat_head_hidden, dropout)
    return model.eval()


# --------------------------------------------------------------------------- Ribeiro et al. 2020


def _ribeiro_padding(downsample: int, kernel_size: int) -> int:
    """The paper's padding for a convolution of stride ``downsample``: with it the strided
    convolution's output length equals the max-pooled shortcut's, ``L // downsample``,
    whenever ``L % downsample != downsample - 1`` (e.g. every multiple of the downsampling)."""
    return max(0, (kernel_size - downsample + 1) // 2)


class RibeiroResBlock1d(nn.Module):
    """A residual unit of Ribeiro et al.: two streams, ``x`` (activated) and ``y`` (the
    pre-activation sum). ``y`` passes the shortcut (max pooling by ``downsample``, then a 1x1
    convolution if the channels change); ``x`` passes conv -> BN -> ReLU -> Dropout -> conv
    (stride ``downsample``); their sum is the next ``y`` and, after BN -> ReLU -> Dropout, the
    next ``x``. The sum thus feeds both the next block's addition and an activation path."""

    def __init__(self, c_in: int, c_out: int, downsample: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, kernel_size, padding=_ribeiro_padding(1, kernel_size), bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.relu1 = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(
            c_out,
            c_out,
            kernel_size,
            stride=downsample,
            padding=_ribeiro_padding(downsample, kernel_size),
            bias=False,
        )
        self.bn2 = nn.BatchNorm1d(c_out)
        self.relu2 = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        skip: list[nn.Module] = []
        if downsample > 1:
            skip.append(nn.MaxPool1d(downsample, stride=downsample))
        if c_in != c_out:
            skip.append(nn.Conv1d(c_in, c_out, 1, bias=False))
        self.skip = nn.Sequential(*skip)  # empty: the identity

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.skip(y)
        x = self.dropout1(self.relu1(self.bn1(self.conv1(x))))
        x = self.conv2(x)
        x = x + y
        y = x
        x = self.dropout2(self.relu2(self.bn2(x)))
        return x, y


class RibeiroResNet1d(nn.Module):
    """The residual network of Ribeiro et al. 2020 (see :func:`ribeiro_resnet`)."""

    def __init__(
        self,
        n_leads: int,
        n_classes: int,
        filters: tuple[int, ...],
        downsample: tuple[int, ...],
        kernel_size: int,
        dropout: float,
        n_samples: int,
        n_samples_out: int,
    ) -> None:
        super().__init__()
        self.input_shape = (n_leads, n_samples)  # the one length this model is built for
        self.conv1 = nn.Conv1d(
            n_leads, filters[0], kernel_size, padding=_ribeiro_padding(1, kernel_size), bias=False
        )
        self.bn1 = nn.BatchNorm1d(filters[0])
        self.relu = nn.ReLU()
        self.blocks = nn.ModuleList(
            RibeiroResBlock1d(filters[i], filters[i + 1], downsample[i], kernel_size, dropout)
            for i in range(len(downsample))
        )
        self.lin = nn.Linear(filters[-1] * n_samples_out, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        y = x
        for block in self.blocks:
            x, y = block(x, y)
        x = x.view(x.size(0), -1)
        return self.lin(x)


def ribeiro_resnet(
    n_leads: int = 12,
    n_classes: int = 9,
    filters: tuple[int, ...] = (16, 24, 32),
    downsample: tuple[int, ...] = (4, 4),
    kernel_size: int = 17,
    dropout: float = 0.2,
    n_samples: int = 4096,
) -> RibeiroResNet1d:
    """The residual network of Ribeiro et al., "Automatic diagnosis of the 12-lead ECG using a
    deep neural network", Nature Communications 11:1760 (2020).

    A conv-BN-ReLU stem with ``filters[0]`` channels, then one residual unit per entry of
    ``downsample`` (``filters[i] -> filters[i + 1]`` channels, length divided by
    ``downsample[i]``; see :class:`RibeiroResBlock1d`: pre-activation units whose sum feeds both
    the next unit's addition and a BatchNorm-ReLU path), then ``x.view(x.size(0), -1)`` and one
    Linear layer. Odd ``kernel_size`` with the paper's padding rule. The paper's network is
    ``filters=(64, 128, 196, 256, 320), downsample=(4, 4, 4, 4), kernel_size=16`` (Keras 'same'
    padding) on ``n_samples=4096`` (10 s at 400 Hz), dropout 0.8.

    The classifier reads the flattened last feature map, so the model is built for one input
    length, ``n_samples`` (kept as ``model.input_shape``); it must leave every unit's input
    length ``L`` with ``L % downsample != downsample - 1`` (true for 600, 1000 and 4096 with the
    default downsampling), or the two streams would differ by a sample. ValueError otherwise.
    """
    filters, downsample = tuple(int(f) for f in filters), tuple(int(d) for d in downsample)
    _positive(n_leads=n_leads, n_classes=n_classes, n_samples=n_samples, smallest_filters=min(filters))
    if len(filters) != len(downsample) + 1 or any(d < 1 for d in downsample):
        raise InvalidArgument(
            f"filters must have one entry more than downsample (the stem's, then one per unit) and "
            f"downsample factors must be positive; got filters={filters}, downsample={downsample}"
        )
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InvalidArgument(f"kernel_size must be odd (symmetric padding), got {kernel_size}")
    length = n_samples
    for i, ds in enumerate(downsample):
        pad = _ribeiro_padding(ds, kernel_size)
        conv_out = (length + 2 * pad - kernel_size) // ds + 1
        if length < kernel_size or conv_out != length // ds:
            raise InvalidArgument(
                f"n_samples={n_samples} does not fit downsample={downsample}: unit {i} gets {length} "
                f"samples, its strided convolution gives {conv_out} and its pooled shortcut "
                f"{length // ds}; choose a length whose unit inputs are not {ds - 1} modulo {ds} "
                "(e.g. a multiple of the total downsampling) and at least the kernel size"
            )
        length = conv_out
    model = RibeiroResNet1d(n_leads, n_classes, filters, downsample, kernel_size, dropout, n_samples, length)
    return model.eval()


# --------------------------------------------------------------------------- grouped convolutions


class GroupedConvNet(nn.Module):
    """A compact network of depthwise-separable and grouped convolutions (see :func:`grouped_conv_net`)."""

    def __init__(self, n_leads: int, n_classes: int, width: int, groups: int) -> None:
        super().__init__()
        wide = 2 * width
        self.stem = nn.Conv1d(n_leads, width, 7, stride=2, padding=3, bias=False)
        self.stem_bn = nn.BatchNorm1d(width)
        # depthwise-separable: one filter per channel (groups=channels), then a 1x1 mixing conv
        self.depthwise = nn.Conv1d(width, width, 5, padding=2, groups=width, bias=False)
        self.depthwise_bn = nn.BatchNorm1d(width)
        self.pointwise = nn.Conv1d(width, wide, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm1d(wide)
        self.pool = nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False)
        # BatchNorm after pooling and before a padded (grouped) conv: neither neighbour can
        # absorb it exactly (zero padding of the conv would become padding of the BN's bias),
        # so it stays a standalone per-channel affine op.
        self.pre_bn = nn.BatchNorm1d(wide)
        self.grouped = nn.Conv1d(wide, wide, 3, padding=1, groups=groups)
        self.grouped_bn = nn.BatchNorm1d(wide)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(wide, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.max_pool1d(x, 3, stride=2, padding=1)
        x = F.relu(self.depthwise_bn(self.depthwise(x)))
        x = F.relu(self.pointwise_bn(self.pointwise(x)))
        x = self.pool(x)
        x = F.relu(self.grouped_bn(self.grouped(self.pre_bn(x))))
        x = torch.flatten(self.gap(x), 1)
        return self.fc(x)


def grouped_conv_net(
    n_leads: int = 12, n_classes: int = 9, width: int = 24, groups: int = 4
) -> GroupedConvNet:
    """A grouped-convolution ECG network in the style of MobileNet (Howard et al. 2017:
    depthwise-separable convolutions) and ResNeXt (Xie et al., CVPR 2017: grouped
    convolutions), the building blocks of light-weight ECG classifiers.

    Conv (stride 2) -> BN -> ``F.relu`` -> ``F.max_pool1d(3, stride=2, padding=1)``; depthwise
    conv (``groups=width``) -> BN -> ReLU -> pointwise 1x1 conv to ``2 * width`` -> BN -> ReLU;
    ``AvgPool1d(3, stride=2, padding=1, count_include_pad=False)``; a standalone BatchNorm
    (not foldable) -> grouped conv (``groups``, padded) -> BN -> ReLU; global average pooling,
    ``torch.flatten(x, 1)``, Linear. ``2 * width`` must be divisible by ``groups``.

    Any input length of at least ``MIN_SAMPLES["grouped_conv_net"]`` samples.
    """
    _positive(n_leads=n_leads, n_classes=n_classes, width=width, groups=groups)
    if (2 * width) % groups:
        raise InvalidArgument(f"2 * width ({2 * width}) must be divisible by groups ({groups})")
    return GroupedConvNet(n_leads, n_classes, width, groups).eval()


# --------------------------------------------------------------------------- test support


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm of ``model`` non-trivial running statistics and affine parameters,
    deterministically from ``seed``, and return the model (in eval mode).

    A freshly built BatchNorm (mean 0, variance 1, weight 1, bias 0) is nearly the identity,
    so folding it could be wrong without any test noticing; after this each channel has its
    own shift and scale. Weights stay positive and variances well away from zero so the
    network's activations keep a reasonable scale.
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            c = module.num_features
            if module.track_running_stats and module.running_mean is not None:
                module.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
            if module.affine:
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
                module.bias.copy_(0.2 * torch.randn(c, generator=gen))
    return model.eval()
