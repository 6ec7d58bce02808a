"""Ed25519 signing of gate reports: writing a key pair, signing a report, and the allow-list of
policy hashes (whose default is this ecgx's default policy).

Only the gate signs. Reading keys, canonical bytes, verifying a signature and verifying a gated
package are the serving path's as well, so they live in the core (:mod:`ecgx.core.signing`).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ecgx.core.outputs import KEYS, OutputError, OutputExistsError, StagedOutput
from ecgx.core.signing import (
    ALGORITHM,
    ALLOWED_POLICIES_ENV,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    SigningError,
    canonical_bytes,
    key_id,
    load_private_key,
)
from ecgx.validation.policy import default_policy


def generate_keypair(out_dir: Path | str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new key pair as the folder ``out_dir``: ``gate_signing_key.pem``, readable by its
    owner only, and ``gate_public_key.pem``. Returns (private key path, public key path).

    The folder follows the output rule (:mod:`ecgx.core.outputs`): built beside ``out_dir`` and renamed
    into place whole. An existing key folder (even half a pair) raises :class:`FileExistsError`
    unless ``overwrite``, since reports signed with the old key would no longer verify with the
    new public key; a folder holding anything but gate keys is never replaced.
    """
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    try:
        stage = StagedOutput(out_dir, KEYS, overwrite=overwrite)
    except OutputExistsError:
        existing = [str(p) for p in (private_path, public_path) if p.exists() or p.is_symlink()]
        verb = "exists" if len(existing) == 1 else "exist"
        raise OutputExistsError(
            f"{' and '.join(existing)} already {verb}; refusing to replace the gate keys, since reports "
            "signed with the old key would no longer verify with the new public key. Choose another "
            "folder, or replace them with --overwrite (overwrite=True)"
        ) from None
    except OutputError as e:
        raise OutputError(f"gate keys: {e}") from None
    with stage as tmp:
        key = Ed25519PrivateKey.generate()
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # A fresh file created 0600 in a fresh folder: the key is never readable by others, not even
        # for a moment, and never written through a link (O_EXCL).
        fd = os.open(tmp / PRIVATE_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        os.chmod(tmp / PRIVATE_KEY_FILE, 0o600)  # the umask can only remove bits; this states the intent
        (tmp / PUBLIC_KEY_FILE).write_bytes(public_pem)
        load_private_key(tmp / PRIVATE_KEY_FILE)  # read back before publishing
    return private_path, public_path


def sign_report(report: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``report`` with ``signature`` = {algorithm, key_id, value (base64)} over
    :func:`canonical_bytes`. An existing signature is replaced; ``report`` is not modified."""
    value = private_key.sign(canonical_bytes(report))
    # A deep, plain-JSON copy (key order kept for readable files): later edits of the caller's dicts
    # cannot alter the signed copy, and what is returned is exactly what was signed.
    body = {k: v for k, v in report.items() if k != "signature"}
    signed: dict[str, Any] = json.loads(json.dumps(body, allow_nan=False))
    signed["signature"] = {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "value": base64.b64encode(value).decode("ascii"),
    }
    return signed


def allowed_policy_hashes(
    hashes: Iterable[str] = (), files: Iterable[Path | str] = (), env: Mapping[str, str] | None = None
) -> frozenset[str]:
    """The allow-list of policy hashes: ``hashes``, the lines of each file in ``files`` (``#``
    starts a comment) and the hashes in the environment variable ``ECGX_ALLOWED_POLICIES``
    (space or comma separated). When none of them gives a hash, the hash of this ecgx's default
    policy: a report gated under any other policy is then not accepted unless allowed explicitly.
    Raises :class:`SigningError` for a value that is not a SHA-256, naming where it came from."""
    found: list[tuple[str, str]] = [(h, "--allowed-policy") for h in hashes]
    for f in files:
        path = Path(f)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SigningError(
                f"allowed policies file {path} cannot be read: {getattr(e, 'strerror', e)}"
            ) from None
        for n, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if text:
                found.append((text, f"{path} line {n}"))
    text = (os.environ if env is None else env).get(ALLOWED_POLICIES_ENV, "")
    found += [(h, ALLOWED_POLICIES_ENV) for h in text.replace(",", " ").split()]
    out = set()
    for value, where in found:
        if len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value):
            raise SigningError(
                f"{where}: {value!r} is not a policy hash (64 hex digits, as in a report's policy.sha256)"
            )
        out.add(value.lower())
    if not out:
        out.add(default_policy().sha256)
    return frozenset(out)
