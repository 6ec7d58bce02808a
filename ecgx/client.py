"""``ecgx client``: call an ``ecgx serve`` (``ecgx.v1.ExplanationService``) over gRPC.

``models`` lists the models, versions, whether each serves and the gate's verdict on every
method (GetModel); ``predict`` prints class probabilities; ``explain`` prints, per attribution,
the method, target, gate verdict and the scores it was decided on, and the leads that carry
the most relevance, and can draw the attribution over the 12 leads of the beat the server
explained (``--png``). ``--json`` writes the whole result as JSON.

ECGs come from a ``.npy`` file (a (12, 600) or (B, 12, 600) float32 median beat at 500 Hz in
millivolts, or with ``--fs`` a rhythm strip (12, T) / (B, 12, T) in the standard lead order) or
from a WFDB record (read with the importer's :func:`ecgx.training.data.wfdb_import.read_record`
and sent as a rhythm strip: the server computes the median beat and returns it).

A gRPC error becomes a :class:`ClientError` (a ValueError, so the command line prints one
``ecgx: error: STATUS: message`` line and exits 2). No PyTorch on this path.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecgx.core.ecg_formats import FORMATS as DOCUMENT_FORMATS
from ecgx.core.errors import FailedPrecondition, InvalidArgument
from ecgx.core.outputs import OutputKind, StagedOutput, check_output
from ecgx.core.schema import BEAT_SAMPLES, LEADS, SAMPLING_RATE_HZ

DEFAULT_TIMEOUT_S = 300.0
TOP_LEADS = 4  # leads listed per attribution
_MAX_MESSAGE_BYTES = 64 * 2**20  # as the server
TOKEN_ENV = "ECGX_TOKEN"


class ClientError(InvalidArgument):
    """A call failed: the message is ``STATUS: what the server said`` (one line)."""


def _pb():  # imported late: the generated stubs exist only after installation
    from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2, ecgx_pb2_grpc

    return ecgx_pb2, ecgx_pb2_grpc


# ---------------------------------------------------------------------- outputs


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _is_client_json(path: Path) -> bool:
    try:
        if path.stat().st_size > 512 * 2**20:
            return False
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and "ecgx_client" in value


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_FILE = OutputKind("PNG picture", False, lambda p: _starts_with(p, PNG_MAGIC), "a PNG file", "out.png")
FHIR_FILE = OutputKind(
    "FHIR resource file",
    False,
    lambda p: _starts_with(p, b'{"resourceType"'),
    "a FHIR JSON resource ecgx client wrote",
    "observation.json",
)
JSON_RESULT = OutputKind(
    "client result file", False, _is_client_json, "a JSON result of ecgx client", "result.json"
)


def check_outputs(png: Path | None, json_out: Path | None, overwrite: bool) -> None:
    """Before any call: the output paths have the right suffix and may be written."""
    if png is not None:
        if png.suffix.lower() != ".png":
            raise InvalidArgument(f"--png {png} must name a .png file")
        check_output(png, PNG_FILE, overwrite=overwrite)
    if json_out is not None:
        if json_out.suffix.lower() != ".json":
            raise InvalidArgument(f"--json {json_out} must name a .json file")
        check_output(json_out, JSON_RESULT, overwrite=overwrite)


def write_json(result: Mapping[str, Any], out: Path, overwrite: bool = False) -> Path:
    with StagedOutput(out, JSON_RESULT, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps({"ecgx_client": 1, **result}, indent=1) + "\n")
    return out


# ---------------------------------------------------------------------- ECG input


@dataclass
class EcgInput:
    """ECGs to send: each (12, T) float32 mV in ``LEADS`` order at ``fs`` Hz."""

    signals: list[np.ndarray]
    fs: float
    source: str


def load_npy(path: Path, fs: float | None = None) -> EcgInput:
    """(12, 600) / (B, 12, 600) median beats at 500 Hz, or with ``fs`` rhythm strips (12, T) / (B, 12, T)."""
    path = Path(path)
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, EOFError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        raise InvalidArgument(f"{path}: not a NumPy .npy array ({e})") from None
    except ValueError as e:
        raise InvalidArgument(f"{path}: not a NumPy .npy array of numbers ({e})") from None
    if not isinstance(x, np.ndarray):
        raise InvalidArgument(f"{path}: holds several arrays (.npz); give one .npy array")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InvalidArgument(f"{path}: holds {x.dtype} values; numbers (float32 millivolts) are needed")
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] != len(LEADS) or x.shape[0] == 0 or x.shape[2] == 0:
        raise InvalidArgument(
            f"{path}: shape {tuple(x.shape)}; expected (12, {BEAT_SAMPLES}) or (B, 12, {BEAT_SAMPLES}) "
            f"median beats at {SAMPLING_RATE_HZ} Hz in the lead order {', '.join(LEADS)} "
            "(or, with --fs, rhythm strips (12, T) or (B, 12, T))"
        )
    if fs is None:
        if x.shape[2] != BEAT_SAMPLES:
            raise InvalidArgument(
                f"{path}: {x.shape[2]} samples per lead is not a {BEAT_SAMPLES}-sample median beat; "
                "for a rhythm strip give its sampling rate with --fs"
            )
        fs = float(SAMPLING_RATE_HZ)
    x = np.asarray(x, dtype=np.float32)
    return EcgInput([x[i] for i in range(len(x))], float(fs), str(path))


def load_record(path: Path) -> EcgInput:
    """A WFDB record as a rhythm strip in mV (the server computes its median beat)."""
    from ecgx.training.data.wfdb_import import read_record

    signal, fs, _ = read_record(path)
    return EcgInput([np.asarray(signal, dtype=np.float32)], float(fs), str(path))


@dataclass(frozen=True)
class EcgDocumentFile:
    """An ECG document read as bytes, sent as it is: the server decodes it (one place)."""

    data: bytes
    format: str
    source: str

    @property
    def signals(self) -> list[bytes]:  # one ECG, as EcgInput counts them
        return [self.data]


def load_document(path: Path, fmt: str | None = None) -> EcgDocumentFile:
    """An ECG document (DICOM, HL7 aECG, GE MUSE, Philips Sierra, FHIR): its bytes and its format,
    from ``fmt`` or else the file's extension or content (nothing is decoded here)."""
    from ecgx.core.ecg_formats import read_document_file

    data, fmt = read_document_file(path, fmt)
    return EcgDocumentFile(data, fmt, str(path))


def load_ecg_file(path: Path, fs: float | None = None, fmt: str | None = None) -> EcgInput | EcgDocumentFile:
    """``--ecg FILE``: a .npy array (median beats, or with ``fs`` rhythm strips), else a document."""
    from ecgx.core.ecg_formats import EcgDocumentError, format_of_file

    if fmt is None:
        if Path(path).suffix.lower() == ".npy":
            return load_npy(path, fs)
        try:
            fmt = format_of_file(path)
        except EcgDocumentError:  # neither extension nor content names a format: maybe an array
            try:
                return load_npy(path, fs)
            except InvalidArgument:
                raise InvalidArgument(
                    f"{path}: not a NumPy .npy array, nor an ECG document whose extension or content "
                    f"shows its format (give --format: {', '.join(DOCUMENT_FORMATS)})"
                ) from None
    if fs is not None:
        raise InvalidArgument("--fs is for .npy rhythm strips; an ECG document names its own rate")
    return load_document(path, fmt)


def ecg_messages(ecgs: EcgInput | EcgDocumentFile, units: str = "mV") -> list[Any]:
    pb, _ = _pb()
    if isinstance(ecgs, EcgDocumentFile):
        return [pb.Ecg(document=pb.EcgDocumentBytes(format=ecgs.format, data=ecgs.data))]
    unit = {"mv": pb.MILLIVOLT, "uv": pb.MICROVOLT, "µv": pb.MICROVOLT}.get(units.lower())
    if unit is None:
        raise InvalidArgument(f"--units must be mV or uV, got {units!r}")
    out = []
    for x in ecgs.signals:
        x = np.ascontiguousarray(x, dtype="<f4")
        out.append(
            pb.Ecg(
                leads=list(LEADS),
                sampling_rate_hz=ecgs.fs,
                units=unit,
                samples_per_lead=x.shape[-1],
                samples=x.tobytes(),
            )
        )
    return out


# ---------------------------------------------------------------------- requests


def parse_target(text: str) -> Any:
    """``predicted``, ``all`` (every positive class), ``top-K``, a small index (0-99), a SNOMED
    code (digits, 6 or more) or a class key (``AF``)."""
    pb, _ = _pb()
    t = text.strip()
    low = t.lower()
    if low in ("", "predicted"):
        return pb.Target(predicted=True)
    if low in ("all", "all_predicted", "all-predicted"):
        return pb.Target(all_predicted=True)
    m = re.fullmatch(r"top[-_]?k?[-_=]?(\d+)", low)
    if m:
        return pb.Target(top_k=int(m[1]))
    if t.isdigit():
        return pb.Target(index=int(t)) if len(t) <= 2 else pb.Target(snomed_code=t)
    return pb.Target(class_key=t)


def parse_params(items: Sequence[str], methods: Sequence[str]) -> dict[str, str]:
    """``METHOD:NAME=VALUE`` (or ``NAME=VALUE`` with one method) as parameters_json by method.
    A value is read as JSON when it parses (numbers, true, null), else kept as text."""
    by_method: dict[str, dict[str, Any]] = {}
    for item in items:
        left, sep, value = item.partition("=")
        method, colon, name = left.rpartition(":")
        if not colon:
            if len(methods) != 1:
                raise InvalidArgument(f"--param {item!r} must name its method: METHOD:NAME=VALUE")
            method = methods[0]
        if not sep or not name or not method:
            raise InvalidArgument(f"--param must look like METHOD:NAME=VALUE, got {item!r}")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        by_method.setdefault(method, {})[name] = parsed
    return {m: json.dumps(p) for m, p in by_method.items()}


def tensor(t: Any) -> np.ndarray:
    return np.frombuffer(t.data, "<f4").reshape(tuple(t.shape))


@dataclass(frozen=True)
class ChannelSecurity:
    """How the client reaches the server: TLS (``tls``, or a ``ca`` PEM file for the server's
    CA), a client certificate for mutual TLS (``cert`` and ``key``), a bearer ``token``.
    Plaintext is the default; a token over plaintext is refused unless ``insecure``."""

    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None
    server_name: str | None = None  # the name the server certificate must carry, if not the host's
    insecure: bool = False

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca is not None or self.cert is not None or self.key is not None

    def checked_token(self) -> str | None:
        """The token, stripped; errors never show it."""
        token = (self.token or "").strip()
        if not token:
            return None
        if not token.isascii() or not token.isprintable() or " " in token:
            raise InvalidArgument("the token (--token or ECGX_TOKEN) has characters no bearer token has")
        if not self.uses_tls and not self.insecure:
            raise InvalidArgument(
                "refusing to send a token over plaintext, where anyone on the network can read it: give the "
                "server's CA with --tls-ca (or --tls), or --insecure on a trusted network"
            )
        return token


def channel_credentials(security: ChannelSecurity) -> Any:
    """``grpc.ChannelCredentials`` for TLS (with the token as call credentials), or None for plaintext."""
    import grpc

    from ecgx.service.security import check_pair, load_certificates, load_tls_key, read_pem_file

    if not security.uses_tls:
        return None
    if (security.cert is None) != (security.key is None):
        raise InvalidArgument("mutual TLS needs both --tls-cert and --tls-key")
    ca = cert = key = None
    if security.ca is not None:
        pem = read_pem_file(security.ca, f"--tls-ca {security.ca}")
        load_certificates(pem, "the server's CA certificate")
        ca = b"".join(pem.blocks(b"CERTIFICATE"))
    if security.cert is not None and security.key is not None:
        cert_pem = read_pem_file(security.cert, f"--tls-cert {security.cert}")
        key_pem = read_pem_file(security.key, f"--tls-key {security.key}")
        chain = load_certificates(cert_pem, "the client certificate")
        check_pair(chain, load_tls_key(key_pem), cert_pem, key_pem)
        cert, key = b"".join(cert_pem.blocks(b"CERTIFICATE")), key_pem.key_blocks()[0]
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    token = security.checked_token()
    if token is None:
        return credentials
    return grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))


class Client:
    """A channel to one server; every call turns a gRPC error into a :class:`ClientError`."""

    def __init__(
        self, address: str, timeout: float = DEFAULT_TIMEOUT_S, security: ChannelSecurity | None = None
    ):
        if not address or any(c.isspace() for c in address):
            raise InvalidArgument(f"--server must be HOST:PORT, got {address!r}")
        import grpc  # here, not at import: every ecgx command builds the client's parser

        security = security or ChannelSecurity()
        self.address = address
        self.tls = security.uses_tls
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ]
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        credentials = channel_credentials(security)
        # Plaintext with a token (only with --insecure): gRPC sends call credentials over TLS only,
        # so the header goes with every call instead.
        token = security.checked_token() if credentials is None else None
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            self.channel = grpc.secure_channel(address, credentials, options=options)
        _, pb_grpc = _pb()
        self.stub = pb_grpc.ExplanationServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, name: str, request: Any, timeout: float | None = None) -> Any:
        import grpc

        try:
            return getattr(self.stub, name)(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise error_of(e, self.address, tls=self.tls) from None

    def list_models(self) -> list[Any]:
        pb, _ = _pb()
        return list(self._call("ListModels", pb.ListModelsRequest(), timeout=30).models)

    def get_model(self, model: str) -> Any:
        pb, _ = _pb()
        return self._call("GetModel", pb.GetModelRequest(model=model), timeout=30)

    def resolve_model(self, model: str | None) -> str:
        """``model``, or the server's only model when None."""
        if model:
            return model
        names = [m.name for m in self.list_models()]
        if len(names) == 1:
            return names[0]
        if not names:
            raise ClientError(f"NOT_FOUND: the server at {self.address} has no models")
        raise ClientError(f"the server has models {', '.join(names)}: choose one with --model")

    def predict(self, model: str, ecgs: Sequence[Any], version: str = "") -> Any:
        pb, _ = _pb()
        return self._call("Predict", pb.PredictRequest(model=model, version=version or "", ecgs=list(ecgs)))

    def explain(
        self,
        model: str,
        ecgs: Sequence[Any],
        methods: Sequence[str],
        targets: Sequence[Any] = (),
        parameters_json: Mapping[str, str] | None = None,
        version: str = "",
        fhir: bool = False,
    ) -> Any:
        pb, _ = _pb()
        request = pb.ExplainRequest(
            model=model,
            version=version or "",
            ecgs=list(ecgs),
            methods=list(methods),
            targets=list(targets),
            parameters_json=dict(parameters_json or {}),
            fhir=fhir,
        )
        return self._call("Explain", request)


_TOO_LARGE = re.compile(r"Sent message larger than max \((\d+) vs\. (\d+)\)")
# What a plaintext client sees from a TLS port, and a TLS client from a plaintext one.
_PLAINTEXT_TO_TLS = ("socket closed", "connection reset", "recvmsg", "end of file")
_TLS_TO_PLAINTEXT = ("wrong_version_number", "wrong version number", "packet_length_too_long", "http_request")


def error_of(e: Any, address: str, tls: bool | None = None) -> ClientError:
    """One line: ``STATUS: message`` of a ``grpc.RpcError``, with what to do where the cause can be
    told: an unreachable server, TLS on one side only (``tls``: whether this client used it), a
    request over the message limit."""
    import grpc

    code = e.code() if hasattr(e, "code") else None
    details = " ".join(str(e.details() if hasattr(e, "details") else e).split())
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.UNAVAILABLE:
        return ClientError(
            f"UNAVAILABLE: cannot reach {address} ({details}){_unavailable_hint(details, tls)}"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(f"DEADLINE_EXCEEDED: no answer from {address} in time (--timeout); {details}")
    too_large = _TOO_LARGE.search(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and too_large:
        sent, limit = (int(g) for g in too_large.groups())
        return ClientError(
            f"RESOURCE_EXHAUSTED: the request is {sent / 2**20:.0f} MiB, over the {limit / 2**20:.0f} MiB "
            "one gRPC message may hold; send the ECGs in smaller parts (split the .npy file: "
            "`ecgs[i:i + 64]` per file; the server takes at most --max-batch ECGs per request, 64 by default)"
        )
    return ClientError(f"{name}: {details}")


def _unavailable_hint(details: str, tls: bool | None) -> str:
    low = details.lower()
    if tls is False and any(s in low for s in _PLAINTEXT_TO_TLS):
        return (
            "; the server expects TLS (it closed the plaintext connection): connect with --tls-ca CERT.pem "
            "(the server's certificate or its CA; for a local `ecgx tls dev-cert`, its cert.pem) or --tls"
        )
    if tls and any(s in low for s in _TLS_TO_PLAINTEXT):
        return "; the server does not speak TLS (started with --insecure and no --tls-cert?): leave out --tls"
    if "ssl" in low or "handshake" in low:
        return "; the TLS handshake failed: check --tls-ca, and for mutual TLS --tls-cert and --tls-key"
    return ""


def version_info(info: Any, version: str) -> Any | None:
    """The VersionInfo of ``version`` ("" the default) in a ModelInfo, None if absent."""
    want = version or info.default_version
    return next((v for v in info.versions if v.version == want), None)


def servable_methods(info: Any, version: str = "") -> list[str]:
    """Methods the gate passed (servable, not ungated) on ``version`` (the default when "")."""
    v = version_info(info, version)
    if v is None:
        return []
    return [m.method for m in v.methods if m.servable and not m.ungated]


# ---------------------------------------------------------------------- text


def _num(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}"


def format_checks(gate: Any) -> str:
    parts = []
    for c in gate.checks:
        block = ", blocking" if c.blocking else ""
        parts.append(f"{c.check} {_num(c.score)} (threshold {_num(c.threshold)}, {c.verdict}{block})")
    return "; ".join(parts) or "no checks"


def format_models(infos: Sequence[Any], verbose: bool = False) -> str:
    """One line per version (serving state, gate verdict, the methods it serves); ``verbose``: the
    full table (package, input, classes, every method's checks and scores)."""
    if not verbose:
        return _format_models_compact(infos)
    lines = []
    for info in infos:
        lines.append(f"model {info.name}: default version {info.default_version or '(none serves)'}")
        for v in info.versions:
            state = "serving" if v.serving else f"NOT serving: {v.refusal_reason}"
            if v.ungated:
                state += " (UNGATED, research mode)"
            lines.append(f"  version {v.version}: {state}")
            if v.gate_verdict:
                lines.append(f"    gate {v.gate_verdict}: {v.gate_headline}")
            if v.package_sha256:
                shape = "x".join(str(s) for s in v.input_shape)
                lines.append(
                    f"    package sha256 {v.package_sha256}, input {shape} at {v.sampling_rate_hz:g} Hz, "
                    f"classes {', '.join(c.key for c in v.classes)}"
                )
            for m in v.methods:
                serve = "servable" if m.servable and not m.ungated else "UNGATED" if m.servable else "refused"
                lines.append(f"    {m.method:22s} {m.verdict:12s} {serve:9s} {format_checks(m)}")
    return "\n".join(lines)


def _format_models_compact(infos: Sequence[Any]) -> str:
    lines = []
    for info in infos:
        lines.append(f"model {info.name}: default version {info.default_version or '(none serves)'}")
        for v in info.versions:
            state = "serving" if v.serving else f"NOT serving: {v.refusal_reason}"
            if v.ungated:
                state += " (UNGATED, research mode)"
            served = [m.method for m in v.methods if m.servable and not m.ungated]
            gate = f"gate {v.gate_verdict}" if v.gate_verdict else "no gate report"
            methods = f"serves {', '.join(served)}" if served else "serves no method"
            lines.append(
                f"  version {v.version}: {state}; {gate}; {methods} ({len(served)} of {len(v.methods)})"
            )
    lines.append("(--verbose: the package, input, classes and every method's gate scores)")
    return "\n".join(lines)


def _classes(info: Any, version: str) -> dict[str, Any]:
    v = version_info(info, version) if info is not None else None
    return {c.key: c for c in v.classes} if v is not None else {}


def format_predict(response: Any, info: Any = None) -> str:
    probs = tensor(response.probabilities)
    classes = _classes(info, response.version)
    lines = [f"model {response.model} version {response.version} (package sha256 {response.package_sha256})"]
    if response.research_mode:
        lines.append("RESEARCH MODE: this version's gate failed; served only with --allow-ungated")
    for i, p in enumerate(probs):
        lines.append(f"ecg {i}: class probabilities (* = 0.5 or more)")
        for k in np.argsort(-p, kind="stable"):
            key = response.class_keys[k]
            c = classes.get(key)
            extra = f"  {c.snomed_code:>10s}  {c.name}" if c is not None else ""
            lines.append(f"  {'*' if p[k] >= 0.5 else ' '} {key:6s} {p[k]:.3f}{extra}")
    return "\n".join(lines)


def format_explain(response: Any, leads: Sequence[str] = LEADS) -> str:
    probs = tensor(response.probabilities)
    keys = list(response.class_keys)
    lines = [
        f"model {response.model} version {response.version} (package sha256 {response.package_sha256})",
        f"gate report sha256 {response.gate_report_sha256}, policy sha256 {response.policy_sha256}",
        f"onnxruntime {response.onnxruntime_version} on {', '.join(response.providers)}; "
        f"compute {response.compute_seconds:.3f} s",
    ]
    if response.research_mode:
        lines.append("RESEARCH MODE: some attributions were served UNGATED (--allow-ungated)")
    for a in response.attributions:
        p = probs[a.ecg_index, keys.index(a.target_class)] if a.target_class in keys else float("nan")
        gate = a.gate
        verdict = gate.verdict + (" (UNGATED, research mode)" if gate.ungated else "")
        lines.append(f"ecg {a.ecg_index}: {a.method} for {a.target_class} (p = {p:.3f}): gate {verdict}")
        lines.append(f"  scores: {format_checks(gate)}")
        shares = np.asarray(a.lead_relevance_share, dtype=float)
        top = np.argsort(-shares, kind="stable")[:TOP_LEADS]
        names = list(leads) if len(leads) == len(shares) else [str(k) for k in range(len(shares))]
        lines.append("  top leads: " + ", ".join(f"{names[k]} {100 * shares[k]:.1f}%" for k in top))
        lines.append(f"  settings {a.effective_parameters_json}; compute {a.compute_seconds:.3f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------- JSON


def _gate_dict(g: Any) -> dict[str, Any]:
    return {
        "method": g.method,
        "servable": g.servable,
        "verdict": g.verdict,
        "ungated": g.ungated,
        "checks": [
            {
                "check": c.check,
                "score": c.score,
                "threshold": c.threshold,
                "verdict": c.verdict,
                "blocking": c.blocking,
                "summary": c.summary,
            }
            for c in g.checks
        ],
    }


def models_dict(infos: Sequence[Any]) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": i.name,
                "default_version": i.default_version,
                "versions": [
                    {
                        "version": v.version,
                        "serving": v.serving,
                        "refusal_reason": v.refusal_reason,
                        "ungated": v.ungated,
                        "classes": [
                            {"key": c.key, "snomed_code": c.snomed_code, "name": c.name} for c in v.classes
                        ],
                        "leads": list(v.leads),
                        "input_shape": list(v.input_shape),
                        "sampling_rate_hz": v.sampling_rate_hz,
                        "package_sha256": v.package_sha256,
                        "gate_verdict": v.gate_verdict,
                        "gate_headline": v.gate_headline,
                        "gate_report_sha256": v.gate_report_sha256,
                        "policy_sha256": v.policy_sha256,
                        "methods": [_gate_dict(m) for m in v.methods],
                    }
                    for v in i.versions
                ],
            }
            for i in infos
        ]
    }


def _probabilities(response: Any) -> list[dict[str, float]]:
    return [
        dict(zip(response.class_keys, map(float, p), strict=True)) for p in tensor(response.probabilities)
    ]


def predict_dict(response: Any) -> dict[str, Any]:
    return {
        "model": response.model,
        "version": response.version,
        "package_sha256": response.package_sha256,
        "research_mode": response.research_mode,
        "probabilities": _probabilities(response),
        "beats_mv": tensor(response.beats).tolist(),
    }


def explain_dict(response: Any) -> dict[str, Any]:
    return {
        "model": response.model,
        "version": response.version,
        "package_sha256": response.package_sha256,
        "gate_report_sha256": response.gate_report_sha256,
        "policy_sha256": response.policy_sha256,
        "onnxruntime_version": response.onnxruntime_version,
        "providers": list(response.providers),
        "compute_seconds": response.compute_seconds,
        "research_mode": response.research_mode,
        "probabilities": _probabilities(response),
        "beats_mv": tensor(response.beats).tolist(),
        "attributions": [
            {
                "ecg_index": a.ecg_index,
                "method": a.method,
                "target_class": a.target_class,
                "gate": _gate_dict(a.gate),
                "lead_relevance_share": list(a.lead_relevance_share),
                "effective_parameters": json.loads(a.effective_parameters_json or "{}"),
                "compute_seconds": a.compute_seconds,
                "attribution": tensor(a.attribution).tolist(),
            }
            for a in response.attributions
        ],
    }


# ---------------------------------------------------------------------- pictures


def png_paths(out: Path, n_ecgs: int) -> list[Path]:
    """``out`` for one ECG; ``stem-ecgI.png`` beside it for several."""
    if n_ecgs == 1:
        return [out]
    return [out.with_name(f"{out.stem}-ecg{i}{out.suffix}") for i in range(n_ecgs)]


def write_explanation_pngs(
    response: Any, out: Path, leads: Sequence[str] = LEADS, overwrite: bool = False
) -> list[Path]:
    """The attributions of each ECG over the beat the server explained: one column per
    (method, target) marked with its gate verdict, one row per lead, the record (the request's
    ECG id, echoed in ``ecg_ids``), methods and verdicts in the title
    (:func:`ecgx.core.plots.plot_attributions`)."""
    from ecgx.core.plots import explanation_title, plot_attributions

    beats = tensor(response.beats)
    probs = tensor(response.probabilities)
    keys = list(response.class_keys)
    ids = list(response.ecg_ids)
    paths = png_paths(out, len(beats))
    for i, path in enumerate(paths):
        maps, verdicts = {}, {}
        for a in response.attributions:
            if a.ecg_index == i:
                label = f"{a.method} -> {a.target_class}"
                maps[label] = tensor(a.attribution)
                verdicts[label] = "ungated" if a.gate.ungated else a.gate.verdict
        top = int(np.argmax(probs[i]))
        title = explanation_title(
            response.model,
            response.version,
            i,
            record=ids[i] if i < len(ids) else "",
            top_class=keys[top],
            probability=float(probs[i, top]),
            methods=verdicts,
        )
        with StagedOutput(path, PNG_FILE, overwrite=overwrite) as tmp:
            plot_attributions(beats[i], maps, tmp, title=title, verdicts=verdicts, leads=leads, fmt="png")
    return paths


# ---------------------------------------------------------------------- the command


def run_client(args: Any) -> int:
    """``ecgx client models|predict|explain`` (arguments from :mod:`ecgx.cli`)."""
    action = args.client_command
    png = getattr(args, "png", None)
    json_out = getattr(args, "json", None)
    overwrite = getattr(args, "overwrite", False)
    check_outputs(None, json_out, overwrite)
    ecgs = None
    if action in ("predict", "explain"):
        if args.record is not None and args.fs is not None:
            raise InvalidArgument("--fs is for --ecg rhythm strips; a WFDB record names its own rate")
        if args.record is not None and args.units != "mV":
            raise InvalidArgument("--units is for --ecg; a WFDB record is read in millivolts")
        if args.record is not None and args.format is not None:
            raise InvalidArgument("--format is for --ecg documents; a WFDB record is read as WFDB")
        ecgs = (
            load_record(args.record)
            if args.record is not None
            else load_ecg_file(args.ecg, args.fs, args.format)
        )
    fhir_out = getattr(args, "fhir_out", None)
    if fhir_out is not None:
        if fhir_out.suffix.lower() != ".json":
            raise InvalidArgument(f"--fhir-out {fhir_out} must name a .json file")
        check_output(fhir_out, FHIR_FILE, overwrite=overwrite)
    if png is not None:  # before the call, every picture it will write
        check_outputs(png, None, overwrite)
        for path in png_paths(png, len(ecgs.signals) if ecgs else 1)[1:]:
            check_output(path, PNG_FILE, overwrite=overwrite)
    with Client(args.server, timeout=args.timeout, security=security_of(args)) as client:
        if action == "models":
            names = [args.model] if args.model else [m.name for m in client.list_models()]
            infos = [client.get_model(n) for n in names]
            verbose = getattr(args, "verbose", False)
            print(format_models(infos, verbose) if infos else f"the server at {args.server} has no models")
            result = models_dict(infos)
        elif action == "predict":
            model = client.resolve_model(args.model)
            r = client.predict(model, ecg_messages(ecgs, args.units), args.version or "")
            info = client.get_model(model)
            print(format_predict(r, info))
            result = predict_dict(r)
        else:
            model = client.resolve_model(args.model)
            if not args.method:
                info = client.get_model(model)
                ok = servable_methods(info, args.version or "")
                raise InvalidArgument(
                    "explain needs --method; the gate passed "
                    + (", ".join(ok) if ok else "no method")
                    + f" on model {model!r}"
                )
            targets = [parse_target(t) for t in args.target or []]
            params = parse_params(args.param, args.method)
            r = client.explain(
                model,
                ecg_messages(ecgs, args.units),
                args.method,
                targets,
                params,
                args.version or "",
                fhir=fhir_out is not None,
            )
            if fhir_out is not None:
                write_fhir_observations(r, fhir_out, overwrite=overwrite)
                print(f"fhir: {fhir_out}")
            info = client.get_model(model)
            v = version_info(info, r.version)
            leads = list(v.leads) if v is not None and len(v.leads) == len(LEADS) else LEADS
            print(format_explain(r, leads))
            if png is not None:
                for path in write_explanation_pngs(r, png, leads, overwrite=overwrite):
                    print(f"picture: {path}")
            result = explain_dict(r)
    if json_out is not None:
        write_json(result, json_out, overwrite=overwrite)
        print(f"json: {json_out}")
    return 0


def write_fhir_observations(response: Any, path: Path, overwrite: bool = False) -> None:
    """The server's FHIR Observation of the attribution (a ``collection`` Bundle of them when the
    response holds several), as JSON."""
    observations = [json.loads(a.fhir_observation) for a in response.attributions if a.fhir_observation]
    if len(observations) != len(response.attributions) or not observations:
        raise FailedPrecondition(
            "the server returned no FHIR Observation for --fhir-out (it predates ExplainRequest.fhir)"
        )
    if len(observations) == 1:
        document: dict[str, Any] = observations[0]
    else:
        entries = [{"resource": o} for o in observations]
        document = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    with StagedOutput(path, FHIR_FILE, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(document) + "\n")


def security_of(args: Any) -> ChannelSecurity:
    """The channel's security from the command line; the token from --token, else ECGX_TOKEN."""
    import os

    return ChannelSecurity(
        tls=getattr(args, "tls", False),
        ca=getattr(args, "tls_ca", None),
        cert=getattr(args, "tls_cert", None),
        key=getattr(args, "tls_key", None),
        token=getattr(args, "token", None) or os.environ.get(TOKEN_ENV),
        server_name=getattr(args, "tls_server_name", None),
        insecure=getattr(args, "insecure", False),
    )


def _add_security_flags(p: Any) -> None:
    g = p.add_argument_group("security (docs/security.md)")
    g.add_argument("--tls", action="store_true", help="TLS; the server's certificate checked by public CAs")
    g.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="TLS; the server's certificate checked by this CA"
    )
    g.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate, for mutual TLS")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="the client certificate's private key")
    g.add_argument("--tls-server-name", metavar="NAME", help="the name the server's certificate must carry")
    g.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"bearer token (better: the environment variable {TOKEN_ENV}, which no process list shows)",
    )
    g.add_argument("--insecure", action="store_true", help="allow a token over plaintext (trusted networks)")


def add_parser(sub: Any, add_common: Any) -> None:
    """The ``client`` subcommand and its three actions (called by :func:`ecgx.cli.build_parser`)."""
    import argparse

    client = sub.add_parser(
        "client",
        help="call an `ecgx serve` over gRPC: models, predictions, explanations",
        description="Call the ecgx.v1.ExplanationService of a running `ecgx serve`. gRPC errors print one "
        "line `ecgx: error: STATUS: message` and exit 2.",
    )
    client_sub = client.add_subparsers(dest="client_command", required=True, metavar="CLIENT_COMMAND")

    def common(p: argparse.ArgumentParser, ecg: bool) -> None:
        p.add_argument("--server", required=True, metavar="ADDR", help="HOST:PORT of `ecgx serve`")
        p.add_argument("--model", metavar="M", help="model name (default: the server's only model)")
        p.add_argument(
            "--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S", help="deadline per call (s)"
        )
        if ecg:
            p.add_argument("--version", metavar="V", help="model version (default: the default version)")
            src = p.add_mutually_exclusive_group(required=True)
            src.add_argument(
                "--ecg",
                type=Path,
                metavar="FILE",
                help="FILE.npy: (12, 600) or (B, 12, 600) float32 median beats at 500 Hz, standard lead "
                "order (with --fs: rhythm strips (12, T) or (B, 12, T)); any other file: an ECG document "
                "(DICOM, HL7 aECG, GE MUSE, Philips Sierra XML, FHIR JSON; by extension and content, or "
                "--format), sent as it is for the server to read",
            )
            src.add_argument(
                "--record", type=Path, metavar="WFDB", help="a WFDB record, sent as a rhythm strip"
            )
            p.add_argument("--fs", type=float, help="sampling rate (Hz) of --ecg rhythm strips")
            p.add_argument("--units", default="mV", choices=["mV", "uV"], help="units of --ecg (default mV)")
            p.add_argument(
                "--format",
                choices=DOCUMENT_FORMATS,
                help="the --ecg document's format (default: by extension, then content)",
            )
        p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the result as JSON")
        p.add_argument("--overwrite", action="store_true", help="replace outputs ecgx client wrote")
        _add_security_flags(p)
        add_common(p)

    p = client_sub.add_parser(
        "models",
        help="models, versions, serving state and gate verdicts",
        description="GetModel: one line per version (serving state, gate verdict, the methods it serves); "
        "--verbose adds the package, input, classes and every method's gate scores (and debug logging).",
    )
    common(p, ecg=False)
    p = client_sub.add_parser("predict", help="class probabilities", description="Predict.")
    common(p, ecg=True)
    p = client_sub.add_parser(
        "explain",
        help="attributions, with gate verdicts and scores; --png draws them",
        description="Explain: per attribution the method, target, gate verdict and scores, and the "
        "leads with the most relevance; --png draws the attributions over the beat the server explained.",
    )
    common(p, ecg=True)
    p.add_argument("--method", nargs="+", metavar="NAME", help="attribution method(s)")
    p.add_argument(
        "--target",
        action="append",
        metavar="T",
        help="class key (AF), SNOMED code, index, predicted (default), all (every positive class) or "
        "top-K; once for all ECGs or once per ECG",
    )
    p.add_argument(
        "--param", action="append", default=[], metavar="METHOD:NAME=VALUE", help="method setting, repeatable"
    )
    p.add_argument("--png", type=Path, metavar="OUT.png", help="draw the attributions over the 12 leads")
    p.add_argument(
        "--fhir-out",
        type=Path,
        metavar="OUT.json",
        help="write the attribution as the server's FHIR R4 Observation (a Bundle when several)",
    )
    for p in client_sub.choices.values():
        p.set_defaults(func=run_client)
