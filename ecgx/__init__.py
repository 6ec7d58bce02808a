"""ecgx: ECG classifiers served from ONNX with validated attribution methods."""

__version__ = "0.1.0"
