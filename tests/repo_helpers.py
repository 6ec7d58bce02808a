"""Shared by the repository, gRPC and Open Inference Protocol tests: gated package copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ecgx.core.package_reader import load_package
from ecgx.validation.gate import package_record
from ecgx.validation.signing import sign_report


def make_package(gated: dict, dest: Path, seed: int = 0, key: Any = None, **changes: Any) -> Path:
    """A copy of the seed's package at ``dest`` with a signed gate.json (report fields changed)."""
    shutil.copytree(gated["family"][f"seed-{seed}"], dest)
    (dest / "gate.json").unlink(missing_ok=True)
    report = {**gated["report"], "package": package_record(load_package(dest)), **changes}
    signed = sign_report(report, key or gated["private"])
    (dest / "gate.json").write_text(json.dumps(signed, indent=1))
    return dest
