"""The curated public API of ``ecgx`` (as httpx pins its own): what users import, and nothing more."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ecgx

PUBLIC = {
    "__version__",
    "AttributionEngine",
    "Dataset",
    "ExportError",
    "GateRun",
    "METHOD_NAMES",
    "ModelPackage",
    "ModelSource",
    "Policy",
    "export_checkpoint",
    "export_package",
    "from_module",
    "load_dataset",
    "load_package",
    "load_policy",
    "run_gate",
    "synthesize_dataset",
}


def test_the_public_names_are_pinned() -> None:
    assert set(ecgx.__all__) == PUBLIC
    assert len(ecgx.__all__) == len(PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_resolves_to_its_definition(name: str) -> None:
    value = getattr(ecgx, name)
    assert value is not None
    if name not in ("__version__", "METHOD_NAMES"):
        assert value.__module__.startswith("ecgx."), value.__module__
        assert value.__name__ == name


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'engine'"):
        ecgx.engine  # noqa: B018


def test_importing_ecgx_loads_neither_pytorch_nor_onnx_runtime() -> None:
    code = "import sys, ecgx; print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_the_serving_names_import_without_pytorch() -> None:
    code = (
        "import sys, ecgx; ecgx.AttributionEngine, ecgx.load_package, ecgx.run_gate, ecgx.METHOD_NAMES; "
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", (r.stdout, r.stderr)
