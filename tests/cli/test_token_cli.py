"""``ecgx token new|add-cert|revoke|list``: the access file ``ecgx serve --tokens`` reads.

The token is printed once and stored nowhere, only its SHA-256; files are replaced atomically
and created 0600; mistakes are one-line errors that leave the file as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import stat
from pathlib import Path

import pytest
from cli_helpers import assert_clean_failure, run_ecgx, snapshot

from ecgx.cli import _add_common, build_parser
from ecgx.service.access import SecurityConfigError, read_access_file, token_hash
from ecgx.token_cli import add_parser, add_token, revoke


def token_cli(*argv: str, capsys: pytest.CaptureFixture) -> tuple[str, str]:
    """Run ``ecgx token ARGV`` in-process through its own parser; (stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="ecgx")
    add_parser(parser.add_subparsers(dest="command"), _add_common)
    args = parser.parse_args(["token", *argv])
    assert args.func(args) == 0
    return capsys.readouterr()


def test_new_prints_the_token_once_and_stores_only_its_hash(tmp_path: Path, capsys) -> None:
    path = tmp_path / "access.toml"
    out, err = token_cli("new", "--file", str(path), "--name", "ward 7", "--scope", "predict",
                         "--scope", "explain", "--note", 'asked by "Dr. X"', capsys=capsys)  # fmt: skip
    token = out.strip()
    assert token.startswith("ecgx_") and len(token) >= 5 + 43 and "shown only this once" in err
    text = path.read_text()
    assert token not in text and token_hash(token) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (entry,) = read_access_file(path).tokens
    assert (entry.name, entry.scopes, entry.note) == ("ward 7", ("predict", "explain"), 'asked by "Dr. X"')
    assert entry.sha256 == hashlib.sha256(token.encode()).hexdigest() and entry.created.endswith("Z")


def test_list_shows_names_and_scopes_never_a_whole_hash(tmp_path: Path, capsys) -> None:
    path = tmp_path / "access.toml"
    token = add_token(path, "reader", [])
    token_cli(
        "add-cert",
        "--file",
        str(path),
        "--name",
        "pacs.hospital.example",
        "--scope",
        "predict",
        capsys=capsys,
    )
    out, _ = token_cli("list", "--file", str(path), capsys=capsys)
    digest = token_hash(token)
    assert "reader  scopes: metadata only" in out and f"sha256 {digest[:8]}..." in out and digest not in out
    assert "certificate pacs.hospital.example  scopes: predict" in out


def test_revoke_removes_the_entry_and_keeps_the_others_and_the_mode(tmp_path: Path, capsys) -> None:
    path = tmp_path / "access.toml"
    add_token(path, "a", ["predict"])
    add_token(path, "b", ["admin"])
    path.chmod(0o640)  # an administrator's choice survives the rewrite
    out, _ = token_cli("revoke", "--file", str(path), "--name", "a", capsys=capsys)
    assert "revoked token 'a'" in out
    assert [e.name for e in read_access_file(path).entries] == ["b"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name != "access.toml"]  # no temporary file left


def test_mistakes_leave_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "access.toml"
    add_token(path, "a", ["predict"])
    before = path.read_bytes()
    with pytest.raises(SecurityConfigError, match="'a' is already listed; names are unique"):
        add_token(path, "a", ["explain"])
    with pytest.raises(SecurityConfigError, match=r"no entry named 'zz' \(listed: 'a'\)"):
        revoke(path, "zz")
    with pytest.raises(SecurityConfigError, match="'name' must be 1-200 printable characters"):
        add_token(path, "bad\nname", ["predict"])
    assert path.read_bytes() == before
    with pytest.raises(SecurityConfigError, match="does not exist"):
        revoke(tmp_path / "none.toml", "a")
    with pytest.raises(SecurityConfigError, match=r"the folder .* does not exist"):
        add_token(tmp_path / "no" / "access.toml", "a", ["predict"])
    path.write_text("[[token]]\nname = 1\n")
    with pytest.raises(SecurityConfigError, match=r"\[\[token\]\] #1: 'name'"):
        add_token(path, "c", ["predict"])


def test_the_ecgx_command_line_runs_it(tmp_path: Path) -> None:
    try:
        build_parser().parse_args(["token", "list", "--file", "x"])
    except SystemExit:
        pytest.skip("ecgx/cli.py does not register `ecgx token` yet (ecgx.token_cli.add_parser)")
    path = tmp_path / "access.toml"
    result = run_ecgx("token", "new", "--file", str(path), "--name", "a", "--scope", "predict")
    assert result.returncode == 0, result.stderr
    assert token_hash(result.stdout.strip()) in path.read_text()
    before = snapshot(tmp_path)
    result = run_ecgx("token", "new", "--file", str(path), "--name", "a", "--scope", "predict")
    assert_clean_failure(
        result, f"access file {path}: 'a' is already listed", before=before, roots=[tmp_path]
    )
    result = run_ecgx("token", "new", "--file", str(path), "--name", "b", "--scope", "write")
    assert result.returncode == 2 and "invalid choice: 'write'" in result.stderr
