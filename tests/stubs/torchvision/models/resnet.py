"""Test stand-in for ``torchvision.models.resnet``.

``zennit.torchvision`` imports ``BasicBlock`` and ``Bottleneck`` only to recognise
torchvision's 2-D ResNet blocks with ``isinstance``. No module of this project is an
instance of these classes, so Zennit's ResNet canonizers never apply here; the classes
refuse to be built so that a test cannot use them by mistake.
"""

from torch import nn

_MESSAGE = (
    "torchvision.models.resnet.{} is a test stand-in (tests/stubs/torchvision), not torchvision; "
    "this project has no 2-D torchvision ResNets"
)


class BasicBlock(nn.Module):
    """Stand-in for torchvision's ResNet basic block (isinstance checks only)."""

    expansion = 1

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError(_MESSAGE.format("BasicBlock"))


class Bottleneck(nn.Module):
    """Stand-in for torchvision's ResNet bottleneck block (isinstance checks only)."""

    expansion = 4

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError(_MESSAGE.format("Bottleneck"))
