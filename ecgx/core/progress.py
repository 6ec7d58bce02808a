"""Progress bars for long work.

Silenced by ``--quiet`` (``enabled=False``) and, through tqdm's ``disable=None``,
whenever stderr is not a terminal, so logs and CI output stay readable.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
) -> Iterator[T]:
    """Wrap ``iterable`` in a progress bar on stderr when ``enabled``."""
    return iter(progress_bar(total=total, desc=desc, unit=unit, enabled=enabled, iterable=iterable))


def progress_bar(
    *,
    total: int | None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    iterable: Iterable | None = None,
) -> tqdm:
    """A bar over ``iterable``, or one updated by hand (``bar.update(k)``) for uneven steps."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None if enabled else True, leave=False)
