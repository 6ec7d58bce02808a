"""Run ``ecgx`` as a user would (a real subprocess) and check how it fails on bad input.

The contract every bad-input case must meet: exit status 2, exactly one line on
stderr that starts with ``ecgx: error:`` and names what is wrong, no traceback,
and the file system exactly as it was (nothing half-written, nothing replaced).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path


def run_ecgx(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m ecgx.cli ARGS`` in a fresh process, progress bars and info logging off."""
    return subprocess.run(
        [sys.executable, "-m", "ecgx.cli", *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def snapshot(*roots: Path) -> dict[str, str]:
    """Relative path -> SHA-256 (files), 'dir' (folders) or 'link -> target' under each root."""
    state: dict[str, str] = {}
    for root in roots:
        if not root.exists() and not root.is_symlink():
            continue
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            key = str(path)
            if path.is_symlink():
                state[key] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                state[key] = "dir"
            else:
                state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def assert_clean_failure(
    result: subprocess.CompletedProcess,
    *fragments: str,
    before: dict[str, str] | None = None,
    roots: Iterable[Path] = (),
) -> None:
    """Exit 2, one ``ecgx: error:`` line containing every fragment, no traceback, files untouched.

    ``before`` is a :func:`snapshot` of ``roots`` taken before the command ran.
    """
    err_lines = [line for line in result.stderr.splitlines() if line.strip()]
    context = f"exit {result.returncode}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, context
    assert "Traceback" not in result.stderr, context
    assert len(err_lines) == 1, context
    assert err_lines[0].startswith("ecgx: error: "), context
    for fragment in fragments:
        assert fragment in err_lines[0], f"{fragment!r} not in the error line\n{context}"
    if before is not None:
        assert snapshot(*roots) == before, f"the file system changed\n{context}"


def serve_port(proc: subprocess.Popen, transport: str, timeout_s: float = 120) -> tuple[int, list[str]]:
    """Read a running ``ecgx serve``'s standard error up to its start-up line, which names the
    port and the ``transport`` ("TLS" or "PLAINTEXT"); returns the port and the lines read."""
    pattern = re.compile(rf"ExplanationService on [^ ]+:(\d+) with {transport}")
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = pattern.search(line)
        if m:
            return int(m[1]), lines
    raise AssertionError("ecgx serve did not report its port:\n" + "".join(lines))


# ``python SCRIPT ARGS`` runs ``ecgx ARGS`` with PyTorch made unimportable (an import hook: setting
# sys.modules["torch"] = None would break scipy), then prints whether torch got loaded anyway.
ECGX_WITHOUT_TORCH = """
import importlib.abc, sys

class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is not importable in this process ({name})")
        return None

sys.meta_path.insert(0, _NoTorch())
from ecgx.cli import main
rc = main(sys.argv[1:])
print("TORCH_LOADED", any(m == "torch" or m.startswith("torch.") for m in sys.modules), flush=True)
sys.exit(rc)
"""
