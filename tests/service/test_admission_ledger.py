"""The transport-neutral half of admission (``CallLedger``), as the REST transport uses it: a plain
header list and a client certificate, no gRPC context; with a real access file and a real audit
log that fails closed when it cannot write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from calls_helpers import make_tokens

from ecgx.core.errors import PermissionDenied, Unauthenticated, Unavailable
from ecgx.service.access import AccessList
from ecgx.service.audit import AuditLog, verify_chain
from ecgx.service.calls import CallLedger

PREDICT = "/ecgx.v1.ExplanationService/Predict"


@pytest.fixture()
def ledger(tmp_path: Path) -> tuple[CallLedger, dict[str, str], Path]:
    access = tmp_path / "access.toml"
    tokens = make_tokens(access, {"predictor": ["predict"], "reader": []})
    audit = tmp_path / "audit.jsonl"
    return CallLedger(AccessList(access), observers=[AuditLog(audit)]), tokens, audit


def test_headers_admit_refuse_and_every_call_gets_one_chained_line(ledger) -> None:
    calls, tokens, audit = ledger
    ok = calls.open(PREDICT, "ipv6:[::1]:5")
    calls.admit(ok, [("Authorization", f"Bearer {tokens['predictor']}")], None)  # HTTP header case
    with calls.serving(ok):
        pass
    assert calls.close(ok, "OK") == "OK"
    for headers, error, reason in [
        ([], Unauthenticated, "unauthenticated"),
        ([("authorization", f"Bearer {tokens['reader']}")], PermissionDenied, "permission_denied"),
    ]:
        record = calls.open(PREDICT, "ipv4:10.0.0.1:5")
        with pytest.raises(error):
            calls.admit(record, headers, None)
        assert calls.close(record, error.code) == error.code
        assert record.refusal == reason
    limited = calls.open(PREDICT, "ipv4:10.0.0.1:6")
    calls.close(limited, "RESOURCE_EXHAUSTED")  # a limit that did not name itself is still counted
    gone = calls.open(PREDICT, "ipv4:10.0.0.1:7")
    calls.close(gone, "CANCELLED")
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(d["code"], d["refusal"]) for d in lines] == [
        ("OK", ""),
        ("UNAUTHENTICATED", "unauthenticated"),
        ("PERMISSION_DENIED", "permission_denied"),
        ("RESOURCE_EXHAUSTED", "resource_limit"),
        ("CANCELLED", "client_gone"),
    ]
    assert lines[0]["caller"] == "predictor" and verify_chain([audit]).ok


def test_a_required_audit_log_that_cannot_write_refuses_and_withholds_answers(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, required=True)
    calls = CallLedger(None, observers=[log])
    log.close()  # later lines open the path each time
    path.unlink()
    path.mkdir()  # now it cannot be written (even by root, unlike a chmod)
    record = calls.open(PREDICT, "p")
    calls.admit(record, [], None)  # not yet known to fail
    assert calls.close(record, "OK") == "UNAVAILABLE"  # its line was not written: no answer
    refused = calls.open(PREDICT, "p")
    with pytest.raises(Unavailable):
        calls.admit(refused, [], None)
    assert calls.close(refused, "UNAVAILABLE") == "UNAVAILABLE"
    assert refused.refusal == "audit_unavailable"
    path.rmdir()  # writable again
    recovered = calls.open(PREDICT, "p")
    with pytest.raises(Unavailable):  # still refused until a line lands ...
        calls.admit(recovered, [], None)
    assert calls.close(recovered, "UNAVAILABLE") == "UNAVAILABLE"  # ... and this refusal's line does
    again = calls.open(PREDICT, "p")
    calls.admit(again, [], None)
    assert calls.close(again, "OK") == "OK"
    assert [json.loads(line)["code"] for line in path.read_text().splitlines()] == ["UNAVAILABLE", "OK"]
