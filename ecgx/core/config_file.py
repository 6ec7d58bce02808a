"""The one loader of ecgx's TOML files (training config, gate policy, serve config, access file).

:func:`read_toml` reads a file and says precisely why it cannot (missing, a folder, a device,
unreadable, not UTF-8, not TOML: each names the file; :func:`parse_toml` is the same for text
already in memory). Documents of settings tables: :func:`check_tables` refuses unknown tables,
:func:`checked_fields` checks a table against a dataclass's field types with strict keys (an
unknown key lists the known ones) and :func:`build` runs the dataclass's own range checks, every
message naming ``table.key``. Documents of entries (arrays of tables, as the access file's
``[[token]]`` and ``[[certificate]]`` callers, whose number and names are open):
:func:`table_arrays` gives each array's tables and :func:`check_keys` refuses unknown keys in one.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from ecgx.core.errors import InvalidArgument


class ConfigError(InvalidArgument):
    """A settings file or table that cannot be used; the message names the file and key."""


def read_toml(path: Path | str, what: str = "config file", if_missing: str = "") -> dict[str, Any]:
    """The TOML document at ``path``; :class:`ConfigError` naming ``what`` and the file otherwise.
    ``if_missing`` is added to the message for a file that does not exist (how to create one)."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise ConfigError(f"{what} {path} is not a regular file (a device, pipe or socket)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = f"; {if_missing}" if if_missing else ""
        raise ConfigError(f"{what} {path} does not exist{hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a TOML file") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {(e.strerror or str(e)).lower()}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not valid TOML: it is not UTF-8 text") from None
    return parse_toml(text, f"{what} {path}")


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """The TOML document in ``text``; :class:`ConfigError` naming ``source`` when it is not TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}") from None


def check_tables(document: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Refuse a document with a top-level table other than ``allowed``."""
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        expected = " and/or ".join(f"[{t}]" for t in allowed)
        raise ConfigError(f"{where}: unknown table(s) {unknown}; expected {expected}")


def table_arrays(document: Mapping[str, Any], names: tuple[str, ...], where: str) -> dict[str, list[Any]]:
    """Each of ``names`` -> the tables of its array (``[[name]]``; [] when absent), for a document
    made of such arrays alone; any other top-level name, or a name that is not an array of
    tables, is refused."""
    unknown = sorted(set(document) - set(names))
    if unknown:
        expected = " and/or ".join(f"[[{n}]]" for n in names)
        raise ConfigError(f"{where}: unknown table {unknown[0]!r}; expected {expected} entries")
    arrays = {}
    for name in names:
        items = document.get(name, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ConfigError(f"{where}: {name} must be a list of [[{name}]] tables")
        arrays[name] = items
    return arrays


def check_keys(entry: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    """Refuse an entry (one table of an array) with a key other than ``allowed``, naming the first."""
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def build(cls: type, values: dict[str, Any], table: str) -> Any:
    try:
        return cls(**values)
    except ValueError as e:  # a range check of the dataclass: its message names the key
        names_a_key = str(e).split(" ", 1)[0] in {f.name for f in fields(cls)}
        raise ConfigError(f"{table}.{e}" if names_a_key else f"{table}: {e}") from None


def checked_fields(cls: type, values: Any, table: str) -> dict[str, Any]:
    """``values`` checked against the dataclass ``cls``'s field types; messages name ``table.key``.

    Integers are accepted for float fields; booleans are never numbers; floats must be finite.
    Range checks stay in the dataclass (their messages name the key too).
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{table} must be a table of settings, got {_kind(values)}")
    types = {f.name: f.type for f in fields(cls)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        what = "setting" if len(unknown) == 1 else "settings"
        raise ConfigError(f"unknown {table} {what} {', '.join(unknown)}; known: {', '.join(sorted(types))}")
    return {key: _checked_value(f"{table}.{key}", types[key], value) for key, value in values.items()}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked_value(name: str, annotation: Any, value: Any) -> Any:
    kind = str(annotation).replace(" ", "")
    if kind == "bool":
        ok = isinstance(value, bool)
        expected = "true or false"
    elif kind == "int":
        ok, expected = _is_int(value), "an integer"
    elif kind == "int|None":
        ok, expected = _is_int(value), "an integer (leave it out for none)"
    elif kind == "float":
        ok, expected = _is_int(value) or isinstance(value, float), "a number"
        if ok and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
        value = float(value) if ok else value
    elif kind == "str":
        ok, expected = isinstance(value, str), "a string"
    elif kind == "tuple[int,...]":
        ok = isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)
        expected = "a list of integers"
        value = tuple(value) if ok else value
    else:  # a field type this checker does not know: a programming error, not bad input
        raise TypeError(f"no type check for {name}: {annotation}")
    if not ok:
        raise ConfigError(f"{name} must be {expected}, got {value!r} ({_kind(value)})")
    return value


def _kind(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    return names.get(type(value), type(value).__name__)
