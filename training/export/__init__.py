"""ONNX export of trained models, with explicit backward graphs for attribution methods."""

from training.export.ir import ExportError
from training.export.package import export_checkpoint, export_package

__all__ = ["ExportError", "export_checkpoint", "export_package"]
