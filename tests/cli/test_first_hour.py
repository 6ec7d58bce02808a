"""Issue #22, the first hour of a new user: each rough edge it lists, as a test."""

from __future__ import annotations

import io
import time

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
