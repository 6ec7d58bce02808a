"""Serving path: ONNX Runtime engine, model repository, gRPC server. Never imports PyTorch."""
