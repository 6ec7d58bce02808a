"""The model repository: gated, signed model versions on disk, verified at load, hot reloaded.

Layout (as on Triton)::

    <root>/<model>/<version>/manifest.json, weights.bin, *.onnx, gate.json [, REVOKED]

Model and version names are plain names (letters, digits, ``.``, ``_``, ``-``; not starting with
a dot). Entries whose name starts with a dot are never read: ``ecgx repo add`` builds a version in
such a hidden temporary sibling and renames it into place when complete. Other entries that are
not plain names, and files among the model or version folders, are skipped (logged once).

Version order: versions that are integers (``1``, ``2``, ``10``) sort numerically and come
first; any other names sort by name after them. "Newest" means last in that order; the default
version of a model is the newest one whose gate passed and that serves.

At load, every version is verified before it can serve:

- ``ecgx.core.package_reader.load_package``: manifest structure, the SHA-256 of every file, the weights
  and graphs; the engine is built from exactly the bytes that were verified.
- ``gate.json``: its Ed25519 signature by one of the trusted public keys (any one may sign), its
  schema, and that its ``package.files`` names exactly the files of the loaded manifest with
  their hashes and the hash of the manifest bytes that were loaded (not a second read from disk).
  The folder may hold nothing else but ``gate.json`` and a ``REVOKED`` file.
- the gate verdict is ``pass`` (a failed gate serves only in research mode, ``allow_ungated``);
- the report is not a research report (``ecgx validate --research``: a policy below the floor;
  such a report serves only in research mode, like a failed gate);
- the report's policy hash (``policy.sha256``) is on the allow-list, when one is configured;
- the report's optional ``expires`` (ISO-8601 with a UTC offset, e.g. ``2027-01-01T00:00:00Z``;
  signed with the rest of the report) has not passed;
- the version folder holds no ``REVOKED`` file (its first line, if any, is shown as the reason).

A version that fails any of these does not serve: it is listed with ``refusal`` saying why (also
logged). Expiry and revocation are re-evaluated at every reload, so an expired or revoked version
stops serving at the next reload (``start_watching`` rescans every ``interval_s``).

Listeners (``add_listener``; the metrics) are told, after each reload, which versions started
serving, were refused (and why) or were removed, and whether the reload itself succeeded
(:class:`RepositoryEvent`); :func:`refusal_category` sorts refusal texts into a few fixed
categories for metric labels.

A version folder that changes (a copy in progress, a file replaced) is verified again at the next
reload: a half-copied version is refused only until its files are complete, never marked bad for
good. A version whose folder did not change is not verified nor rebuilt again: its engine is
reused. Each reload builds a new immutable snapshot and swaps it in with one assignment, so
readers never see half a reload; a reload that fails (the repository folder cannot be read)
keeps the versions that were serving.

No PyTorch here: this is the serving path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ecgx.core.errors import FailedPrecondition, InvalidArgument, NotFound
from ecgx.core.package_reader import MANIFEST_FILE, ModelPackage, PackageError, is_plain_name, load_package
from ecgx.core.signing import (
    GATE_REPORT_FILE,
    REPORT_SCHEMA,
    SUPPORTED_SCHEMA_VERSIONS,
    SigningError,
    key_id,
    verify_signature,
)
from ecgx.service.engine import AttributionEngine
from ecgx.service.methods import get_method
from ecgx.service.methods.base import DIRECTIONS

log = logging.getLogger(__name__)

REVOKED_FILE = "REVOKED"
EXPIRES_FIELD = "expires"
NOT_CHECKED = "not checked"


class RepositoryError(InvalidArgument):
    """The repository folder cannot be used (missing, not a folder, unreadable)."""


class PromotionRefused(FailedPrecondition):
    """``promote`` refused a package: its gate report does not verify, failed, or is not allowed.

    Not a ValueError: the command line tells it apart from bad input (exit 1, not 2)."""


# ------------------------------------------------------------------------------------ data classes


@dataclass(frozen=True)
class CheckResult:
    check: str
    score: float | None
    threshold: float | None
    verdict: str
    blocking: bool
    summary: str


@dataclass(frozen=True)
class MethodGate:
    """The gate's verdict on one method for one version."""

    method: str
    servable: bool
    verdict: str  # "pass" | "fail" | "not checked"
    checks: tuple[CheckResult, ...]
    ungated: bool = False  # served only because of research mode (allow_ungated)
    # The settings the gate checked the method with (never None once built by method_gate).
    settings: MethodSettings | None = field(default=None, compare=False)


# Directions a policy may declare safe for a setting (validation's [serving.may_differ]).
MAY_DIFFER = DIRECTIONS


@dataclass(frozen=True)
class MethodSettings:
    """The settings a gate verdict covers: ``checked`` (every public parameter as the gate ran the
    method, "seed" of stochastic methods left out) and ``may_differ`` (parameter -> "any",
    "at_least" or "at_most": how a served value may differ from the checked one). The serving
    core's ``settings_violation`` enforces them."""

    checked: dict[str, Any]
    may_differ: dict[str, str]


def method_settings(method: str, entry: Any) -> MethodSettings:
    """The settings of a report's method entry; a report signed before settings were recorded
    (or without a usable entry) covers the method's defaults, with only "seed" free."""
    try:
        impl = get_method(method)
    except NotFound:  # a user method: it is never served, so nothing to cover
        return MethodSettings({}, {})
    defaults = {k: v for k, v in impl.parameters().items() if k != "seed"}
    recorded = entry.get("settings") if isinstance(entry, Mapping) else None
    if not isinstance(recorded, Mapping) or not isinstance(recorded.get("checked"), Mapping):
        return MethodSettings(defaults, {"seed": "any"} if impl.stochastic else {})
    may_differ = recorded.get("may_differ")
    # A direction this server does not know is not trusted: such a setting must equal the checked one.
    pairs = may_differ.items() if isinstance(may_differ, Mapping) else ()
    free = {str(k): v for k, v in pairs if v in MAY_DIFFER}
    if impl.stochastic:
        free["seed"] = "any"
    return MethodSettings(dict(recorded["checked"]), free)


@dataclass(frozen=True)
class ServedVersion:
    model: str
    version: str
    path: Path
    engine: AttributionEngine | None  # None when the version does not serve
    refusal: str | None  # why it does not serve
    package_sha256: str | None  # SHA-256 of manifest.json as loaded
    report: dict | None  # the verified gate report (None when it is missing or does not verify)
    report_bytes: bytes | None
    report_sha256: str | None
    policy_sha256: str | None
    allow_ungated: bool = False
    expires: datetime | None = None
    package: ModelPackage | None = field(default=None, repr=False, compare=False)

    @property
    def servable(self) -> bool:
        return self.engine is not None and self.refusal is None

    @property
    def gate_verdict(self) -> str | None:
        """The verified report's verdict ("pass" or "fail"), None without a verified report."""
        return None if self.report is None else self.report.get("verdict")

    @property
    def gate_passed(self) -> bool:
        """The gate passed and its report may serve (a research report never does)."""
        return self.gate_verdict == "pass" and not is_research(self.report)

    @property
    def ungated(self) -> bool:
        """Serving although its gate failed (research mode)."""
        return self.servable and not self.gate_passed

    def unavailable_reason(self, method: str) -> str | None:
        """Why the package cannot run ``method`` (a graph the export left out), or None."""
        if self.package is not None:
            from ecgx.service.methods import unavailable_reason

            try:
                return unavailable_reason(self.package, method)
            except ValueError:  # an unknown method name: not this question
                return None
        why = ((self.report or {}).get("unavailable") or {}).get(method)
        return str(why) if why else None

    def method_gate(self, method: str) -> MethodGate:
        """What the gate said about ``method`` on this version, and whether it may be served:
        when the report lists it under ``serve`` (or, in research mode, any method, marked
        ``ungated``), and only while the version itself serves."""
        entry = (self.report or {}).get("methods", {}).get(method)
        checks: tuple[CheckResult, ...] = ()
        verdict = NOT_CHECKED
        if isinstance(entry, Mapping):
            verdict = entry.get("verdict") if entry.get("verdict") in ("pass", "fail") else NOT_CHECKED
            checks = tuple(
                CheckResult(
                    check=name,
                    score=_number(c.get("score")),
                    threshold=_number(c.get("threshold")),
                    verdict=str(c.get("verdict")),
                    blocking=bool(c.get("blocking")),
                    summary=str(c.get("summary", "")),
                )
                for name, c in (entry.get("checks") or {}).items()
                if isinstance(c, Mapping)
            )
        settings = method_settings(method, entry)
        if self.unavailable_reason(method) is not None:  # not even research mode serves it
            return MethodGate(method, False, verdict, checks, settings=settings)
        gated = self.servable and self.gate_passed and method in (self.report or {}).get("serve", [])
        if gated:
            return MethodGate(method, True, verdict, checks, settings=settings)
        if self.servable and self.allow_ungated:
            return MethodGate(method, True, verdict, checks, ungated=True, settings=settings)
        return MethodGate(method, False, verdict, checks, settings=settings)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _now() -> datetime:
    """The time expiry is judged by (one place, so tests can move it)."""
    return datetime.now(UTC)


def version_sort_key(version: str) -> tuple[int, int, str]:
    """Integers numerically, first; other names by name, after them."""
    return (0, int(version), version) if version.isdigit() else (1, 0, version)


# ------------------------------------------------------------------------------------------ events

EVENT_LOADED = "loaded"  # a version serves with an engine it did not serve with before
EVENT_REFUSED = "refused"  # a version is new and does not serve, or its refusal changed
EVENT_REMOVED = "removed"  # a version folder is gone
EVENT_RELOADED = "reloaded"  # a reload swapped in a new snapshot
EVENT_RELOAD_FAILED = "reload_failed"  # a reload could not read the repository; versions stay


@dataclass(frozen=True)
class RepositoryEvent:
    """One change a reload made, as listeners see it (``reason``: the refusal or the error)."""

    kind: str
    model: str = ""
    version: str = ""
    reason: str = ""

    @property
    def category(self) -> str:
        """The refusal's category (:func:`refusal_category`); "" for other events."""
        return refusal_category(self.reason) if self.kind == EVENT_REFUSED else ""


RepositoryListener = Callable[[RepositoryEvent], None]

# Refusal texts by category, matched on how the text starts or, for the per-file integrity
# texts (which start with a file name), on a phrase inside it. One table beside the
# texts it sorts, so a new refusal text and its category are written together.
REFUSAL_CATEGORIES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("report_missing", (f"{GATE_REPORT_FILE} is missing",), ()),
    ("report_invalid", (f"{GATE_REPORT_FILE} ", "the gate report's expires"), ()),
    ("signature", ("the gate report is signed by a key", "the gate report does not verify"), ()),
    (
        "integrity",
        ("the package ", "the gate report records no package files", "the version folder cannot be listed"),
        ("after gating", "but not in its gate report", "which the package does not list"),
    ),
    ("policy", ("the gate report's policy",), ()),
    ("expired", ("the gate report expired",), ()),
    ("gate_failed", ("the gate failed",), ()),
    ("research_report", ("the gate report is a research report",), ()),
    ("revoked", ("revoked",), ()),
    ("engine_error", ("the engine cannot be built", "the engine was not built"), ()),
)
REFUSAL_OTHER = "other"


def refusal_category(refusal: str | None) -> str:
    """A refusal text's category: one of :data:`REFUSAL_CATEGORIES`' names, or "other"."""
    text = refusal or ""
    for category, prefixes, _ in REFUSAL_CATEGORIES:
        if text.startswith(prefixes):
            return category
    # Only then phrases: a gate's headline, say, may contain anything after its fixed prefix.
    for category, _, phrases in REFUSAL_CATEGORIES:
        if any(p in text for p in phrases):
            return category
    return REFUSAL_OTHER


def snapshot_changes(
    old: Mapping[str, Sequence[ServedVersion]], new: Mapping[str, Sequence[ServedVersion]]
) -> list[RepositoryEvent]:
    """The loaded, refused and removed events that take ``old`` to ``new``."""
    events = []
    for model, versions in new.items():
        before = {v.version: v for v in old.get(model, ())}
        for v in versions:
            was = before.get(v.version)
            if v.servable and (was is None or was.engine is not v.engine):
                events.append(RepositoryEvent(EVENT_LOADED, model, v.version))
            elif not v.servable and (was is None or was.servable or was.refusal != v.refusal):
                events.append(RepositoryEvent(EVENT_REFUSED, model, v.version, v.refusal or ""))
    for model, versions in old.items():
        now = {v.version for v in new.get(model, ())}
        events += [RepositoryEvent(EVENT_REMOVED, model, v.version) for v in versions if v.version not in now]
    return events


# ------------------------------------------------------------------------------------ verification


@dataclass(frozen=True)
class Verified:
    """What :func:`verify_version` found: the package and report when they verify, else a problem."""

    package: ModelPackage | None
    report: dict | None
    report_bytes: bytes | None
    problem: str | None  # None: authentic, intact, and the report's gate covers these files

    @property
    def report_sha256(self) -> str | None:
        return None if self.report_bytes is None else hashlib.sha256(self.report_bytes).hexdigest()


def _read_regular(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read()


def verify_version(folder: Path, trusted_keys: Sequence[Ed25519PublicKey]) -> Verified:
    """Verify the package in ``folder`` against its ``gate.json``: the signature by one of
    ``trusted_keys``, the schema, the package (``load_package``), and that the report names
    exactly the files of the loaded manifest with their hashes and nothing else lies in the folder.
    The verdict, policy and expiry are the caller's to judge."""
    report_path = folder / GATE_REPORT_FILE
    if not report_path.exists() and not report_path.is_symlink():
        return Verified(None, None, None, f"{GATE_REPORT_FILE} is missing (not gated, or still being copied)")
    try:
        raw = _read_regular(report_path)
    except OSError as e:
        reason = "is a symbolic link" if report_path.is_symlink() else f"cannot be read ({e.strerror or e})"
        return Verified(None, None, None, f"{GATE_REPORT_FILE} {reason}")
    try:
        report = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return Verified(None, None, None, f"{GATE_REPORT_FILE} is not valid JSON ({e}); still being copied?")
    if not isinstance(report, dict):
        return Verified(None, None, None, f"{GATE_REPORT_FILE} is not a JSON object")
    problem = _signature_problem(report, trusted_keys)
    if problem:
        return Verified(None, None, raw, problem)
    if report.get("schema") != REPORT_SCHEMA or report.get("schema_version") not in SUPPORTED_SCHEMA_VERSIONS:
        return Verified(
            None,
            None,
            raw,
            f"{GATE_REPORT_FILE} is not a supported gate report (schema {report.get('schema')!r} "
            f"version {report.get('schema_version')!r})",
        )
    try:
        package = load_package(folder)
    except PackageError as e:
        return Verified(None, report, raw, f"the package does not verify: {e}")
    except OSError as e:
        return Verified(None, report, raw, f"the package cannot be read: {e}")
    problem = _files_problem(folder, package, report)
    return Verified(package if problem is None else None, report, raw, problem)


def _signature_problem(report: Mapping[str, Any], trusted_keys: Sequence[Ed25519PublicKey]) -> str | None:
    sig = report.get("signature")
    wanted = sig.get("key_id") if isinstance(sig, Mapping) else None
    keys = [k for k in trusted_keys if key_id(k) == wanted]
    if sig is not None and isinstance(wanted, str) and not keys:
        return (
            f"the gate report is signed by a key that is not trusted (key id {wanted[:12]}); "
            "configure its public key, or gate the package with a trusted key"
        )
    try:
        verify_signature(report, keys[0] if keys else trusted_keys[0])
    except SigningError as e:
        return f"the gate report does not verify: {e}"
    return None


def _files_problem(folder: Path, package: ModelPackage, report: Mapping[str, Any]) -> str | None:
    """The report must name exactly the loaded files with the loaded hashes, and the folder hold
    nothing else (but the report and a REVOKED file)."""
    rec = report.get("package")
    files = rec.get("files") if isinstance(rec, Mapping) else None
    if not isinstance(files, Mapping) or not files:
        return "the gate report records no package files (package.files), so it certifies nothing"
    expected = {name: entry["sha256"] for name, entry in package.manifest["files"].items()}
    expected[MANIFEST_FILE] = package.manifest_sha256
    for name in sorted(set(expected) | set(files)):
        if name not in files:
            return f"{name} is in the package but not in its gate report (added after gating)"
        if name not in expected:
            return f"the gate report names {name}, which the package does not list"
        if files[name] != expected[name]:
            return (
                f"{name} changed after gating (SHA-256 {str(expected[name])[:12]} != "
                f"{str(files[name])[:12]} in the gate report)"
            )
    allowed = set(files) | {GATE_REPORT_FILE, REVOKED_FILE}
    try:
        extra = sorted(e.name for e in os.scandir(folder) if e.name not in allowed)
    except OSError as e:
        return f"the version folder cannot be listed: {e.strerror or e}"
    if extra:
        return f"{', '.join(extra)} was added to the version folder after gating (not in the gate report)"
    return None


def parse_expiry(report: Mapping[str, Any]) -> tuple[datetime | None, str | None]:
    """The report's ``expires`` as an aware datetime, or a problem with it."""
    value = report.get(EXPIRES_FIELD)
    if value is None:
        return None, None
    if not isinstance(value, str):
        return None, f"the gate report's {EXPIRES_FIELD} is not an ISO-8601 text"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None, f"the gate report's {EXPIRES_FIELD} {value!r} is not an ISO-8601 timestamp"
    if when.tzinfo is None:
        return None, f"the gate report's {EXPIRES_FIELD} {value!r} has no UTC offset (write e.g. ...Z)"
    return when.astimezone(UTC), None


def check_policy_hashes(hashes: Collection[str] | None) -> frozenset[str] | None:
    """The allow-list as a set of lower-case hex SHA-256 digests; ValueError for anything else."""
    if hashes is None:
        return None
    if isinstance(hashes, str):
        hashes = [hashes]
    out = set()
    for h in hashes:
        if not isinstance(h, str) or len(h) != 64 or any(c not in "0123456789abcdefABCDEF" for c in h):
            raise InvalidArgument(
                f"allowed policy {h!r} is not a SHA-256 (64 hex digits, as in a report's policy.sha256)"
            )
        out.add(h.lower())
    return frozenset(out)


def policy_sha256(report: Mapping[str, Any] | None) -> str | None:
    pol = (report or {}).get("policy")
    value = pol.get("sha256") if isinstance(pol, Mapping) else None
    return value if isinstance(value, str) else None


def is_research(report: Mapping[str, Any] | None) -> bool:
    """A research report (``ecgx validate --research``): made under a policy that may be below the
    floor, marked not servable. Anything but an explicit ``false`` is not trusted to be servable."""
    return report is not None and report.get("research", False) is not False


def gate_problem(
    report: Mapping[str, Any],
    allowed_policies: Collection[str] | None,
    now: datetime,
    *,
    allow_ungated: bool = False,
) -> str | None:
    """Why an authentic report does not let its package serve (verdict, policy, expiry), or None."""
    if allowed_policies is not None and policy_sha256(report) not in allowed_policies:
        return (
            f"the gate report's policy (sha256 {str(policy_sha256(report))[:12]}) is not on the allow-list "
            "of policies; gate the package under an allowed policy"
        )
    expires, problem = parse_expiry(report)
    if problem:
        return problem
    if expires is not None and now >= expires:
        return f"the gate report expired at {expires.isoformat()}; gate the package again"
    if report.get("verdict") != "pass" and not allow_ungated:
        return f"the gate failed: {report.get('headline') or '; '.join(report.get('reasons') or [])}"
    if is_research(report) and not allow_ungated:
        return (
            "the gate report is a research report (ecgx validate --research), which is never served: "
            "gate the package again without --research, under a policy at or above the floor"
        )
    return None


def revocation(folder: Path) -> str | None:
    """The refusal for a revoked version (a REVOKED file in its folder), or None."""
    path = folder / REVOKED_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        first = _read_regular(path)[:500].decode("utf-8", "replace").strip().splitlines()
    except OSError:
        first = []
    return "revoked" + (f": {first[0].strip()}" if first and first[0].strip() else f" ({REVOKED_FILE} file)")


# -------------------------------------------------------------------------------------- repository


def _fingerprint(folder: Path) -> tuple:
    """What changes when anything in the folder changes (a copy in progress, a replaced file);
    the REVOKED file is left out (revocation is checked at every reload without a rebuild)."""
    st = os.stat(folder, follow_symlinks=False)
    entries = []
    with os.scandir(folder) as it:
        for e in it:
            if e.name == REVOKED_FILE:
                continue
            s = e.stat(follow_symlinks=False)
            # ctime too: an edit that keeps size and mtime (touch -r, a same-second rewrite) changes it.
            entries.append((e.name, s.st_mode, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino))
    return (st.st_ino, tuple(sorted(entries)))


@dataclass(frozen=True)
class _Loaded:
    """A version folder as verified at one fingerprint; reused while the folder is unchanged."""

    fingerprint: tuple
    verified: Verified
    engine: AttributionEngine | None
    build_problem: str | None


def _why_not_default(v: ServedVersion) -> str:
    if v.refusal:
        return v.refusal
    # Research mode serves a version whose gate failed, but never picks it by default.
    if is_research(v.report):
        return "its gate report is a research report; name the version to use it in research mode"
    return f"its gate verdict is {v.gate_verdict!r}; name the version to use it in research mode"


class ModelRepository:
    """Serves the verified versions under ``root``; see the module docstring for the rules.

    Args:
        trusted_keys: Ed25519 public keys; a report signed by any one of them is authentic.
        allowed_policies: SHA-256 hashes of the gate policies whose reports are accepted
            (None: any policy).
        allow_ungated: research mode: versions whose gate failed serve too, and every method is
            servable, marked ``ungated``.
        engine_options: keyword arguments for every :class:`AttributionEngine` (providers,
            threads, max_batch, ...).
    """

    def __init__(
        self,
        root: Path,
        trusted_keys: Sequence[Ed25519PublicKey],
        *,
        allowed_policies: Collection[str] | None = None,
        allow_ungated: bool = False,
        engine_options: dict | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {self.root} is not a folder")
        if not trusted_keys:
            raise RepositoryError("a model repository needs at least one trusted public key")
        self.trusted_keys = tuple(trusted_keys)
        self.allowed_policies = check_policy_hashes(allowed_policies)
        self.allow_ungated = allow_ungated
        self.engine_options = dict(engine_options or {})
        self.last_error: str | None = None
        self.generation = 0  # successful reloads so far (each swapped in a new snapshot)
        self._snapshot: dict[str, tuple[ServedVersion, ...]] = {}
        self._cache: dict[tuple[str, str], _Loaded] = {}
        self._skipped: set[str] = set()
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: tuple[RepositoryListener, ...] = ()
        self.reload()

    # ---------------------------------------------------------------- reading

    def models(self) -> list[str]:
        return sorted(self._snapshot)

    def versions(self, model: str) -> list[ServedVersion]:
        """Every version of ``model``, oldest first, serving or not."""
        snap = self._snapshot
        if model not in snap:
            raise NotFound(self._unknown_model(model, snap))
        return list(snap[model])

    def default_version(self, model: str) -> ServedVersion | None:
        """The newest version whose gate passed and that serves."""
        for v in reversed(self.versions(model)):
            if v.servable and v.gate_passed:
                return v
        return None

    def get(self, model: str, version: str | None = None) -> ServedVersion:
        """A serving version (the default when ``version`` is None); NotFound for an unknown
        model or version, FailedPrecondition (message: the refusal) for one that does not serve."""
        versions = self.versions(model)
        if version is None or version == "":
            v = self.default_version(model)
            if v is None:
                refused = "; ".join(f"version {x.version}: {_why_not_default(x)}" for x in versions)
                raise FailedPrecondition(
                    f"model {model!r} has no default version (the newest whose gate passed): "
                    f"{refused or 'it has no version'}"
                )
            return v
        for v in versions:
            if v.version == version:
                if not v.servable:
                    raise FailedPrecondition(
                        f"model {model!r} version {version!r} does not serve: {v.refusal}"
                    )
                return v
        known = ", ".join(v.version for v in versions)
        raise NotFound(f"model {model!r} has no version {version!r}; it has {known or 'none'}")

    @staticmethod
    def _unknown_model(model: str, snap: Mapping[str, Any]) -> str:
        return f"unknown model {model!r}; the repository has {', '.join(sorted(snap)) or 'no model'}"

    # ---------------------------------------------------------------- loading

    def reload(self) -> None:
        """Rescan the repository and swap in the new set of versions. A failure to read the
        repository folder is logged and kept in ``last_error``; the serving versions stay."""
        with self._reload_lock:
            try:
                snapshot, cache = self._scan()
            except Exception as e:  # a failed reload must never take serving versions down
                self.last_error = f"reload of {self.root} failed, the serving versions stay: {e}"
                log.error("%s", self.last_error, exc_info=not isinstance(e, (OSError, RepositoryError)))
                self._tell([RepositoryEvent(EVENT_RELOAD_FAILED, reason=self.last_error)])
                return
            for model, versions in self._snapshot.items():
                gone = {v.version for v in versions} - {v.version for v in snapshot.get(model, ())}
                for name in sorted(gone, key=version_sort_key):
                    log.info("model %s version %s was removed", model, name)
            events = snapshot_changes(self._snapshot, snapshot)
            self._snapshot, self._cache, self.last_error = snapshot, cache, None
            self.generation += 1
            self._tell([*events, RepositoryEvent(EVENT_RELOADED)])

    # ---------------------------------------------------------------- listeners

    def add_listener(self, listener: RepositoryListener, *, replay: bool = True) -> None:
        """Call ``listener`` with every :class:`RepositoryEvent` of later reloads, in the reloading
        thread, after the new snapshot is in place. With ``replay``, it is first told about the
        versions there are now (loaded or refused), as if they had just been loaded.

        A listener must be quick and must not call :meth:`reload` (the reload lock is held);
        its exceptions are logged and ignored."""
        with self._reload_lock:
            self._listeners = (*self._listeners, listener)
            if replay:
                self._tell(snapshot_changes({}, self._snapshot), (listener,))

    def remove_listener(self, listener: RepositoryListener) -> None:
        with self._reload_lock:
            self._listeners = tuple(x for x in self._listeners if x is not listener)

    def _tell(
        self, events: Sequence[RepositoryEvent], listeners: Sequence[RepositoryListener] | None = None
    ) -> None:
        for listener in self._listeners if listeners is None else listeners:
            for event in events:
                try:
                    listener(event)
                except Exception:  # a listener (the metrics) must never fail a reload
                    log.exception("repository listener %r failed on %s", listener, event)

    def _scan(self) -> tuple[dict[str, tuple[ServedVersion, ...]], dict[tuple[str, str], _Loaded]]:
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {self.root} is not a folder (any more)")
        now = _now()
        snapshot: dict[str, tuple[ServedVersion, ...]] = {}
        cache: dict[tuple[str, str], _Loaded] = {}
        for model_dir in self._plain_dirs(self.root):
            versions = []
            for vdir in self._plain_dirs(model_dir):
                key = (model_dir.name, vdir.name)
                try:
                    fp = _fingerprint(vdir)
                except OSError as e:
                    log.warning("skipping %s: %s", vdir, e)
                    continue
                loaded = self._cache.get(key)
                if loaded is None or loaded.fingerprint != fp:
                    loaded = self._load(vdir, fp)
                cache[key] = loaded
                version = self._served(model_dir.name, vdir, loaded, now)
                self._log_change(version)
                versions.append(version)
            if versions:
                versions.sort(key=lambda v: version_sort_key(v.version))
                snapshot[model_dir.name] = tuple(versions)
        return snapshot, cache

    def _plain_dirs(self, folder: Path) -> list[Path]:
        out = []
        with os.scandir(folder) as it:  # OSError here is a failed reload (kept snapshot)
            for e in it:
                if e.name.startswith("."):
                    continue  # hidden: a version still being written by `ecgx repo add`, or not ours
                if not is_plain_name(e.name) or not e.is_dir(follow_symlinks=False):
                    where = str(Path(folder, e.name))
                    if where not in self._skipped:
                        self._skipped.add(where)
                        log.info("skipping %s: not a folder with a plain name", where)
                    continue
                out.append(Path(e.path))
        return out

    def _load(self, folder: Path, fingerprint: tuple) -> _Loaded:
        verified = verify_version(folder, self.trusted_keys)
        engine, problem = None, None
        if verified.problem is None and verified.package is not None:
            static = gate_problem(
                verified.report or {},
                self.allowed_policies,
                _now(),
                allow_ungated=self.allow_ungated,
            )
            # No engine for a version that can never serve (policy, failed gate); expiry is
            # re-checked at every reload, and an expired version needs no engine either.
            if static is None:
                try:
                    engine = self._build_engine(verified.package)
                except Exception as e:  # a bad graph refuses one version, not the reload
                    problem = f"the engine cannot be built: {str(e)[:500]}"
        return _Loaded(fingerprint, verified, engine, problem)

    def _log_change(self, v: ServedVersion) -> None:
        """Log a version that is new or whose state changed (not every scan)."""
        old = next((o for o in self._snapshot.get(v.model, ()) if o.version == v.version), None)
        if old is not None and old.refusal == v.refusal and old.servable == v.servable:
            return
        if v.servable:
            mark = " (UNGATED: research mode)" if v.ungated else ""
            log.info("model %s version %s serves%s", v.model, v.version, mark)
        else:
            log.warning("model %s version %s does not serve: %s", v.model, v.version, v.refusal)

    def _build_engine(self, package: ModelPackage) -> AttributionEngine:
        """An engine from the verified bytes, warmed up: every session created, one forward and
        one gradient pass on a zero ECG, so the first request is not the slow one."""
        engine = AttributionEngine(package, **self.engine_options)
        engine.warm_up()
        leads, samples = package.input_shape
        zero = np.zeros((1, leads, samples), np.float32)
        engine.logits(zero)
        if "gradient" in package.manifest["graphs"]:
            engine.backward("gradient", zero, np.zeros(1, np.int64))
        return engine

    def _served(self, model: str, folder: Path, loaded: _Loaded, now: datetime) -> ServedVersion:
        v = loaded.verified
        report = v.report  # set only when its signature by a trusted key verified
        refusal = v.problem or loaded.build_problem
        if refusal is None and report is not None:
            refusal = gate_problem(report, self.allowed_policies, now, allow_ungated=self.allow_ungated)
        if refusal is None:
            refusal = revocation(folder)
        if refusal is None and loaded.engine is None:
            refusal = "the engine was not built"  # an expired version that is no longer expired
        expires = parse_expiry(report)[0] if report is not None else None
        return ServedVersion(
            model=model,
            version=folder.name,
            path=folder,
            engine=loaded.engine if refusal is None else None,
            refusal=refusal,
            package_sha256=v.package.manifest_sha256 if v.package is not None else None,
            report=report,
            report_bytes=v.report_bytes,
            report_sha256=v.report_sha256,
            policy_sha256=policy_sha256(report),
            allow_ungated=self.allow_ungated,
            expires=expires,
            package=v.package,
        )

    # ---------------------------------------------------------------- watching

    def start_watching(self, interval_s: float = 2.0) -> None:
        """Rescan every ``interval_s`` seconds in a daemon thread (until :meth:`stop`)."""
        if interval_s <= 0:
            raise InvalidArgument(f"interval_s must be positive, got {interval_s}")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.reload()
                except Exception:  # reload logs its own failures; never die
                    log.exception("model repository reload failed")

        self._thread = threading.Thread(target=loop, name="ecgx-repository-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop watching. A rescan in progress only reads, and the thread is a daemon: shutdown
        waits for it at most ``timeout_s`` (it must stay within its grace period)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None


def refusal_of_method(served: ServedVersion, gate: MethodGate) -> str:
    """Why the gate of ``served`` does not let ``gate.method`` serve: its failed checks (blocking
    first) with scores and thresholds. Both protocols (ecgx.v1, the OIP) refuse with this text."""
    where = (
        f"method {gate.method!r} did not pass the validation gate of {served.model} version {served.version}"
    )
    failed = sorted((c for c in gate.checks if c.verdict == "fail"), key=lambda c: not c.blocking)
    if failed:
        parts = [
            f"{c.check} score {_show(c.score)} vs threshold {_show(c.threshold)}"
            + (" (blocking)" if c.blocking else " (not blocking)")
            + (f": {c.summary}" if c.summary else "")
            for c in failed
        ]
        return f"{where}: failed {'; '.join(parts)}"
    report = served.report or {}
    unavailable = served.unavailable_reason(gate.method)
    if unavailable:  # the export could not build or check a graph it needs
        return f"{where}: the gate did not check it: {unavailable}"
    if gate.verdict == "not checked":
        return f"{where}: the gate did not check it"
    return f"{where}: verdict {gate.verdict!r}" + (
        f" (gate: {report.get('headline')})" if report.get("headline") else ""
    )


def _show(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


# ------------------------------------------------------------------------------------------ promotion


def next_version(model_dir: Path) -> str:
    """Max existing integer version + 1 (hidden entries ignored); "1" for a new model."""
    numbers = [0]
    if model_dir.is_dir():
        numbers += [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    return str(max(numbers) + 1)


def promote(
    package_dir: Path | str,
    repo: Path | str,
    model: str,
    version: str | None,
    trusted_keys: Sequence[Ed25519PublicKey],
    *,
    allowed_policies: Collection[str] | None = None,
) -> Path:
    """Copy a gated package into ``repo/model/version`` when its gate report verifies and passed
    (under an allowed policy, when a list is given, and not expired). Returns the version folder.

    The version is built in a hidden temporary sibling, verified there again, and renamed into
    place; an existing version is never replaced. Raises :class:`PromotionRefused` when the gate
    does not let the package serve, ValueError (or OSError) for bad input.
    """
    from ecgx.core.outputs import PACKAGE, OutputExistsError, StagedOutput

    package_dir, repo = Path(package_dir), Path(repo)
    allowed_policies = check_policy_hashes(allowed_policies)
    for what, name in (("model", model), ("version", version)):
        if name is not None and not is_plain_name(name):
            raise InvalidArgument(
                f"{what} name {name!r} is not a plain name (letters, digits, '.', '_', '-'; not starting "
                "with '.' or '-')"
            )
    if not package_dir.is_dir():
        raise InvalidArgument(f"package {package_dir} is not a folder")
    if repo.exists() and not repo.is_dir():
        raise InvalidArgument(f"repository {repo} is not a folder")
    if not (package_dir / MANIFEST_FILE).is_file():
        raise InvalidArgument(f"{package_dir} is not a model package: {MANIFEST_FILE} is missing")
    if not (package_dir / GATE_REPORT_FILE).exists():
        raise InvalidArgument(
            f"{package_dir} has no {GATE_REPORT_FILE}: gate it first (`ecgx validate PKG --data DIR`)"
        )
    verified = verify_version(package_dir, trusted_keys)
    if verified.problem:
        raise PromotionRefused(f"{package_dir} is not promoted: {verified.problem}")
    revoked = revocation(package_dir)
    if revoked:
        raise PromotionRefused(f"{package_dir} is not promoted: {revoked}")
    problem = gate_problem(verified.report or {}, allowed_policies, _now())
    if problem:
        raise PromotionRefused(f"{package_dir} is not promoted: {problem}")
    model_dir = repo / model
    version = version or next_version(model_dir)
    out = model_dir / version
    names = [*verified.report["package"]["files"], GATE_REPORT_FILE]  # type: ignore[index]
    try:
        stage = StagedOutput(out, PACKAGE, overwrite=False)
    except OutputExistsError:
        raise InvalidArgument(
            f"model {model!r} version {version!r} already exists in {repo}; never replaced"
        ) from None
    with stage as tmp:
        for name in names:
            shutil.copyfile(package_dir / name, tmp / name, follow_symlinks=False)
        again = verify_version(tmp, trusted_keys)  # the copy, read back before publishing
        if again.problem or again.report_sha256 != verified.report_sha256:
            raise PromotionRefused(f"{package_dir} changed while it was copied: {again.problem}")
    log.info("promoted %s as model %s version %s", package_dir, model, version)
    return out
