"""Reading a model package (see training/export/package_writer.py for how one is written).

NumPy, JSON, hashlib and the ``onnx`` protobuf reader only: the serving path runs from the
package files alone.

Integrity. Every file the package uses (``weights.bin`` and every graph) must be listed in
the manifest's ``files`` table under a plain file name (no folders, no ``..``), be a
regular file (not a symbolic link) and match its SHA-256. Graphs and weights are read
once, hashed and kept in memory: the engine builds its ONNX Runtime sessions from these
verified bytes, never from the files again, so a file swapped after loading is never
used. Inside each graph, the only external data allowed are parameter initialisers
stored in ``weights.bin`` exactly where the manifest's parameter table says.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from ecgx.core.errors import InvalidArgument, NotFound

PACKAGE_FORMAT = "ecgx-model-package"
SUPPORTED_VERSIONS = (1,)
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.bin"
# The training split's fingerprint (training/export/package_writer.py writes it; validation/leakage.py reads).
TRAINING_BEATS_FILE = "training_beats.sha256"
TRAINING_IDS_FILE = "training_ids.json"
# Every method needs one of these (perturbation methods the forward pass, gradient methods and the
# gate the gradient): the export refuses a package without them. Any other graph may be missing
# when the export could not build or check it for the model; the manifest's ``unavailable`` then
# says why (graph -> {"reason": ..., "methods": [the methods that need it]}).
REQUIRED_GRAPHS = ("forward", "gradient")
# A partial package (manifest ``partial``: {"reason": ...}) is a model the export's IR could not read:
# it holds the forward pass only, and ``unavailable`` lists every other graph with that reason.
PARTIAL_REQUIRED_GRAPHS = ("forward",)
# Package files are plain names in the package folder: no separators, no "." or "..".
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FLOAT32 = 1  # onnx.TensorProto.FLOAT


class PackageError(InvalidArgument):
    """A package folder is missing, malformed, of an unsupported version, or was modified."""


def is_plain_name(name: object) -> bool:
    """True for a file name that can only mean a file directly inside the package folder."""
    return isinstance(name, str) and bool(_PLAIN_NAME.fullmatch(name)) and ".." not in name


@dataclass(frozen=True)
class ModelPackage:
    """A package folder, its manifest and the verified bytes of its graphs and weights.

    Immutable, so it can be shared across threads. Only :func:`load_package` makes one.
    """

    path: Path
    manifest: dict[str, Any]
    # File name -> the bytes that were hashed at load (graphs and weights.bin).
    contents: Mapping[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    # SHA-256 of the manifest bytes that were parsed.
    manifest_sha256: str | None = None
    # Graph -> the names of its initialisers that are package parameters (weights.bin).
    graph_parameters: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False, compare=False)

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

    @property
    def partial(self) -> str | None:
        """Why the package holds only the forward pass (the export's IR could not read the model),
        or None for a full package."""
        entry = self.manifest.get("partial")
        return entry["reason"] if entry else None

    @property
    def unavailable(self) -> dict[str, dict[str, Any]]:
        """Graph -> {"reason", "methods"} for each graph the export left out (empty when none)."""
        return dict(self.manifest.get("unavailable") or {})

    def graph_unavailable_reason(self, graph: str) -> str:
        """Why the package has no ``graph``, as the end of a sentence ("is unavailable: ...")."""
        entry = self.unavailable.get(graph)
        if entry is not None:
            return f"is unavailable for this model: {entry['reason']}"
        return (
            f"is not in the package (it has {sorted(self.manifest['graphs'])}); a package exported "
            "before this graph existed lacks it: re-export the model"
        )

    def _graph_entry(self, graph: str) -> dict[str, Any]:
        graphs = self.manifest["graphs"]
        if graph not in graphs:
            raise PackageError(f"package {self.path}: graph {graph!r} {self.graph_unavailable_reason(graph)}")
        return graphs[graph]

    def graph_file(self, graph: str) -> Path:
        """Where the graph was read from (for messages: sessions use :meth:`graph_bytes`)."""
        return self.path / self._graph_entry(graph)["file"]

    def graph_bytes(self, graph: str) -> bytes:
        """The ONNX model of ``graph`` as read and verified at load."""
        return self._content(self._graph_entry(graph)["file"])

    def graph_signature(self, graph: str) -> tuple[list[str], list[str]]:
        """(input names, output names) of ``graph`` as the manifest records them."""
        entry = self._graph_entry(graph)
        return list(entry["inputs"]), list(entry["outputs"])

    def weights_bytes(self) -> bytes:
        """``weights.bin`` as read and verified at load."""
        return self._content(WEIGHTS_FILE)

    def _content(self, name: str) -> bytes:
        try:
            return self.contents[name]
        except KeyError:
            raise PackageError(
                f"{self.path}: {name} was not read at load; load packages with load_package"
            ) from None

    def parameter_table(self) -> dict[str, dict[str, Any]]:
        """Name -> {offset, length, shape} of every weight in ``weights.bin``."""
        return self.manifest["parameters"]

    def parameter_views(self) -> dict[str, np.ndarray]:
        """Every weight initialiser, by name: read-only float32 views of the verified weights."""
        raw = self.weights_bytes()
        return {
            name: np.frombuffer(raw, "<f4", int(np.prod(e["shape"], dtype=np.int64)), e["offset"]).reshape(
                e["shape"]
            )
            for name, e in self.parameter_table().items()
        }

    def read_parameters(self) -> dict[str, np.ndarray]:
        """Every weight initialiser, by name, from the verified ``weights.bin`` (float32 copies)."""
        return {name: view.astype(np.float32) for name, view in self.parameter_views().items()}

    def class_index(self, key_or_code: str | int) -> int:
        """Index of a class given by index (also as text, ``"3"``), key (``"AF"``) or SNOMED code."""
        if isinstance(key_or_code, str) and key_or_code.isdigit() and int(key_or_code) < self.n_classes:
            key_or_code = int(key_or_code)  # SNOMED codes are 6+ digits, so this is never a code
        if isinstance(key_or_code, (int,)) and not isinstance(key_or_code, bool):
            if not 0 <= key_or_code < self.n_classes:
                raise NotFound(f"class index {key_or_code} is out of range 0..{self.n_classes - 1}")
            return int(key_or_code)
        for i, c in enumerate(self.manifest["classes"]):
            if key_or_code in (c["key"], c["code"]):
                return i
        raise NotFound(f"unknown class {key_or_code!r}; known: {', '.join(self.class_keys)}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_regular(folder: Path, name: str) -> int:
    """A read-only descriptor of the regular file ``name`` directly in ``folder``.

    Never follows a symbolic link (``O_NOFOLLOW``) and refuses anything but a regular file,
    checked on the opened file itself, so nothing can be swapped between check and read.
    Raises :class:`PackageError` (missing, a link, a folder, unreadable).
    """
    if not is_plain_name(name):
        raise PackageError(f"{folder}: {name!r} is not a plain file name inside the package")
    path = folder / name
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise PackageError(f"{folder}: file {name} listed in the manifest is missing") from None
    except OSError as e:
        if os.path.islink(path):
            raise PackageError(
                f"{folder}: {name} is a symbolic link; package files must be regular files in the package"
            ) from None
        raise PackageError(f"{folder}: {name} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PackageError(f"{folder}: {name} is not a regular file")
    return fd


def read_package_file(folder: Path, name: str) -> bytes:
    """The bytes of the package file ``name`` (see :func:`open_regular`)."""
    with os.fdopen(open_regular(folder, name), "rb") as f:
        return f.read()


def hash_package_file(folder: Path, name: str) -> str:
    """SHA-256 of the package file ``name``, streamed (see :func:`open_regular`)."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(folder, name), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_package(path: Path | str, verify_hashes: bool = True) -> ModelPackage:
    """Read and check a package.

    Checks the manifest's format, version and structure; that every file it uses (graphs,
    ``weights.bin``) is listed in ``files`` under a plain name, present and a regular file;
    (``verify_hashes``) every listed file's SHA-256; the parameter table against
    ``weights.bin`` (in bounds, finite values); and each graph's external data references.
    Raises :class:`PackageError` naming the file and field at fault.
    """
    path = Path(path)
    if not (path / MANIFEST_FILE).exists() and not (path / MANIFEST_FILE).is_symlink():
        raise PackageError(f"{path} is not a model package: {MANIFEST_FILE} is missing")
    raw_manifest = read_package_file(path, MANIFEST_FILE)
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(raw_manifest)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{manifest_path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{manifest_path} is not an ecgx model package manifest")
    if manifest.get("format_version") not in SUPPORTED_VERSIONS:
        raise PackageError(
            f"{path}: package format version {manifest.get('format_version')} is not supported "
            f"(this ecgx reads {list(SUPPORTED_VERSIONS)})"
        )
    check_manifest(manifest, manifest_path)

    files = manifest["files"]
    used = [WEIGHTS_FILE, *dict.fromkeys(g["file"] for g in manifest["graphs"].values())]
    for name in used:
        if name not in files:
            raise PackageError(
                f"{manifest_path}: {name} is used by the package but not listed in files with its SHA-256"
            )
    contents: dict[str, bytes] = {}
    for name, entry in files.items():
        if name in used:  # kept: sessions and weights come from exactly these bytes
            contents[name] = read_package_file(path, name)
            digest = hashlib.sha256(contents[name]).hexdigest()
        else:
            digest = hash_package_file(path, name)
        if verify_hashes and digest != entry["sha256"]:
            raise PackageError(
                f"{path}: {name} does not match its SHA-256 in the manifest; the package was modified"
            )

    check_parameters(manifest["parameters"], contents[WEIGHTS_FILE], path)
    graph_parameters = {
        graph: _check_graph(graph, contents[entry["file"]], path / entry["file"], manifest["parameters"])
        for graph, entry in manifest["graphs"].items()
    }
    return ModelPackage(
        path=path,
        manifest=manifest,
        contents=MappingProxyType(contents),
        manifest_sha256=hashlib.sha256(raw_manifest).hexdigest(),
        graph_parameters=MappingProxyType(graph_parameters),
    )


# ---------------------------------------------------------------------------------- manifest structure


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    """Raises :class:`PackageError` naming the manifest file and the field at fault."""

    def __init__(self, manifest_path: Path):
        self.where = manifest_path

    def fail(self, key: str, problem: str) -> None:
        raise PackageError(f"{self.where}: field {key} {problem}")

    def get(self, obj: Mapping[str, Any], key: str, prefix: str = "") -> Any:
        if key not in obj:
            raise PackageError(f"{self.where}: field {prefix}{key} is missing")
        return obj[key]

    def dict_(self, value: Any, key: str, non_empty: bool = False) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"must be a JSON object, got {type(value).__name__} {_show(value)}")
        if non_empty and not value:
            self.fail(key, "must not be empty")
        return value

    def list_(self, value: Any, key: str, non_empty: bool = False) -> list[Any]:
        if not isinstance(value, list):
            self.fail(key, f"must be a list, got {type(value).__name__} {_show(value)}")
        if non_empty and not value:
            self.fail(key, "must not be empty")
        return value

    def str_(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {_show(value)}")
        return value

    def int_(self, value: Any, key: str, minimum: int = 0) -> int:
        if not _is_int(value) or value < minimum:
            self.fail(key, f"must be an integer >= {minimum}, got {_show(value)}")
        return value


def required_graphs(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The graphs a package must hold: forward and gradient, or forward alone in a partial package."""
    return PARTIAL_REQUIRED_GRAPHS if manifest.get("partial") else REQUIRED_GRAPHS


def check_manifest(manifest: dict[str, Any], manifest_path: Path) -> None:
    """Check the structure of a manifest: every field the reader and the engine use, with its type."""
    c = _Checker(manifest_path)
    if manifest.get("partial") is not None:
        partial = c.dict_(manifest["partial"], "partial", non_empty=True)
        c.str_(c.get(partial, "reason", "partial."), "partial.reason")
    required = required_graphs(manifest)
    classes = c.list_(c.get(manifest, "classes"), "classes", non_empty=True)
    keys = set()
    for i, cls in enumerate(classes):
        cls = c.dict_(cls, f"classes[{i}]")
        for k in ("key", "code"):
            c.str_(c.get(cls, k, f"classes[{i}]."), f"classes[{i}].{k}")
        if cls["key"] in keys:
            c.fail(f"classes[{i}].key", f"repeats the class key {cls['key']!r}")
        keys.add(cls["key"])
    leads = c.list_(c.get(manifest, "leads"), "leads", non_empty=True)
    for i, lead in enumerate(leads):
        c.str_(lead, f"leads[{i}]")
    inp = c.dict_(c.get(manifest, "input"), "input")
    shape = c.list_(c.get(inp, "shape", "input."), "input.shape")
    if len(shape) != 3 or not (shape[0] is None or (_is_int(shape[0]) and shape[0] > 0)):
        c.fail("input.shape", f"must be [batch or null, leads, samples], got {_show(shape)}")
    for i in (1, 2):
        c.int_(shape[i], f"input.shape[{i}]", minimum=1)
    if shape[1] != len(leads):
        c.fail("input.shape[1]", f"is {shape[1]} leads, but leads lists {len(leads)}")
    rate = c.get(inp, "sampling_rate_hz", "input.")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        c.fail("input.sampling_rate_hz", f"must be a positive number of Hz, got {_show(rate)}")
    # The R peak's sample is known only for inputs aligned on it (the project's median beat).
    r_peak = inp.get("r_peak_sample")
    if r_peak is not None and (not _is_int(r_peak) or not 0 <= r_peak < shape[2]):
        c.fail(
            "input.r_peak_sample", f"must be null or a sample index in 0..{shape[2] - 1}, got {_show(r_peak)}"
        )

    files = c.dict_(c.get(manifest, "files"), "files", non_empty=True)
    for name, entry in files.items():
        if not is_plain_name(name):
            c.fail(
                f"files[{name!r}]",
                "is not a plain file name in the package folder (no folders, no '..', no absolute paths)",
            )
        entry = c.dict_(entry, f"files[{name!r}]")
        digest = c.get(entry, "sha256", f"files[{name!r}].")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            c.fail(f"files[{name!r}].sha256", f"must be 64 lowercase hex digits, got {_show(digest)}")
        if "bytes" in entry:
            c.int_(entry["bytes"], f"files[{name!r}].bytes")

    graphs = c.dict_(c.get(manifest, "graphs"), "graphs", non_empty=True)
    for graph in required:
        if graph not in graphs:
            c.fail("graphs", f"has no {graph!r} graph (it has {sorted(graphs)})")
    for graph, entry in graphs.items():
        key = f"graphs[{graph!r}]"
        entry = c.dict_(entry, key)
        name = c.str_(c.get(entry, "file", f"{key}."), f"{key}.file")
        if not is_plain_name(name) or name in (MANIFEST_FILE, WEIGHTS_FILE):
            c.fail(
                f"{key}.file",
                f"must be the plain name of an ONNX file in the package folder (no folders, no '..', "
                f"no absolute paths), got {_show(name)}",
            )
        for part in ("inputs", "outputs"):
            names = c.list_(c.get(entry, part, f"{key}."), f"{key}.{part}", non_empty=True)
            for i, n in enumerate(names):
                c.str_(n, f"{key}.{part}[{i}]")

    if manifest.get("unavailable") is not None:
        unavailable = c.dict_(manifest["unavailable"], "unavailable")
        for graph, entry in unavailable.items():
            key = f"unavailable[{graph!r}]"
            if graph in graphs:
                c.fail(
                    key, "names a graph the package has under graphs; a graph is either there or unavailable"
                )
            if graph in required:
                c.fail(key, f"names the {graph!r} graph, which every package must have")
            entry = c.dict_(entry, key)
            c.str_(c.get(entry, "reason", f"{key}."), f"{key}.reason")
            for i, m in enumerate(c.list_(c.get(entry, "methods", f"{key}."), f"{key}.methods")):
                c.str_(m, f"{key}.methods[{i}]")

    params = c.dict_(c.get(manifest, "parameters"), "parameters")
    for name, entry in params.items():
        key = f"parameters[{name!r}]"
        entry = c.dict_(entry, key)
        offset = c.int_(c.get(entry, "offset", f"{key}."), f"{key}.offset")
        length = c.int_(c.get(entry, "length", f"{key}."), f"{key}.length")
        dims = c.list_(c.get(entry, "shape", f"{key}."), f"{key}.shape")
        for i, d in enumerate(dims):
            c.int_(d, f"{key}.shape[{i}]")
        if offset % 4:
            c.fail(f"{key}.offset", f"must be a multiple of 4 (float32), got {offset}")
        if length != 4 * math.prod(dims):
            c.fail(
                f"{key}.length",
                f"is {length} bytes, but shape {dims} holds {math.prod(dims)} float32 ({4 * math.prod(dims)} "
                "bytes)",
            )

    if manifest.get("training_data") is not None:
        training = c.dict_(manifest["training_data"], "training_data")
        for key in ("beats_file", "ids_file"):
            name = c.str_(c.get(training, key, "training_data."), f"training_data.{key}")
            if name not in files:
                c.fail(f"training_data.{key}", f"names {_show(name)}, which is not listed in files")

    layers = c.list_(c.get(manifest, "layers"), "layers")
    for i, layer in enumerate(layers):
        layer = c.dict_(layer, f"layers[{i}]")
        names = c.list_(c.get(layer, "parameters", f"layers[{i}]."), f"layers[{i}].parameters")
        for j, n in enumerate(names):
            if not isinstance(n, str) or n not in params:
                c.fail(f"layers[{i}].parameters[{j}]", f"names no parameter of the table: {_show(n)}")


def check_parameters(params: dict[str, dict[str, Any]], weights: bytes, path: Path) -> None:
    """Every parameter lies inside weights.bin and holds finite values."""
    for name, entry in params.items():
        end = entry["offset"] + entry["length"]
        if end > len(weights):
            raise PackageError(
                f"{path / MANIFEST_FILE}: field parameters[{name!r}] spans bytes {entry['offset']}..{end}, "
                f"beyond the end of {WEIGHTS_FILE} ({len(weights)} bytes)"
            )
        values = np.frombuffer(weights, "<f4", entry["length"] // 4, entry["offset"])
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise PackageError(
                f"{path / WEIGHTS_FILE}: parameter {name!r} holds {bad} NaN or infinite value(s); "
                "every attribution of this model would be NaN"
            )


# ---------------------------------------------------------------------------------- graph external data


def _check_graph(graph: str, data: bytes, file: Path, params: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """Parse one graph and check its external data; returns the names of its initialisers that are
    package parameters (the engine supplies those from the verified weights).

    Allowed: a top-level initialiser named in the parameter table, float32, of the table's shape,
    stored in weights.bin at the table's offset and length. Anything else that points outside
    the graph (another file, another place, a tensor in a node attribute, a subgraph or a
    function) is refused: ONNX Runtime would read it from disk, unverified.
    """
    from google.protobuf.message import DecodeError
    from onnx import ModelProto, TensorProto

    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise PackageError(f"{file} (graph {graph!r}) is not a valid ONNX model: {e}") from None
    if not model.HasField("graph") or not model.graph.node:
        raise PackageError(f"{file} (graph {graph!r}) is not a valid ONNX model: it holds no graph")

    def external(t: TensorProto) -> bool:
        return t.data_location == TensorProto.EXTERNAL or len(t.external_data) > 0

    names = []
    for t in model.graph.initializer:
        if t.name in params:
            entry = params[t.name]
            if t.data_type != _FLOAT32 or list(t.dims) != list(entry["shape"]):
                raise PackageError(
                    f"{file} (graph {graph!r}): initialiser {t.name!r} is not float32 of shape "
                    f"{entry['shape']} as the manifest's parameter table says"
                )
            names.append(t.name)
            if external(t):
                refs = {e.key: e.value for e in t.external_data}
                where = (refs.get("location"), refs.get("offset", "0"), refs.get("length"))
                if where != (WEIGHTS_FILE, str(entry["offset"]), str(entry["length"])):
                    raise PackageError(
                        f"{file} (graph {graph!r}): initialiser {t.name!r} reads external data from "
                        f"{_show(refs)}, not from {WEIGHTS_FILE} at offset {entry['offset']}, length "
                        f"{entry['length']} as the manifest's parameter table says"
                    )
        elif external(t):
            location = next((e.value for e in t.external_data if e.key == "location"), None)
            raise PackageError(
                f"{file} (graph {graph!r}): initialiser {t.name!r} reads external data from {location!r}; "
                f"only parameters of the manifest's table may, from {WEIGHTS_FILE}"
            )
    for where, t in _nested_tensors(model):
        if external(t):
            location = next((e.value for e in t.external_data if e.key == "location"), None)
            raise PackageError(
                f"{file} (graph {graph!r}): {where} reads external data from {location!r}; only parameter "
                f"initialisers may, from {WEIGHTS_FILE}"
            )
    return tuple(names)


def _nested_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """Every tensor of ``model`` other than the main graph's initialisers: sparse initialisers,
    node attributes, subgraphs, functions and training graphs."""

    def of_graph(g: Any, where: str, top: bool) -> Iterator[tuple[str, Any]]:
        if not top:
            for t in g.initializer:
                yield f"{where} initialiser {t.name!r}", t
        for s in g.sparse_initializer:
            yield f"{where} sparse initialiser", s.values
            yield f"{where} sparse initialiser", s.indices
        for node in g.node:
            yield from of_node(node, where)

    def of_node(node: Any, where: str) -> Iterator[tuple[str, Any]]:
        for a in node.attribute:
            label = f"{where} node {node.name or node.op_type!r} attribute {a.name!r}"
            if a.HasField("t"):
                yield label, a.t
            for t in a.tensors:
                yield label, t
            sparse = [a.sparse_tensor] if a.HasField("sparse_tensor") else []
            for s in [*sparse, *a.sparse_tensors]:
                yield label, s.values
                yield label, s.indices
            subgraphs = [a.g] if a.HasField("g") else []
            for sub in [*subgraphs, *a.graphs]:
                yield from of_graph(sub, f"{label} subgraph", top=False)

    yield from of_graph(model.graph, "graph", top=True)
    for f in model.functions:
        for node in f.node:
            yield from of_node(node, f"function {f.name!r}")
    for info in model.training_info:
        for g in (info.initialization, info.algorithm):
            yield from of_graph(g, "training graph", top=False)
