"""``ecgx token``: the access file of ``ecgx serve --tokens`` (docs/security.md).

``new`` makes a bearer token, stores only its SHA-256 (and its expiry, with ``--expires 90d`` or
an ISO date or date and time) and prints the token once; ``add-cert``
lists a client certificate's name; ``revoke`` removes an entry (a running server drops it at its
next check, within seconds); ``list`` shows names, kinds and scopes, and of tokens only the
first 8 hex digits of the hash. Every change replaces the file atomically; a new file is 0600.

No PyTorch on this path.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ecgx.service.access import (
    GRANTABLE,
    AccessEntry,
    AccessFile,
    SecurityConfigError,
    expiry_from,
    format_time,
    new_token,
    now_iso,
    read_access_file,
    token_hash,
    write_access_file,
)


def _open(path: Path, create: bool) -> AccessFile:
    if path.exists() or not create:
        return read_access_file(path)
    if not path.parent.is_dir():
        raise SecurityConfigError(f"access file {path}: the folder {path.parent} does not exist")
    return AccessFile(path)


def _add(access: AccessFile, entry: AccessEntry) -> AccessFile:
    if access.find(entry.name) is not None:
        raise SecurityConfigError(
            f"access file {access.path}: {entry.name!r} is already listed; names are unique "
            f"(revoke it first with `ecgx token revoke --file {access.path} --name {entry.name}`)"
        )
    if entry.kind == "token":
        return replace(access, tokens=(*access.tokens, entry))
    return replace(access, certificates=(*access.certificates, entry))


def add_token(path: Path, name: str, scopes: list[str], note: str = "", expires: str = "") -> str:
    """Add a new token for ``name`` to the access file (created if missing); returns the token,
    which is stored nowhere: only its hash is. ``expires``: a duration ("90d", "12h") or an ISO
    date or date and time after which the server refuses it ("" never)."""
    until = format_time(expiry_from(expires)) if expires else ""
    token = new_token()
    entry = AccessEntry(
        "token", name, tuple(dict.fromkeys(scopes)), token_hash(token), now_iso(), note, expires=until
    )
    write_access_file(_add(_open(path, create=True), entry))
    return token


def add_certificate(path: Path, name: str, scopes: list[str], note: str = "") -> None:
    """List a client certificate (a SAN DNS name, URI, e-mail, or the subject CN) with ``scopes``."""
    entry = AccessEntry("certificate", name, tuple(dict.fromkeys(scopes)), note=note)
    write_access_file(_add(_open(path, create=True), entry))


def revoke(path: Path, name: str) -> AccessEntry:
    """Remove the entry ``name`` (token or certificate); returns it."""
    access = _open(path, create=False)
    entry = access.find(name)
    if entry is None:
        names = ", ".join(repr(e.name) for e in access.entries) or "none"
        raise SecurityConfigError(f"access file {path}: no entry named {name!r} (listed: {names})")
    write_access_file(
        replace(
            access,
            tokens=tuple(e for e in access.tokens if e.name != name),
            certificates=tuple(e for e in access.certificates if e.name != name),
        )
    )
    return entry


def format_entries(access: AccessFile) -> str:
    """One line per entry: name, kind, scopes, created, and a token's hash prefix (never the hash)."""
    if not access.entries:
        return f"{access.path}: no entries"
    lines = []
    for e in access.entries:
        scopes = ", ".join(e.scopes) or "metadata only"
        extra = f"  sha256 {e.sha256[:8]}...  created {e.created or '?'}" if e.kind == "token" else ""
        if e.expires:
            extra += f"  expires {e.expires}"
        note = f"  ({e.note})" if e.note else ""
        lines.append(f"{e.kind:11s} {e.name}  scopes: {scopes}{extra}{note}")
    return "\n".join(lines)


def run_token(args: Any) -> int:
    """``ecgx token new|add-cert|revoke|list`` (arguments from :mod:`ecgx.cli`)."""
    action = args.token_command
    if action == "new":
        token = add_token(args.file, args.name, args.scope, args.note or "", args.expires or "")
        print(token)  # the only time anyone sees it
        until = read_access_file(args.file).find(args.name)
        expiry = f", expires {until.expires}" if until is not None and until.expires else ""
        print(
            f"added token {args.name!r} (scopes: {', '.join(args.scope)}{expiry}) to {args.file}; "
            "it is shown only this once: give it to its user now",
            file=sys.stderr,
        )
    elif action == "add-cert":
        add_certificate(args.file, args.name, args.scope, args.note or "")
        print(f"added certificate {args.name!r} (scopes: {', '.join(args.scope)}) to {args.file}")
    elif action == "revoke":
        entry = revoke(args.file, args.name)
        print(f"revoked {entry.kind} {entry.name!r} in {args.file}; a running server drops it within seconds")
    else:
        print(format_entries(read_access_file(args.file)))
    return 0


def add_parser(sub: Any, add_common: Any) -> None:
    """The ``token`` subcommand and its actions (called by :func:`ecgx.cli.build_parser`)."""
    token = sub.add_parser(
        "token",
        help="bearer tokens and client-certificate names that may call `ecgx serve --tokens FILE`",
        description="Manage the access file of `ecgx serve --tokens FILE` (docs/security.md). Tokens are "
        "stored as SHA-256 hashes only; a running server reloads the file within seconds.",
    )
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="TOKEN_COMMAND")

    def common(p: Any, scopes: bool) -> None:
        p.add_argument("--file", type=Path, required=True, metavar="ACCESS.toml", help="the access file")
        if scopes:
            p.add_argument("--name", required=True, help="the caller's name, as the audit log shows it")
            p.add_argument(
                "--scope",
                action="append",
                required=True,
                choices=GRANTABLE,
                help="what it may call, repeatable: predict, explain, admin (everything)",
            )
            p.add_argument("--note", help="a remark kept with the entry (who, ticket, expiry plan)")
        add_common(p)

    p = token_sub.add_parser(
        "new",
        help="make a token; prints it once",
        description="Make a token, store its hash (and expiry), print it once.",
    )
    p.add_argument(
        "--expires",
        metavar="WHEN",
        help="when the token stops working: a duration (90d, 12h, 30m, 2w) or an ISO-8601 date or date "
        "and time, UTC unless a zone is given (2027-03-01, 2027-03-01T12:00:00+01:00); default never",
    )
    common(p, scopes=True)
    common(
        token_sub.add_parser(
            "add-cert",
            help="list a client certificate's name (mutual TLS)",
            description="List a client certificate by a SAN (DNS name, URI, e-mail) or its subject CN.",
        ),
        scopes=True,
    )
    p = token_sub.add_parser("revoke", help="remove a token or certificate", description="Remove an entry.")
    p.add_argument("--name", required=True, help="the entry to remove")
    common(p, scopes=False)
    common(
        token_sub.add_parser("list", help="names and scopes", description="List the entries."), scopes=False
    )
    for p in token_sub.choices.values():
        p.set_defaults(func=run_token)
