"""ONNX Runtime execution providers: which to use and how each is configured.

One place for provider selection (TensorRT, CUDA, CPU, as this onnxruntime build offers) and
for every provider option ecgx sets. Options go to ONNX Runtime as provider options, as
``(name, options)`` pairs for ``InferenceSession(..., providers=...)``; never through environment
variables (``ORT_TENSORRT_*``), which a process shares with every session and which a deployment
cannot see in the configuration.

TensorRT compiles an engine per graph and input shape: its engine cache (the compiled engines)
and timing cache (per-layer kernel timings, reused across graphs and shapes) keep that cost to
the first start of a model on a machine; :func:`warm_up` runs each session once at model load so
the first request does not pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ecgx.core.errors import InvalidArgument

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_PREFERENCE = (TENSORRT, CUDA, CPU)
GPU_PROVIDERS = frozenset({TENSORRT, CUDA})
# What a dynamic (symbolic) input dimension becomes in the warm-up run: one ECG.
WARM_UP_DIM = 1


def select_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Execution providers to use: ``requested`` (validated) or the best available.

    The default order is TensorRT, CUDA, CPU, keeping those this onnxruntime build offers.
    """
    available = ort.get_available_providers()
    if requested is None:
        return [p for p in PROVIDER_PREFERENCE if p in available] or [CPU]
    requested = list(requested)
    if not requested:
        raise InvalidArgument("give at least one execution provider")
    missing = [p for p in requested if p not in available]
    if missing:
        raise InvalidArgument(
            f"execution provider(s) {missing} are not available; this onnxruntime offers {available}"
        )
    return requested


def gpu_providers_available() -> list[str]:
    """The GPU providers this onnxruntime build offers (none with the CPU-only ``onnxruntime``)."""
    return [p for p in PROVIDER_PREFERENCE if p in GPU_PROVIDERS and p in ort.get_available_providers()]


@dataclass(frozen=True)
class ProviderSettings:
    """How the GPU providers run; the CPU provider takes no options.

    Args:
        device_id: the CUDA device.
        tf32: CUDA's TF32 tensor-core maths for float32 convolutions and matrix products (faster
            on Ampere and later, about 1e-3 relative error; off: exact float32).
        fp16: TensorRT builds float16 engines (faster, about 1e-3 relative error).
        cache_dir: TensorRT's engine cache (``engines/``) and timing cache (``timing/``) folder;
            None: no caches, every start compiles every engine again.
        workspace_bytes: the most GPU memory TensorRT may use while building an engine.
        cudnn_search: CUDA's convolution algorithm search: EXHAUSTIVE (best kernels, a slower
            first run), HEURISTIC or DEFAULT.
    """

    device_id: int = 0
    tf32: bool = True
    fp16: bool = False
    cache_dir: Path | None = None
    workspace_bytes: int = 2 << 30
    cudnn_search: str = "EXHAUSTIVE"

    def __post_init__(self) -> None:
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, int) or self.device_id < 0:
            raise InvalidArgument(f"device_id must be a whole number >= 0, got {self.device_id!r}")
        if self.cudnn_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
            raise InvalidArgument(
                f"cudnn_search must be EXHAUSTIVE, HEURISTIC or DEFAULT, got {self.cudnn_search!r}"
            )
        if isinstance(self.workspace_bytes, bool) or not isinstance(self.workspace_bytes, int):
            raise InvalidArgument(f"workspace_bytes must be a whole number, got {self.workspace_bytes!r}")
        if self.workspace_bytes < 1:
            raise InvalidArgument(f"workspace_bytes must be >= 1, got {self.workspace_bytes}")


def _flag(on: bool) -> str:
    return "1" if on else "0"


def provider_options(provider: str, settings: ProviderSettings) -> dict[str, str]:
    """ONNX Runtime's options for one provider under ``settings`` (strings, as ORT takes them)."""
    if provider == TENSORRT:
        options = {
            "device_id": str(settings.device_id),
            "trt_fp16_enable": _flag(settings.fp16),
            "trt_max_workspace_size": str(settings.workspace_bytes),
            "trt_engine_cache_enable": _flag(settings.cache_dir is not None),
            "trt_timing_cache_enable": _flag(settings.cache_dir is not None),
        }
        if settings.cache_dir is not None:
            # Engines are keyed by graph, shape and settings, so fp16 and fp32 engines never mix.
            options["trt_engine_cache_path"] = str(Path(settings.cache_dir) / "engines")
            options["trt_timing_cache_path"] = str(Path(settings.cache_dir) / "timing")
        return options
    if provider == CUDA:
        return {
            "device_id": str(settings.device_id),
            "use_tf32": _flag(settings.tf32),
            "cudnn_conv_algo_search": settings.cudnn_search,
            "do_copy_in_default_stream": "1",
        }
    return {}


def session_providers(
    providers: Sequence[str], settings: ProviderSettings | None = None
) -> list[tuple[str, dict[str, str]]]:
    """``(name, options)`` pairs for ``ort.InferenceSession(..., providers=...)``, in order.

    Creates the TensorRT cache folders (TensorRT does not), so a first start can fill them.
    """
    settings = settings or ProviderSettings()
    pairs = [(p, provider_options(p, settings)) for p in providers]
    if TENSORRT in providers and settings.cache_dir is not None:
        for sub in ("engines", "timing"):
            (Path(settings.cache_dir) / sub).mkdir(parents=True, exist_ok=True)
    return pairs


# ONNX input types -> numpy (what the package graphs take).
INPUT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def warm_up_feeds(session: Any) -> dict[str, np.ndarray]:
    """Zero inputs of every input's type, one row where a dimension is dynamic."""
    feeds = {}
    for i in session.get_inputs():
        dtype = INPUT_DTYPES.get(i.type)
        if dtype is None:
            raise InvalidArgument(f"warm-up cannot build input {i.name!r} of type {i.type}")
        shape = [d if isinstance(d, int) and d > 0 else WARM_UP_DIM for d in i.shape]
        feeds[i.name] = np.zeros(shape, dtype=dtype)
    return feeds


def warm_up(session: Any) -> None:
    """Run ``session`` once on zeros: TensorRT builds (or loads from its cache) the engine and CUDA
    picks its kernels now, at model load, rather than in the first request's time."""
    session.run(None, warm_up_feeds(session))


def needs_warm_up(session: Any) -> bool:
    """A session on a GPU provider: the CPU provider has nothing to compile."""
    return any(p in GPU_PROVIDERS for p in session.get_providers())
