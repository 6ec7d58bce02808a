"""The Open Inference Protocol over HTTP/REST (KServe v2), a thin adapter over the serving core.

``tritonclient.http`` and KServe's REST clients work unchanged, JSON tensors and Triton's
binary tensor data extension (``Inference-Header-Content-Length``, the Python client's default)
alike. Served:

    GET  /v2/health/live                                  200 live (no body)
    GET  /v2/health/ready                                 200 ready, 400 not ready (no body)
    GET  /v2                                              server metadata
    GET  /v2/models/{model}[/versions/{version}]          model metadata
    GET  /v2/models/{model}[/versions/{version}]/ready    200 ready, 400 not ready (no body)
    POST /v2/models/{model}[/versions/{version}]/infer    inference, with attributions

The request parameters (``method``, ``target``, ``parameters``), the ``ecg`` input and the
outputs are those of the OIP over gRPC (:mod:`ecgx.service.oip_codec` holds them for both);
``binary_data_output`` (request) and ``binary_data`` (per output) choose binary outputs.
Every call passes the same :class:`ecgx.service.calls.CallLedger` as the gRPC port (tokens,
client certificates, scopes, audit, metrics), recorded under the OIP gRPC method names, so
scopes and dashboards are the same. Credentials are checked from the headers before the body
is read (:mod:`ecgx.service.http_server`).

Errors are ``{"error": "..."}`` with the status of the core's typed error (docs/http.md has the
table, after google.rpc's HTTP mapping) and an ``Ecgx-Status`` header with the gRPC code name,
so a client can tell FAILED_PRECONDITION from INVALID_ARGUMENT (both 400).

No PyTorch here (the serving path).
"""

from __future__ import annotations

import json
import logging
import math
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from ecgx.core.errors import EcgxError, InvalidArgument
from ecgx.service import oip_codec as codec
from ecgx.service.calls import AUDIT_UNAVAILABLE_MESSAGE, CallLedger, CallRecord
from ecgx.service.http_server import (
    BodyTooLarge,
    HttpLimits,
    HttpRequest,
    HttpResponse,
    HttpServer,
    error_response,
    server_ssl_context,
)
from ecgx.service.requests import Caller, CancelToken, ExplainRequest
from ecgx.service.security import (
    CERT_ENV,
    CLIENT_CA_ENV,
    KEY_ENV,
    SecurityConfigError,
    ServerSecurity,
    load_tls,
    read_pem,
)

log = logging.getLogger(__name__)

_OIP = "/inference.GRPCInferenceService/"
BINARY_HEADER = "Inference-Header-Content-Length"
STATUS_HEADER = "Ecgx-Status"
REQUEST_ID_HEADER = "X-Request-Id"
# Framing parameters of the REST protocol, not the model's: taken here, never passed on.
BINARY_OUTPUT_PARAMETER = "binary_data_output"
# A JSON number of an FP32 tensor needs at most ~16 characters ("-1.2345678e-05, "); room for twice that.
JSON_CHARS_PER_VALUE = 32
JSON_OVERHEAD = 64 * 1024
MAX_TENSOR_VALUES = 2**31  # far above any batch an input can hold (64 MiB bodies)
VALUES_PER_ECG = 12 * 600  # the OIP input of every package: median beats, 12 leads x 600 samples
MAX_JSON_DEPTH = 16  # nested "data" arrays deeper than any tensor's shape are refused

# The status of each typed error: google.rpc's HTTP mapping (google/rpc/code.proto), as
# KServe's and grpc-gateway's servers use it. FAILED_PRECONDITION is 400 there, not 412 (412
# answers conditional-request headers, If-Match and the like, which this API has none of).
HTTP_STATUS: Mapping[str, int] = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
PAYLOAD_TOO_LARGE = 413  # a body over the size limit (RESOURCE_EXHAUSTED in the audit)


def http_status(error: EcgxError) -> int:
    """The HTTP status of a typed service error (500 only for codes no client input causes)."""
    if isinstance(error, BodyTooLarge):
        return PAYLOAD_TOO_LARGE
    return HTTP_STATUS.get(error.code, 500)


@dataclass(frozen=True)
class Route:
    method: str  # HTTP method
    pattern: re.Pattern[str]
    rpc: str  # the OIP gRPC method it is recorded and authorised as
    handler: str  # the OipHttpApp method that serves it


_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
ROUTES: tuple[Route, ...] = (
    Route("GET", re.compile(r"/v2/health/live"), _OIP + "ServerLive", "_live"),
    Route("GET", re.compile(r"/v2/health/ready"), _OIP + "ServerReady", "_ready"),
    Route("GET", re.compile(r"/v2/?"), _OIP + "ServerMetadata", "_server_metadata"),
    Route("GET", re.compile(_MODEL + r"/ready"), _OIP + "ModelReady", "_model_ready"),
    Route("POST", re.compile(_MODEL + r"/infer"), _OIP + "ModelInfer", "_infer"),
    Route("GET", re.compile(_MODEL + r"/?"), _OIP + "ModelMetadata", "_model_metadata"),
)


@dataclass(frozen=True)
class Tensor:
    """One input tensor of a REST request: declared name, datatype and shape, and its data as
    raw bytes (binary extension) or a flat list of JSON numbers."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None = None
    values: list[Any] | None = None


@dataclass(frozen=True)
class InferBody:
    """A decoded ``/infer`` body."""

    id: str
    parameters: dict[str, Any]
    inputs: tuple[Tensor, ...]
    outputs: tuple[tuple[str, bool | None], ...]  # (name, binary_data) per requested output
    binary_outputs: bool  # the request-level binary_data_output


class OipHttpApp:
    """The REST transport: an :data:`ecgx.service.http_server.Application` over a serving core.

    Args:
        core: ``ecgx.service.core.ServingCore`` (predict, explain, served, repository).
        ledger: the :class:`CallLedger` of the server (the gRPC port's authenticator,
            open RPCs and observers).
        version: the server version ServerMetadata reports.
    """

    def __init__(self, core: Any, ledger: CallLedger, *, version: str = "0"):
        self.core = core
        self.ledger = ledger
        self.version = version
        self.shutting_down = False
        self.max_json_bytes = core.max_batch * VALUES_PER_ECG * JSON_CHARS_PER_VALUE + JSON_OVERHEAD

    def shutdown(self) -> None:
        """Readiness answers "not ready" from now on (call at SIGTERM)."""
        self.shutting_down = True

    # ------------------------------------------------------------------ one call

    def __call__(self, request: HttpRequest) -> HttpResponse:
        route, match = _route(request)
        if route is None:
            return match  # 404 / 405, before any record: no RPC was asked for
        handler = getattr(self, route.handler)
        return serve_call(
            self.ledger, route.rpc, request, lambda record: handler(request, match.groupdict(), record)
        )

    # ------------------------------------------------------------------ health and metadata

    def _live(self, request: HttpRequest, path: dict[str, str], record: CallRecord) -> HttpResponse:
        return HttpResponse(200)

    def _ready(self, request: HttpRequest, path: dict[str, str], record: CallRecord) -> HttpResponse:
        return HttpResponse(200 if codec.server_ready(self.core, self.shutting_down) else 400)

    def _server_metadata(
        self, request: HttpRequest, path: dict[str, str], record: CallRecord
    ) -> HttpResponse:
        return HttpResponse.json(
            200,
            {
                "name": codec.SERVER_NAME,
                "version": self.version,
                "extensions": ["parameters", "binary_tensor_data"],
            },
        )

    def _model_ready(self, request: HttpRequest, path: dict[str, str], record: CallRecord) -> HttpResponse:
        ready = codec.model_ready(self.core, *_model_version(path), self.shutting_down)
        return HttpResponse(200 if ready else 400)

    def _model_metadata(self, request: HttpRequest, path: dict[str, str], record: CallRecord) -> HttpResponse:
        served = self.core.served(*_model_version(path))
        versions = [v.version for v in self.core.repository.versions(served.model) if v.servable]
        return HttpResponse.json(200, codec.model_metadata(served, versions))

    # ------------------------------------------------------------------ inference

    def _infer(self, request: HttpRequest, path: dict[str, str], record: CallRecord) -> HttpResponse:
        model, version = _model_version(path)
        body = decode_infer_body(request, self.max_json_bytes)
        call = codec.parse_parameters(body.parameters)
        if len(body.inputs) != 1:
            names = [t.name[:80] for t in body.inputs[:8]]
            raise InvalidArgument(
                f"ModelInfer takes exactly one input named {codec.INPUT_NAME!r} (FP32 [batch, 12, 600], "
                f"millivolts), got {names}"
            )
        t = body.inputs[0]
        x = codec.input_ecgs(t.name, t.datatype, t.shape, call, raw=t.raw, values=t.values)
        wanted = codec.wanted_outputs([name for name, _ in body.outputs], call)
        caller = Caller.of(record.identity, request.peer)
        cancel = CancelToken(is_active=request.connected)
        core_request = codec.core_request(model, version, x, call, caller, cancel)
        if isinstance(core_request, ExplainRequest):
            result = self.core.explain(core_request)
        else:
            result = self.core.predict(core_request)
        binary = {name: flag for name, flag in body.outputs}
        outputs = [
            (name, array, binary.get(name) if binary.get(name) is not None else body.binary_outputs)
            for name, array in codec.outputs_of(result, wanted)
        ]
        if codec.OUTPUT_FHIR in wanted:
            served = self.core.served(result.facts.model, result.facts.version)
            flag = binary.get(codec.OUTPUT_FHIR)
            observations = codec.fhir_observations(result, served)
            outputs.append((codec.OUTPUT_FHIR, observations, body.binary_outputs if flag is None else flag))
        head: dict[str, Any] = {"model_name": result.facts.model, "model_version": result.facts.version}
        if body.id:
            head["id"] = body.id
        head["parameters"] = codec.response_parameters(result)
        return encode_infer_response(head, outputs)


# ---------------------------------------------------------------------- routing


def _route(request: HttpRequest) -> tuple[Route | None, Any]:
    """The route of the request and its match, or (None, a 404/405 response)."""
    path = request.path
    allowed = []
    for route in ROUTES:
        match = route.pattern.fullmatch(path)
        if match is None:
            continue
        if route.method == request.method:
            return route, match
        allowed.append(route.method)
    if allowed:
        return None, _error(
            405,
            f"{request.method[:16]} is not allowed on this path; use {', '.join(allowed)}",
            "UNIMPLEMENTED",
            (("Allow", ", ".join(allowed)),),
        )
    return None, _error(
        404,
        "unknown path; this server serves /v2/health/live, /v2/health/ready, /v2, "
        "/v2/models/{model}[/versions/{version}][/ready|/infer] (KServe v2 REST)",
        "NOT_FOUND",
    )


def _model_version(path: Mapping[str, str | None]) -> tuple[str, str | None]:
    model = unquote(path["model"] or "")
    version = unquote(path["version"]) if path.get("version") else None
    return model, version


# ---------------------------------------------------------------------- request body


def decode_infer_body(request: HttpRequest, max_json_bytes: int) -> InferBody:
    """The JSON header and binary tensors of an ``/infer`` body, each checked; InvalidArgument
    (or BodyTooLarge) names what is wrong. The body is read only here, after admission."""
    if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        raise InvalidArgument(
            "compressed request bodies (Content-Encoding) are not taken; send the body uncompressed"
        )
    json_size = _json_size(request, max_json_bytes)
    body = request.body()
    head = _parse_json(memoryview(body)[:json_size])
    binary = memoryview(body)[json_size:]
    if not isinstance(head, dict):
        raise InvalidArgument(f"the request body must be a JSON object, got {type(head).__name__}")
    unknown = sorted(set(head) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise InvalidArgument(
            f"unknown field(s) {[u[:40] for u in unknown[:8]]} in the request; "
            "KServe v2 takes id, parameters, inputs, outputs"
        )
    request_id = head.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _parameters(head.get("parameters", {}), "the request's parameters")
    binary_outputs = parameters.pop(BINARY_OUTPUT_PARAMETER, False)
    if not isinstance(binary_outputs, bool):
        raise InvalidArgument(f"request parameter {BINARY_OUTPUT_PARAMETER!r} must be true or false")
    inputs, used = _inputs(head.get("inputs"), binary)
    if used != len(binary):
        raise InvalidArgument(
            f"the body holds {len(binary)} bytes after the JSON header ({BINARY_HEADER}: {json_size}), "
            f"but the inputs' binary_data_size add up to {used}"
        )
    return InferBody(request_id[:256], parameters, inputs, _outputs(head.get("outputs", [])), binary_outputs)


def _json_size(request: HttpRequest, max_json_bytes: int) -> int:
    """The JSON header's length: Inference-Header-Content-Length, else the whole body; checked
    against the body's length and the JSON limit before anything is read."""
    text = request.headers.get(BINARY_HEADER)
    if text is None:
        size = request.content_length
    else:
        text = text.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 18):
            raise InvalidArgument(f"{BINARY_HEADER} must be a non-negative integer (the JSON header's bytes)")
        size = int(text)
        if size > request.content_length:
            raise InvalidArgument(
                f"{BINARY_HEADER} is {size}, more than the body's {request.content_length} bytes "
                "(Content-Length)"
            )
    if size > max_json_bytes:
        raise BodyTooLarge(
            f"the JSON part of the request is {size} bytes; this server takes at most {max_json_bytes} "
            f"(send the tensor as binary data, {BINARY_HEADER})"
        )
    if size == 0:
        raise InvalidArgument("the request has no body; ModelInfer needs a JSON object with 'inputs'")
    return size


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(data: memoryview) -> Any:
    try:
        text = bytes(data).decode("utf-8")
        return json.loads(text, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise InvalidArgument("the JSON header is not UTF-8 text") from None
    except RecursionError:
        raise InvalidArgument("the JSON header nests too deep") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers over Python's digit limit
        raise InvalidArgument(f"the JSON header is not valid JSON: {str(e)[:200]}") from None


def _parameters(value: Any, where: str) -> dict[str, Any]:
    """A KServe parameters object: names -> string, number or boolean."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a JSON object, got {type(value).__name__}")
    for name, v in value.items():
        if not isinstance(v, (str, int, float, bool)):
            raise InvalidArgument(
                f"{where}: {name[:80]!r} must be a string, number or boolean, got {type(v).__name__} "
                "(method settings go in 'parameters' as JSON object text)"
            )
    return dict(value)


def _inputs(value: Any, binary: memoryview) -> tuple[tuple[Tensor, ...], int]:
    """The inputs and how many binary bytes they took, in order."""
    if not isinstance(value, list) or not value:
        raise InvalidArgument("'inputs' must be a non-empty list of tensors ({name, datatype, shape, data})")
    tensors, offset = [], 0
    for n, item in enumerate(value[:16]):
        where = f"inputs[{n}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f"{where} must be a JSON object, got {type(item).__name__}")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidArgument(f"{where}: 'name' and 'datatype' must be strings")
        if (
            not isinstance(shape, list)
            or len(shape) > codec.MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
        ):
            raise InvalidArgument(
                f"{where}: 'shape' must be a list of at most {codec.MAX_DIMS} non-negative integers"
            )
        # A zero dimension beside huge ones declares no values, yet NumPy cannot even describe the
        # array (oip_codec.input_array would fail to reshape it): refused here, by its size.
        if math.prod(d for d in shape if d) > MAX_TENSOR_VALUES:
            raise InvalidArgument(
                f"{where}: 'shape' {shape} declares more values than any input this server takes"
            )
        params = _parameters(item.get("parameters", {}), f"{where}.parameters")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgument(f"{where}: binary_data_size must be a non-negative integer")
            if "data" in item:
                raise InvalidArgument(f"{where} has both 'data' and binary_data_size; give one")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"{where}: binary_data_size {size} runs past the body's end "
                    f"({len(binary) - offset} bytes left)"
                )
            tensors.append(Tensor(name, datatype, tuple(shape), raw=bytes(binary[offset : offset + size])))
            offset += size
        elif "data" in item and datatype == "BYTES":
            tensors.append(Tensor(name, datatype, tuple(shape), values=_strings(item["data"], where)))
        elif "data" in item:
            tensors.append(
                Tensor(name, datatype, tuple(shape), values=_flat(item["data"], math.prod(shape), where))
            )
        else:
            raise InvalidArgument(f"{where} has no data: give 'data' or binary data ({BINARY_HEADER})")
    if len(value) > 16:
        raise InvalidArgument(
            f"'inputs' holds {len(value)} tensors; ModelInfer takes one ({codec.INPUT_NAME!r})"
        )
    return tuple(tensors), offset


def _strings(data: Any, where: str) -> list[Any]:
    """A BYTES tensor's elements in JSON: a flat list of strings (text documents: XML, FHIR JSON)."""
    if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
        raise InvalidArgument(
            f"{where}: 'data' of a BYTES tensor must be a flat list of strings "
            f"(binary documents such as DICOM go as binary data, {BINARY_HEADER})"
        )
    return data


def _flat(data: Any, count: int, where: str) -> list[Any]:
    """The tensor's numbers in row-major order, from a flat or nested JSON list (KServe allows
    both); anything but numbers is refused here, before NumPy sees it."""
    out: list[Any] = []
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, list):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidArgument(f"{where}: 'data' nests deeper than any tensor shape")
            if len(out) + len(value) > count * 2 + 16:  # far more than the shape holds: stop early
                raise InvalidArgument(f"{where}: 'data' holds more values than shape {count} allows")
            stack.extend((v, depth + 1) for v in reversed(value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(value)
        else:
            raise InvalidArgument(f"{where}: 'data' must hold numbers only, got {type(value).__name__}")
    if len(out) != count:
        raise InvalidArgument(f"{where}: 'data' holds {len(out)} values; its shape needs {count}")
    if any(isinstance(v, int) and not -(2**63) <= v < 2**64 for v in out):
        raise InvalidArgument(f"{where}: 'data' holds an integer out of any tensor type's range")
    return out


def _outputs(value: Any) -> tuple[tuple[str, bool | None], ...]:
    if not isinstance(value, list):
        raise InvalidArgument("'outputs' must be a list of {name, parameters}")
    out = []
    for n, item in enumerate(value[:16]):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidArgument(f"outputs[{n}] must be a JSON object with a string 'name'")
        params = _parameters(item.get("parameters", {}), f"outputs[{n}].parameters")
        if "classification" in params:
            raise InvalidArgument(
                f"outputs[{n}]: the classification extension is not served; ask for the tensor"
            )
        flag = params.get("binary_data")
        if flag is not None and not isinstance(flag, bool):
            raise InvalidArgument(f"outputs[{n}].parameters.binary_data must be true or false")
        out.append((item["name"], flag))
    if len(value) > 16:
        raise InvalidArgument(f"'outputs' names {len(value)} tensors; this model has at most 3")
    return tuple(out)


# ---------------------------------------------------------------------- response body


def encode_infer_response(
    head: dict[str, Any], outputs: Sequence[tuple[str, np.ndarray | list[bytes], bool]]
) -> HttpResponse:
    """The ``/infer`` answer: JSON, with the binary outputs after it (Triton's binary extension)."""
    tensors, blobs = [], []
    for name, array, binary in outputs:
        if isinstance(array, list):  # BYTES: the FHIR Observations (JSON text)
            tensor = {"name": name, "datatype": "BYTES", "shape": [len(array)]}
            if binary:
                blob = codec.bytes_tensor(array)
                tensor["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                tensor["data"] = [e.decode("utf-8") for e in array]
            tensors.append(tensor)
            continue
        tensor = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array, dtype="<f4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.ravel().tolist()  # float32 -> float64 -> text: exact round trip
        tensors.append(tensor)
    text = json.dumps({**head, "outputs": tensors}).encode("utf-8")
    if not blobs:
        return HttpResponse(200, (text,))
    return HttpResponse(
        200,
        (text, *blobs),
        content_type="application/octet-stream",
        headers=((BINARY_HEADER, str(len(text))),),
    )


def _error(status: int, message: str, code: str, headers: Sequence[tuple[str, str]] = ()) -> HttpResponse:
    return error_response(status, message, ((STATUS_HEADER, code), *headers))


def serve_call(
    ledger: CallLedger, rpc: str, request: HttpRequest, answer: Callable[[CallRecord], HttpResponse]
) -> HttpResponse:
    """One REST call under the ledger, for the OIP routes and the viewer's calls alike: recorded,
    admitted (tokens, client certificate, limits), answered by ``answer`` or refused with the
    error's status, audited, and withheld if a required audit line cannot be written."""
    record = ledger.open(rpc, request.peer, "http")
    headers = [(k.lower(), v) for k, v in request.headers.items()]
    with ledger.serving(record):
        try:
            ledger.admit(record, headers, request.client_certificate)
            response, code = answer(record), "OK"
        except EcgxError as e:
            response, code = _refusal(e, record), e.code
        final = ledger.close(record, code)
    if final != code:  # a required audit line could not be written: the answer is withheld
        response = _error(503, AUDIT_UNAVAILABLE_MESSAGE, final)
    return _with_headers(response, ((REQUEST_ID_HEADER, record.request_id),))


def _refusal(error: EcgxError, record: CallRecord) -> HttpResponse:
    status = http_status(error)
    # DEBUG, as on gRPC (rpc.failure_status): the message may echo what the client typed; the
    # audit log and the metrics count every refusal by code.
    log.debug("REST %s: %s %s", record.method_name, error.code, str(error)[:300])
    extra = (("WWW-Authenticate", 'Bearer realm="ecgx"'),) if status == 401 else ()
    return _error(status, str(error)[:2000], error.code, extra)


def _with_headers(response: HttpResponse, headers: Sequence[tuple[str, str]]) -> HttpResponse:
    return HttpResponse(
        response.status, response.body, response.content_type, response.headers + tuple(headers)
    )


@dataclass
class RestServer:
    """A running REST transport: the application and its HTTP server."""

    app: OipHttpApp
    http: HttpServer

    @property
    def port(self) -> int:
        return self.http.port

    @property
    def url(self) -> str:
        return self.http.url

    def stop(self, grace_s: float = 5.0) -> None:
        """Readiness turns false, then the server stops (requests in flight get ``grace_s``)."""
        self.app.shutdown()
        self.http.stop(grace_s)


def default_limits(core: Any) -> HttpLimits:
    """Room for every request slot and queue place twice over (idle kept-alive connections
    beside running ones), at least 16."""
    quotas = core.quotas
    queued = quotas.max_queued if quotas.max_queued is not None else 4 * quotas.max_concurrent
    return HttpLimits(max_connections=max(16, 2 * (quotas.max_concurrent + queued)))


def start_rest(
    core: Any,
    security: ServerSecurity,
    *,
    observers: Sequence[Any] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    limits: HttpLimits | None = None,
) -> RestServer:
    """Serve the OIP over REST for ``core`` with the gRPC port's callers, open RPCs and
    observers (audit, metrics). A TLS gRPC port gets a TLS REST port or none: refused otherwise."""
    if security.credentials is not None and ssl_context is None:
        raise SecurityConfigError(
            "the gRPC port uses TLS, so the HTTP port must too: give its TLS context (the same "
            "--tls-cert and --tls-key serve both)"
        )
    ledger = CallLedger(
        security.authenticator,
        open_rpcs=security.open_rpcs,
        observers=[o for o in observers if o is not None],
    )
    app = make_app(core, ledger)
    http = HttpServer(
        app, host=host, port=port, limits=limits or default_limits(core), ssl_context=ssl_context
    )
    return RestServer(app, http.start())


def rest_ssl_context(
    tls_cert: str | Path | None,
    tls_key: str | Path | None,
    tls_client_ca: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ssl.SSLContext | None:
    """The REST port's TLS from the gRPC port's settings (files or the ECGX_TLS_* environment,
    checked as there); None without a certificate (plaintext, --insecure)."""
    cert = read_pem(tls_cert, CERT_ENV, "--tls-cert", env)
    key = read_pem(tls_key, KEY_ENV, "--tls-key", env)
    if cert is None or key is None:
        return None
    client_ca = read_pem(tls_client_ca, CLIENT_CA_ENV, "--tls-client-ca", env)
    material = load_tls(cert, key, client_ca)
    return server_ssl_context(material.cert_chain, material.key, material.client_ca)


def make_app(core: Any, ledger: CallLedger, *, version: str | None = None) -> OipHttpApp:
    """The REST application for ``core`` (the installed ecgx version by default)."""
    return OipHttpApp(core, ledger, version=codec.server_version() if version is None else version)


__all__ = [
    "BINARY_HEADER",
    "HTTP_STATUS",
    "ROUTES",
    "STATUS_HEADER",
    "InferBody",
    "OipHttpApp",
    "RestServer",
    "decode_infer_body",
    "encode_infer_response",
    "http_status",
    "make_app",
    "rest_ssl_context",
    "start_rest",
]
