"""ecgx: ECG classifiers served from ONNX with validated attribution methods.

The public API, imported lazily (PEP 562): ``import ecgx`` loads neither PyTorch nor ONNX
Runtime, so a serving install (no PyTorch) can use every name whose layer it has::

    import ecgx

    package = ecgx.export_checkpoint("runs/default/seed-0/checkpoint.pt", "packages/s0")
    engine = ecgx.AttributionEngine(package)
    maps = engine.attribute("integrated_gradients", beats, target="AF", n_steps=50)
    run = ecgx.run_gate(package, "data/validation", family=["packages/s1", "packages/s2"])

``__all__`` is pinned by ``tests/core/test_public_api.py``; anything else is internal.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it. One table: __all__, __getattr__ and __dir__ read it.
_PUBLIC: dict[str, str] = {
    # data
    "Dataset": "ecgx.core.dataset",
    "load_dataset": "ecgx.core.dataset",
    "synthesize_dataset": "ecgx.training.data.synth",
    # export (needs the `train` extra: PyTorch)
    "ExportError": "ecgx.training.export",
    "ModelSource": "ecgx.training.export",
    "export_checkpoint": "ecgx.training.export",
    "export_package": "ecgx.training.export",
    "from_module": "ecgx.training.export",
    # packages and attributions (serving install)
    "ModelPackage": "ecgx.core.package_reader",
    "load_package": "ecgx.core.package_reader",
    "AttributionEngine": "ecgx.service.engine",
    "METHOD_NAMES": "ecgx.service.methods",
    # the gate
    "GateRun": "ecgx.validation.gate",
    "run_gate": "ecgx.validation.gate",
    "Policy": "ecgx.validation.policy",
    "load_policy": "ecgx.validation.policy",
}

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'ecgx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
