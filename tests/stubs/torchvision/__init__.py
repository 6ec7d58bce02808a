"""Test stand-in for torchvision (see tests/stubs/README.md): not the real package.

Zennit and onnx2torch import torchvision at import time for features this project
never uses (ResNet canonizers for torchvision's 2-D models; NMS and RoIAlign ONNX
operators). This package provides just the names they import; calling any of them
raises NotImplementedError.
"""

from torchvision import models, ops

__version__ = "0.0.0+ecgx.test.stub"
__all__ = ["models", "ops"]
