"""``ecgx attribute --out FOLDER``: attributions of a dataset range as sharded Parquet, resumable,
computed here or on a Ray cluster with the same numbers.

Layout of the output folder (read it with ``pandas.read_parquet(folder)``,
``polars.read_parquet(f"{folder}/*.parquet")`` or DuckDB's ``read_parquet('folder/*.parquet')``;
files starting with ``_`` or ``.`` are not data, and pyarrow/pandas skip them):

- ``shard-000000.parquet``, ... one per shard of ``shard_size`` consecutive beats, one row per
  ECG: ``index`` (int64, the beat's row in the dataset), ``record_id`` / ``patient_id`` (text,
  null when the dataset does not say), ``target`` (int32 class index) and ``target_key``,
  ``method``, ``package_sha256``, and ``attribution``: a fixed-size list of
  ``leads x samples`` float32 in row-major order (lead by lead); the shape is in the manifest and
  in each file's schema metadata (``ecgx.shape``). ``np.stack(df.attribution).reshape(-1, 12, 600)``
  gives the array back.
- ``_attributions.json``: the run (method, settings, run seed, target, beat range, shard size,
  package hash, data source), its shards and counts, and ``complete``.

Shards are written atomically (a hidden temporary beside the shard, then a rename), so an
interrupted run leaves only finished shards; ``resume`` computes the missing ones after
checking that the run is the same (:func:`check_resume`).

Seeds: a stochastic method draws its noise per call, in row order (``default_rng(seed)``), so the
unit of work must be fixed: one shard is one engine call, with the seed
``SeedSequence([run_seed, shard_index]).generate_state(1)[0]`` (:func:`shard_seed`). Shard
boundaries depend only on the beat range and ``shard_size``, never on the workers, so a run
here, on Ray or resumed gives the same numbers bit for bit. A stochastic run without a seed
draws a run seed once and records it in the manifest.

Ray (``backend="ray"``) is the gate's backend, :mod:`ecgx.validation.ray_backend`, imported
only inside :func:`_ray_results`: without ``--ray`` nothing here imports Ray.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecgx.core.dataset import PATIENT_IDS, RECORD_IDS, default_meta, load_dataset
from ecgx.core.errors import EcgxError, FailedPrecondition, InvalidArgument
from ecgx.core.outputs import (
    ATTRIBUTION_SHARDS,
    TMP_SUFFIX,
    StagedOutput,
    check_output,
    classify_output,
    temporary_sibling,
    write_text_atomic,
)
from ecgx.core.package_reader import ModelPackage, load_package
from ecgx.core.progress import progress_bar
from ecgx.service.engine import AttributionEngine

log = logging.getLogger(__name__)

SCHEMA = "ecgx-attributions"
FORMAT_VERSION = 1
MANIFEST = "_attributions.json"  # "_": pyarrow's and pandas' folder readers skip it
DEFAULT_SHARD_SIZE = 256
_SHARD_NAME = "shard-{:06d}.parquet"
# Shards handed to the Ray backend per worker at a time: enough to keep every worker busy, few
# enough that the driver writes shards as the run goes (and holds only their results).
SHARDS_PER_WORKER = 4
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# What must match for --resume to add shards to an existing folder.
_IDENTITY = ("method", "params", "seed", "target", "start", "stop", "shard_size", "package_sha256", "data")


def shard_seed(run_seed: int, index: int) -> int:
    """The seed of shard ``index`` of a run seeded ``run_seed`` (same here and on every worker)."""
    return int(np.random.SeedSequence([run_seed, index]).generate_state(1)[0])


@dataclass(frozen=True)
class Shard:
    """Beats ``start..stop-1`` of the dataset, computed in one engine call."""

    index: int
    start: int
    stop: int
    seed: int | None  # the method's seed for this shard; None for deterministic methods

    @property
    def name(self) -> str:
        return _SHARD_NAME.format(self.index)

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class RunSpec:
    """One sharded attribution run: what decides its numbers, recorded in the manifest."""

    method: str
    params: dict[str, Any]  # the method's settings, without ``seed``
    seed: int | None  # run seed of a stochastic method, None otherwise
    target: str | None
    start: int
    stop: int
    shard_size: int
    package: str
    package_sha256: str
    data: str  # a local path (absolute) or a URI

    def shards(self) -> list[Shard]:
        bounds = range(self.start, self.stop, self.shard_size)
        return [
            Shard(
                i,
                a,
                min(a + self.shard_size, self.stop),
                None if self.seed is None else shard_seed(self.seed, i),
            )
            for i, a in enumerate(bounds)
        ]

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _IDENTITY}

    def call_params(self, shard: Shard) -> dict[str, Any]:
        return self.params if shard.seed is None else {**self.params, "seed": shard.seed}


@dataclass(frozen=True)
class ShardResult:
    """What a worker sends back for one shard."""

    index: int
    targets: np.ndarray  # (rows,) int64
    attributions: np.ndarray  # (rows, leads, samples) float32


# ---------------------------------------------------------------------- datasets: paths and URIs


@dataclass
class DataSource:
    """The beats of a dataset folder at a local/shared path or a URI pyarrow reads (``file://``,
    ``s3://``, ``gs://``, ``hdfs://``, ...): its size and ids, and beats read by range."""

    location: str
    n: int
    reader: RangeReader = field(repr=False)  # picklable: workers read their shards themselves
    record_ids: list[str] | None = field(default=None, repr=False)  # one per beat, if the data says
    patient_ids: list[str] | None = field(default=None, repr=False)


def is_uri(data: str) -> bool:
    return _URI.match(data) is not None


def open_source(data: str) -> DataSource:
    """Open ``data`` (a dataset folder path or URI); bad input is an InvalidArgument naming it."""
    if not is_uri(data):
        ds = load_dataset(data)  # every check of a dataset folder
        path = Path(data).resolve()
        return DataSource(str(path), len(ds), _open_uri(path.as_uri()).reader, ds.record_ids, ds.patient_ids)
    return _open_uri(data)


def _open_uri(uri: str) -> DataSource:
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        scheme = _URI.match(uri).group(1)  # type: ignore[union-attr]
        raise InvalidArgument(
            f"--data {uri}: cannot read {scheme}:// URIs ({e}); give a dataset folder path or a URI "
            "pyarrow reads (file://, s3://, gs://, hdfs://)"
        ) from None
    root = root.rstrip("/")
    try:
        with fs.open_input_stream(f"{root}/meta.json") as f:
            meta = json.loads(f.read())
        header = _npy_header(fs, f"{root}/signals.npy")
    except (OSError, ValueError, pa.ArrowException) as e:
        raise InvalidArgument(f"--data {uri} is not a readable dataset folder: {e}") from None
    _check_meta(uri, meta, header[1])
    n = header[1][0]
    return DataSource(uri, n, RangeReader(uri, header), _ids(meta, RECORD_IDS, n), _ids(meta, PATIENT_IDS, n))


def _ids(meta: dict[str, Any], key: str, n: int) -> list[str] | None:
    """``ecgx.core.dataset.Dataset.record_ids`` / ``patient_ids`` of a folder read from a URI."""
    ids = meta.get(key)
    if ids is None and key == RECORD_IDS:  # datasets from before record_ids: the WFDB import's list
        records = meta.get("records")
        ids = records if isinstance(records, list) and len(records) == n else None
    if ids is not None and (not isinstance(ids, list) or len(ids) != n):
        raise InvalidArgument(f"meta.json: {key} must be a list of one id per beat ({n})")
    return None if ids is None else [str(i) for i in ids]


def _npy_header(fs: Any, path: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of a C-order .npy file, from its first bytes only."""
    with fs.open_input_file(path) as f:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if fortran:
        raise ValueError(f"{path} is in Fortran order; datasets are written in C order")
    return offset, tuple(shape), dtype


def _check_meta(uri: str, meta: Any, shape: tuple[int, ...]) -> None:
    """The checks ``ecgx.core.dataset.load_dataset`` makes of a folder that can be made without
    reading every value (those are checked per shard by the engine)."""
    want = default_meta("")
    if not isinstance(meta, dict) or any(meta.get(k) != want[k] for k in ("leads", "sampling_rate_hz")):
        raise InvalidArgument(f"--data {uri}: meta.json is not the meta of an ecgx dataset folder")
    codes = [c.get("code") for c in meta.get("classes", []) if isinstance(c, dict)]
    if codes != [c["code"] for c in want["classes"]]:
        raise InvalidArgument(f"--data {uri}: meta.json's classes are not ecgx's classes in order")
    if len(shape) != 3 or shape[1:] != (len(want["leads"]), want["beat_samples"]):
        raise InvalidArgument(f"--data {uri}: signals.npy has shape {shape}, expected (N, 12, 600)")


class RangeReader:
    """Reads beats ``start..stop-1`` of a remote signals.npy with one ranged read (picklable:
    each Ray worker opens the file system itself)."""

    def __init__(self, uri: str, header: tuple[int, tuple[int, ...], np.dtype]):
        self.uri, (self.offset, self.shape, self.dtype) = uri, header

    def __call__(self, start: int, stop: int) -> np.ndarray:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(self.uri)
        beat = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with fs.open_input_file(f"{root.rstrip('/')}/signals.npy") as f:
            data = f.read_at((stop - start) * beat, self.offset + start * beat)
        x = np.frombuffer(data, dtype=self.dtype).reshape(stop - start, *self.shape[1:])
        return x.astype(np.float32)


# ---------------------------------------------------------------------- the work of one shard


def compute_shard(engine: Any, spec: RunSpec, reader: RangeReader, shard: Shard) -> ShardResult:
    """One shard: its beats read where this runs, one engine call (the unit the seeds are drawn per).
    The same function runs here and, pickled with the engine as a reference, on a Ray worker."""
    x = reader(shard.start, shard.stop)
    targets = engine.resolve_target(spec.target, engine.check_inputs(x))
    maps = engine.attribute(spec.method, x, targets, **spec.call_params(shard))
    return ShardResult(shard.index, np.asarray(targets, dtype=np.int64), maps)


# ---------------------------------------------------------------------- Parquet shards


def _table(
    spec: RunSpec, source: DataSource, class_keys: list[str], shard: Shard, result: ShardResult
) -> Any:
    import pyarrow as pa

    rows, size = shard.rows, int(np.prod(result.attributions.shape[1:]))
    flat = pa.array(np.ascontiguousarray(result.attributions, dtype=np.float32).reshape(-1))
    columns = {
        "index": pa.array(np.arange(shard.start, shard.stop, dtype=np.int64)),
        "record_id": pa.array(_slice(source.record_ids, shard, rows), pa.string()),
        "patient_id": pa.array(_slice(source.patient_ids, shard, rows), pa.string()),
        "target": pa.array(result.targets.astype(np.int32)),
        "target_key": pa.array([class_keys[t] for t in result.targets], pa.string()),
        "method": pa.array([spec.method] * rows, pa.string()),
        "package_sha256": pa.array([spec.package_sha256] * rows, pa.string()),
        "attribution": pa.FixedSizeListArray.from_arrays(flat, size),
    }
    meta = {"ecgx.shape": json.dumps(list(result.attributions.shape[1:])), "ecgx.shard": str(shard.index)}
    return pa.table(columns).replace_schema_metadata({**meta, "ecgx.run": _run_id(spec)})


def _slice(ids: list[str] | None, shard: Shard, rows: int) -> list[str | None]:
    return [None] * rows if ids is None else ids[shard.start : shard.stop]


def _run_id(spec: RunSpec) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(spec.identity(), sort_keys=True).encode()).hexdigest()


def _write_shard(folder: Path, shard: Shard, table: Any) -> None:
    """Temporary sibling, read back, rename: a shard file is complete or absent."""
    import pyarrow.parquet as pq

    out = folder / shard.name
    tmp = temporary_sibling(out, folder=False)
    try:
        pq.write_table(table, tmp)
        if pq.read_metadata(tmp).num_rows != shard.rows:
            raise OSError(f"{out}: the written shard does not read back")
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finished(folder: Path, spec: RunSpec, shard: Shard) -> bool:
    """A shard file of this run with all its rows (anything else is computed again)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(folder / shard.name)
    except (OSError, ValueError, Exception):  # pyarrow raises ArrowInvalid for a torn file
        return False
    tags = meta.metadata or {}
    return meta.num_rows == shard.rows and tags.get(b"ecgx.run") == _run_id(spec).encode()


@dataclass(frozen=True)
class Attributions:
    """A sharded output read back, rows in beat order."""

    index: np.ndarray  # (N,) int64
    record_id: list[str | None]
    target: np.ndarray  # (N,) int32
    attributions: np.ndarray  # (N, leads, samples) float32
    manifest: dict[str, Any]


def read_attributions(folder: Path | str) -> Attributions:
    """The rows of a sharded attribution folder, in beat order, with the run's manifest."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    table = pq.read_table(folder).sort_by("index")
    shape = manifest["shape"]
    flat = table.column("attribution").combine_chunks().flatten().to_numpy()
    return Attributions(
        index=table.column("index").to_numpy(),
        record_id=table.column("record_id").to_pylist(),
        target=table.column("target").to_numpy(),
        attributions=flat.reshape(-1, *shape),
        manifest=manifest,
    )


# ---------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Backend:
    """Where shards are computed: ``local`` (this process) or ``ray`` at ``address``
    (``auto``, ``local`` for a cluster of this machine only, or ``host:port`` / ``ray://...``)."""

    kind: str = "local"
    address: str | None = None
    workers: int | None = None  # Ray actors; default one per CPU of the cluster


def make_spec(
    *,
    package: Path,
    data: str,
    method: str,
    params: dict[str, Any],
    target: str | None,
    start: int,
    count: int | None,
    shard_size: int,
) -> tuple[RunSpec, DataSource]:
    """The run's spec, checked before any model pass (settings, target, range, shard size)."""
    from ecgx.service.methods import check_available, get_method

    if shard_size < 1:
        raise InvalidArgument(f"--shard-size must be a positive integer, got {shard_size}")
    source = open_source(data)
    stop = source.n if count is None else start + count
    if not 0 <= start < source.n or stop > source.n or stop <= start:
        raise InvalidArgument(
            f"--start/--count select beats {start}..{stop - 1}, but {data} holds {source.n}"
        )
    params = dict(params)
    seed = params.pop("seed", None)
    impl, pkg = get_method(method), load_package(package)
    given = {**params, "seed": seed} if seed is not None else params  # a deterministic method refuses it
    check_available(pkg, method, given)
    passes = impl.check(source.reader(start, start + 1), **given)  # every setting, the seed's too
    _check_shard_cost(method, passes, min(shard_size, stop - start))
    if impl.stochastic and seed is None:
        seed = secrets.randbits(63)  # recorded in the manifest: the run can be resumed and repeated
    if target is not None:
        pkg.class_index(target)  # NotFound names the known classes
    spec = RunSpec(
        method,
        params,
        seed,
        target,
        start,
        stop,
        shard_size,
        str(Path(package).resolve()),
        pkg.manifest_sha256 or "",
        source.location,
    )
    return spec, source


def _check_shard_cost(method: str, passes: int, rows: int) -> None:
    """A shard is one engine call: it must fit the engine's per-call limits (``service.limits``)."""
    from ecgx.service import limits

    if rows > limits.MAX_REQUEST_ECGS or passes * rows > limits.MAX_REQUEST_ROWS:
        fit = max(1, min(limits.MAX_REQUEST_ECGS, limits.MAX_REQUEST_ROWS // passes))
        raise InvalidArgument(
            f"{method} with these settings needs {passes:,} model passes per ECG: a shard of {rows} ECGs is "
            f"over the engine's limits per call; use --shard-size {fit} or less"
        )


def run_sharded(
    spec: RunSpec,
    source: DataSource,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    backend: Backend = Backend(),
    providers: Sequence[str] | None = None,
    max_batch: int = 64,
    show_progress: bool = True,
    seed_given: bool = True,
) -> dict[str, Any]:
    """Compute the shards of ``spec`` missing in ``out`` and write them; returns the manifest."""
    if resume and overwrite:
        raise InvalidArgument("--resume adds to an existing output, --overwrite replaces it: choose one")
    state = classify_output(out, ATTRIBUTION_SHARDS)
    if state == "ours" and resume:
        spec = check_resume(out, spec, seed_given)
    elif state == "ours":
        check_output(out, ATTRIBUTION_SHARDS, overwrite=overwrite)
        with StagedOutput(out, ATTRIBUTION_SHARDS, overwrite=True) as tmp:  # old one kept until done
            return _run_into(Path(tmp), spec, source, backend, providers, max_batch, show_progress)
    return _run_into(out, spec, source, backend, providers, max_batch, show_progress)


def check_resume(out: Path, spec: RunSpec, seed_given: bool) -> RunSpec:
    """``spec`` as the run in ``out`` was started (its drawn seed adopted when none was given);
    FailedPrecondition naming each difference if it is another run."""
    try:
        old = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise FailedPrecondition(f"--resume: cannot read {out / MANIFEST}: {e}") from None
    if not seed_given and spec.seed is not None and old.get("seed") is not None:
        spec = RunSpec(**{**asdict(spec), "seed": old["seed"]})
    new = spec.identity()
    diff = [k for k in _IDENTITY if old.get(k) != new[k]]
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} there, {new[k]!r} now" for k in diff)
        raise FailedPrecondition(
            f"--resume: {out} holds another run ({shown}); resume with the same method, settings, seed, "
            "target, beats, shard size, package and data, or write to another --out"
        )
    return spec


def _run_into(
    folder: Path,
    spec: RunSpec,
    source: DataSource,
    backend: Backend,
    providers: Sequence[str] | None,
    max_batch: int,
    show_progress: bool,
) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".*{TMP_SUFFIX}"):  # a shard being written when a run was killed
        stale.unlink(missing_ok=True)
    package = _load_same_package(spec)
    shards = spec.shards()
    todo = [s for s in shards if not _finished(folder, spec, s)]
    manifest = _manifest(spec, package, shards, done=len(shards) - len(todo), backend=backend)
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if todo:
        log.info("%d of %d shard(s) to compute (%d ECGs)", len(todo), len(shards), sum(s.rows for s in todo))
    by_index = {s.index: s for s in todo}
    bar = progress_bar(
        total=sum(s.rows for s in todo), desc=f"attribute {spec.method}", unit="ECG", enabled=show_progress
    )
    with bar:
        if todo:
            engine = AttributionEngine(package, providers=providers, max_batch=max_batch)
            for result in _results(spec, todo, backend, engine, source.reader, bar):
                shard = by_index[result.index]
                _write_shard(folder, shard, _table(spec, source, package.class_keys, shard, result))
    manifest = _manifest(spec, package, shards, done=len(shards), backend=backend)
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _manifest(
    spec: RunSpec, package: ModelPackage, shards: list[Shard], done: int, backend: Backend
) -> dict[str, Any]:
    from ecgx.core.schema import BEAT_SAMPLES, N_LEADS

    return {
        "schema": SCHEMA,
        "format_version": FORMAT_VERSION,
        **spec.identity(),
        "package": spec.package,
        # Packages carry no version of their own: what the manifest says about where one came from.
        "package_info": {k: package.manifest.get(k) for k in ("format_version", "ecgx_version", "created")},
        "seed_rule": "shard i uses numpy SeedSequence([seed, i]).generate_state(1)[0]"
        if spec.seed is not None
        else None,
        "shape": [N_LEADS, BEAT_SAMPLES],
        "columns": [
            "index",
            "record_id",
            "patient_id",
            "target",
            "target_key",
            "method",
            "package_sha256",
            "attribution",
        ],
        "backend": {"kind": backend.kind, "address": backend.address, "workers": backend.workers},
        "shards": [{"name": s.name, "start": s.start, "stop": s.stop} for s in shards],
        "counts": {"shards": len(shards), "shards_done": done, "ecgs": spec.stop - spec.start},
        "complete": done == len(shards),
    }


def _load_same_package(spec: RunSpec) -> ModelPackage:
    package = load_package(spec.package)  # every file's hash checked against the manifest
    if package.manifest_sha256 != spec.package_sha256:
        raise FailedPrecondition(
            f"package {spec.package} changed during the run (manifest SHA-256 {package.manifest_sha256}, "
            f"the run's is {spec.package_sha256})"
        )
    return package


def _results(
    spec: RunSpec, todo: list[Shard], backend: Backend, engine: Any, reader: RangeReader, bar: Any
) -> Iterator[ShardResult]:
    """Each shard's result, the bar advanced as each finishes."""
    if backend.kind == "ray":
        yield from _ray_results(spec, todo, backend, engine, reader, bar)
        return
    for shard in todo:
        yield compute_shard(engine, spec, reader, shard)
        bar.update(shard.rows)


def _ray_results(
    spec: RunSpec, todo: list[Shard], backend: Backend, engine: Any, reader: RangeReader, bar: Any
) -> Iterator[ShardResult]:
    """Shards as calls on the gate's Ray backend (:mod:`ecgx.validation.ray_backend`: the package
    shipped to long-lived actors that verify its hashes and hold its engine; a killed worker's
    calls retried), a few per worker at a time so the driver writes shards as the run goes and
    holds only those results. A shard's numbers do not depend on the worker that computes it."""
    from ecgx.validation.ray_backend import connect

    with connect(backend.address or "local", [engine.package], backend.workers) as ray_backend:
        # The actors rebuild only engines the backend made: the driver's own would keep every
        # shard on the driver.
        engine = ray_backend.engine(
            engine.package,
            providers=engine.providers,
            threads=engine.threads,
            parameters=None,
            max_request_ecgs=engine.max_request_ecgs,
            max_request_rows=engine.max_request_rows,
            max_batch=engine.max_batch,
        )
        step = ray_backend.workers * SHARDS_PER_WORKER
        for i in range(0, len(todo), step):
            chunk = todo[i : i + step]
            calls = [functools.partial(compute_shard, engine, spec, reader, s) for s in chunk]
            # map calls on_done once per call, in the calls' order
            on_done = functools.partial(_advance, bar, iter([s.rows for s in chunk]))
            try:
                results = ray_backend.map(calls, on_done, driver_ok=False)
            except Exception as e:
                raise _worker_error(e) from None
            yield from results


def _advance(bar: Any, rows: Iterator[int]) -> None:
    bar.update(next(rows))


def _worker_error(e: Exception) -> Exception:
    """The EcgxError a worker raised (a bad ECG, a setting over a limit), as itself; else ``e``."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, EcgxError) else e
