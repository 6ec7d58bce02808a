"""Issue #22, the first hour of a new user: each rough edge it lists, as a test."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from ecgx.core.progress import ProgressLog, progress, progress_bar


class _Pipe(io.StringIO):
    """A stream that is not a terminal, as stderr is under nohup, CI or a pipe."""

    def isatty(self) -> bool:
        return False


def test_progress_without_a_terminal_writes_lines_while_a_long_step_runs():
    stream = _Pipe()
    with progress_bar(total=4, desc="randomisation", unit="model", stream=stream, interval=0.1) as bar:
        assert isinstance(bar, ProgressLog)
        bar.update(1)
        time.sleep(0.45)  # one slow item: the timer still writes while it runs
        bar.update(3)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3, lines  # at least two while the step ran, one when it ended
    assert lines[0].startswith("progress randomisation: 1/4 model (25%)")
    assert "model/s" in lines[0] and "s left" in lines[0]
    assert lines[-1].startswith("progress randomisation: 4/4 model (100%)") and lines[-1].endswith("[done]")


def test_progress_of_a_short_step_or_when_disabled_writes_nothing():
    stream = _Pipe()
    assert list(progress(range(3), desc="quick", stream=stream, interval=30)) == [0, 1, 2]
    assert list(progress(range(3), desc="off", stream=stream, interval=0.01, enabled=False)) == [0, 1, 2]
    assert stream.getvalue() == ""


# ------------------------------------------------------------------------- the demo's closing summary


def _fake_demo_tree(out):
    """What a finished demo leaves, without running one: the summary reads only paths."""
    for d in ("packages/seed-0", "packages/seed-1", "repo/ecg/1", "figures", "keys", "records", "report"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for f in (
        "keys/gate_public_key.pem",
        "keys/gate_signing_key.pem",
        "report/report.html",
        "records/beat-7.npy",
    ):
        (out / f).write_text("x")
    return out


def test_closing_summary_lists_only_what_exists_verdicts_and_the_next_commands(tmp_path):
    from ecgx.demo import DemoResult, PackageVerdict, closing_summary

    out = _fake_demo_tree(tmp_path / "demo")
    pkgs = [out / "packages" / "seed-0", out / "packages" / "seed-1"]
    result = DemoResult(
        out=out,
        packages=pkgs,
        trims=["gates 5 of 16 methods", "the gate policy is the default one"],
        verdicts={pkgs[0]: PackageVerdict("pass", ("gradient_shap",), 5)},
        report=out / "report" / "report.html",
        figures=[],
        record=out / "records" / "beat-7.npy",
        method="gradient_shap",
        seconds=12.0,
    )
    text = "\n".join(closing_summary(result))
    assert str(out / "report" / "report.html") in text
    assert str(out / "keys" / "gate_public_key.pem") in text and str(out / "repo") in text
    assert "grpc_explanation.png" not in text and "training runs" not in text  # not written: not listed
    assert "seed-0: PASS, 1 of 5 methods pass: gradient_shap" in text
    assert "seed-1: not gated by this demo (not served)" in text
    assert "note: gates 5 of 16 methods" in text
    serve = (
        f"ecgx serve --repo {out / 'repo'} --trusted-key {out / 'keys' / 'gate_public_key.pem'} --insecure"
    )
    assert serve in text and "--public-key" not in text
    assert f"--ecg {out / 'records' / 'beat-7.npy'} --method gradient_shap" in text
    assert f"file://{(out / 'report' / 'report.html').resolve()}" in text


def test_the_serve_command_the_summary_prints_parses(tmp_path):
    """The next commands use flags the CLI has (issue #22: `serve` was told --public-key)."""
    import shlex

    from ecgx.cli import build_parser
    from ecgx.demo import DemoResult, next_commands

    out = _fake_demo_tree(tmp_path / "demo")
    result = DemoResult(out=out, packages=[], record=out / "records/beat-7.npy", method="gradient_shap")
    commands = [line.strip() for line in next_commands(result) if line.strip().startswith("ecgx ")]
    assert len(commands) == 2
    parser = build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])  # exits 2 on an unknown flag


# ---------------------------------------------------------------------- CLI errors and serving edges


def _main(*argv: str) -> int:
    from ecgx.cli import main

    return main(list(argv))


def test_serve_on_a_packages_folder_warns_and_names_the_command_that_makes_a_repository(tmp_path, caplog):
    from ecgx.cli import _warn_not_a_repository

    for name in ("seed-0", "seed-1"):
        (tmp_path / "packages" / name).mkdir(parents=True)
        (tmp_path / "packages" / name / "manifest.json").write_text("{}")
    with caplog.at_level("WARNING"):
        _warn_not_a_repository(tmp_path / "packages")
    (record,) = caplog.records
    assert "holds model packages (seed-0, seed-1), not a model repository" in record.getMessage()
    assert "ecgx repo add PACKAGE --repo REPO --model NAME" in record.getMessage()
    caplog.clear()
    (tmp_path / "repo" / "ecg" / "1").mkdir(parents=True)
    _warn_not_a_repository(tmp_path / "repo")  # a repository: no warning
    assert not caplog.records


def test_serve_without_a_trusted_key_names_its_own_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ECGX_GATE_PUBLIC_KEY", raising=False)
    (tmp_path / "repo").mkdir()
    assert _main("serve", "--repo", str(tmp_path / "repo"), "--insecure", "--no-metrics", "-q") == 2
    err = capsys.readouterr().err
    assert "--trusted-key FILE" in err and "--public-key" not in err


def _ed25519_certificate(folder):
    """A self-signed certificate with an Ed25519 key: loads fine, fails every gRPC handshake."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.x509.oid import NameOID

    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, None)
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (folder / "key.pem").write_bytes(pem)
    (folder / "key.pem").chmod(0o600)
    return folder / "cert.pem", folder / "key.pem"


def test_a_tls_key_grpc_cannot_use_is_refused_at_start_up(tmp_path):
    import pytest

    from ecgx.service.security import SecurityConfigError, load_server_security

    cert, key = _ed25519_certificate(tmp_path / "ed")
    with pytest.raises(
        SecurityConfigError, match=r"Ed25519 key, which gRPC's TLS cannot use.*ecgx tls dev-cert"
    ):
        load_server_security(tls_cert=cert, tls_key=key, insecure=True, env={})


def test_tls_dev_cert_writes_a_p256_pair_the_server_accepts(tmp_path, capsys):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from ecgx.service.security import load_server_security

    out = tmp_path / "tls"
    assert _main("tls", "dev-cert", "--out", str(out)) == 0
    assert "--tls-ca" in capsys.readouterr().out
    key = load_pem_private_key((out / "key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert (out / "key.pem").stat().st_mode & 0o077 == 0
    security = load_server_security(tls_cert=out / "cert.pem", tls_key=out / "key.pem", insecure=True, env={})
    assert security.credentials is not None
    assert _main("tls", "dev-cert", "--out", str(out)) == 2  # never replaced without --overwrite


def _tls_server(folder):
    """A gRPC port with the dev certificate and no services: enough for a handshake."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from ecgx.service.security import write_dev_certificate

    cert, key = write_dev_certificate(folder)
    server = grpc.server(ThreadPoolExecutor(2))
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port, cert


def test_a_plaintext_client_is_told_the_server_expects_tls(tmp_path):
    import pytest

    from ecgx.client import ChannelSecurity, Client, ClientError

    server, port, cert = _tls_server(tmp_path / "tls")
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as client, pytest.raises(ClientError) as plain:
            client.list_models()
        assert "the server expects TLS" in str(plain.value) and "--tls-ca" in str(plain.value)
        # The dev certificate's key is one gRPC signs with: with --tls-ca the handshake succeeds
        # (this bare port then has no such method).
        security = ChannelSecurity(ca=cert, server_name="localhost")
        with (
            Client(f"127.0.0.1:{port}", timeout=10, security=security) as client,
            pytest.raises(ClientError) as tls,
        ):
            client.list_models()
        assert "UNIMPLEMENTED" in str(tls.value)
    finally:
        server.stop(None)


def test_an_oversized_request_says_the_limit_and_how_to_split():
    import grpc

    from ecgx.client import error_of

    class Raw(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self):
            return "Sent message larger than max (230984010 vs. 67108864)"

    text = str(error_of(Raw(), "127.0.0.1:50051", tls=False))
    assert "the request is 220 MiB, over the 64 MiB one gRPC message may hold" in text
    assert "smaller parts" in text and "--max-batch" in text and "230984010" not in text


def test_import_wfdb_looks_in_subfolders():
    """PhysioNet's layout (WFDB/g1/HR00001.hea): a folder's records are found in its subfolders."""
    import tempfile
    from pathlib import Path

    from ecgx.training.data.wfdb_import import find_records

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for rel in ("g1/HR00001", "g1/HR00002", "g2/deeper/HR00003", "HR00000"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / f"{rel}.hea").write_text("")
        found = find_records([root])
    assert [name for name, _, _ in found] == ["HR00000", "HR00001", "HR00002", "HR00003"]
    assert [base.relative_to(root).as_posix() for _, base, _ in found][-1] == "g2/deeper/HR00003"


def test_export_of_a_package_folder_says_it_is_already_one(tmp_path, capsys):
    pkg = tmp_path / "packages" / "seed-0"
    pkg.mkdir(parents=True)
    (pkg / "manifest.json").write_text("{}")
    assert _main("export", str(pkg), "--out", str(tmp_path / "again")) == 2
    err = capsys.readouterr().err
    assert "is already a model package" in err and "checkpoint.pt does not exist" not in err
    assert not (tmp_path / "again").exists()


def test_validate_says_not_a_package_before_asking_for_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ECGX_GATE_SIGNING_KEY", raising=False)
    (tmp_path / "packages" / "seed-0").mkdir(parents=True)
    (tmp_path / "packages" / "seed-0" / "manifest.json").write_text("{}")
    (tmp_path / "data").mkdir()
    assert _main("validate", str(tmp_path / "packages"), "--data", str(tmp_path / "data")) == 2
    err = capsys.readouterr().err
    assert "holds packages, not one" in err and "seed-0" in err and "key" not in err.lower()
    assert _main("validate", str(tmp_path / "data"), "--data", str(tmp_path / "data")) == 2
    assert "is not a model package (no manifest.json)" in capsys.readouterr().err


def test_client_models_is_compact_by_default():
    from types import SimpleNamespace as NS

    from ecgx.client import format_models

    methods = [
        NS(method=m, servable=m == "gradient_shap", ungated=False, verdict=v, checks=[])
        for m, v in (("gradient_shap", "pass"), ("lrp", "fail"), ("saliency", "fail"))
    ]
    version = NS(
        version="1",
        serving=True,
        refusal_reason="",
        ungated=False,
        gate_verdict="pass",
        gate_headline="1 passes",
        package_sha256="ab" * 32,
        input_shape=[12, 600],
        sampling_rate_hz=500.0,
        classes=[],
        methods=methods,
    )
    info = NS(name="ecg", default_version="1", versions=[version])
    compact = format_models([info]).splitlines()
    assert compact[1] == "  version 1: serving; gate pass; serves gradient_shap (1 of 3)"
    assert len(compact) == 3 and "--verbose" in compact[-1]
    full = format_models([info], verbose=True)
    assert "package sha256" in full and "lrp" in full


@pytest.mark.slow
def test_the_quick_demo_ends_with_a_summary_of_files_that_exist(tmp_path, capsys):
    """One real `ecgx demo --quick` (minutes on 2 cores): every path its summary lists exists,
    the gated package's verdict is there, and the next commands name the saved record."""
    import re

    from ecgx.demo import QUICK, run_demo

    out = tmp_path / "demo"
    result = run_demo(out, quick=True, show_progress=False)
    text = capsys.readouterr().out
    summary = text[text.index("demo finished in") :]
    listed = [Path(m) for m in re.findall(r"^  [^/\n]+?\s{2,}(/\S+)$", summary, flags=re.M)]
    assert len(listed) >= 8 and all(p.exists() for p in listed), listed
    gated = len(QUICK.gate_methods)
    assert re.search(rf"seed-0: (PASS|FAIL), \d+ of {gated} methods pass", summary)
    assert "seed-1: not gated by this demo" in summary and f"gates {gated} of 16 methods" in summary
    if result.method is not None:  # the gate passed a method: it was served and is the one named
        assert f"--ecg {out / 'records' / 'test-beat.npy'} --method {result.method}" in summary
    assert "What this demo trimmed" in (out / "report" / "report.html").read_text(encoding="utf-8")


# ------------------------------------------------------------- benchmarks/demo_timing.py's figures


def _demo_timing():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "demo_timing.py"
    spec = importlib.util.spec_from_file_location("demo_timing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_timing_records_steps_and_rewrites_only_the_readme_figures(tmp_path):
    import json

    timing = _demo_timing()
    out = _fake_demo_tree(tmp_path / "demo")
    (out / "timings.json").write_text(
        json.dumps({"wall_s": 100, "steps": [{"step": "gate", "wall_s": 60.4, "cpu_s": 110.2}]})
    )
    (out / "runs" / "seed-0").mkdir(parents=True)
    (out / "runs" / "seed-0" / "metrics.json").write_text(
        json.dumps({"min_test_auroc": 0.85, "mean_test_auroc": 0.96})
    )
    gate = {
        "verdict": "pass",
        "passed": ["gradient_shap"],
        "timings_s": {"randomisation": 30.0, "total": 90.0},
    }
    (out / "packages" / "seed-0" / "gate.json").write_text(json.dumps(gate))
    rows = timing.step_rows(out)
    assert rows[0] == "| step gate: wall / CPU | 60 s / 110 s |"
    assert rows[1] == "| gate seed-0 wall s per check (total 90 s) | randomisation 30 |"
    sentence = timing.readme_figures(True, 150.0, 240.0, 2**20, [1.0, 1.5, 2.0], out)
    assert (
        "`ecgx demo --quick` took 2.5 min wall clock for 4.0 min of CPU time, peak memory 1.0 GB" in sentence
    )
    assert "test AUROC min 0.85 / mean 0.96" in sentence and "its gate passed gradient_shap." in sentence
    readme = tmp_path / "README.md"
    old_quick = "Measured by x: `ecgx demo --quick` took 20.2 min wall clock"
    full = "Measured by y: `ecgx demo` took 9.0 min wall clock"
    readme.write_text(f"intro\n<!-- demo-timing -->\n{old_quick}\n{full}\n<!-- /demo-timing -->\nrest\n")
    timing.update_readme(readme, True, sentence)
    text = readme.read_text()
    assert old_quick not in text and full in text and sentence in text
    assert text.startswith("intro\n<!-- demo-timing -->\n" + sentence) and text.endswith(
        "<!-- /demo-timing -->\nrest\n"
    )
