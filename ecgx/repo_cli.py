"""``ecgx repo stale``: temporary folders an interrupted ``ecgx repo add`` left behind.

Lists hidden ``.*.ecgx-tmp`` / ``.*.ecgx-old`` folders in a repository; ``--remove`` deletes those
unchanged for ``--min-age`` seconds (default an hour, so a promotion still copying is never hit).
No PyTorch on this path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ecgx.core.errors import InvalidArgument
from ecgx.service.stale import DEFAULT_MIN_AGE_S, describe, remove_stale, stale_temporaries


def run_stale(args: Any) -> int:
    """``ecgx repo stale`` (arguments from :mod:`ecgx.cli`)."""
    if not args.repo.is_dir():
        raise InvalidArgument(f"repository {args.repo} is not a folder")
    if args.min_age < 0:
        raise InvalidArgument(f"--min-age must be >= 0 seconds, got {args.min_age}")
    if args.remove:
        removed = remove_stale(args.repo, args.min_age)
        for stale in removed:
            print(f"removed {describe(stale)}")
        print(f"{len(removed)} stale temporary folder(s) removed from {args.repo}")
        return 0
    found = stale_temporaries(args.repo, args.min_age)
    for stale in found:
        print(describe(stale))
    hint = f"; remove them with `ecgx repo stale --repo {args.repo} --remove`" if found else ""
    print(f"{len(found)} stale temporary folder(s) in {args.repo}{hint}")
    return 0


def add_stale_parser(repo_sub: Any, add_common: Any) -> None:
    """``ecgx repo stale`` (called by :func:`ecgx.cli.build_parser`)."""
    p = repo_sub.add_parser(
        "stale",
        help="list (or remove) temporary folders an interrupted `ecgx repo add` left behind",
        description="List hidden .*.ecgx-tmp / .*.ecgx-old folders under DIR and DIR/MODEL that an "
        "interrupted promotion (kill -9, power loss) left; --remove deletes those unchanged for --min-age "
        "seconds.",
    )
    p.add_argument("--repo", type=Path, required=True, metavar="DIR", help="model repository folder")
    p.add_argument("--remove", action="store_true", help="delete them")
    p.add_argument(
        "--min-age",
        type=float,
        default=DEFAULT_MIN_AGE_S,
        metavar="S",
        help=f"only folders unchanged for S seconds (default {DEFAULT_MIN_AGE_S:.0f}: a promotion may be "
        "running)",
    )
    add_common(p)
    p.set_defaults(func=run_stale)
