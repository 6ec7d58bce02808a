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


# ------------------------------------------------------------------------- the demo's closing summary


def _fake_demo_tree(out):
    """What a finished demo leaves, without running one: the summary reads only paths."""
    for d in ("packages/seed-0", "packages/seed-1", "repo/ecg/1", "figures", "keys", "records", "report"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for f in (
        "keys/gate_public_key.pem",
        "keys/gate_signing_key.pem",
        "report/report.html",
        "records/beat-7.npy",
    ):
        (out / f).write_text("x")
    return out


def test_closing_summary_lists_only_what_exists_verdicts_and_the_next_commands(tmp_path):
    from ecgx.demo import DemoResult, PackageVerdict, closing_summary

    out = _fake_demo_tree(tmp_path / "demo")
    pkgs = [out / "packages" / "seed-0", out / "packages" / "seed-1"]
    result = DemoResult(
        out=out,
        packages=pkgs,
        trims=["gates 5 of 16 methods", "the gate policy is the default one"],
        verdicts={pkgs[0]: PackageVerdict("pass", ("gradient_shap",), 5)},
        report=out / "report" / "report.html",
        figures=[],
        record=out / "records" / "beat-7.npy",
        method="gradient_shap",
        seconds=12.0,
    )
    text = "\n".join(closing_summary(result))
    assert str(out / "report" / "report.html") in text
    assert str(out / "keys" / "gate_public_key.pem") in text and str(out / "repo") in text
    assert "grpc_explanation.png" not in text and "training runs" not in text  # not written: not listed
    assert "seed-0: PASS, 1 of 5 methods pass: gradient_shap" in text
    assert "seed-1: not gated by this demo (not served)" in text
    assert "note: gates 5 of 16 methods" in text
    serve = (
        f"ecgx serve --repo {out / 'repo'} --trusted-key {out / 'keys' / 'gate_public_key.pem'} --insecure"
    )
    assert serve in text and "--public-key" not in text
    assert f"--ecg {out / 'records' / 'beat-7.npy'} --method gradient_shap" in text
    assert f"file://{(out / 'report' / 'report.html').resolve()}" in text


def test_the_serve_command_the_summary_prints_parses(tmp_path):
    """The next commands use flags the CLI has (issue #22: `serve` was told --public-key)."""
    import shlex

    from ecgx.cli import build_parser
    from ecgx.demo import DemoResult, next_commands

    out = _fake_demo_tree(tmp_path / "demo")
    result = DemoResult(out=out, packages=[], record=out / "records/beat-7.npy", method="gradient_shap")
    commands = [line.strip() for line in next_commands(result) if line.strip().startswith("ecgx ")]
    assert len(commands) == 2
    parser = build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])  # exits 2 on an unknown flag
