"""Admission before work, over real loopback channels (issue 19, items 3-5): a refused caller's
message is never read, garbage bytes are INVALID_ARGUMENT without a traceback per request, and
long-lived streams have their own cap, so idle health Watch streams lock nobody out.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from calls_helpers import (
    HEALTH_CHECK,
    HEALTH_WATCH,
    LIST_MODELS,
    MODEL_INFER,
    PREDICT,
    Running,
    bearer,
    code_of,
    make_tokens,
    raw_unary,
    rss_bytes,
    serve_subprocess,
    start_in_process,
    stop_subprocess,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ecgx.service.calls import StreamLimits
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
OK = grpc.StatusCode.OK
LIMITS = StreamLimits()  # the server's defaults
SCOPES = {f"caller-{i}": ["predict"] for i in range(6)}
# Not protobuf: a length-delimited field 1 whose length runs past the end of the message.
GARBAGE = [b"\x0a\xff\xff\xff\xff\x0f", b"\xff" * 64, b"\x0a\x05ab"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    running = start_in_process(tmp_path_factory.mktemp("admission"), SCOPES, metrics=True)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory):
    running = start_in_process(tmp_path_factory.mktemp("open"), SCOPES, open_health=True)
    yield running
    running.stop()


# ----------------------------------------------------------------------------- garbage bytes


def test_garbage_bytes_are_invalid_argument_with_a_token_and_unauthenticated_without(server, caplog) -> None:
    channel = server.channel()
    token = bearer(server.tokens["caller-0"])
    caplog.set_level(logging.WARNING)
    for method in (PREDICT, MODEL_INFER):
        call = raw_unary(channel, method)
        for payload in GARBAGE * 4:
            code, details, _ = code_of(call, payload, token)
            assert code == INVALID, (method, payload, code, details)
            assert "not a valid" in details and "message" in details, details
            code, details, _ = code_of(call, payload)
            assert code == UNAUTHENTICATED, (method, payload, code, details)
    # Logged at most once a minute (24 bad messages here), and never with a traceback.
    lines = [r for r in caplog.records if "not a valid" in r.getMessage()]
    assert len(lines) <= 1, [r.getMessage() for r in lines]
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert "Traceback" not in caplog.text


def test_garbage_bytes_are_audited_and_counted_as_bad_messages(server) -> None:
    code, _, request_id = code_of(
        raw_unary(server.channel(), PREDICT), GARBAGE[0], bearer(server.tokens["caller-1"])
    )
    assert code == INVALID
    line = server.audit_of(request_id)
    assert (line["code"], line["refusal"], line["caller"]) == ("INVALID_ARGUMENT", "bad_message", "caller-1")
    text = server.metrics.exposition().decode()
    assert 'ecgx_refusals_total{reason="bad_message",rpc="/ecgx.v1.ExplanationService/Predict"}' in text


def test_a_valid_message_still_decodes_and_is_served(server) -> None:
    request = pb.ListModelsRequest().SerializeToString()
    code, _, request_id = code_of(
        raw_unary(server.channel(), LIST_MODELS), request, bearer(server.tokens["caller-0"])
    )
    assert code == OK
    assert server.audit_of(request_id)["code"] == "OK"


# ------------------------------------------------------------------------------------ streams


def watch(channel: grpc.Channel, metadata=()) -> tuple[grpc.Future, threading.Event]:
    """An idle health Watch stream; the event is set once its first response (or error) arrived."""
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), metadata=metadata)
    first = threading.Event()

    def read() -> None:
        try:
            for _ in stream:
                first.set()
        except grpc.RpcError:
            pass
        finally:
            first.set()

    threading.Thread(target=read, daemon=True).start()
    return stream, first


def open_watches(running: Running, n: int, metadata=()) -> tuple[list, list]:
    """Open ``n`` Watch streams; returns (the ones that stayed open, the ones refused)."""
    channel = running.channel()
    streams = [watch(channel, metadata) for _ in range(n)]
    for _, first in streams:
        assert first.wait(10)
    # code() would wait for an open stream to end: done() says whether it has.
    kept = [s for s, _ in streams if not s.done()]
    refused = [s for s, _ in streams if s.done()]
    return kept, refused


def check(running: Running, metadata=()) -> grpc.StatusCode:
    request = health_pb2.HealthCheckRequest().SerializeToString()
    return code_of(raw_unary(running.channel(), HEALTH_CHECK), request, metadata, timeout=5)[0]


def test_44_idle_watch_streams_from_one_token_lock_nobody_out(server) -> None:
    hog = bearer(server.tokens["caller-2"])
    kept, refused = open_watches(server, 44, hog)
    try:
        assert len(kept) == LIMITS.per_caller
        assert {s.code() for s in refused} == {EXHAUSTED}
        assert "too many open streams" in refused[0].details()
        # Everything else goes on: health Check (the hog's and others'), unary calls, others' streams.
        assert check(server, hog) == OK
        assert check(server, bearer(server.tokens["caller-3"])) == OK
        request = pb.ListModelsRequest().SerializeToString()
        assert code_of(raw_unary(server.channel(), LIST_MODELS), request, hog, timeout=5)[0] == OK
        others, _ = open_watches(server, 1, bearer(server.tokens["caller-3"]))
        assert len(others) == 1
        others[0].cancel()
    finally:
        for s in kept:
            s.cancel()
    # Every refused stream was audited and counted.
    lines = [d for d in server.audit_lines() if d["rpc"] == HEALTH_WATCH and d["refusal"] == "stream_cap"]
    assert len(lines) >= len(refused)
    assert {d["code"] for d in lines} == {"RESOURCE_EXHAUSTED"}
    assert 'reason="stream_cap"' in server.metrics.exposition().decode()


def test_when_the_stream_cap_is_full_health_check_and_unary_calls_still_answer(server) -> None:
    kept = []
    try:
        for i in range(LIMITS.total // LIMITS.per_caller):
            mine, _ = open_watches(server, LIMITS.per_caller, bearer(server.tokens[f"caller-{i}"]))
            kept += mine
        assert len(kept) == LIMITS.total
        late = bearer(server.tokens["caller-5"])
        _, refused = open_watches(server, 1, late)
        assert [s.code() for s in refused] == [EXHAUSTED]
        with ThreadPoolExecutor(16) as pool:  # many at once: spare threads, not a queue behind streams
            codes = list(pool.map(lambda _: check(server, late), range(32)))
        assert set(codes) == {OK}
    finally:
        for s in kept:
            s.cancel()


def test_with_open_health_44_watch_streams_from_nobody_lock_nobody_out(open_server) -> None:
    kept, refused = open_watches(open_server, 44)
    try:
        assert len(kept) == LIMITS.per_caller and len(refused) == 44 - LIMITS.per_caller
        assert check(open_server) == OK
        request = pb.ListModelsRequest().SerializeToString()
        token = bearer(open_server.tokens["caller-0"])
        assert code_of(raw_unary(open_server.channel(), LIST_MODELS), request, token, timeout=5)[0] == OK
    finally:
        for s in kept:
            s.cancel()


# -------------------------------------------------------------------- memory before authentication


def _large_predict(megabytes: int) -> bytes:
    n = megabytes * 1024 * 1024 // (4 * 12)
    ecg = pb.Ecg(leads=["I"] * 12, sampling_rate_hz=500.0, samples_per_lead=n, samples=bytes(n * 4 * 12))
    return pb.PredictRequest(model="ecg", ecgs=[ecg]).SerializeToString()


@pytest.mark.slow
def test_24_unauthenticated_57_mb_requests_raise_server_memory_by_at_most_100_mb(tmp_path: Path) -> None:
    access = tmp_path / "access.toml"
    make_tokens(access, {"someone": ["predict"]})
    proc, port = serve_subprocess(tmp_path, "--tokens", str(access))
    try:
        payload = _large_predict(57)
        assert 56e6 < len(payload) < 60e6
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(24)]
        # Warm up (a first call loads lazily imported code), then start measuring from here.
        assert code_of(raw_unary(channels[0], PREDICT), b"")[0] == UNAUTHENTICATED
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to now
        before = rss_bytes(proc.pid)
        with ThreadPoolExecutor(24) as pool:
            codes = list(pool.map(lambda c: code_of(raw_unary(c, PREDICT), payload)[0], channels))
        peak = rss_bytes(proc.pid, "VmHWM")
        assert set(codes) == {UNAUTHENTICATED}, codes
        grew = (peak - before) / 1e6
        print(f"server memory: {before / 1e6:.0f} MB before, peak {peak / 1e6:.0f} MB during the flood")
        assert grew <= 100, f"the server's memory grew by {grew:.0f} MB for 24 refused requests"
        for c in channels:
            c.close()
    finally:
        stop_subprocess(proc)


def test_a_message_over_the_size_limit_from_an_admitted_caller_is_refused_and_audited(server) -> None:
    too_large = b"\x0a" + b"\x00" * (65 * 1024 * 1024)  # over MAX_MESSAGE_BYTES (64 MiB)
    call = raw_unary(server.channel(), PREDICT)
    code, details, _ = code_of(call, too_large, bearer(server.tokens["caller-4"]))
    assert code == EXHAUSTED and "larger than max" in details, (code, details)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [d for d in server.audit_lines() if d["caller"] == "caller-4" and d["rpc"] == PREDICT]
        if lines:
            break
        time.sleep(0.02)
    # gRPC's core refuses it before Python sees a byte: the line says the request never arrived.
    assert [d["refusal"] for d in lines] == ["request_not_received"], lines


def test_a_call_with_no_request_message_is_invalid_argument(server) -> None:
    call = server.channel().stream_unary(PREDICT, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        call(iter([]), metadata=bearer(server.tokens["caller-5"]), timeout=10)
    assert e.value.code() == INVALID and "no request message" in e.value.details()
