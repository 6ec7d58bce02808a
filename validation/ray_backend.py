"""The gate's work on a Ray cluster (issue 24): one place that runs the gate's calls remotely.

The gate's unit of work stays what it is locally: one call of one method (or one row's
perturbation curves) on one model and the whole set of ECGs, so every seed is drawn exactly as in
the local run (SmoothGrad's noise, KernelSHAP/LIME's samples and IG's baselines are drawn per call
from the method's seed; the randomised models from the policy's seed and the draw), never per
worker, and the numbers are the same bit for bit.

Each call is pickled on the driver with the engines, packages and large arrays it uses replaced by
references (pickle's persistent ids): an engine becomes (package hash, parameter overrides,
providers, threads), an array its object-store entry. Long-lived actors, one per worker CPU,
write every package to a node-local folder, verify each file's SHA-256 against the driver's
(refusing a different copy: :class:`FailedPrecondition` naming the file and both hashes), and
build each engine once. A call that cannot be pickled (the random control counts its calls; the
"other model" row keeps its engine) runs on the driver, in the order the gate makes it.

Ray is imported here only, and only when a run asks for it (``--ray``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import shutil
import tempfile
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ecgx.core.errors import FailedPrecondition, InvalidArgument
from ecgx.core.package_reader import ModelPackage, load_package
from ecgx.service.engine import AttributionEngine

log = logging.getLogger(__name__)

# Arrays at least this large travel through the object store once per batch of calls, not
# inside every call's pickle (the gate's ECGs go to every method).
BIG_ARRAY_BYTES = 1 << 20
# Engines an actor keeps (a randomisation run builds a few dozen models, used one step at a time).
ENGINE_CACHE = 8
# Ray restarts a killed actor and retries its calls (a call is deterministic, so a retry changes
# nothing).
MAX_RESTARTS = 4
MAX_TASK_RETRIES = 4
# What ``--ray local`` starts: small, the machine is shared.
LOCAL_OBJECT_STORE_BYTES = 300_000_000


def package_files(folder: Path) -> dict[str, bytes]:
    """Every file of a package folder by relative path (what the cluster receives)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def files_digest(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def package_key(hashes: dict[str, str]) -> str:
    """One hash naming a package's exact content (the node-local folder's name)."""
    return hashlib.sha256(repr(sorted(hashes.items())).encode()).hexdigest()[:32]


def verify_copy(folder: Path, expected: dict[str, str], node: str) -> None:
    """Refuse a node-local copy that differs from the driver's package in any file."""
    for name, want in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            raise FailedPrecondition(f"node {node}: the package copy {folder} lacks {name} (sha256 {want})")
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != want:
            raise FailedPrecondition(
                f"node {node}: package file {path} has sha256 {got}, the driver's package has {want}; "
                "refusing to compute on a different package"
            )


def materialise(files: dict[str, bytes], expected: dict[str, str], root: Path, node: str) -> Path:
    """The node-local copy of a package under ``root`` (written when absent), verified."""
    folder = root / package_key(expected)
    if not folder.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        try:
            staging.rename(folder)
        except OSError:  # another actor on this node won the race
            shutil.rmtree(staging, ignore_errors=True)
    verify_copy(folder, expected, node)
    return folder


@dataclass(frozen=True)
class _EngineSpec:
    """What an actor needs to build a driver's engine again (its token names the actor's copy)."""

    token: str
    package: str  # the shipped package's key
    parameters: dict[str, np.ndarray] | None  # weight overrides (randomised, changed copies)
    providers: Sequence[str] | None
    threads: int | None
    max_request_ecgs: int | None
    max_request_rows: int | None
    max_batch: int  # the most rows per ONNX Runtime run (the driver's --max-batch)


def _call_pickler(out: io.BytesIO, backend: RayBackend, arrays: list[np.ndarray]) -> pickle.Pickler:
    """A cloudpickle pickler (closures by value) with engines, packages and big arrays as references."""
    import cloudpickle

    class CallPickler(cloudpickle.CloudPickler):
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, AttributionEngine):
                return ("engine", *backend.engine_spec(obj))
            if isinstance(obj, ModelPackage):
                return ("package", backend.shipped_key(obj))
            if isinstance(obj, np.ndarray) and obj.nbytes >= BIG_ARRAY_BYTES and obj.dtype != object:
                arrays.append(obj)
                return ("array", len(arrays) - 1)
            return None

    return CallPickler(out, protocol=pickle.HIGHEST_PROTOCOL)


class _CallUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, worker: _Worker, arrays: Sequence[np.ndarray]):
        super().__init__(io.BytesIO(data))
        self.worker = worker
        self.arrays = arrays

    def persistent_load(self, pid: Any) -> Any:
        kind, *rest = pid
        if kind == "engine":
            return self.worker.engine(*rest)
        if kind == "package":
            return self.worker.packages[rest[0]]
        # Object-store arrays are read-only views; a method may write into its input.
        return np.array(self.arrays[rest[0]])


class _Worker:
    """What one actor holds: verified node-local packages and the engines built on them."""

    def __init__(self, shipped: dict[str, tuple[dict[str, str], dict[str, bytes]]], cache_root: str | None):
        node = os.uname().nodename
        root = Path(cache_root or Path(tempfile.gettempdir()) / "ecgx-ray-packages")
        root.mkdir(parents=True, exist_ok=True)
        self.engines: OrderedDict[str, AttributionEngine] = OrderedDict()
        self.packages: dict[str, ModelPackage] = {}
        self.refusal: str | None = None
        try:
            for key, (hashes, files) in shipped.items():
                self.packages[key] = load_package(materialise(files, hashes, root, node))
        except FailedPrecondition as e:  # reported by ready(), not as an actor that keeps dying
            self.refusal = str(e)

    def ready(self) -> str | None:
        return self.refusal

    def engine(
        self, token: str, key: str, parameters: Any, providers: Any, threads: Any, *caps: Any
    ) -> AttributionEngine:
        if token not in self.engines:
            max_ecgs, max_rows, max_batch = caps
            self.engines[token] = AttributionEngine(
                self.packages[key],
                providers=providers,
                threads=threads,
                parameters=parameters,
                max_request_ecgs=max_ecgs,
                max_request_rows=max_rows,
                max_batch=max_batch,
            )
            while len(self.engines) > ENGINE_CACHE:
                self.engines.popitem(last=False)
        self.engines.move_to_end(token)
        return self.engines[token]

    def run(self, call: bytes, *arrays: np.ndarray) -> Any:
        return _CallUnpickler(call, self, arrays).load()()


@dataclass
class RayBackend:
    """Runs the gate's calls on Ray actors; use as a context manager (:func:`connect`)."""

    packages: Sequence[ModelPackage]
    workers: int
    cache_root: str | None = None
    _actors: list[Any] = field(default_factory=list)
    _shipped: dict[int, str] = field(default_factory=dict)  # id of a driver's package -> its key
    _engines: Any = field(default_factory=weakref.WeakKeyDictionary)  # engine -> _EngineSpec
    _blobs: Any = None

    def start(self) -> None:
        import ray

        blobs = {}
        for pkg in self.packages:
            files = package_files(Path(pkg.path))
            hashes = files_digest(files)
            self._shipped[id(pkg)] = package_key(hashes)
            blobs[package_key(hashes)] = (hashes, files)
        actor = ray.remote(num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)(_Worker)
        # Held for the run: a restarted actor reads its packages from here again.
        self._blobs = ray.put(blobs)
        self._actors = [actor.remote(self._blobs, self.cache_root) for _ in range(self.workers)]
        # Every actor verifies its packages before any work: a refusal surfaces here, clearly.
        for refusal in ray.get([a.ready.remote() for a in self._actors]):
            if refusal:
                raise FailedPrecondition(refusal)

    def close(self) -> None:
        import ray

        for actor in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self._actors = []

    def shipped_key(self, pkg: ModelPackage) -> str:
        key = self._shipped.get(id(pkg))
        if key is None:
            raise InvalidArgument(f"package {pkg.path} was not shipped to the Ray cluster")
        return key

    def engine(
        self,
        package: ModelPackage,
        *,
        providers: Sequence[str] | None,
        threads: int | None,
        parameters: dict[str, np.ndarray] | None,
        max_request_ecgs: int | None,
        max_request_rows: int | None,
        max_batch: int = 64,
    ) -> AttributionEngine:
        """An engine as :class:`AttributionEngine` builds it, remembered so that a call using it
        can name it to an actor (:meth:`engine_spec`), which builds its own copy once."""
        engine = AttributionEngine(
            package,
            providers=providers,
            threads=threads,
            parameters=parameters,
            max_request_ecgs=max_request_ecgs,
            max_request_rows=max_request_rows,
            max_batch=max_batch,
        )
        self._engines[engine] = _EngineSpec(
            uuid.uuid4().hex,
            self.shipped_key(package),
            parameters,
            providers,
            threads,
            max_request_ecgs,
            max_request_rows,
            engine.max_batch,
        )
        return engine

    def engine_spec(self, engine: AttributionEngine) -> tuple:
        """How an actor rebuilds ``engine`` (one :meth:`engine` made); another engine is refused,
        so a call using it runs on the driver."""
        spec = self._engines.get(engine)
        if spec is None:
            raise pickle.PicklingError(f"engine on {engine.package.path} was not built by the Ray backend")
        return tuple(getattr(spec, f.name) for f in fields(spec))

    def map(
        self, calls: Sequence[Callable[[], Any]], on_done: Callable[[], Any], *, driver_ok: bool = True
    ) -> list[Any]:
        """Every call's result in order: picklable calls on the actors, the rest on the driver
        (``driver_ok=False``: a call that cannot go to the actors is an error, never silently local)."""
        import ray
        from ray.util import ActorPool

        pool = ActorPool(self._actors)
        remote, local, results = [], [], [None] * len(calls)
        for i, call in enumerate(calls):
            payload = self._pickle(call)
            (local if payload is None else remote).append((i, payload))
        if local and not driver_ok:
            name = getattr(calls[local[0][0]], "func", calls[local[0][0]]).__qualname__
            raise FailedPrecondition(f"{name} cannot run on the Ray actors (see the debug log for why)")
        stored: dict[int, Any] = {}  # an array several calls use (the ECGs) is stored once
        for _, (data, arrays) in remote:
            for a in arrays:  # alive in `remote` until the loop ends, so their ids are theirs
                if id(a) not in stored:
                    stored[id(a)] = ray.put(a)
            refs = [stored[id(a)] for a in arrays]
            pool.submit(lambda actor, v: actor.run.remote(v[0], *v[1]), (data, refs))
        log.debug("ray: %d calls on the actors, %d on the driver", len(remote), len(local))
        for i, _ in local:  # in the gate's order, while the actors work
            results[i] = calls[i]()
            on_done()
        for i, _ in remote:
            results[i] = pool.get_next()
            on_done()
        return results

    def _pickle(self, call: Callable[[], Any]) -> tuple[bytes, list[np.ndarray]] | None:
        out, arrays = io.BytesIO(), []
        try:
            _call_pickler(out, self, arrays).dump(call)
        except (TypeError, pickle.PicklingError, AttributeError) as e:
            log.debug("ray: %s runs on the driver (%s)", getattr(call, "func", call).__qualname__, e)
            return None
        return out.getvalue(), arrays


@contextlib.contextmanager
def connect(
    address: str, packages: Sequence[ModelPackage], workers: int | None = None, cache_root: str | None = None
) -> Iterator[RayBackend]:
    """Connect to ``address`` (``auto``, ``local`` = a cluster for this run, or HOST:PORT), start the
    actors and stop them on exit (also on Ctrl-C: no actor outlives the run)."""
    try:
        import ray
    except ImportError as e:
        raise FailedPrecondition("--ray needs Ray: pip install 'ecgx[ray]'") from e
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidArgument(f"workers must be a positive integer, got {workers!r}")
    started = not ray.is_initialized()
    if started:
        if address == "local":
            # address="local": a new cluster for this run, never one that RAY_ADDRESS or an
            # earlier `ray start` on this machine names.
            ray.init(
                address="local",
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if workers and workers > cpus:
        # Each actor takes a CPU: the others wait for the cluster to grow (an autoscaler may).
        log.warning("ray: %d workers asked for, the cluster has %d CPUs; some wait for more", workers, cpus)
    backend = RayBackend(packages, workers or max(1, cpus), cache_root)
    try:
        backend.start()
        yield backend
    finally:
        backend.close()
        if started:
            ray.shutdown()
