"""The audit log: one JSON object per line for every finished RPC, saying who asked for what.

Fields: ``time`` (the call's start, ISO-8601 UTC with milliseconds), ``request_id`` (also sent
to the client as ``x-request-id``), ``caller``, ``auth`` (token, certificate or none), ``peer``,
``rpc``, ``model``, ``version``, ``methods``, ``targets``, ``batch_size``, ``code`` (the gRPC
status name), ``latency_ms`` and ``engine_ms``.

Only the fields of :class:`ecgx.service.calls.CallRecord` are written, and the record has no field for
anything from an ECG (samples, the client's ECG id), so no waveform or patient identifier can
reach this file. A failed write (full disk) is logged and never fails the RPC.

No PyTorch here (the serving path).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ecgx.service.calls import CallRecord

log = logging.getLogger(__name__)

STDERR = "-"


def audit_line(record: CallRecord) -> str:
    """The JSON line of a finished call (no trailing newline)."""
    entry: dict[str, Any] = {
        "time": datetime.fromtimestamp(record.started, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "request_id": record.request_id,
        "caller": record.caller,
        "auth": record.auth,
        "peer": record.peer,
        "rpc": record.rpc,
        "model": record.model,
        "version": record.version,
        "methods": list(record.methods),
        "targets": list(record.targets),
        "batch_size": record.batch_size,
        "code": record.code,
        "latency_ms": round(record.latency_s * 1000, 3),
        "engine_ms": round(record.engine_s * 1000, 3),
    }
    # ensure_ascii: a caller's name cannot smuggle a line break or terminal escape into the file.
    return json.dumps(entry, ensure_ascii=True, separators=(",", ":"))


class AuditLog:
    """A :class:`ecgx.service.calls.CallObserver` appending :func:`audit_line` for every finished call.

    Args:
        target: a file path (created 0600, appended to), or "-" for standard error.
    """

    def __init__(self, target: str | Path):
        self.target = str(target)
        self._lock = threading.Lock()
        self._failing = False
        # Created owner-only: who called what, when, is itself sensitive. Unbuffered writes on an
        # O_APPEND descriptor: each line lands whole at the end, and a failed one leaves nothing
        # behind in a buffer to fail again.
        self._stderr = self.target == STDERR
        self._fd = None if self._stderr else os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def call_started(self, record: CallRecord) -> None:
        """Nothing: a call is written once, when it ends."""

    def call_finished(self, record: CallRecord) -> None:
        """Write the call's line at once; a failure is logged, never raised."""
        line = audit_line(record) + "\n"
        with self._lock:
            try:
                self._write(line)
            except (OSError, ValueError) as e:  # ValueError: written after close()
                if not self._failing:  # once per run of failures, not once per call
                    log.error(
                        "AUDIT LOG %s: cannot write (%s); calls go on unaudited until it can", self.target, e
                    )
                self._failing = True
                return
            if self._failing:
                log.error("AUDIT LOG %s: writing again", self.target)
                self._failing = False

    def _write(self, line: str) -> None:
        if self._stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            return
        if self._fd is None:
            raise ValueError("the audit log is closed")
        data = line.encode("utf-8")
        while data:
            data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        """Close the file (standard error stays open); later calls are logged as unaudited."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


__all__ = ["AuditLog", "audit_line"]
