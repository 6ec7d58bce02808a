"""The shared TOML loader (ecgx.core.config_file): reading a file, and documents of entries
(arrays of tables, as the access file's callers). Settings tables are tested through the files
that use them (training config, serve config, gate policy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecgx.core.config_file import ConfigError, check_keys, parse_toml, read_toml, table_arrays
from ecgx.core.errors import InvalidArgument


def test_read_toml_names_the_file_and_adds_the_hint_only_when_missing(tmp_path: Path) -> None:
    missing = tmp_path / "none.toml"
    with pytest.raises(ConfigError, match=r"^access file .*none\.toml does not exist; create it$"):
        read_toml(missing, "access file", if_missing="create it")
    with pytest.raises(ConfigError, match=r"config file .* is a folder, not a TOML file$"):
        read_toml(tmp_path, if_missing="create it")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_toml(tmp_path / "bin.toml")
    (tmp_path / "ok.toml").write_text('[[token]]\nname = "a"\n')
    assert read_toml(tmp_path / "ok.toml") == {"token": [{"name": "a"}]}


def test_parse_toml_names_its_source() -> None:
    assert parse_toml("a = 1\n", "x") == {"a": 1}
    with pytest.raises(ConfigError, match=r"^access file a\.toml is not valid TOML: "):
        parse_toml("a = [", "access file a.toml")


def test_table_arrays_gives_each_array_and_refuses_anything_else() -> None:
    doc = parse_toml('[[token]]\nname = "a"\n[[token]]\nname = "b"\n', "x")
    assert table_arrays(doc, ("token", "certificate"), "f") == {
        "token": [{"name": "a"}, {"name": "b"}],
        "certificate": [],
    }
    with pytest.raises(ConfigError, match=r"^f: unknown table 'users'; expected \[\[token\]\] and/or"):
        table_arrays({"users": [{}]}, ("token", "certificate"), "f")
    for not_an_array in (3, {"name": "a"}, [1, 2]):
        with pytest.raises(ConfigError, match=r"^f: token must be a list of \[\[token\]\] tables$"):
            table_arrays({"token": not_an_array}, ("token",), "f")


def test_check_keys_names_the_first_unknown_key_and_the_allowed_ones() -> None:
    check_keys({"name": "a"}, {"name", "note"}, "entry")
    with pytest.raises(ConfigError, match=r"^entry: unknown key 'expiry'; allowed: name, note$") as e:
        check_keys({"name": "a", "zeta": 1, "expiry": 2}, {"name", "note"}, "entry")
    assert isinstance(e.value, InvalidArgument)
