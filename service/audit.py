"""The audit log: one JSON line for every call that reached the server, saying who asked for what
and what they really got, hash-chained so that a reviewer can check nothing was altered.

Fields: ``time`` (the call's start, ISO-8601 UTC with milliseconds), ``request_id`` (also sent
to the client as ``x-request-id``), ``caller``, ``auth`` (token, certificate or none), ``peer``,
``rpc``, ``transport`` (``grpc``, or ``http`` for the REST port, whose calls carry the OIP gRPC
method names), ``model``, ``version``, ``methods``, ``targets``, ``batch_size``, ``code`` (the gRPC
status name the client got: CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAUTHENTICATED,
...), ``refusal`` (which limit or check refused it, "" when none), ``latency_ms``, ``engine_ms``
and ``prev``.

**The chain.** ``prev`` is the hex SHA-256 of the previous line's bytes (without its newline);
the first line of a new log has :data:`GENESIS` (64 zeros). At start the log reads the last line
of an existing file and continues from it. Reopened on SIGHUP (:meth:`AuditLog.request_reopen`,
for logrotate), it keeps the last hash in memory, so the first line of the new file continues the
chain of the rotated one: ``ecgx audit verify audit.jsonl.1 audit.jsonl`` checks both in order
(:func:`verify_chain`), and a file whose first ``prev`` is not GENESIS continues an older file.

**Whole lines.** Each line is one ``os.write`` on an ``O_APPEND`` descriptor under a lock (never
interleaved); a short write (full disk, file size limit) is cut back with ``ftruncate``, so no
partial line stays. A failed write is logged once per run of failures. With ``required`` the
log fails closed: while it cannot write, new calls are refused UNAVAILABLE
(:class:`ecgx.service.calls.Unavailable` from :meth:`AuditLog.call_started`), and a call whose
line cannot be written gets UNAVAILABLE instead of its answer. Each refused call's own line is
tried, so the first one that lands ends the refusals.

Lines of calls that finish after :meth:`AuditLog.close` (still running at shutdown) are still
written: the file is opened for each such line.

Only the fields of :class:`ecgx.service.calls.CallRecord` are written, and the record has no field
for anything from an ECG, so no waveform or patient identifier can reach this file.

No PyTorch here (the serving path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ecgx.core.errors import Unavailable
from ecgx.service.calls import CallRecord

log = logging.getLogger(__name__)

STDERR = "-"
GENESIS = "0" * 64  # the ``prev`` of a new log's first line
_TAIL_BYTES = 1 << 16  # how much of an existing file's end is read to find its last line


def line_hash(line: str | bytes) -> str:
    """The hex SHA-256 the next line's ``prev`` carries (of the line without its newline)."""
    data = line.encode("utf-8") if isinstance(line, str) else line
    return hashlib.sha256(data.rstrip(b"\n")).hexdigest()


def audit_line(record: CallRecord, prev: str = GENESIS) -> str:
    """The JSON line of a finished call (no trailing newline), chained to ``prev``."""
    entry: dict[str, Any] = {
        "time": datetime.fromtimestamp(record.started, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "request_id": record.request_id,
        "caller": record.caller,
        "auth": record.auth,
        "peer": record.peer,
        "rpc": record.rpc,
        "transport": record.transport,
        "model": record.model,
        "version": record.version,
        "methods": list(record.methods),
        "targets": list(record.targets),
        "batch_size": record.batch_size,
        "code": record.code,
        "refusal": record.refusal,
        "latency_ms": round(record.latency_s * 1000, 3),
        "engine_ms": round(record.engine_s * 1000, 3),
        "prev": prev,
    }
    # ensure_ascii: a caller's name cannot smuggle a line break or terminal escape into the file.
    return json.dumps(entry, ensure_ascii=True, separators=(",", ":"))


def last_line(path: Path) -> bytes | None:
    """The last complete line of ``path`` (None for a missing or empty file, or not a regular
    file: /dev/full would read zeros forever)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except FileNotFoundError:
        return None
    lines = [line for line in tail.split(b"\n") if line.strip()]
    return lines[-1] if lines else None


class AuditLog:
    """A :class:`ecgx.service.calls.CallObserver` appending :func:`audit_line` for every finished call.

    Args:
        target: a file path (created 0600, appended to), or "-" for standard error.
        required: fail closed (``--audit-required``): calls are refused UNAVAILABLE while a line
            cannot be written.
    """

    def __init__(self, target: str | Path, *, required: bool = False):
        self.target = str(target)
        self.required = required
        self._lock = threading.Lock()
        self._failing = False
        self._reopen = False
        self._stderr = self.target == STDERR
        # Created owner-only: who called what, when, is itself sensitive.
        self._fd = None if self._stderr else self._open()
        last = None if self._stderr else last_line(Path(self.target))
        self._prev = line_hash(last) if last is not None else GENESIS

    def _open(self) -> int:
        return os.open(self.target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    # ---------------------------------------------------------------- CallObserver

    def call_started(self, record: CallRecord) -> None:
        """Refuse the call (UNAVAILABLE) while a required log cannot be written."""
        if self.required and self._failing:
            raise Unavailable(
                "the audit log cannot be written, and this server answers only calls it records; "
                "try again later"
            )

    def call_finished(self, record: CallRecord) -> None:
        """Write the call's line at once; a failure is logged (once per run of failures) and, for a
        required log, raised as :class:`ecgx.service.calls.Unavailable`."""
        with self._lock:
            if self._reopen:
                self._do_reopen()
            line = audit_line(record, self._prev)
            try:
                self._write(line + "\n")
            except OSError as e:
                if not self._failing:
                    log.error(
                        "AUDIT LOG %s: cannot write (%s); %s",
                        self.target,
                        e,
                        "calls are refused until it can" if self.required else "calls go on unaudited",
                    )
                self._failing = True
                if self.required:
                    raise Unavailable("the audit log cannot be written") from None
                return
            self._prev = line_hash(line)
            if self._failing:
                log.error("AUDIT LOG %s: writing again", self.target)
                self._failing = False

    # ---------------------------------------------------------------- the file

    def _write(self, line: str) -> None:
        data = line.encode("utf-8")
        if self._stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            return
        if self._fd is None:  # after close(): a call that outlived the server still gets its line
            fd = self._open()
            try:
                _write_whole(fd, data)
            finally:
                os.close(fd)
            return
        _write_whole(self._fd, data)

    def request_reopen(self) -> None:
        """Reopen the file before the next line (safe from a signal handler: it only sets a flag)."""
        self._reopen = True

    def reopen(self) -> None:
        """Reopen the file now (after logrotate moved it); the chain goes on from the last line."""
        with self._lock:
            self._do_reopen()

    def _do_reopen(self) -> None:
        self._reopen = False
        if self._stderr or self._fd is None:
            return
        try:
            fd = self._open()
        except OSError as e:
            log.error("AUDIT LOG %s: cannot reopen (%s); writing on to the old file", self.target, e)
            return
        os.close(self._fd)
        self._fd = fd
        log.info("audit log %s reopened", self.target)

    def close(self) -> None:
        """Close the file (standard error stays open); lines of later calls are still written."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _write_whole(fd: int, data: bytes) -> None:
    """One write of the whole line; a short one is cut back off the file and raised."""
    written = os.write(fd, data)
    if written == len(data):
        return
    try:
        os.ftruncate(fd, os.fstat(fd).st_size - written)
    except OSError as e:
        log.error("AUDIT LOG: a short write could not be cut back (%s); the file ends in a partial line", e)
    raise OSError(f"short write: {written} of {len(data)} bytes (disk full or file size limit)")


# ------------------------------------------------------------------------------------ verify


@dataclass(frozen=True)
class ChainReport:
    """What :func:`verify_chain` found."""

    lines: int  # lines checked (up to the first broken one)
    start: str  # the first line's ``prev``: GENESIS, or the last hash of an older file
    last: str  # the hash of the last good line (the next line's ``prev``)
    broken: str = ""  # "FILE:LINE: what is wrong"; "" when the chain holds

    @property
    def ok(self) -> bool:
        return not self.broken


def _numbered(paths: Sequence[Path]) -> Iterator[tuple[str, int, bytes]]:
    for path in paths:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                yield str(path), n, raw


def verify_chain(paths: Iterable[Path | str]) -> ChainReport:
    """Check the hash chain of audit files, in order (oldest first); stops at the first broken
    line. The first line's ``prev`` is taken as given (a rotated older file may be gone)."""
    files = [Path(p) for p in paths]
    count, start, prev = 0, "", ""
    for where, n, raw in _numbered(files):
        at = f"{where}:{n}"
        if not raw.endswith(b"\n"):
            return ChainReport(count, start, prev, f"{at}: a partial line (no newline at its end)")
        try:
            entry = json.loads(raw)
            link = entry["prev"]
        except (ValueError, TypeError, KeyError):
            return ChainReport(count, start, prev, f"{at}: not an audit line (JSON with 'prev')")
        if not isinstance(link, str):
            return ChainReport(count, start, prev, f"{at}: 'prev' is not a hash")
        if count == 0:
            start = link
        elif link != prev:
            return ChainReport(
                count,
                start,
                prev,
                f"{at}: does not link to the line before ('prev' {link[:16]}..., the line before hashes "
                f"to {prev[:16]}...): that line was changed, or lines were removed or inserted here",
            )
        prev, count = line_hash(raw), count + 1
    return ChainReport(count, start, prev)


__all__ = [
    "GENESIS",
    "AuditLog",
    "ChainReport",
    "audit_line",
    "last_line",
    "line_hash",
    "verify_chain",
]
