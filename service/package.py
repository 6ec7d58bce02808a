"""Reading a model package (see training/export/package.py for how one is written).

NumPy, JSON and hashlib only: the serving path must run from the package files alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE_FORMAT = "ecgx-model-package"
SUPPORTED_VERSIONS = (1,)
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.bin"


class PackageError(ValueError):
    """A package folder is missing, malformed, of an unsupported version, or was modified."""


@dataclass(frozen=True)
class ModelPackage:
    """A package folder and its manifest. Immutable, so it can be shared across threads."""

    path: Path
    manifest: dict[str, Any]

    @property
    def class_keys(self) -> list[str]:
        return [c["key"] for c in self.manifest["classes"]]

    @property
    def n_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def leads(self) -> list[str]:
        return list(self.manifest["leads"])

    @property
    def input_shape(self) -> tuple[int, int]:
        _, leads, samples = self.manifest["input"]["shape"]
        return int(leads), int(samples)

    def graph_file(self, graph: str) -> Path:
        graphs = self.manifest["graphs"]
        if graph not in graphs:
            raise PackageError(f"package {self.path} has no {graph!r} graph; it has {sorted(graphs)}")
        return self.path / graphs[graph]["file"]

    def parameter_table(self) -> dict[str, dict[str, Any]]:
        """Name -> {offset, length, shape} of every weight in ``weights.bin``."""
        return self.manifest["parameters"]

    def read_parameters(self) -> dict[str, np.ndarray]:
        """Every weight initialiser, by name, read from ``weights.bin`` (float32 copies)."""
        raw = (self.path / WEIGHTS_FILE).read_bytes()
        out = {}
        for name, entry in self.parameter_table().items():
            data = raw[entry["offset"] : entry["offset"] + entry["length"]]
            out[name] = np.frombuffer(data, dtype="<f4").reshape(entry["shape"]).astype(np.float32)
        return out

    def class_index(self, key_or_code: str | int) -> int:
        """Index of a class given by index (also as text, ``"3"``), key (``"AF"``) or SNOMED code."""
        if isinstance(key_or_code, str) and key_or_code.isdigit() and int(key_or_code) < self.n_classes:
            key_or_code = int(key_or_code)  # SNOMED codes are 6+ digits, so this is never a code
        if isinstance(key_or_code, (int,)) and not isinstance(key_or_code, bool):
            if not 0 <= key_or_code < self.n_classes:
                raise ValueError(f"class index {key_or_code} is out of range 0..{self.n_classes - 1}")
            return int(key_or_code)
        for i, c in enumerate(self.manifest["classes"]):
            if key_or_code in (c["key"], c["code"]):
                return i
        raise ValueError(f"unknown class {key_or_code!r}; known: {', '.join(self.class_keys)}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_package(path: Path | str, verify_hashes: bool = True) -> ModelPackage:
    """Read and check a package: manifest format and version, every listed file present,
    and (``verify_hashes``) every file's SHA-256 as recorded at export."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise PackageError(f"{path} is not a model package: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{manifest_path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{manifest_path} is not an ecgx model package manifest")
    if manifest.get("format_version") not in SUPPORTED_VERSIONS:
        raise PackageError(
            f"{path}: package format version {manifest.get('format_version')} is not supported "
            f"(this ecgx reads {list(SUPPORTED_VERSIONS)})"
        )
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise PackageError(f"{path}: file {name} listed in the manifest is missing")
        if verify_hashes and sha256_file(file) != entry["sha256"]:
            raise PackageError(
                f"{path}: {name} does not match its SHA-256 in the manifest; the package was modified"
            )
    return ModelPackage(path=path, manifest=manifest)
