"""Admission of Predict and Explain work, for every transport at once: request slots with a
bounded queue, per-caller concurrency and a per-caller request rate.

A request is admitted in this order, each refusal RESOURCE_EXHAUSTED naming the limit:
the caller's rate (a moving window from the ``limits`` library, per identity), the caller's
concurrent requests (running or queued), then a server slot (``max_concurrent`` run at a time,
``max_queued`` more wait at most ``queue_wait_s`` or until their cancel token fires). Per-caller
quotas apply only to identified callers: an insecure server identifies nobody.

Every admitted request's cancel token is held here while it runs, so shutdown can cancel them
all (:meth:`Admission.cancel_all`). No PyTorch here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator

from limits import parse as parse_rate
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from ecgx.core.errors import InvalidArgument, ResourceExhausted
from ecgx.service.calls import note_call
from ecgx.service.requests import Caller, CancelToken, Quotas

POLL_S = 0.1  # how often a queued request looks at its cancel token


def check_rate(text: str, where: str = "caller_rate") -> str:
    """``text`` if it is a rate in the ``limits`` notation ("600/minute"), else InvalidArgument."""
    try:
        parse_rate(text)
    except (ValueError, TypeError):
        raise InvalidArgument(
            f"{where} must be a rate such as '600/minute' or '20/second', got {text!r}"
        ) from None
    return text


class Admission:
    """Slots, queue and per-caller quotas of one server (shared by all its transports)."""

    def __init__(self, quotas: Quotas):
        q = quotas
        if q.max_concurrent < 1 or q.max_batch < 1 or (q.max_queued is not None and q.max_queued < 0):
            raise InvalidArgument("max_batch and max_concurrent must be at least 1, max_queued at least 0")
        self.max_concurrent = int(q.max_concurrent)
        self.max_queued = 4 * self.max_concurrent if q.max_queued is None else int(q.max_queued)
        self.queue_wait_s = float(q.queue_wait_s)
        per_caller = max(1, self.max_concurrent // 2) if q.caller_concurrent is None else q.caller_concurrent
        if per_caller < 1:
            raise InvalidArgument(f"caller_concurrent must be at least 1, got {per_caller}")
        self.caller_concurrent = int(per_caller)
        self.caller_rate = None if q.caller_rate is None else parse_rate(check_rate(q.caller_rate))
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._slots = threading.BoundedSemaphore(self.max_concurrent)
        self._lock = threading.Lock()
        self._waiting = 0
        self._per_caller: Counter[str] = Counter()
        self._running: set[CancelToken] = set()

    # ------------------------------------------------------------------ state, for health and tests

    def free_slots(self) -> int:
        return self._slots._value  # BoundedSemaphore keeps its count here; read-only use

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def cancel_all(self, reason: str) -> int:
        """Cancel every admitted or queued request (their work stops at the next chunk); how many."""
        with self._lock:
            tokens = list(self._running)
        for token in tokens:
            token.cancel(reason)
        return len(tokens)

    # ------------------------------------------------------------------ admission

    @contextlib.contextmanager
    def admit(self, caller: Caller, cancel: CancelToken) -> Iterator[None]:
        """Hold a slot for the block; ResourceExhausted naming the quota when refused,
        Cancelled/DeadlineExceeded when the request is cancelled while it waits."""
        key = caller.name if caller.identified else None
        self._check_rate(key)
        with self._lock:
            if key is not None and self._per_caller[key] >= self.caller_concurrent:
                note_call(refusal="caller_concurrent")  # the audit line and the metrics name the quota
                raise ResourceExhausted(
                    f"caller {key!r} already has {self._per_caller[key]} requests running or queued, "
                    f"its quota (caller_concurrent = {self.caller_concurrent}, --caller-concurrent); "
                    "wait for one to finish"
                )
            if key is not None:
                self._per_caller[key] += 1
            self._running.add(cancel)
        try:
            self._take_slot(cancel)
            try:
                yield
            finally:
                self._slots.release()
        finally:
            with self._lock:
                self._running.discard(cancel)
                if key is not None:
                    self._per_caller[key] -= 1
                    if self._per_caller[key] <= 0:
                        del self._per_caller[key]

    def _check_rate(self, key: str | None) -> None:
        if key is None or self.caller_rate is None:
            return
        if not self._limiter.hit(self.caller_rate, "ecgx-caller", key):
            note_call(refusal="caller_rate")
            raise ResourceExhausted(
                f"caller {key!r} is over its request rate quota ({self.caller_rate}, caller_rate / "
                "--caller-rate); retry later"
            )

    def _take_slot(self, cancel: CancelToken) -> None:
        if self._slots.acquire(blocking=False):
            return
        with self._lock:
            if self._waiting >= self.max_queued:
                note_call(refusal="queue_full")
                raise ResourceExhausted(
                    f"the server is busy: {self.max_concurrent} requests are running and {self._waiting} "
                    "waiting (--max-concurrent, --max-queued); retry with backoff"
                )
            self._waiting += 1
        try:
            give_up = time.monotonic() + self.queue_wait_s
            while time.monotonic() < give_up:
                cancel.check()
                if self._slots.acquire(timeout=POLL_S):
                    return
            note_call(refusal="queue_timeout")
            raise ResourceExhausted(
                f"the server is busy: no request slot freed within {self.queue_wait_s:g} s "
                "(--max-concurrent); retry with backoff"
            )
        finally:
            with self._lock:
                self._waiting -= 1
