"""The audit trail a reviewer signs off (issue 19, item 6), over real servers on loopback: the real
outcome of every call (DEADLINE_EXCEEDED, CANCELLED), whole lines under a real file-size limit
(RLIMIT_FSIZE in a subprocess), fail-closed ``--audit-required``, the hash chain and
``ecgx audit verify``, reopening on SIGHUP for logrotate, and lines of calls still running at
shutdown.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from pathlib import Path

import grpc
import pytest
from calls_helpers import (
    HEALTH_WATCH,
    LIST_MODELS,
    bearer,
    code_of,
    make_tokens,
    raw_unary,
    serve_subprocess,
    start_in_process,
    stop_subprocess,
)
from cli_helpers import run_ecgx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ecgx.service.audit import GENESIS, AuditLog, line_hash, verify_chain
from ecgx.service.calls import CallRecord
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb

LIST = pb.ListModelsRequest().SerializeToString()


def list_models(address: str, token: str) -> tuple[grpc.StatusCode, str, str]:
    with grpc.insecure_channel(address) as channel:
        return code_of(raw_unary(channel, LIST_MODELS), LIST, bearer(token), timeout=10)


# ------------------------------------------------------------------------------ real outcomes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    running = start_in_process(tmp_path_factory.mktemp("audit"), {"reader": [], "predictor": ["predict"]})
    yield running
    running.stop()


def test_a_stream_whose_deadline_passed_is_audited_deadline_exceeded(server) -> None:
    stream = health_pb2_grpc.HealthStub(server.channel()).Watch(
        health_pb2.HealthCheckRequest(), metadata=bearer(server.tokens["reader"]), timeout=0.5
    )
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    line = _wait_for(server, lambda d: d["rpc"] == HEALTH_WATCH and d["caller"] == "reader")
    assert line["code"] == "DEADLINE_EXCEEDED", line


def test_a_stream_the_client_cancelled_is_audited_cancelled(server) -> None:
    stream = health_pb2_grpc.HealthStub(server.channel()).Watch(
        health_pb2.HealthCheckRequest(), metadata=bearer(server.tokens["predictor"])
    )
    next(stream)  # admitted and running
    stream.cancel()
    line = _wait_for(server, lambda d: d["rpc"] == HEALTH_WATCH and d["caller"] == "predictor")
    assert line["code"] == "CANCELLED", line


def test_refusals_are_audited_with_their_code_and_reason(server) -> None:
    code, _, request_id = list_models(server.address, "ecgx_not-a-token")
    assert code == grpc.StatusCode.UNAUTHENTICATED
    line = server.audit_of(request_id)
    assert (line["code"], line["refusal"]) == ("UNAUTHENTICATED", "unauthenticated")
    predict = raw_unary(server.channel(), "/ecgx.v1.ExplanationService/Predict")
    code, _, request_id = code_of(predict, b"", bearer(server.tokens["reader"]))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert server.audit_of(request_id)["refusal"] == "permission_denied"


def test_the_servers_audit_file_is_one_intact_chain(server) -> None:
    for _ in range(3):
        list_models(server.address, server.tokens["reader"])
    report = verify_chain([server.audit])
    assert report.ok and report.start == GENESIS, report
    assert report.lines == len(server.audit_lines())


def _wait_for(server, match, seconds: float = 5) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = [d for d in server.audit_lines() if match(d)]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.02)
    raise AssertionError("no audit line")


# --------------------------------------------------------------------------------- the chain


def _record(n: int) -> CallRecord:
    return CallRecord(
        request_id=f"r{n}", rpc="/ecgx.v1.ExplanationService/ListModels", peer="ipv4:127.0.0.1:1"
    )


def test_the_chain_continues_across_restarts_and_verify_names_the_first_broken_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for start in (0, 3):  # two runs of a server: the second reads the first's last line
        log = AuditLog(path)
        for n in range(start, start + 3):
            log.call_finished(_record(n))
        log.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["prev"] == GENESIS
    assert json.loads(lines[3])["prev"] == line_hash(lines[2])
    ok = run_ecgx("audit", "verify", str(path))
    assert ok.returncode == 0 and "intact: 6 line(s)" in ok.stdout, ok.stdout + ok.stderr

    for n, tamper in [(2, lambda s: s.replace('"code":"OK"', '"code":"DENIED"')), (4, None)]:
        bad = tmp_path / f"bad{n}.jsonl"
        changed = list(lines)
        if tamper is None:
            del changed[n - 1]  # a line removed
        else:
            changed[n - 1] = tamper(changed[n - 1])
        bad.write_text("\n".join(changed) + "\n")
        result = run_ecgx("audit", "verify", str(bad))
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"BROKEN at {bad}:{n + 1 if tamper else n}:" in result.stdout, result.stdout


def test_verify_refuses_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.call_finished(_record(0))
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"time":"2026')
    result = run_ecgx("audit", "verify", str(path))
    assert result.returncode == 1 and f"{path}:2: a partial line" in result.stdout, result.stdout


# ------------------------------------------------------------------ a real full file system


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("required", [True, False])
def test_a_file_size_limit_never_leaves_a_partial_line_and_required_fails_closed(
    tmp_path: Path, required: bool
) -> None:
    access, audit = tmp_path / "access.toml", tmp_path / "audit.jsonl"
    token = make_tokens(access, {"reader": []})["reader"]
    limit = 3000  # a few lines (~420 bytes each)
    flags = ["--tokens", str(access), "--audit-log", str(audit)] + (["--audit-required"] if required else [])
    proc, port = serve_subprocess(tmp_path, *flags, preexec=_limit_file_size(limit))
    try:
        codes = [list_models(f"127.0.0.1:{port}", token)[0] for _ in range(20)]
        assert proc.poll() is None  # SIGXFSZ did not kill it
    finally:
        err = stop_subprocess(proc)
    data = audit.read_bytes()
    assert len(data) <= limit and data.endswith(b"\n"), data[-200:]
    report = verify_chain([audit])
    assert report.ok, report.broken
    written = report.lines
    assert 3 <= written < 20
    ok = grpc.StatusCode.OK
    if required:
        # Every call whose line could not be written was refused, and the rest were answered.
        assert codes == [ok] * written + [grpc.StatusCode.UNAVAILABLE] * (20 - written), codes
    else:
        assert set(codes) == {ok}, codes
    assert err.count("cannot write") == 1, err  # logged once per run of failures
    assert "Traceback" not in err, err


# ------------------------------------------------------------------ logrotate and shutdown


def test_sighup_reopens_the_file_and_the_chain_continues_across_the_rotation(tmp_path: Path) -> None:
    access, audit = tmp_path / "access.toml", tmp_path / "audit.jsonl"
    token = make_tokens(access, {"reader": []})["reader"]
    proc, port = serve_subprocess(tmp_path, "--tokens", str(access), "--audit-log", str(audit))
    rotated = tmp_path / "audit.jsonl.1"
    try:
        for _ in range(2):
            list_models(f"127.0.0.1:{port}", token)
        os.rename(audit, rotated)  # what logrotate does, then it sends SIGHUP
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        for _ in range(2):
            list_models(f"127.0.0.1:{port}", token)
        assert proc.poll() is None
    finally:
        stop_subprocess(proc)
    assert len(rotated.read_text().splitlines()) == 2
    assert len(audit.read_text().splitlines()) == 2
    result = run_ecgx("audit", "verify", str(rotated), str(audit))
    assert result.returncode == 0 and "intact: 4 line(s)" in result.stdout, result.stdout + result.stderr
    alone = verify_chain([audit])
    assert alone.ok and alone.start == line_hash(rotated.read_text().splitlines()[-1])


def test_calls_still_running_at_shutdown_get_their_line(tmp_path: Path) -> None:
    access, audit = tmp_path / "access.toml", tmp_path / "audit.jsonl"
    token = make_tokens(access, {"reader": []})["reader"]
    proc, port = serve_subprocess(
        tmp_path, "--tokens", str(access), "--audit-log", str(audit), "--grace", "1"
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(), metadata=bearer(token)
    )
    try:
        next(stream)  # running
        err = stop_subprocess(proc)
    finally:
        channel.close()
    assert "closed" not in err, err
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [d["rpc"] for d in lines] == [HEALTH_WATCH], lines
    assert lines[0]["code"] != "OK"  # it did not end normally: the server went away under it
    assert verify_chain([audit]).ok


def test_verify_of_a_missing_file_is_a_clean_usage_error(tmp_path: Path) -> None:
    from cli_helpers import assert_clean_failure

    assert_clean_failure(run_ecgx("audit", "verify", str(tmp_path / "nope.jsonl")), "does not exist")
