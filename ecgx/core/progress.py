"""Progress for long work that never goes silent.

On a terminal: a tqdm bar on the stream (stderr by default). Without one (logs, CI, ``nohup``,
a pipe) a bar would be switched off and a long step would print nothing for minutes, so a
:class:`ProgressLog` writes one line instead when the step starts, every ``interval`` seconds
while it runs (from a timer thread, so a single slow item cannot hold the line back), and when
it ends: step, done/total, rate and time left. ``--quiet`` (``enabled=False``) silences both.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

# Without a terminal, a running step writes a line at least this often (seconds).
LOG_INTERVAL = 30.0


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    stream: IO[str] | None = None,
    interval: float = LOG_INTERVAL,
) -> Iterator[T]:
    """Iterate ``iterable`` with progress on ``stream`` (stderr by default) when ``enabled``."""
    bar = progress_bar(total=total, desc=desc, unit=unit, enabled=enabled, stream=stream, interval=interval)
    with bar:
        for item in iterable:
            yield item
            bar.update(1)


def progress_bar(
    *,
    total: int | None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    iterable: Iterable | None = None,
    stream: IO[str] | None = None,
    interval: float = LOG_INTERVAL,
) -> Any:
    """A bar updated by hand (``bar.update(k)``, used as a context manager): tqdm on a terminal,
    a :class:`ProgressLog` otherwise, nothing when not ``enabled``. ``iterable`` is kept for
    callers that iterate the tqdm bar itself."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True)
    if _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=False)
    return ProgressLog(total=total, desc=desc, unit=unit, stream=stream, interval=interval, iterable=iterable)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


class ProgressLog:
    """Progress lines for a stream that is not a terminal (see the module docstring)."""

    def __init__(
        self,
        *,
        total: int | None,
        desc: str,
        unit: str,
        stream: IO[str],
        interval: float = LOG_INTERVAL,
        iterable: Iterable | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.total, self.desc, self.unit = total, desc or "progress", unit
        self.stream, self.interval, self.iterable = stream, interval, iterable
        self.n = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ticks = 0
        self._started = time.monotonic()

    def __enter__(self) -> ProgressLog:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._tick, name=f"progress {self.desc}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress log was made without an iterable")
        with self:
            for item in self.iterable:
                yield item
                self.update(1)

    def update(self, k: int = 1) -> None:
        with self._lock:
            self.n += k

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._ticks:  # a step quick enough to need no line ends without one too
            self._write(self.line("done"))

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._ticks += 1
            self._write(self.line())

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed stream must not break the work it reports on
            pass

    def line(self, state: str = "") -> str:
        """``desc: 12/40 unit (30%), 0.41 unit/s, 68 s left, 29 s elapsed``."""
        with self._lock:
            n = self.n
        elapsed = time.monotonic() - self._started
        rate = n / elapsed if elapsed > 0 else 0.0
        done = f"{n}/{self.total}" if self.total else f"{n}"
        parts = [f"{done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and n < self.total:
            parts.append(f"{(self.total - n) / rate:.0f} s left")
        parts.append(f"{elapsed:.0f} s elapsed")
        suffix = f" [{state}]" if state else ""
        return f"progress {self.desc}: {', '.join(parts)}{suffix}"
