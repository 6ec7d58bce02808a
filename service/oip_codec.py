"""The Open Inference Protocol (KServe v2) as the serving core sees it, for every OIP transport.

gRPC (service/oip.py) and REST both reduce a request to plain values (the request parameters
as a name -> value dict, the ``ecg`` input's datatype, shape and bytes or numbers, the
requested output names), and this module turns them into core records and the core's results
back into outputs and response parameters. Nothing here knows gRPC or HTTP.

The protocol, as served:

- input ``ecg``: FP32 ``[B, 12, 600]`` median beats at 500 Hz in millivolts, the package's lead
  order, as little-endian float32 bytes or a list of numbers.
- outputs ``probabilities`` and ``logits`` (FP32 ``[B, classes]``); with the request parameter
  ``method`` also ``attribution`` (FP32 ``[B, 12, 600]``). ModelMetadata lists only the outputs
  every request can ask for: ``attribution`` exists only for a request that names a method.
- or input ``ecg_document``: BYTES ``[B]``, one ECG document per element (KServe's BYTES
  encoding: each element a 4-byte little-endian length and its bytes when raw; strings or bytes
  when given as contents), with the request parameter ``format`` (one of
  :data:`~ecgx.core.ecg_formats.FORMATS`). Each is decoded by the serving core as ecgx.v1's
  ``Ecg.document`` is (service/ecg_input.py, one place), through the same checks.
- with ``fhir`` true (and a method), also output ``fhir_observation``: BYTES ``[B]``, each
  attribution as a FHIR R4 Observation in JSON (service/fhir_output.py).
- request parameters: ``method``, ``target`` (class key, SNOMED code, class index, or
  ``"predicted"``, the default), ``parameters`` (the method's settings as JSON object text),
  ``format`` (with ``ecg_document``), ``fhir``; ``priority`` and ``timeout`` (set by some
  clients) are ignored; anything else is INVALID_ARGUMENT.
- response parameter ``ecg_waveforms`` (when the core reports it): what each ECG's model input
  was made from ("median_beat", "window" or "rhythm_strip"), as JSON text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecgx.core.ecg_formats import FORMATS
from ecgx.core.errors import FailedPrecondition, InvalidArgument, NotFound
from ecgx.service.core import parse_settings_json
from ecgx.service.ecg_input import DocumentBytes, DocumentEcg
from ecgx.service.requests import (
    CLASS,
    PREDICTED,
    Caller,
    CancelToken,
    ExplainRequest,
    ExplainResult,
    MethodCall,
    PredictRequest,
    PredictResult,
    Target,
)

SERVER_NAME = "ecgx"
PLATFORM = "onnxruntime_onnx"  # Triton's name for ONNX Runtime models
INPUT_NAME = "ecg"
INPUT_DOCUMENT = "ecg_document"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_LOGITS = "logits"
OUTPUT_ATTRIBUTION = "attribution"
OUTPUT_FHIR = "fhir_observation"
PARAM_METHOD = "method"
PARAM_TARGET = "target"
PARAM_PARAMETERS = "parameters"
PARAM_FORMAT = "format"
PARAM_FHIR = "fhir"
KNOWN_PARAMETERS = (PARAM_METHOD, PARAM_TARGET, PARAM_PARAMETERS, PARAM_FORMAT, PARAM_FHIR)
IGNORED_PARAMETERS = frozenset({"priority", "timeout"})
MAX_DIMS = 8  # a tensor shape longer than this is not an ECG batch of any kind
MAX_TENSOR_VALUES = 2**31  # far more than any message can carry (64 MiB)


@dataclass(frozen=True)
class OipCall:
    """What the request parameters ask for: a method (None: probabilities only), its target and settings."""

    method: str | None = None
    target: Any = PREDICTED
    settings: Mapping[str, Any] | None = None
    format: str | None = None  # the ecg_document input's format
    fhir: bool = False  # also the fhir_observation output


def parse_parameters(parameters: Mapping[str, Any]) -> OipCall:
    """The request parameters (name -> str/int/bool/float value; None for an unset one)."""
    values = {}
    for name, value in parameters.items():
        if name in IGNORED_PARAMETERS:
            continue
        if name not in KNOWN_PARAMETERS:
            raise InvalidArgument(
                f"unknown request parameter {name[:80]!r}; this server takes "
                f"{', '.join(map(repr, KNOWN_PARAMETERS))}"
            )
        values[name] = value
    fmt = values.get(PARAM_FORMAT)
    if fmt is not None and fmt not in FORMATS:
        raise InvalidArgument(
            f"request parameter {PARAM_FORMAT!r} must be one of {', '.join(FORMATS)}, got {str(fmt)[:80]!r}"
        )
    fhir = values.get(PARAM_FHIR, False)
    if not isinstance(fhir, bool):
        raise InvalidArgument(f"request parameter {PARAM_FHIR!r} must be a boolean, got {str(fhir)[:80]!r}")
    method = values.get(PARAM_METHOD)
    if method is None:
        for name in (PARAM_TARGET, PARAM_PARAMETERS) + ((PARAM_FHIR,) if fhir else ()):
            if name in values:
                raise InvalidArgument(
                    f"request parameter {name!r} needs {PARAM_METHOD!r} (an attribution method) too"
                )
        return OipCall(format=fmt)
    if not isinstance(method, str) or not method:
        raise InvalidArgument(f"request parameter {PARAM_METHOD!r} must be a method name (a string)")
    target = values.get(PARAM_TARGET, PREDICTED)
    if isinstance(target, str):
        target = target.strip()
    if isinstance(target, (bool, float)) or target is None or target == "":
        raise InvalidArgument(
            f"request parameter {PARAM_TARGET!r} must be a class key, SNOMED code, index or "
            f"{PREDICTED!r}, got {str(target)[:80]!r}"
        )
    settings = values.get(PARAM_PARAMETERS)
    parsed = (
        {} if settings is None else parse_settings_json(settings, f"request parameter {PARAM_PARAMETERS!r}")
    )
    return OipCall(method, target, parsed, fmt, fhir)


def input_array(
    name: str,
    datatype: str,
    shape: Sequence[int],
    *,
    raw: bytes | None = None,
    values: Sequence[Any] | None = None,
) -> np.ndarray:
    """The ``ecg`` input as a float32 array of its declared shape, from little-endian bytes or a
    flat list of numbers (exactly one of them); the core checks the shape against the model."""
    if name != INPUT_NAME:
        raise InvalidArgument(
            f"ModelInfer takes exactly one input named {INPUT_NAME!r} (FP32 [batch, 12, 600], millivolts), "
            f"got {name[:80]!r}"
        )
    if datatype != "FP32":
        raise InvalidArgument(f"input {INPUT_NAME!r} must have datatype FP32, got {datatype[:20]!r}")
    dims = [int(d) for d in shape]
    if not 1 <= len(dims) <= MAX_DIMS or any(d < 0 for d in dims):
        raise InvalidArgument(
            f"input {INPUT_NAME!r} must have shape [batch, 12, 600] (median beats, lead-major), "
            f"got {dims[:MAX_DIMS]}"
        )
    count = math.prod(dims)
    # A zero dimension makes the count 0 whatever the others declare; NumPy still refuses a shape
    # whose other dimensions are too large for memory, so they are bounded too.
    declared = math.prod(d for d in dims if d)
    if declared > MAX_TENSOR_VALUES:
        raise InvalidArgument(
            f"input {INPUT_NAME!r} declares shape {dims}: more than {MAX_TENSOR_VALUES:,} values in its "
            "nonzero dimensions; an ECG batch is [batch, 12, 600]"
        )
    if raw is not None and values is not None:
        raise InvalidArgument(f"input {INPUT_NAME!r} is given both as raw bytes and as contents; give one")
    if raw is not None:
        if len(raw) != 4 * count:
            raise InvalidArgument(
                f"input {INPUT_NAME!r}: raw_input_contents holds {len(raw)} bytes; shape {dims} in FP32 "
                f"needs {4 * count} (little-endian float32)"
            )
        return np.frombuffer(raw, dtype="<f4").reshape(dims)
    if values is not None:
        if len(values) != count:
            raise InvalidArgument(
                f"input {INPUT_NAME!r}: contents.fp32_contents holds {len(values)} values; "
                f"shape {dims} needs {count}"
            )
        try:
            return np.asarray(values, dtype=np.float32).reshape(dims)
        except (ValueError, TypeError):
            raise InvalidArgument(f"input {INPUT_NAME!r}: the contents must be numbers") from None
    raise InvalidArgument(
        f"input {INPUT_NAME!r} has no data: give raw_input_contents or contents.fp32_contents"
    )


def input_ecgs(
    name: str,
    datatype: str,
    shape: Sequence[int],
    call: OipCall,
    *,
    raw: bytes | None = None,
    values: Sequence[Any] | None = None,
) -> np.ndarray | list[DocumentEcg]:
    """The one input of a ModelInfer as the core takes it: the ``ecg`` array, or the
    ``ecg_document`` documents (payloads the core decodes)."""
    if name == INPUT_DOCUMENT:
        return input_documents(datatype, shape, call, raw=raw, values=values)
    if call.format is not None:
        raise InvalidArgument(
            f"request parameter {PARAM_FORMAT!r} goes with input {INPUT_DOCUMENT!r}, not {name[:80]!r}"
        )
    return input_array(name, datatype, shape, raw=raw, values=values)


def input_documents(
    datatype: str,
    shape: Sequence[int],
    call: OipCall,
    *,
    raw: bytes | None = None,
    values: Sequence[Any] | None = None,
) -> list[DocumentEcg]:
    """The ``ecg_document`` input: BYTES [B], raw (KServe: 4-byte little-endian length, then the
    element's bytes, per element) or as contents (bytes, or text encoded as UTF-8)."""
    where = f"input {INPUT_DOCUMENT!r}"
    if datatype != "BYTES":
        raise InvalidArgument(f"{where} must have datatype BYTES, got {datatype[:20]!r}")
    dims = [int(d) for d in shape]
    if len(dims) != 1 or dims[0] < 1:
        raise InvalidArgument(
            f"{where} must have shape [batch] (one document per element), got {dims[:MAX_DIMS]}"
        )
    if call.format is None:
        raise InvalidArgument(
            f"{where} needs the request parameter {PARAM_FORMAT!r}: one of {', '.join(FORMATS)}"
        )
    if raw is not None and values is not None:
        raise InvalidArgument(f"{where} is given both as raw bytes and as contents; give one")
    if raw is not None:
        elements = _length_prefixed(raw, dims[0], where)
    elif values is not None:
        if len(values) != dims[0]:
            raise InvalidArgument(
                f"{where}: the contents hold {len(values)} elements; shape {dims} needs {dims[0]}"
            )
        elements = [_element_bytes(v, where) for v in values]
    else:
        raise InvalidArgument(f"{where} has no data: give raw_input_contents or contents.bytes_contents")
    return [DocumentEcg(DocumentBytes(call.format, data)) for data in elements]


def _length_prefixed(raw: bytes, count: int, where: str) -> list[bytes]:
    out, offset = [], 0
    view = memoryview(raw)
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidArgument(f"{where}: raw contents end before element {i}'s 4-byte length")
        size = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(view):
            raise InvalidArgument(
                f"{where}: element {i} announces {size} bytes; "
                f"{len(view) - offset} are left in the raw contents"
            )
        out.append(bytes(view[offset : offset + size]))
        offset += size
    if offset != len(view):
        raise InvalidArgument(f"{where}: {len(view) - offset} bytes after the {count} elements of its shape")
    return out


def _element_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise InvalidArgument(f"{where}: each element must be bytes or text, got {type(value).__name__}")


def bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """BYTES elements in KServe's raw encoding (the inverse of the ``ecg_document`` decoding)."""
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def wanted_outputs(names: Sequence[str], call: OipCall) -> list[str]:
    """The outputs to send (all of them when ``names`` is empty), or an error naming the bad one."""
    available = [OUTPUT_PROBABILITIES, OUTPUT_LOGITS] + ([OUTPUT_ATTRIBUTION] if call.method else [])
    if call.fhir:
        available.append(OUTPUT_FHIR)
    if not names:
        return available
    wanted: list[str] = []
    for name in names:
        if name == OUTPUT_ATTRIBUTION and not call.method:
            raise InvalidArgument(
                f"output {OUTPUT_ATTRIBUTION!r} needs the request parameter {PARAM_METHOD!r} "
                "(an attribution method, e.g. saliency)"
            )
        if name == OUTPUT_FHIR and not call.fhir:
            raise InvalidArgument(
                f"output {OUTPUT_FHIR!r} needs the request parameters {PARAM_FHIR!r} (true) "
                f"and {PARAM_METHOD!r}"
            )
        if name not in available:
            raise NotFound(f"unknown output {name[:80]!r}; this model has {', '.join(available)}")
        if name in wanted:
            raise InvalidArgument(f"output {name!r} is requested twice")
        wanted.append(name)
    return wanted


def core_request(
    model: str,
    version: str,
    x: np.ndarray | Sequence[DocumentEcg],
    call: OipCall,
    caller: Caller,
    cancel: CancelToken,
) -> PredictRequest | ExplainRequest:
    """The core's record of a ModelInfer: Predict without a method, Explain with one."""
    common = dict(model=model, version=version or None, ecgs=x, caller=caller, cancel=cancel)
    if call.method is None:
        return PredictRequest(**common)
    target = Target(PREDICTED) if call.target == PREDICTED else Target(CLASS, call.target)
    return ExplainRequest(
        **common,
        methods=(MethodCall(call.method, dict(call.settings or {})),),
        targets=(target,),
        fhir=call.fhir,
    )


def outputs_of(result: PredictResult, wanted: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """(name, little-endian float32 array) for each wanted FP32 output, in the order asked
    (``fhir_observation``, BYTES, comes from :func:`fhir_observations`)."""
    arrays = {OUTPUT_PROBABILITIES: result.probabilities, OUTPUT_LOGITS: result.logits}
    if isinstance(result, ExplainResult):
        arrays[OUTPUT_ATTRIBUTION] = np.stack([a.attribution for a in result.attributions])
    return [(name, np.ascontiguousarray(arrays[name], dtype="<f4")) for name in wanted if name != OUTPUT_FHIR]


def fhir_observations(result: ExplainResult, served: Any) -> list[bytes]:
    """Each attribution as a FHIR R4 Observation (JSON bytes), by :mod:`ecgx.service.fhir_output`."""
    from ecgx.service.fhir_output import observations_of

    return observations_of(result, served)


def response_parameters(result: PredictResult) -> dict[str, Any]:
    """The response parameters (str, bool or float values), the same on every OIP transport."""
    f = result.facts
    out: dict[str, Any] = {
        "model_version": f.version,
        "package_sha256": f.package_sha256,
        "classes": json.dumps(list(f.class_keys)),
    }
    waveforms = getattr(result, "ecg_waveforms", ())  # set by the core once it reports them
    if waveforms:
        out["ecg_waveforms"] = json.dumps(list(waveforms))
    if isinstance(result, ExplainResult):
        a = result.attributions[0]
        out.update(
            {
                PARAM_METHOD: a.method,
                "targets": json.dumps([t[0] for t in result.targets]),
                "gate_verdict": a.gate.verdict,
                "gate_report_sha256": f.gate_report_sha256,
                "policy_sha256": f.policy_sha256,
                "ungated": bool(a.gate.ungated),
                "effective_parameters": json.dumps(a.effective_parameters, sort_keys=True),
                "compute_seconds": float(sum(x.compute_seconds for x in result.attributions)),
                "onnxruntime_version": f.onnxruntime_version,
                "providers": json.dumps(list(f.providers)),
            }
        )
    return out


def model_metadata(served: Any, versions: Sequence[str]) -> dict[str, Any]:
    """ModelMetadata of a served version: inputs and the outputs every request can ask for."""
    package = served.engine.package
    leads, samples = package.input_shape
    classes = package.n_classes
    return {
        "name": served.model,
        "versions": list(versions),
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, leads, samples]}],
        "outputs": [
            {"name": OUTPUT_PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
            {"name": OUTPUT_LOGITS, "datatype": "FP32", "shape": [-1, classes]},
        ],
    }


__all__ = [
    "INPUT_DOCUMENT",
    "INPUT_NAME",
    "OUTPUT_ATTRIBUTION",
    "OUTPUT_FHIR",
    "OUTPUT_LOGITS",
    "OUTPUT_PROBABILITIES",
    "PLATFORM",
    "SERVER_NAME",
    "OipCall",
    "bytes_tensor",
    "core_request",
    "fhir_observations",
    "input_array",
    "input_documents",
    "input_ecgs",
    "model_metadata",
    "outputs_of",
    "parse_parameters",
    "response_parameters",
    "wanted_outputs",
]


# ---------------------------------------------------------------------------- health


def server_version() -> str:
    """The ecgx version ServerMetadata reports (the installed distribution's; "0" in a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ecgx")
    except PackageNotFoundError:
        return "0"


def server_ready(core: Any, shutting_down: bool) -> bool:
    """ServerReady on every transport: not shutting down, and some model has a serving default version."""
    repository = core.repository
    return not shutting_down and any(repository.default_version(m) is not None for m in repository.models())


def model_ready(core: Any, model: str, version: str | None, shutting_down: bool) -> bool:
    """ModelReady on every transport: whether the version (None: the default) serves; false, not an
    error, for an unknown one (as Triton)."""
    if shutting_down:
        return False
    try:
        core.served(model, version)
    except (NotFound, FailedPrecondition):
        return False
    return True
