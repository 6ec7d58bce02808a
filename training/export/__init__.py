"""ONNX export of trained models, with explicit backward graphs for attribution methods."""

from ecgx.training.export.ir import ExportError
from ecgx.training.export.package_writer import default_sample_inputs, export_checkpoint, export_package
from ecgx.training.export.source import ModelSource, from_module

__all__ = [
    "ExportError",
    "ModelSource",
    "default_sample_inputs",
    "export_checkpoint",
    "export_package",
    "from_module",
]
