"""The web viewer (service/viewer.py, service/viewer_assets/) on a real REST port with TLS, bearer
tokens and an audit log, mounted as ``ecgx serve --viewer`` mounts it (viewer.mount_viewer):
plain HTTP tests of its JSON calls, then Chromium (Debian's, driven by Playwright; never a
downloaded browser) loading the page, signing in, explaining a sample and rendering it.

``ECGX_VIEWER_SCREENSHOTS=DIR`` keeps the browser test's screenshots in DIR (docs/images holds
those of docs/viewer.md)."""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from repo_helpers import make_package
from tls_helpers import Pki, make_pki

from ecgx.service.audit import AuditLog
from ecgx.service.core import lead_shares
from ecgx.service.http_server import HttpResponse, HttpServer
from ecgx.service.oip_http import RestServer, rest_ssl_context, start_rest
from ecgx.service.repository import ModelRepository, refusal_of_method
from ecgx.service.security import load_server_security
from ecgx.service.serve_config import ServeConfigError, resolve_serve_config
from ecgx.service.server import build_server
from ecgx.service.viewer import ASSETS, mount_viewer
from ecgx.token_cli import add_token

MODEL = "ecg"
CHROMIUM = Path("/usr/bin/chromium")
SAMPLE = ASSETS / "samples" / "synthetic-AF.json"
REFUSED = "saliency"  # its gate verdict is edited to a failed blocking check in version 1


@dataclass
class World:
    rest: RestServer
    pki: Pki
    tokens: dict[str, str]
    audit: Path
    repository: ModelRepository

    @property
    def url(self) -> str:
        return f"https://localhost:{self.rest.port}"


def _failed_saliency(report: dict[str, Any]) -> dict[str, Any]:
    """The report's methods with saliency failing its first check (blocking), and the serve list
    without it: a method the gate refused, with scores and a threshold to show."""
    methods = json.loads(json.dumps(report["methods"]))
    entry = methods[REFUSED]
    check = next(iter(entry["checks"]))
    entry["checks"][check].update(verdict="fail", blocking=True)
    entry["verdict"] = "fail"
    return {"methods": methods, "serve": [m for m in report["serve"] if m != REFUSED]}


@pytest.fixture(scope="module")
def world(gated, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("viewer")
    pki = make_pki(tmp / "pki")
    make_package(gated, tmp / "repo" / MODEL / "1", 0, **_failed_saliency(gated["report"]))
    repository = ModelRepository(tmp / "repo", [gated["public"]], engine_options={"threads": 1})
    access = tmp / "access.toml"
    tokens = {"clinician": add_token(access, "clinician", ["predict", "explain"])}
    tokens["reader"] = add_token(access, "reader", [])
    tls = {"tls_cert": pki.server.cert, "tls_key": pki.server.key}
    security = load_server_security(tokens_file=access, env={}, **tls)
    audit = AuditLog(tmp / "audit.jsonl")
    built = build_server(repository, security=security, host="127.0.0.1", port=0, max_batch=4, audit=audit)
    built.server.start()
    security.start()
    rest = start_rest(
        built.servicer.core, security, observers=[audit], ssl_context=rest_ssl_context(env={}, **tls)
    )
    mount_viewer(rest)
    yield World(rest, pki, tokens, tmp / "audit.jsonl", repository)
    rest.stop(1)
    built.server.stop(None)
    security.stop()
    audit.close()
    repository.stop()


def get(world: World, path: str, token: str | None = None, method: str = "GET") -> tuple[int, dict, Any]:
    """(status, headers, parsed JSON or bytes) of one request over TLS."""
    context = ssl.create_default_context(cafile=str(world.pki.ca.path))
    request = urllib.request.Request(world.url + path, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as r:
            status, headers, body = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, headers, body = e.code, dict(e.headers), e.read()
    if headers.get("Content-Type", "").startswith("application/json") and body:
        return status, headers, json.loads(body)
    return status, headers, body


def audit_line(world: World, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = {d["request_id"]: d for d in map(json.loads, world.audit.read_text().splitlines())}
        if request_id in lines:
            return lines[request_id]
        time.sleep(0.02)
    raise AssertionError(f"no audit line for {request_id}")


# ---------------------------------------------------------------------------- the JSON calls


def test_every_viewer_call_needs_a_known_token(world) -> None:
    for path in (
        "/viewer/api/models",
        f"/viewer/api/models/{MODEL}",
        f"/viewer/api/models/{MODEL}/versions/1/report",
    ):
        status, headers, body = get(world, path)
        assert status == 401 and headers["Ecgx-Status"] == "UNAUTHENTICATED", (path, body)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, headers, body = get(world, path, token="ecgx_not-a-token")
        assert status == 401, (path, body)
        line = audit_line(world, headers["X-Request-Id"])
        assert line["code"] == "UNAUTHENTICATED" and line["transport"] == "http"


def test_a_reader_lists_models_and_the_call_is_audited_as_list_models(world) -> None:
    status, headers, body = get(world, "/viewer/api/models", world.tokens["reader"])
    assert status == 200
    assert body == {
        "models": [{"name": MODEL, "default_version": "1", "versions": [{"version": "1", "serving": True}]}]
    }
    line = audit_line(world, headers["X-Request-Id"])
    assert line["rpc"].endswith("/ListModels") and line["caller"] == "reader" and line["code"] == "OK"


def test_the_model_call_gives_each_methods_gate_verdict_scores_and_refusal(world) -> None:
    status, headers, body = get(world, f"/viewer/api/models/{MODEL}", world.tokens["clinician"])
    assert status == 200, body
    (v,) = body["versions"]
    assert v["serving"] and v["gate_verdict"] == "pass" and len(v["leads"]) == 12
    methods = {m["method"]: m for m in v["methods"]}
    served = world.repository.versions(MODEL)[0]
    assert methods["gradcam"]["servable"] and methods["gradcam"]["refusal"] is None
    report_checks = served.report["methods"]["gradcam"]["checks"]
    shown = {c["check"]: c for c in methods["gradcam"]["checks"]}
    assert shown.keys() == report_checks.keys()
    for name, c in report_checks.items():
        for key in ("score", "threshold"):
            assert shown[name][key] == pytest.approx(c.get(key)), (name, key)
        assert shown[name]["verdict"] == c["verdict"]
    refused = methods[REFUSED]
    assert not refused["servable"] and refused["verdict"] == "fail"
    assert refused["refusal"] == refusal_of_method(served, served.method_gate(REFUSED))
    assert "failed" in refused["refusal"] and "threshold" in refused["refusal"]
    unchecked = [m for m in methods.values() if m["verdict"] == "not checked"]
    assert unchecked and all(not m["servable"] and m["refusal"] for m in unchecked)
    assert audit_line(world, headers["X-Request-Id"])["rpc"].endswith("/GetModel")


def test_the_report_call_gives_the_signed_report(world) -> None:
    status, headers, body = get(
        world, f"/viewer/api/models/{MODEL}/versions/1/report", world.tokens["reader"]
    )
    assert status == 200
    served = world.repository.versions(MODEL)[0]
    assert body["report"] == json.loads(served.report_bytes) and body["sha256"] == served.report_sha256
    assert audit_line(world, headers["X-Request-Id"])["rpc"].endswith("/GetGateReport")


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        (f"/viewer/api/models/{MODEL}/versions/9/report", 404, "NOT_FOUND"),
        ("/viewer/api/models/no-such-model", 404, "NOT_FOUND"),
        ("/viewer/api/nothing", 404, "NOT_FOUND"),
    ],
)
def test_unknown_versions_models_and_calls_are_404(world, path: str, status: int, code: str) -> None:
    got, headers, body = get(world, path, world.tokens["reader"])
    assert (got, headers["Ecgx-Status"]) == (status, code), body
    assert "error" in body


def test_pages_are_served_without_a_token_with_a_strict_policy_and_nothing_else_is(world) -> None:
    status, headers, body = get(world, "/viewer/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"ecgx viewer" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert get(world, "/viewer/assets/app.js")[1]["Content-Type"].startswith("text/javascript")
    for path in (
        "/viewer/../oip_http.py",
        "/viewer/assets/../../viewer.py",
        "/viewer/nothing.html",
        "/viewer/%2e%2e/viewer.py",
    ):
        assert get(world, path)[0] == 404, path
    assert get(world, "/viewer/", method="POST")[0] == 405
    assert get(world, "/viewer")[2] == get(world, "/viewer/")[2]  # (urllib follows the 308)
    assert get(world, "/viewer/api/models", world.tokens["reader"], method="POST")[0] == 405
    # The REST transport beside it is untouched.
    assert get(world, "/v2/health/live")[0] == 401


def test_the_viewer_setting_needs_the_http_port(tmp_path) -> None:
    with pytest.raises(ServeConfigError, match="viewer is served on the HTTP port"):
        resolve_serve_config(None, {"repo": tmp_path, "viewer": True})
    assert resolve_serve_config(None, {"repo": tmp_path, "viewer": True, "http_port": 0}).viewer
    config = tmp_path / "serve.toml"
    config.write_text('[serve]\nrepo = "r"\nhttp_port = 8000\nviewer = true\n')
    assert resolve_serve_config(config, {}).viewer


def test_a_mounted_application_serves_its_prefix_only() -> None:
    def named(name: str) -> Any:
        return lambda request: HttpResponse.json(200, {"app": name, "path": request.path})

    server = HttpServer(named("main")).start()
    try:
        server.mount("/viewer", named("viewer"))
        with pytest.raises(ValueError):
            server.mount("viewer/", named("bad"))
        answers = {}
        for path in ("/viewer", "/viewer/x/y", "/viewers", "/v2/models", "/"):
            with urllib.request.urlopen(server.url + path, timeout=10) as r:
                answers[path] = json.loads(r.read())["app"]
    finally:
        server.stop(0.5)
    assert answers == {
        "/viewer": "viewer",
        "/viewer/x/y": "viewer",
        "/viewers": "main",
        "/v2/models": "main",
        "/": "main",
    }


# ---------------------------------------------------------------------------- in Chromium


def _launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium (/usr/bin/chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = _launch(p)
        yield b
        b.close()


def _page(browser: Any) -> Any:
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 1800})
    return context.new_page()


def _shot(page: Any, name: str) -> None:
    """Keep a screenshot of the whole page in $ECGX_VIEWER_SCREENSHOTS (JPEG: the docs' copies)."""
    folder = os.environ.get("ECGX_VIEWER_SCREENSHOTS")
    if folder:
        page.screenshot(path=Path(folder) / name, full_page=True, type="jpeg", quality=55)


def _sign_in(page: Any, token: str) -> None:
    page.fill("#token", token)
    page.click("#signin button[type=submit]")


@pytest.mark.slow
def test_a_wrong_token_shows_the_error(world, browser) -> None:
    page = _page(browser)
    page.goto(world.url + "/viewer/")
    page.wait_for_selector("#signin", state="visible")
    _sign_in(page, "ecgx_wrong")
    error = page.locator("#signin .error")
    error.wait_for(state="visible")
    page.locator("#signin .error", has_text="UNAUTHENTICATED").wait_for()
    assert "Not signed in" in error.text_content() and "UNAUTHENTICATED" in error.text_content()
    assert page.locator("#main").is_hidden()
    page.context.close()


@pytest.mark.slow
def test_the_viewer_explains_a_sample_on_ecg_paper_with_the_gate_verdicts(world, browser) -> None:
    page = _page(browser)
    page.goto(world.url + "/viewer/")
    page.wait_for_selector("#signin", state="visible")
    _sign_in(page, world.tokens["clinician"])
    page.wait_for_selector("#main", state="visible")
    page.wait_for_selector("#methods li")

    # The gate's verdicts: gradcam may serve; the refused method is disabled with its reason.
    assert page.locator("#method-gradcam").is_enabled()
    refused = page.locator(f"li[data-method={REFUSED}]")
    assert page.locator(f"#method-{REFUSED}").is_disabled()
    assert "did not pass the validation gate" in refused.locator(".reason").text_content()
    assert refused.locator("tr.fail td.threshold").count() >= 1
    assert page.locator("li.method.servable").count() >= 1

    page.select_option("#sample", SAMPLE.name)
    page.locator("#ecg-title", has_text="atrial fibrillation").wait_for()  # (the pages' CSP forbids eval)
    page.check("#method-gradcam")
    page.click("#explain")
    page.wait_for_selector("#results", state="visible", timeout=60_000)

    # 12 leads in the 3 x 4 layout plus the rhythm row, the classes, and the lead shares.
    cells = json.loads(page.locator("#paper").get_attribute("data-layout"))
    assert sorted({c["lead"] for c in cells}) == sorted(world.repository.versions(MODEL)[0].package.leads)
    assert len(cells) == 13 and sum(c["rhythm"] for c in cells) == 1
    assert page.locator("#classes tr[data-class]").count() == len(
        world.repository.versions(MODEL)[0].package.manifest["classes"]
    )
    bars = page.locator("svg.lead-shares g.bar")
    shares = {
        bars.nth(i).get_attribute("data-lead"): float(bars.nth(i).get_attribute("data-share"))
        for i in range(bars.count())
    }
    assert len(shares) == 12 and sum(shares.values()) == pytest.approx(1, abs=1e-4)

    # The shares are the serving core's (lead_shares of the map the same call returns over REST).
    attribution = _attribution_over_rest(world, "gradcam")
    leads = list(world.repository.versions(MODEL)[0].package.leads)
    expected = dict(zip(leads, lead_shares(attribution[0]).tolist(), strict=True))
    assert shares == pytest.approx(expected, abs=1e-5)
    assert "gate pass" in page.locator("#facts").text_content()
    assert page.locator("#classes tr[data-class] td:nth-child(4)", has_text="yes").count() == 1

    # Pixels: the overlay colours the lead with the largest share where its map peaks, and not
    # where its map is near zero.
    top = max(expected, key=expected.get)
    cell = next(c for c in cells if c["lead"] == top and not c["rhythm"])
    row = np.abs(attribution[0][leads.index(top)])
    image = _canvas_pixels(page)
    peak_x = int(cell["beatX"] + int(row.argmax()) * cell["pxPerSample"])
    y = int(cell["y"] + 3)
    r, g, b = image[y : y + 4, peak_x].mean(axis=0)[:3]
    assert b - r > 60, (r, g, b)
    quiet = np.flatnonzero(row < 0.01 * row.max())
    if quiet.size:
        qx = int(cell["beatX"] + int(quiet[len(quiet) // 2]) * cell["pxPerSample"])
        r, g, b = image[y : y + 4, qx].mean(axis=0)[:3]
        assert r >= b, (r, g, b)
    _shot(page, "viewer.jpg")

    # The gate report page for the release reviewer.
    page.click("#report-link")
    page.wait_for_selector("#main", state="visible")
    assert "verdict: pass" in page.locator("#verdict").text_content()
    assert page.locator("#matrix tr[data-method=gradcam] td.method-verdict").text_content() == "pass"
    assert page.locator(f"#matrix tr[data-method={REFUSED}] td.method-verdict").text_content() == "fail"
    assert page.locator("#figures svg.scores circle").count() >= 2
    assert "verified" in page.locator("#facts").text_content()
    _shot(page, "viewer-report.jpg")
    page.context.close()


def _attribution_over_rest(world: World, method: str, beat: Any = None) -> np.ndarray:
    """``method``'s map of ``beat`` (default: the shipped sample) over the REST transport."""
    beat = json.loads(SAMPLE.read_text())["samples"] if beat is None else beat
    body = {
        "inputs": [
            {"name": "ecg", "datatype": "FP32", "shape": [1, 12, 600], "data": np.ravel(beat).tolist()}
        ],
        "parameters": {"method": method, "target": "predicted"},
    }
    context = ssl.create_default_context(cafile=str(world.pki.ca.path))
    request = urllib.request.Request(
        f"{world.url}/v2/models/{MODEL}/versions/1/infer",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {world.tokens['clinician']}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, context=context, timeout=60) as r:
        answer = json.loads(r.read())
    out = next(o for o in answer["outputs"] if o["name"] == "attribution")
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _canvas_pixels(page: Any) -> np.ndarray:
    """The canvas as drawn (RGBA rows), read from its own pixels in the page's screenshot."""
    import io

    from PIL import Image

    png = page.locator("#paper").screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"), dtype=np.float64)


@pytest.mark.slow
def test_a_dropped_dicom_file_is_decoded_by_the_server_and_explained(
    world, browser, shared_data, tmp_path
) -> None:
    """A DICOM 12-lead ECG (10 s of a real record, pydicom's writer) goes to the server as the OIP
    ecg_document input; the page draws the median beat the server computed from it."""
    from ecg_format_helpers import real_record, write_dicom

    mv, rate = real_record(shared_data)
    path = tmp_path / "HR06000.dcm"
    path.write_bytes(write_dicom(mv, rate))
    page = _page(browser)
    page.goto(world.url + "/viewer/")
    page.wait_for_selector("#signin", state="visible")
    _sign_in(page, world.tokens["clinician"])
    page.wait_for_selector("#methods li")
    page.set_input_files("#file", str(path))
    page.locator("#ecg-title", has_text="dicom document").wait_for()
    page.check("#method-gradcam")
    page.click("#explain")
    page.wait_for_selector("#results", state="visible", timeout=60_000)
    cells = json.loads(page.locator("#paper").get_attribute("data-layout"))
    assert len({c["lead"] for c in cells}) == 12
    bars = page.locator("svg.lead-shares g.bar")
    assert bars.count() == 12
    # The same explanation as the record's median beat sent raw: computed by the server from the
    # document as the WFDB importer computes it from the record itself.
    from ecgx.training.data.wfdb_import import record_median_beat

    beat, _ = record_median_beat(shared_data / "ptbxl-sample" / "HR06000")
    dicom_shares = [float(bars.nth(i).get_attribute("data-share")) for i in range(12)]
    raw = lead_shares(_attribution_over_rest(world, "gradcam", np.asarray(beat).tolist())[0])
    assert dicom_shares == pytest.approx(raw.tolist(), abs=0.02)
    assert "gate pass" in page.locator("#facts").text_content()
    page.context.close()


# ---------------------------------------------------------------------------- ecgx serve --viewer

CLI_HAS_VIEWER = "--viewer" in (Path(__file__).resolve().parents[2] / "ecgx" / "cli.py").read_text()


@pytest.mark.skipif(not CLI_HAS_VIEWER, reason="ecgx serve --viewer is not wired in ecgx/cli.py yet")
def test_ecgx_serve_viewer_serves_the_pages_and_calls_without_torch(gated, tmp_path) -> None:
    """``ecgx serve --http-port 0 --viewer`` as a user runs it (PyTorch unimportable): the page and
    a viewer call answer on the REST port; without --viewer the pages are not there."""
    import re
    import signal
    import subprocess
    import sys

    from cli_helpers import ECGX_WITHOUT_TORCH, serve_port

    make_package(gated, tmp_path / "repo" / MODEL / "1", 0)
    script = tmp_path / "serve_no_torch.py"
    script.write_text(ECGX_WITHOUT_TORCH)
    args = ["serve", "--repo", str(tmp_path / "repo"), "--port", "0", "--http-port", "0", "--viewer"]
    args += ["--trusted-key", str(gated["public_pem"]), "--no-metrics", "--grace", "1", "--insecure"]
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        _, lines = serve_port(proc, "PLAINTEXT")
        port = next(m[1] for line in lines if (m := re.search(r"over REST on http://[^ ]+:(\d+)", line)))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/viewer/", timeout=30) as r:
            assert r.status == 200 and b"ecgx viewer" in r.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/viewer/api/models", timeout=30) as r:
            assert json.loads(r.read())["models"][0]["name"] == MODEL
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "torch" not in out
