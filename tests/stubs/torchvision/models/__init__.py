"""Test stand-in for ``torchvision.models``: only the ResNet block classes Zennit imports."""

from torchvision.models import resnet

__all__ = ["resnet"]
