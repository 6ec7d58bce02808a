"""Temporary folders that an interrupted ``ecgx repo add`` left in a model repository.

``ecgx repo add`` builds a version in a hidden sibling (``MODEL/.VERSION.<random>.ecgx-tmp``)
and renames it into place; a normal failure removes it, but ``kill -9`` or a power cut cannot.
The repository never serves such a folder (hidden names are skipped), but it takes disk space
and nothing else would notice it. :func:`stale_temporaries` finds them (``ecgx serve`` logs them
at start, ``ecgx repo stale`` lists them) and :func:`remove_stale` removes those old enough that
no promotion can still be writing them.

No PyTorch here (the serving path).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

TMP_SUFFIXES = (".ecgx-tmp", ".ecgx-old")  # ecgx.core.outputs' staging and replaced-output folders
DEFAULT_MIN_AGE_S = 3600.0  # a promotion copies a package in seconds; an hour-old temporary is dead


@dataclass(frozen=True)
class StaleTemporary:
    """A hidden temporary under a repository, and how long ago it last changed."""

    path: Path
    age_s: float
    size_bytes: int


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIXES)


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def stale_temporaries(repo: Path | str, min_age_s: float = 0.0) -> list[StaleTemporary]:
    """Hidden ``.*.ecgx-tmp`` / ``.*.ecgx-old`` entries in ``repo`` and its model folders that
    have not changed for ``min_age_s`` seconds, oldest first."""
    repo = Path(repo)
    if not repo.is_dir():
        return []
    candidates = [p for p in repo.iterdir() if _is_temporary(p)]
    for model in repo.iterdir():
        if model.is_dir() and not model.is_symlink() and not model.name.startswith("."):
            candidates += [p for p in model.iterdir() if _is_temporary(p)]
    now = time.time()
    found = []
    for path in candidates:
        try:
            age = now - path.lstat().st_mtime
            if age >= min_age_s:
                found.append(StaleTemporary(path, age, _size(path)))
        except OSError:  # removed meanwhile: not stale
            continue
    return sorted(found, key=lambda s: -s.age_s)


def remove_stale(repo: Path | str, min_age_s: float = DEFAULT_MIN_AGE_S) -> list[StaleTemporary]:
    """Remove the temporaries :func:`stale_temporaries` finds at ``min_age_s``; returns them."""
    removed = []
    for stale in stale_temporaries(repo, min_age_s):
        if stale.path.is_dir() and not stale.path.is_symlink():
            shutil.rmtree(stale.path)
        else:
            stale.path.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def describe(stale: StaleTemporary) -> str:
    hours = stale.age_s / 3600
    return f"{stale.path} ({stale.size_bytes / 1e6:.1f} MB, unchanged for {hours:.1f} h)"


__all__ = ["DEFAULT_MIN_AGE_S", "StaleTemporary", "describe", "remove_stale", "stale_temporaries"]
