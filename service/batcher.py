"""Dynamic batching of concurrent requests into one engine call, as Triton's dynamic batcher does.

The engine runs a batch of ECGs in one ONNX Runtime call for little more than one ECG costs, but
every client request is a call of its own: under many concurrent single-ECG requests the server
does far less work than the engine could. :class:`DynamicBatcher` merges requests that would make
the same engine call (same served version, methods, effective settings and target mode: the
``key`` the serving core computes) into one, and hands each its own rows of the result.

How a batch forms (one *lane* per key):

- the first request of a lane that has no batch forming leads a new batch; later ones join it
  until it holds ``preferred_batch_size`` ECGs (or the merged cost would pass ``max_cost``);
- the leader starts the batch at once when no batch of the lane is running (an idle engine: a lone
  client waits for nothing), else when the batch is full, when the running batch finishes or
  after ``max_queue_delay_ms``, whichever comes first. So batches grow with the load and a
  request never waits more than the delay for a busy engine;
- the leader's thread runs the batch (no extra threads) with a cancel token that fires only when
  every member's has fired (shutdown cancels them all), then hands each member its result.

Per request: a member whose cancel token fires or whose deadline passes while it waits leaves at
once (its rows, if already running, are dropped), and one that was cancelled or expired before the
batch starts is not run at all; the others never see its error. Errors of a member's own input
must be found before it joins (the serving core validates every request first). An error of the
merged call itself goes to every member of that batch.

Only row-independent work may be merged: every row's result must not depend on the other rows.
The serving core keys only deterministic methods with scalar settings (a seeded method draws its
noise over the whole batch, so merging would change the answer: those are never batched).

No PyTorch here (the serving path), nothing of gRPC or HTTP.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ecgx.core.errors import EcgxError
from ecgx.service.requests import Quotas

DEFAULT_PREFERRED_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_DELAY_MS = 2.0
MAX_PREFERRED_BATCH_SIZE = 4096  # the engine's max_request_ecgs default (limits.MAX_REQUEST_ECGS)
MAX_QUEUE_DELAY_MS = 1000.0
POLL_S = 0.1  # how often a waiting member looks at its cancel token (it also wakes when done)


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BatchPolicy:
    """Dynamic batching of one model (serve config ``[batching]``, docs/serving.md)."""

    enabled: bool = True
    preferred_batch_size: int = DEFAULT_PREFERRED_BATCH_SIZE
    max_queue_delay_ms: float = DEFAULT_MAX_QUEUE_DELAY_MS

    def __post_init__(self) -> None:
        # Messages start with the key (ecgx.core.config_file.build prefixes the table).
        size = self.preferred_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_PREFERRED_BATCH_SIZE:
            raise ValueError(f"preferred_batch_size must be in [1, {MAX_PREFERRED_BATCH_SIZE}], got {size}")
        delay = self.max_queue_delay_ms
        if not (math.isfinite(delay) and 0 <= delay <= MAX_QUEUE_DELAY_MS):
            raise ValueError(f"max_queue_delay_ms must be in [0, {MAX_QUEUE_DELAY_MS:g}], got {delay}")


@dataclass(frozen=True)
class BatchingConfig:
    """The default policy and per-model overrides (model name -> policy)."""

    default: BatchPolicy = field(default_factory=BatchPolicy)
    models: Mapping[str, BatchPolicy] = field(default_factory=dict)

    def for_model(self, model: str) -> BatchPolicy:
        return self.models.get(model, self.default)

    @classmethod
    def off(cls) -> BatchingConfig:
        return cls(BatchPolicy(enabled=False))


@dataclass(frozen=True)
class BatchingQuotas(Quotas):
    """:class:`~ecgx.service.requests.Quotas` with the batching settings, so that ``ecgx serve``'s
    one ``quotas`` argument carries them to the serving core (``ServeConfig.quotas``)."""

    batching: BatchingConfig = field(default_factory=BatchingConfig)


# ---------------------------------------------------------------------------- jobs and batches


class Signal:
    """A one-shot event on a bare lock: ``wait`` blocks in the lock's C code (no Condition, no
    waiter lock built per wait), so waking a batch's members costs the leader one lock release
    each, and each member one acquire. Unlike ``threading.Event`` it cannot be cleared."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # held until set(): waiters block on it
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        """Set it (once; callers serialise, as ``Job.finish`` does)."""
        if not self._set:
            self._set = True
            self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        if self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._lock.release()  # open for every other waiter and later wait
            return True
        return self._set


@dataclass(eq=False)
class Job:
    """One request's share of a batch: its ECG count, cost (model rows), cancel token (anything
    with ``check()`` raising Cancelled / DeadlineExceeded) and whatever ``execute`` needs."""

    rows: int
    cost: int
    cancel: Any
    payload: Any
    queued_at: float = field(default_factory=time.perf_counter)
    queue_delay_s: float = 0.0
    batch_rows: int = 0  # ECGs of the batch it ran in
    result: Any = None
    error: BaseException | None = None
    done: Signal = field(default_factory=Signal)
    _finishing: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """Set the outcome once: the first of the leader (its result) and the member itself (its
        cancellation while it waited) wins."""
        with self._finishing:
            if self.done.is_set():
                return
            self.result, self.error = result, error
            self.done.set()

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


@dataclass(frozen=True)
class BatchStats:
    """What one executed batch was, for the metrics."""

    model: str
    label: str  # the method label the core chose ("" for Predict, a method name, "multiple")
    ecgs: int
    requests: int
    queue_delays_s: tuple[float, ...]


class _Batch:
    def __init__(self, max_rows: int, max_cost: int | None):
        self.jobs: list[Job] = []
        self.rows = 0
        self.cost = 0
        self.max_rows = max_rows
        self.max_cost = max_cost
        self.full = False
        self.started = False

    def fits(self, job: Job) -> bool:
        within_cost = self.max_cost is None or self.cost + job.cost <= self.max_cost
        return not self.full and self.rows + job.rows <= self.max_rows and within_cost

    def add(self, job: Job) -> None:
        self.jobs.append(job)
        self.rows += job.rows
        self.cost += job.cost
        if self.rows >= self.max_rows:
            self.full = True

    def remove(self, job: Job) -> None:
        self.jobs.remove(job)
        self.rows -= job.rows
        self.cost -= job.cost


class _Lane:
    """The batches of one key: the one forming, and how many are running."""

    def __init__(self, owner: Any):
        self.owner = owner  # keeps the key's objects (a ServedVersion) alive while the lane lives
        self.forming: _Batch | None = None
        self.running = 0
        self.waiting = 0  # members not yet finished, so the lane is dropped only when idle


class AllCancelled:
    """The cancel token of a merged call: it fires when every member's token has fired (so
    shutdown, which cancels them all, stops the batch at its next chunk; one member leaving does
    not)."""

    def __init__(self, tokens: Sequence[Any]):
        self.tokens = list(tokens)

    def check(self) -> None:
        last: EcgxError | None = None
        for token in self.tokens:
            try:
                token.check()
                return
            except EcgxError as e:
                last = e
        if last is not None:
            raise last


def _fired(cancel: Any) -> bool:
    try:
        cancel.check()
    except EcgxError:
        return True
    return False


Execute = Callable[[list[Job], AllCancelled], Sequence[Any]]


class DynamicBatcher:
    """Merges concurrent jobs of the same key into one ``execute`` call (see the module doc).

    Args:
        config: the batching policy per model.
        observe: called with :class:`BatchStats` after every batch starts (the metrics); None: nothing.
    """

    def __init__(self, config: BatchingConfig, observe: Callable[[BatchStats], None] | None = None):
        self.config = config
        self.observe = observe
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._lanes: dict[Hashable, _Lane] = {}

    def enabled(self, model: str) -> bool:
        return self.config.for_model(model).enabled

    def lanes(self) -> int:
        """Keys with work in progress (a lane is dropped once idle: keys never pile up)."""
        with self._lock:
            return len(self._lanes)

    def submit(
        self,
        key: Hashable,
        job: Job,
        execute: Execute,
        *,
        model: str,
        label: str = "",
        owner: Any = None,
        max_cost: int | None = None,
    ) -> Any:
        """``job``'s own result of the (possibly merged) ``execute`` call, or its own error.

        ``execute(jobs, cancel)`` returns one result per job, in order; ``owner`` is kept alive
        with the lane (the served version the key names by id); ``max_cost`` caps a batch's
        summed job costs (the engine's per-call row cap).
        """
        policy = self.config.for_model(model)
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane(owner)
            lane.waiting += 1
            batch = lane.forming
            leader = batch is None or not batch.fits(job)
            if leader:
                if batch is not None:  # it cannot take this job: it is as full as it gets
                    batch.full = True
                batch = lane.forming = _Batch(max(policy.preferred_batch_size, job.rows), max_cost)
            batch.add(job)
            if batch.full:
                lane.forming = None
                self._changed.notify_all()
        try:
            if leader:
                self._lead(lane, batch, job, policy, execute, model, label)
            else:
                self._follow(batch, job)
            return job.outcome()
        finally:
            with self._lock:
                lane.waiting -= 1
                if lane.waiting == 0 and lane.running == 0 and self._lanes.get(key) is lane:
                    del self._lanes[key]

    # ------------------------------------------------------------------ leader

    def _lead(
        self,
        lane: _Lane,
        batch: _Batch,
        job: Job,
        policy: BatchPolicy,
        execute: Execute,
        model: str,
        label: str,
    ) -> None:
        give_up = time.monotonic() + policy.max_queue_delay_ms / 1000.0
        with self._lock:
            while not batch.full and lane.running > 0:
                left = give_up - time.monotonic()
                if left <= 0 or _fired(job.cancel):  # a leader that must go starts its batch now
                    break
                self._changed.wait(min(left, self._wait_s(job)))
            if lane.forming is batch:
                lane.forming = None
            batch.started = True
            jobs = list(batch.jobs)
            lane.running += 1
        try:
            self._run(jobs, execute, model, label)
        finally:
            with self._lock:
                lane.running -= 1
                self._changed.notify_all()

    def _run(self, jobs: list[Job], execute: Execute, model: str, label: str) -> None:
        started = time.perf_counter()
        live = []
        for job in jobs:  # a member cancelled or past its deadline before the start is not run
            try:
                job.cancel.check()
                live.append(job)
            except EcgxError as e:
                job.finish(error=e)
        if not live:
            return
        rows = sum(j.rows for j in live)
        for job in live:
            job.queue_delay_s = started - job.queued_at
            job.batch_rows = rows
        if self.observe is not None:
            self.observe(BatchStats(model, label, rows, len(live), tuple(j.queue_delay_s for j in live)))
        try:
            results = execute(live, AllCancelled([j.cancel for j in live]))
        except BaseException as e:  # the merged call failed: every member gets its error
            for job in live:
                job.finish(error=e)
            if not isinstance(e, Exception):
                raise
            return
        for job, result in zip(live, results, strict=True):
            try:  # a member cancelled while the batch ran gets its own error, not a stale answer
                job.cancel.check()
                job.finish(result)
            except EcgxError as e:
                job.finish(error=e)

    # ------------------------------------------------------------------ follower

    def _follow(self, batch: _Batch, job: Job) -> None:
        while not job.done.wait(self._wait_s(job)):
            try:
                job.cancel.check()
            except EcgxError as e:
                with self._lock:
                    if not batch.started:  # leave before the start: the batch runs without it
                        batch.remove(job)
                job.finish(error=e)  # a running batch's result for it is then dropped
                return

    @staticmethod
    def _wait_s(job: Job) -> float:
        remaining = getattr(job.cancel, "remaining", None)
        left = remaining() if callable(remaining) else None
        return POLL_S if left is None else max(0.001, min(POLL_S, left))


__all__ = [
    "AllCancelled",
    "BatchPolicy",
    "BatchStats",
    "BatchingConfig",
    "BatchingQuotas",
    "DynamicBatcher",
    "Job",
]
