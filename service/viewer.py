"""The web viewer (``ecgx serve --viewer``): static pages and a few JSON calls on the HTTP port.

Mounted at ``/viewer`` on the REST transport's :class:`~ecgx.service.http_server.HttpServer`
(:func:`mount_viewer`), so it shares its connection limits, TLS (and mutual TLS) and timeouts.

- ``/viewer/``, ``/viewer/report.html`` and ``/viewer/assets/...``, ``/viewer/samples/...``:
  the files of ``viewer_assets/`` (plain HTML, CSS and ES modules; sample median beats), served
  without credentials: they hold no data of the server, only the page that asks for it.
- ``/viewer/api/...``: the data the REST transport lacks, each call admitted by the REST
  transport's own :class:`~ecgx.service.calls.CallLedger` (tokens, client certificates, scopes,
  audit, metrics) and recorded under the ecgx.v1 RPC it answers like, so scopes and dashboards
  are those of the gRPC API::

      GET /viewer/api/models                                  ListModels
      GET /viewer/api/models/{model}                          GetModel: versions, classes, each
                                                              method's gate verdict, scores,
                                                              thresholds and refusal reason
      GET /viewer/api/models/{model}/versions/{v}/report      GetGateReport: the signed report

Predictions and explanations are not here: the page asks the OIP REST endpoint
(``POST /v2/models/{model}/versions/{v}/infer``), which goes through the serving core, so a
method the gate refused cannot be asked for from the viewer either.

No PyTorch here (the serving path).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ecgx.core.errors import FailedPrecondition, InvalidArgument, NotFound
from ecgx.service.calls import CallRecord, note_call
from ecgx.service.http_server import HttpRequest, HttpResponse, error_response
from ecgx.service.methods import METHOD_NAMES
from ecgx.service.oip_http import STATUS_HEADER, OipHttpApp, RestServer, serve_call
from ecgx.service.repository import refusal_of_method

PREFIX = "/viewer"
ASSETS = Path(__file__).resolve().parent / "viewer_assets"
_ECGX = "/ecgx.v1.ExplanationService/"
MAX_NAME = 200  # a model or version name longer than this is no name in any repository

CONTENT_TYPES: Mapping[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The pages load only their own files and talk only to this server; nothing may frame them.
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)


@dataclass(frozen=True)
class ApiRoute:
    pattern: re.Pattern[str]
    rpc: str  # the ecgx.v1 RPC it is recorded and authorised as
    handler: Callable[[ViewerApp, dict[str, str]], Any]


def static_files(root: Path = ASSETS) -> dict[str, Path]:
    """URL path -> file, for every asset under ``root`` (read once: no path from a request ever
    reaches the file system)."""
    files = {
        f"{PREFIX}/{p.relative_to(root).as_posix()}": p
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in CONTENT_TYPES
    }
    files[f"{PREFIX}/"] = root / "index.html"
    return files


class ViewerApp:
    """The viewer's :data:`~ecgx.service.http_server.Application`, over the REST transport's
    application ``rest`` (its serving core and call ledger)."""

    def __init__(self, rest: OipHttpApp, assets: Path = ASSETS):
        self.core = rest.core
        self.ledger = rest.ledger
        self.files = static_files(assets)

    @property
    def repository(self) -> Any:
        return self.core.repository

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith(f"{PREFIX}/api/"):
            return self._api(request)
        return self._static(request)

    # ------------------------------------------------------------------ files

    def _static(self, request: HttpRequest) -> HttpResponse:
        if request.path == PREFIX:  # the pages' relative links need the slash
            return HttpResponse(308, (), "text/plain", (("Location", f"{PREFIX}/"),))
        path = self.files.get(request.path)
        if path is None:
            return error_response(404, "no such page in the viewer; open /viewer/")
        if request.method not in ("GET", "HEAD"):
            return error_response(405, "the viewer's pages take GET", (("Allow", "GET, HEAD"),))
        body = path.read_bytes()
        if request.method == "HEAD":
            return HttpResponse(200, (), CONTENT_TYPES[path.suffix], SECURITY_HEADERS)
        return HttpResponse(200, (body,), CONTENT_TYPES[path.suffix], SECURITY_HEADERS)

    # ------------------------------------------------------------------ the JSON calls

    def _api(self, request: HttpRequest) -> HttpResponse:
        found = _api_route(request.path)
        if found is None:
            return _error(404, "unknown viewer call; see docs/viewer.md", NotFound.code)
        route, params = found
        if request.method != "GET":
            return _error(405, "the viewer's calls take GET", "UNIMPLEMENTED", (("Allow", "GET"),))

        def answer(record: CallRecord) -> HttpResponse:
            names = {k: _name(k, v) for k, v in params.items()}
            return HttpResponse.json(200, route.handler(self, names))

        # Admitted, audited and refused exactly as a REST call (one place: oip_http.serve_call).
        response = serve_call(self.ledger, route.rpc, request, answer)
        return HttpResponse(
            response.status,
            response.body,
            response.content_type,
            (*response.headers, ("Cache-Control", "no-store")),
        )

    def list_models(self, params: dict[str, str]) -> dict[str, Any]:
        out = []
        for name in self.repository.models():
            default = self.repository.default_version(name)
            versions = self.repository.versions(name)
            out.append(
                {
                    "name": name,
                    "default_version": default.version if default is not None else None,
                    "versions": [{"version": v.version, "serving": v.servable} for v in versions],
                }
            )
        return {"models": out}

    def get_model(self, params: dict[str, str]) -> dict[str, Any]:
        model = params["model"]
        versions = self.repository.versions(model)
        note_call(model=model)
        default = self.repository.default_version(model)
        return {
            "name": model,
            "default_version": default.version if default is not None else None,
            "versions": [version_info(v) for v in versions],
        }

    def gate_report(self, params: dict[str, str]) -> dict[str, Any]:
        served = self._version(params["model"], params["version"])
        if served.report_bytes is None:
            raise NotFound(
                f"{served.model} version {served.version} has no verified gate report: "
                f"{served.refusal or 'none'}"
            )
        return {
            "model": served.model,
            "version": served.version,
            "sha256": served.report_sha256,
            "policy_sha256": served.policy_sha256,
            "package_sha256": served.package_sha256,
            # report_bytes is only set once the signature verified against a trusted key.
            "signature": "verified against this server's trusted keys",
            "serving": served.servable,
            "refusal": served.refusal,
            "report": json.loads(served.report_bytes),
        }

    def _version(self, model: str, version: str) -> Any:
        versions = self.repository.versions(model)
        note_call(model=model)
        match = [v for v in versions if v.version == version]
        if not match:
            known = ", ".join(v.version for v in versions) or "none"
            raise NotFound(f"model {model!r} has no version {version!r}; it has {known}")
        note_call(match[0])
        return match[0]


def version_info(served: Any) -> dict[str, Any]:
    """What the viewer shows of a version: serving or why not, classes, leads, and each method's
    gate verdict with its scores against the thresholds (as ecgx.v1 GetModel tells)."""
    report = served.report or {}
    info: dict[str, Any] = {
        "version": served.version,
        "serving": served.servable,
        "refusal": served.refusal,
        "ungated": bool(getattr(served, "ungated", False)),
        "package_sha256": served.package_sha256,
        "gate_report_sha256": served.report_sha256,
        "gate_verdict": report.get("verdict"),
        "gate_headline": report.get("headline"),
        "classes": [],
        "leads": [],
        "methods": [],
    }
    package = served.engine.package if served.engine is not None else served.package
    if package is not None:
        manifest = package.manifest
        info["classes"] = [
            {"key": c["key"], "snomed_code": str(c.get("code", "")), "name": str(c.get("name", ""))}
            for c in manifest["classes"]
        ]
        info["leads"] = list(package.leads)
        info["input_shape"] = list(package.input_shape)
        rate = manifest.get("input", {}).get("sampling_rate_hz", 500)
        info["sampling_rate_hz"] = float(rate) if isinstance(rate, (int, float)) else 500.0
    if served.report is not None:
        info["methods"] = [method_info(served, m) for m in METHOD_NAMES]
    return info


def method_info(served: Any, method: str) -> dict[str, Any]:
    """One method's gate verdict on ``served``; ``refusal`` is the text the serving core refuses
    it with (repository.refusal_of_method), None when it serves."""
    gate = served.method_gate(method)
    return {
        "method": method,
        "servable": gate.servable,
        "verdict": gate.verdict,
        "ungated": gate.ungated,
        "refusal": None if gate.servable else _method_refusal(served, gate),
        "checks": [
            {
                "check": c.check,
                "score": _finite(c.score),
                "threshold": _finite(c.threshold),
                "verdict": c.verdict,
                "blocking": c.blocking,
                "summary": c.summary,
            }
            for c in gate.checks
        ],
    }


def _method_refusal(served: Any, gate: Any) -> str:
    if not served.servable:
        return f"{served.model} version {served.version} does not serve: {served.refusal}"
    return refusal_of_method(served, gate)


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _name(what: str, text: str) -> str:
    value = unquote(text)
    if not value or len(value) > MAX_NAME or not value.isprintable():
        raise InvalidArgument(f"the {what} name must be 1 to {MAX_NAME} printable characters")
    return value


_M = r"/viewer/api/models/(?P<model>[^/]+)"
API_ROUTES: tuple[ApiRoute, ...] = (
    ApiRoute(re.compile(r"/viewer/api/models/?"), _ECGX + "ListModels", ViewerApp.list_models),
    ApiRoute(re.compile(_M + r"/?"), _ECGX + "GetModel", ViewerApp.get_model),
    ApiRoute(
        re.compile(_M + r"/versions/(?P<version>[^/]+)/report"),
        _ECGX + "GetGateReport",
        ViewerApp.gate_report,
    ),
)


def _api_route(path: str) -> tuple[ApiRoute, dict[str, str]] | None:
    for route in API_ROUTES:
        match = route.pattern.fullmatch(path)
        if match is not None:
            return route, match.groupdict()
    return None


def _error(status: int, message: str, code: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    return error_response(status, message, ((STATUS_HEADER, code), *headers))


def mount_viewer(rest: RestServer) -> ViewerApp:
    """Serve the viewer at ``/viewer`` on the REST transport's port (``ecgx serve --viewer``)."""
    if not (ASSETS / "index.html").is_file():
        raise FailedPrecondition(f"the viewer's files are missing from {ASSETS}; reinstall ecgx")
    app = ViewerApp(rest.app)
    rest.http.mount(PREFIX, app)
    return app


__all__ = ["API_ROUTES", "PREFIX", "ViewerApp", "method_info", "mount_viewer", "static_files", "version_info"]
