"""The dynamic batcher on its own, with threads (issue #21): merging, per-job results, cancellation
and deadlines per job, errors per batch, and no lane left behind. The gRPC tests
(test_batching_grpc.py) run it inside a real server on the real engine."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ecgx.core.errors import Cancelled, DeadlineExceeded
from ecgx.service.batcher import (
    AllCancelled,
    BatchingConfig,
    BatchPolicy,
    BatchStats,
    DynamicBatcher,
    Job,
    Signal,
)
from ecgx.service.requests import CancelToken

SLOW = 1000.0  # ms: a delay no test waits for (a batch that waited it would fail the test's timeout)


class Engine:
    """An ``execute`` that records every batch, answers each job with its own payload times ten, and
    can be held busy (the first batch blocks until released) to let others queue behind it."""

    def __init__(self, hold_first: bool = False, fail_on: object = None):
        self.batches: list[list[object]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.hold_first = hold_first
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, jobs: list[Job], cancel: AllCancelled) -> list[object]:
        with self.lock:
            first = not self.batches
            self.batches.append([j.payload for j in jobs])
        if first and self.hold_first:
            self.entered.set()
            assert self.release.wait(30)
        if self.fail_on is not None and self.fail_on in [j.payload for j in jobs]:
            raise RuntimeError("the merged call failed")
        return [j.payload * 10 for j in jobs]


def _batcher(size: int = 4, delay_ms: float = SLOW, observed: list | None = None) -> DynamicBatcher:
    config = BatchingConfig(BatchPolicy(preferred_batch_size=size, max_queue_delay_ms=delay_ms))
    return DynamicBatcher(config, observe=None if observed is None else observed.append)


def _submit(batcher: DynamicBatcher, engine: Engine, payload: int, token: CancelToken | None = None):
    job = Job(1, 1, token or CancelToken(), payload)
    return batcher.submit("key", job, engine, model="m", label="saliency")


def _busy(batcher: DynamicBatcher, engine: Engine, pool: ThreadPoolExecutor):
    """A first job that holds the engine until ``engine.release`` is set."""
    first = pool.submit(_submit, batcher, engine, 0)
    assert engine.entered.wait(30)
    return first


def _until(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def _queued(batcher: DynamicBatcher, n: int) -> None:
    """Wait until ``n`` jobs are in the lane (the busy one included)."""
    _until(lambda: batcher._lanes.get("key") is not None and batcher._lanes["key"].waiting >= n)


def test_a_lone_job_runs_at_once_whatever_the_delay() -> None:
    observed: list[BatchStats] = []
    batcher, engine = _batcher(observed=observed), Engine()
    assert _submit(batcher, engine, 7) == 70
    assert engine.batches == [[7]] and observed[0].ecgs == 1 and observed[0].requests == 1
    assert observed[0].queue_delays_s[0] < SLOW / 1000 / 2  # it did not wait for the delay
    assert batcher.lanes() == 0


def test_jobs_queued_behind_a_busy_engine_run_as_one_batch_each_with_its_own_result() -> None:
    observed: list[BatchStats] = []
    batcher, engine = _batcher(size=8, delay_ms=SLOW, observed=observed), Engine(hold_first=True)
    with ThreadPoolExecutor(8) as pool:
        first = _busy(batcher, engine, pool)
        rest = [pool.submit(_submit, batcher, engine, k) for k in range(1, 6)]
        _queued(batcher, 6)
        engine.release.set()  # the running batch ends: the waiting one starts, not waiting the delay
        assert first.result(30) == 0
        assert [f.result(30) for f in rest] == [10, 20, 30, 40, 50]
    assert engine.batches[0] == [0] and sorted(engine.batches[1]) == [1, 2, 3, 4, 5]
    assert [s.ecgs for s in observed] == [1, 5] and observed[1].label == "saliency"
    assert batcher.lanes() == 0


def test_a_full_batch_starts_without_waiting_for_the_engine() -> None:
    batcher, engine = _batcher(size=3, delay_ms=SLOW), Engine(hold_first=True)
    with ThreadPoolExecutor(8) as pool:
        first = _busy(batcher, engine, pool)
        full = [pool.submit(_submit, batcher, engine, k) for k in (1, 2, 3)]
        assert sorted(f.result(30) for f in full) == [10, 20, 30]  # while the first still runs
        assert not first.done()
        engine.release.set()
        assert first.result(30) == 0


def test_a_cancelled_job_leaves_the_queue_and_the_batch_runs_without_it() -> None:
    batcher, engine = _batcher(size=8), Engine(hold_first=True)
    tokens = {k: CancelToken() for k in (1, 2, 3)}
    with ThreadPoolExecutor(8) as pool:
        first = _busy(batcher, engine, pool)
        jobs = {k: pool.submit(_submit, batcher, engine, k, tokens[k]) for k in (1, 2, 3)}
        _queued(batcher, 4)
        tokens[2].cancel("the client went away")
        with pytest.raises(Cancelled, match="the client went away"):
            jobs[2].result(30)  # at once, not when the batch ends
        assert not first.done()
        engine.release.set()
        assert jobs[1].result(30) == 10 and jobs[3].result(30) == 30 and first.result(30) == 0
    assert sorted(engine.batches[1]) == [1, 3]


def test_a_deadline_that_passes_while_queued_fails_that_job_alone() -> None:
    batcher, engine = _batcher(size=8), Engine(hold_first=True)
    with ThreadPoolExecutor(8) as pool:
        first = _busy(batcher, engine, pool)
        short = pool.submit(_submit, batcher, engine, 1, CancelToken(deadline=time.monotonic() + 0.2))
        other = pool.submit(_submit, batcher, engine, 2)
        with pytest.raises(DeadlineExceeded):
            short.result(30)
        engine.release.set()
        assert other.result(30) == 20 and first.result(30) == 0
    assert engine.batches[1] == [2]


def test_the_leader_cancelled_before_the_start_is_not_run_but_its_batch_is() -> None:
    batcher, engine = _batcher(size=8), Engine(hold_first=True)
    lead = CancelToken()
    with ThreadPoolExecutor(8) as pool:
        first = _busy(batcher, engine, pool)
        leader = pool.submit(_submit, batcher, engine, 1, lead)
        _queued(batcher, 2)
        follower = pool.submit(_submit, batcher, engine, 2)
        _queued(batcher, 3)
        lead.cancel("gone")
        engine.release.set()
        with pytest.raises(Cancelled):
            leader.result(30)
        assert follower.result(30) == 20 and first.result(30) == 0
    assert engine.batches[1] == [2]


def test_an_error_of_the_merged_call_fails_its_batch_only() -> None:
    batcher, engine = _batcher(size=8), Engine(hold_first=True, fail_on=2)
    with ThreadPoolExecutor(8) as pool:
        first = _busy(batcher, engine, pool)
        merged = [pool.submit(_submit, batcher, engine, k) for k in (1, 2)]
        _queued(batcher, 3)
        engine.release.set()
        assert first.result(30) == 0
        for f in merged:
            with pytest.raises(RuntimeError, match="merged call failed"):
                f.result(30)
    assert _submit(batcher, engine, 3) == 30 and batcher.lanes() == 0


def test_different_keys_never_merge() -> None:
    batcher, engine = _batcher(size=8), Engine(hold_first=True)
    with ThreadPoolExecutor(8) as pool:
        first = _busy(batcher, engine, pool)
        other = pool.submit(lambda: batcher.submit("other", Job(1, 1, CancelToken(), 5), engine, model="m"))
        assert other.result(30) == 50  # its own lane is idle: it runs at once
        engine.release.set()
        first.result(30)


def test_a_batch_never_passes_its_row_or_cost_cap() -> None:
    batcher, engine = _batcher(size=4), Engine(hold_first=True)

    def submit(payload: int, rows: int, cost: int) -> object:
        return batcher.submit("key", Job(rows, cost, CancelToken(), payload), engine, model="m", max_cost=10)

    with ThreadPoolExecutor(8) as pool:
        first = _busy(batcher, engine, pool)
        a = pool.submit(submit, 1, 2, 6)
        _queued(batcher, 2)
        b = pool.submit(submit, 2, 1, 6)  # a cost of 12 together: over the cap, a batch of its own
        _queued(batcher, 3)
        c = pool.submit(submit, 3, 1, 1)
        _queued(batcher, 4)
        engine.release.set()
        assert [f.result(30) for f in (first, a, b, c)] == [0, 10, 20, 30]
    assert sorted(map(sorted, engine.batches[1:])) == [[1], [2, 3]]


def test_the_merged_cancel_token_fires_only_when_every_member_has() -> None:
    tokens = [CancelToken(), CancelToken()]
    merged = AllCancelled(tokens)
    tokens[0].cancel("one left")
    merged.check()
    tokens[1].cancel("the server is shutting down")
    with pytest.raises(Cancelled, match="shutting down"):
        merged.check()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"preferred_batch_size": 0}, "preferred_batch_size must be in [1, 4096], got 0"),
        ({"preferred_batch_size": True}, "preferred_batch_size must be in [1, 4096], got True"),
        ({"max_queue_delay_ms": -1.0}, "max_queue_delay_ms must be in [0, 1000], got -1.0"),
        ({"max_queue_delay_ms": float("nan")}, "max_queue_delay_ms must be in [0, 1000], got nan"),
    ],
)
def test_policy_values_out_of_range_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        BatchPolicy(**changes)
    assert str(err.value) == message


def test_a_model_of_its_own_gets_its_own_policy() -> None:
    own = BatchPolicy(enabled=False)
    config = BatchingConfig(BatchPolicy(preferred_batch_size=8), {"ecg": own})
    assert config.for_model("ecg") is own and config.for_model("other").preferred_batch_size == 8
    assert not BatchingConfig.off().for_model("any").enabled


# ---------------------------------------------------------------------------- the members' wake-up


def test_signal_wakes_every_waiter_once_set_and_times_out_before():
    signal = Signal()
    assert not signal.is_set()
    assert signal.wait(0.01) is False  # not set: the wait ends at its timeout
    woken: list[bool] = []
    waiters = [threading.Thread(target=lambda: woken.append(signal.wait(10.0))) for _ in range(3)]
    for t in waiters:
        t.start()
    signal.set()
    signal.set()  # setting twice is harmless
    for t in waiters:
        t.join(10.0)
    assert woken == [True, True, True]
    assert signal.is_set() and signal.wait(0) and signal.wait()  # stays set for later waits


def test_job_finish_keeps_the_first_outcome():
    job = Job(1, 1, None, None)
    job.finish(result="leader's")
    job.finish(error=RuntimeError("too late"))
    assert job.done.is_set() and job.outcome() == "leader's"
