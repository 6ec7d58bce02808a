"""``ecgx audit verify FILE...``: check the hash chain of ``ecgx serve --audit-log`` files.

Give rotated files oldest first (``audit.jsonl.2 audit.jsonl.1 audit.jsonl``): the chain runs on
across them. Exit status 0 when every line links to the one before, 1 at the first broken line
(named with its file and line number). No PyTorch on this path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ecgx.core.errors import InvalidArgument
from ecgx.service.audit import GENESIS, verify_chain


def run_audit(args: Any) -> int:
    """``ecgx audit verify`` (arguments from :mod:`ecgx.cli`)."""
    for path in args.files:
        if not path.is_file():
            raise InvalidArgument(f"audit file {path} does not exist or is not a file")
    report = verify_chain(args.files)
    start = "from the start (genesis)" if report.start == GENESIS else f"continuing {report.start}"
    if report.ok:
        print(f"audit chain intact: {report.lines} line(s), {start}; last hash {report.last}")
        return 0
    print(f"audit chain BROKEN at {report.broken}")
    print(f"{report.lines} line(s) before it verify, {start}")
    return 1


def add_parser(sub: Any, add_common: Any) -> None:
    """The ``audit`` subcommand (called by :func:`ecgx.cli.build_parser`)."""
    audit = sub.add_parser("audit", help="check the audit log of `ecgx serve --audit-log`")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")
    p = audit_sub.add_parser(
        "verify",
        help="check the hash chain of audit files; report the first broken line",
        description="Check that every line of the audit files carries the SHA-256 of the line before "
        "(docs/security.md). Give rotated files oldest first. Exit status: 0 intact; 1 broken (the first "
        "broken line is named); 2 bad usage.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audit files, oldest first")
    add_common(p)
    p.set_defaults(func=run_audit)
