"""The bottom layer: NumPy-only, no PyTorch, no ONNX Runtime, no gRPC.

Data records and formats (``schema``, ``dataset``, ``median_beat``), the model package contract
and its reader (``package_reader``), gate report verification (``signing``), the attribution
measures the gate and the stability sampler share (``similarity``, ``ecg_noise``), output staging
(``outputs``), progress (``progress``) and figures (``plots``). Every other layer may import
this one; it imports none of them (``tests/core/test_architecture.py``).
"""
