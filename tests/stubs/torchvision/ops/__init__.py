"""Test stand-in for ``torchvision.ops``: the names onnx2torch imports, none usable.

onnx2torch's converters for the ONNX NonMaxSuppression and RoiAlign operators use
these; ECG models have neither operator, so a call means something is wrong.
"""

from typing import NoReturn


def _refuse(name: str) -> NoReturn:
    raise NotImplementedError(
        f"torchvision.ops.{name} is a test stand-in (tests/stubs/torchvision), not torchvision; "
        "ECG models have no detection operators (NonMaxSuppression, RoiAlign)"
    )


def nms(*args, **kwargs) -> NoReturn:
    """Stand-in for non-maximum suppression: always raises NotImplementedError."""
    _refuse("nms")


def box_convert(*args, **kwargs) -> NoReturn:
    """Stand-in for box format conversion: always raises NotImplementedError."""
    _refuse("box_convert")


def roi_align(*args, **kwargs) -> NoReturn:
    """Stand-in for RoIAlign: always raises NotImplementedError."""
    _refuse("roi_align")


__all__ = ["box_convert", "nms", "roi_align"]
