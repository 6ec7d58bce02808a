"""One rule for every output ecgx writes (``--out`` of every command).

- An output is built in a temporary sibling (``.NAME.<random>.ecgx-tmp``) and renamed
  into place only when it is complete (and, where the writer can, read back valid).
  A failure, Ctrl-C or SIGTERM removes the temporary, and any parent folders the
  command created for it.
- An existing output is refused unless ``overwrite``; ``overwrite`` replaces only an
  output of the same kind that ecgx wrote, recognised by its marker (a dataset's
  ``meta.json``, a package's ``manifest.json``, ...). Anything else is refused even
  with ``overwrite``, naming what is there. An empty folder counts as free.
- The old output is removed only after the new one is complete.
- A file where a folder is expected (or the reverse), a parent that is a file, and a
  symbolic link are clear errors.

This module is deliberately light (standard library only): the CLI, ``training/`` and
``validation/`` import it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ecgx.core.errors import InvalidArgument

TMP_SUFFIX = ".ecgx-tmp"
OLD_SUFFIX = ".ecgx-old"
_MAX_MARKER_BYTES = 256 * 2**20  # a marker file larger than this is not one ecgx wrote
_LISTED = 4  # entries named when describing a folder that is in the way


class OutputError(InvalidArgument):
    """An output path cannot be used; the message names it and says why."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists; it may be replaced only with ``overwrite`` (and only if ecgx wrote it)."""


@dataclass(frozen=True)
class OutputKind:
    """What a command writes: a folder or a file, and how to recognise one that ecgx wrote."""

    name: str  # "dataset folder"
    folder: bool
    recognise: Callable[[Path], bool]  # True: an output of this kind that ecgx wrote
    marker: str  # what recognise looks for, for messages ("meta.json")
    example: str = ""  # file kinds: a file name for the "give a file" hint

    @property
    def a_name(self) -> str:
        return ("an " if self.name[0] in "aeiou" else "a ") + self.name


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        if not path.is_file() or path.stat().st_size > _MAX_MARKER_BYTES:
            return None
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _json_marker(name: str, test: Callable[[dict[str, Any]], bool]) -> Callable[[Path], bool]:
    def recognise(folder: Path) -> bool:
        value = _json_object(folder / name)
        return value is not None and test(value)

    return recognise


def _is_gate_report(path: Path) -> bool:
    value = _json_object(path)
    return value is not None and value.get("schema") == "ecgx-gate-report"


def _is_npy(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(6) == b"\x93NUMPY"
    except OSError:
        return False


KEY_FILES = ("gate_signing_key.pem", "gate_public_key.pem")


def _is_key_folder(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return bool(names) and names <= set(KEY_FILES)


def _is_figure_folder(folder: Path) -> bool:
    entries = list(folder.iterdir())
    return bool(entries) and all(p.is_file() and p.suffix == ".png" for p in entries)


DATASET = OutputKind(
    "dataset folder",
    True,
    _json_marker("meta.json", lambda m: "format_version" in m and "leads" in m and "classes" in m),
    "meta.json",
)
PACKAGE = OutputKind(
    "model package",
    True,
    _json_marker("manifest.json", lambda m: m.get("format") == "ecgx-model-package"),
    "manifest.json",
)
RUN = OutputKind(
    "run folder",
    True,
    _json_marker("run.json", lambda m: isinstance(m.get("seeds"), dict) and "model_config" in m),
    "run.json",
)
EXPERIMENTS = OutputKind(
    "experiments report folder",
    True,
    _json_marker("experiments.json", lambda m: m.get("schema") == "ecgx-gate-report"),
    "experiments.json",
)
KEYS = OutputKind("gate key folder", True, _is_key_folder, " and/or ".join(KEY_FILES))
GATE_REPORT = OutputKind("gate report", False, _is_gate_report, "a JSON gate report", "gate.json")
ATTRIBUTIONS = OutputKind("attribution file", False, _is_npy, "a .npy array", "attributions.npy")
ATTRIBUTION_SHARDS = OutputKind(
    "attribution folder",
    True,
    _json_marker("_attributions.json", lambda m: m.get("schema") == "ecgx-attributions"),
    "_attributions.json",
)
DEMO = OutputKind(
    "demo folder", True, _json_marker("ecgx-demo.json", lambda m: "ecgx_demo" in m), "ecgx-demo.json"
)
FIGURES = OutputKind("figure folder", True, _is_figure_folder, "only .png files")

State = Literal["absent", "empty", "ours"]


def _reason(e: OSError) -> str:
    return (e.strerror or str(e)).lower()


def _describe_folder(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _check_parents(out: Path) -> None:
    """The nearest existing ancestor of ``out`` must be a folder."""
    parent = out.parent
    while not (parent.exists() or parent.is_symlink()):
        if parent == parent.parent:
            return
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {out}: {parent} is a file, not a folder")


def classify_output(out: Path | str, kind: OutputKind) -> State:
    """``absent``, ``empty`` (an empty folder, free to use) or ``ours`` (an output of ``kind``
    that ecgx wrote). Anything else raises :class:`OutputError` naming what is in the way."""
    out = Path(out)
    try:
        if out.is_symlink():
            raise OutputError(
                f"{out} is a symbolic link; ecgx never writes through or replaces links: give the real path"
            )
        _check_parents(out)
        if not out.exists():
            return "absent"
        if kind.folder:
            if not out.is_dir():
                raise OutputError(f"{out} is a file, but the {kind.name} --out must be a folder")
            if not any(out.iterdir()):
                return "empty"
            if not kind.recognise(out):
                raise OutputError(
                    f"{out} already exists and is not {kind.a_name} written by ecgx (no {kind.marker}; it "
                    f"holds {_describe_folder(out)}); refusing to replace it, even with --overwrite: "
                    "choose another --out"
                )
            return "ours"
        if out.is_dir():
            example = f", e.g. {out / kind.example}" if kind.example else ""
            raise OutputError(f"{out} is a folder, but the {kind.name} --out must be a file{example}")
        if not out.is_file():
            raise OutputError(f"{out} is not a regular file; the {kind.name} --out must be one")
        if not kind.recognise(out):
            raise OutputError(
                f"{out} already exists and is not {kind.a_name} written by ecgx (not {kind.marker}); "
                "refusing to replace it, even with --overwrite: choose another --out"
            )
        return "ours"
    except OSError as e:
        raise OutputError(f"cannot use {out} as --out: {_reason(e)}") from None


def check_output(out: Path | str, kind: OutputKind, *, overwrite: bool = False) -> State:
    """Fail early (before minutes of work) if ``out`` may not be written; returns its state."""
    state = classify_output(out, kind)
    if state == "ours" and not overwrite:
        raise OutputExistsError(
            f"{out} already exists ({kind.a_name} ecgx wrote); choose another --out, "
            "or pass --overwrite to replace it"
        )
    return state


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first)."""
    missing = []
    while not (folder.exists() or folder.is_symlink()):
        missing.append(folder)
        folder = folder.parent
    created = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    except OSError as e:
        _remove_empty(created)
        raise OutputError(f"cannot create folder {d}: {_reason(e)}") from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    for d in reversed(folders):
        try:
            d.rmdir()
        except OSError:
            return


def temporary_sibling(out: Path, folder: bool) -> Path:
    """A fresh hidden temporary folder or file beside ``out`` (same file system, so renames are atomic)."""
    try:
        if folder:
            return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TMP_SUFFIX, dir=out.parent))
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=TMP_SUFFIX, dir=out.parent)
        os.close(fd)
        return Path(name)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {out.parent}: {_reason(e)}") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class StagedOutput:
    """Build an output in a temporary sibling; :meth:`commit` puts it in place, :meth:`abort` drops it.

    As a context manager it yields the temporary path and commits on success, aborts on any
    exception (Ctrl-C included)::

        with StagedOutput(out, PACKAGE, overwrite=overwrite) as tmp:
            write_everything_into(tmp)
    """

    def __init__(self, out: Path | str, kind: OutputKind, *, overwrite: bool = False):
        self.out = Path(out)
        self.kind = kind
        self.overwrite = overwrite
        check_output(self.out, kind, overwrite=overwrite)
        self._created = _make_parents(self.out.parent)
        try:
            self.path = temporary_sibling(self.out, kind.folder)
        except BaseException:
            _remove_empty(self._created)
            raise
        self._open = True

    def commit(self) -> Path:
        """Put the finished output at ``out``, replacing an old one only now (re-checked)."""
        if not self._open:
            raise RuntimeError(f"staged output {self.out} was already committed or aborted")
        try:
            state = check_output(self.out, self.kind, overwrite=self.overwrite)  # may have changed meanwhile
            if self.kind.folder:
                self.path.chmod(0o755)  # mkdtemp makes it owner-only; outputs are readable like any folder
                if state == "absent":
                    os.rename(self.path, self.out)
                else:
                    _swap(self.path, self.out)
            else:
                self.path.chmod(0o644)
                os.replace(self.path, self.out)
        except BaseException:
            self.abort()
            raise
        self._open = False
        return self.out

    def abort(self) -> None:
        """Remove the temporary (and the parent folders this output created); safe to call twice."""
        if self._open:
            _remove(self.path)
            _remove_empty(self._created)
        self._open = False

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _swap(new: Path, out: Path) -> None:
    """Replace the folder ``out`` by ``new``; the old one is deleted only once ``new`` is in place."""
    hold = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=OLD_SUFFIX, dir=out.parent))
    os.rename(out, hold / out.name)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(hold / out.name, out)
        hold.rmdir()
        raise
    shutil.rmtree(hold, ignore_errors=True)


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write a small file inside an output ecgx owns: readers see the old text or the new, never half."""
    path = Path(path)
    tmp = temporary_sibling(path, folder=False)
    try:
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
