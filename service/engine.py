"""The attribution engine: ONNX Runtime sessions over a model package.

One engine per package, created once and shared by all threads of a server:
sessions are created once (under a lock) and ``InferenceSession.run`` is
thread-safe, and the engine keeps no per-request state. Every call splits
its rows into batches of at most ``max_batch``, so memory stays bounded
whatever the request size; the caps in :mod:`ecgx.service.limits` bound its time.

Sessions are built from the graph bytes that :func:`~ecgx.core.package_reader.load_package`
hashed, and every parameter is handed to ONNX Runtime from the one verified copy of
``weights.bin`` in memory: nothing is read from the package folder after loading.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ecgx.core.errors import InvalidArgument, NotFound, ResourceExhausted
from ecgx.core.package_reader import ModelPackage, PackageError, load_package
from ecgx.service import limits
from ecgx.service.providers import (  # noqa: F401  (PROVIDER_PREFERENCE, select_providers: older import paths)
    PROVIDER_PREFERENCE,
    ProviderSettings,
    needs_warm_up,
    select_providers,
    session_providers,
    warm_up,
)

log = logging.getLogger(__name__)

# Inputs are millivolts; anything beyond this is a units error or garbage, not an ECG.
MAX_ABS_MV = 50.0
# Backward graphs whose ``logits`` output is the logits of their ``x`` input: when a method runs
# one of them on the request's own inputs, ``attribute_with_logits`` returns those logits, so a
# server need not run the forward graph as well.
# The fewest rows each part of a split pass gets (``threads`` >= 2): below it, handing a part to
# another thread costs about what the part saves (a single-ECG forward pass takes 0.2 ms).
MIN_SPLIT_ROWS = 4
LOGITS_AT_X_GRAPHS = frozenset(
    {"gradient", "guided_backprop", "deconvolution", "lrp", "lrp_epsilon_plus", "lrp_epsilon_alpha2_beta1"}
)


class AttributionEngine:
    """Predictions and attributions for one model package on ONNX Runtime.

    Args:
        package: a package folder or an already loaded :class:`ModelPackage`.
        providers: execution providers in priority order (default: TensorRT, CUDA, CPU as available).
        provider_settings: GPU provider options (:class:`ecgx.service.providers.ProviderSettings`:
            TensorRT engine and timing caches, FP16, CUDA TF32); None: the defaults (no caches).
        max_batch: the most rows sent to ONNX Runtime in one run (forward or backward pass),
            at most ``limits.MAX_BATCH_ROWS``.
        threads: CPU threads one pass may use. 1: ONNX Runtime runs single-threaded in the
            calling thread. T >= 2: sessions still run one intra-op thread each, and a pass of
            at least ``2 * MIN_SPLIT_ROWS`` rows is split into up to T parts run at once (the
            caller runs one, an engine-owned pool the others); smaller passes stay on one
            thread. On the 2-vCPU reference machine two intra-op threads often lost to one
            (thread-pool barrier waits when another tenant holds a vCPU), while independent
            single-thread runs do not wait on each other. None: ONNX Runtime's own intra-op
            pool (one thread per core), no splitting.
        max_request_ecgs: the most ECGs one ``attribute`` call takes (None: no cap).
        max_request_rows: the most model passes (ECGs x passes per ECG) one ``attribute``
            call may need (None: no cap). Offline jobs that size their own work may lift both.
        verify_hashes: check every package file against the manifest's SHA-256 on load.
        parameters: replacement values for some weight initialisers, by name (as in
            ``ModelPackage.read_parameters``). Every graph reads the replaced values, so
            all methods see the same modified model. The validation gate uses this to
            randomise layers; a serving engine never sets it.
    """

    def __init__(
        self,
        package: str | Path | ModelPackage,
        *,
        providers: Sequence[str] | None = None,
        provider_settings: ProviderSettings | None = None,
        max_batch: int = 64,
        threads: int | None = None,
        verify_hashes: bool = True,
        parameters: Mapping[str, np.ndarray] | None = None,
        max_request_ecgs: int | None = limits.MAX_REQUEST_ECGS,
        max_request_rows: int | None = limits.MAX_REQUEST_ROWS,
    ):
        self.max_batch = _check_count("max_batch", max_batch, limits.MAX_BATCH_ROWS, "MAX_BATCH_ROWS")
        if threads is not None:
            threads = _check_count("threads", threads, None, "")
        self.max_request_ecgs = (
            None if max_request_ecgs is None else _check_count("max_request_ecgs", max_request_ecgs, None, "")
        )
        self.max_request_rows = (
            None if max_request_rows is None else _check_count("max_request_rows", max_request_rows, None, "")
        )
        self.package = package if isinstance(package, ModelPackage) else load_package(package, verify_hashes)
        self.providers = select_providers(providers)
        self.provider_settings = provider_settings or ProviderSettings()
        self.threads = threads
        # One float32 array per parameter: views of the verified weights.bin bytes, or the
        # replacement values. Every session reads these (ONNX Runtime wraps them, no copy on CPU).
        self._parameters = {**self.package.parameter_views(), **self._check_overrides(parameters or {})}
        self._initializers = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self._parameters.items()}
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._lock = threading.Lock()
        self._capture = threading.local()  # attribute_with_logits: per calling thread
        self._cancel: Any = None  # set only on a request's view (with_cancel)
        # Runs the other parts of a split pass (threads >= 2); created here, not lazily, so that
        # request views (with_cancel) share it. Its threads start on first use.
        self._pool = (
            ThreadPoolExecutor(threads - 1, thread_name_prefix="ecgx-engine") if (threads or 1) > 1 else None
        )
        self._row_names: dict[str, tuple[frozenset[str], tuple[str, ...]] | None] = {}

    # ------------------------------------------------------------------ sessions

    def session(self, graph: str) -> ort.InferenceSession:
        """The ONNX Runtime session of one package graph, created on first use."""
        sess = self._sessions.get(graph)
        if sess is not None:
            return sess
        with self._lock:
            if graph not in self._sessions:
                self._sessions[graph] = self._build_session(graph)
                log.debug("loaded graph %s with %s", graph, self._sessions[graph].get_providers())
            return self._sessions[graph]

    def _build_session(self, graph: str) -> ort.InferenceSession:
        """A session from the verified graph bytes, its parameters supplied from memory.

        The package check (``load_package``) made sure that every external data reference
        of the graph is one of these parameters, so ONNX Runtime reads no file.
        """
        data = self.package.graph_bytes(graph)
        file = self.package.graph_file(graph)
        opts = ort.SessionOptions()
        if self.threads is not None:
            # threads >= 2 parallelise across rows (``run``), never inside one run.
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
        names = list(self.package.graph_parameters.get(graph, ()))
        if names:
            opts.add_external_initializers(names, [self._initializers[n] for n in names])
        try:
            sess = ort.InferenceSession(
                data, opts, providers=session_providers(self.providers, self.provider_settings)
            )
        except Exception as e:  # onnxruntime's own exception types derive from Exception only
            raise PackageError(
                f"{file}: ONNX Runtime cannot load graph {graph!r}: {str(e).strip()[:500]}"
            ) from None
        inputs, outputs = self.package.graph_signature(graph)
        got = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
        if sorted(got[0]) != sorted(inputs) or got[1] != outputs:
            raise PackageError(
                f"{file}: graph {graph!r} has inputs {got[0]} and outputs {got[1]}, but the manifest says "
                f"inputs {inputs} and outputs {outputs}"
            )
        if needs_warm_up(sess):  # GPU: engine build and kernel search at load, not in the first request
            warm_up(sess)
        return sess

    def _check_overrides(self, parameters: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        table = self.package.parameter_table()
        overrides = {}
        for name, value in parameters.items():
            if name not in table:
                raise InvalidArgument(f"package {self.package.path} has no parameter {name!r}")
            arr = np.ascontiguousarray(value, dtype=np.float32)
            if list(arr.shape) != list(table[name]["shape"]):
                shape = table[name]["shape"]
                raise InvalidArgument(f"parameter {name!r} must have shape {shape}, got {arr.shape}")
            if not np.isfinite(arr).all():
                raise InvalidArgument(f"parameter {name!r} holds NaN or infinite values")
            overrides[name] = arr
        return overrides

    def warm_up(self, graphs: Sequence[str] | None = None) -> None:
        """Create sessions ahead of the first request (a server does this at load time)."""
        for graph in graphs or list(self.package.manifest["graphs"]):
            self.session(graph)

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """One pass of ``graph`` over all rows of ``feeds`` (no chunking: callers chunk by
        ``max_batch``). With ``threads`` >= 2, a pass of enough rows runs as up to ``threads``
        concurrent single-thread runs over consecutive rows, its outputs concatenated: each row's
        result is the same as in one run."""
        sess = self.session(graph)
        parts = self._split(graph, feeds, outputs)
        if parts is None:
            return sess.run(list(outputs), feeds)
        futures = [self._pool.submit(sess.run, list(outputs), part) for part in parts[1:]]
        results = [sess.run(list(outputs), parts[0])]
        for part, future in zip(parts[1:], futures, strict=True):
            # A part no pool thread has started yet (the pool is busy with another request's
            # parts) runs here, so a request never waits on another's work.
            results.append(sess.run(list(outputs), part) if future.cancel() else future.result())
        return [np.concatenate([r[i] for r in results]) for i in range(len(outputs))]

    def _split(
        self, graph: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]
    ) -> list[dict[str, np.ndarray]] | None:
        """``feeds`` cut into consecutive row ranges, one per thread, or None: one thread, too few
        rows, or a graph whose inputs or outputs are not all row-wise in one batch dimension."""
        if self._pool is None:
            return None
        if graph not in self._row_names:
            self._row_names[graph] = _row_wise(self.session(graph))
        names = self._row_names[graph]
        if names is None or not set(outputs) <= set(names[1]):
            return None
        rows = {len(v) for k, v in feeds.items() if k in names[0]}
        if len(rows) != 1:
            return None
        n = rows.pop()
        k = min(self.threads or 1, n // MIN_SPLIT_ROWS)
        if k < 2:
            return None
        bounds = [n * i // k for i in range(k + 1)]
        return [
            {name: (v[a:b] if name in names[0] else v) for name, v in feeds.items()}
            for a, b in itertools.pairwise(bounds)
        ]

    # ------------------------------------------------------------------ input checks

    def check_inputs(self, inputs: Any) -> np.ndarray:
        """(B, 12, 600) float32 from an array-like, or an :class:`InvalidArgument` saying what is wrong."""
        x = np.asarray(inputs)
        leads, samples = self.package.input_shape
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[1:] != (leads, samples):
            raise InvalidArgument(
                f"inputs must have shape (batch, {leads}, {samples}) or ({leads}, {samples}), got {x.shape}"
            )
        if x.shape[0] == 0:
            raise InvalidArgument("inputs hold no ECG (batch size 0)")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise InvalidArgument(f"inputs must be real numbers, got dtype {x.dtype}")
        x = x.astype(np.float32, copy=False)
        bad = ~np.isfinite(x).all(axis=(1, 2))
        if bad.any():
            raise InvalidArgument(f"ECG(s) {np.flatnonzero(bad).tolist()} hold NaN or infinite values")
        big = np.abs(x).max(axis=(1, 2)) > MAX_ABS_MV
        if big.any():
            raise InvalidArgument(
                f"ECG(s) {np.flatnonzero(big).tolist()} exceed {MAX_ABS_MV} mV; inputs must be millivolts"
            )
        return np.ascontiguousarray(x)

    def resolve_target(self, target: Any, x: np.ndarray) -> np.ndarray:
        """Per-ECG class indices: ``None`` means each ECG's most probable class; a class
        index, key or SNOMED code applies to all; a sequence gives one per ECG."""
        if target is None:
            return self.logits(x).argmax(axis=1)
        if isinstance(target, (str, int, np.integer)):
            return np.full(len(x), self.class_index(target), dtype=np.int64)
        targets = list(np.asarray(target).ravel()) if not isinstance(target, (list, tuple)) else list(target)
        if len(targets) != len(x):
            raise InvalidArgument(
                f"got {len(targets)} targets for {len(x)} ECGs; give one per ECG or a single class"
            )
        return np.array([self.class_index(t) for t in targets], dtype=np.int64)

    def class_index(self, target: Any) -> int:
        """Index of one class given by index, key or SNOMED code; :class:`NotFound` otherwise."""
        key = _as_index(target)
        try:
            return self.package.class_index(key)
        except ValueError as e:
            raise NotFound(str(e)) from None

    def selectors(self, target: np.ndarray) -> np.ndarray:
        """One-hot rows selecting each ECG's target logit (the backward graphs' ``seed`` input)."""
        return np.eye(self.package.n_classes, dtype=np.float32)[target]

    # ------------------------------------------------------------------ batched passes

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits (B, classes) of checked inputs, batched."""
        parts = [self.run("forward", {"x": x[sl]}, ["logits"])[0] for sl in self._chunks(len(x))]
        return np.concatenate(parts)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(x)))

    def backward(
        self, graph: str, x: np.ndarray, target: np.ndarray, output: str = "gradient", **extra: np.ndarray
    ) -> np.ndarray:
        """One backward graph over rows of ``x`` (and per-row ``extra`` inputs), batched."""
        seeds = self.selectors(target)
        # The graph computes the logits of x anyway: keep them when this is the request's own x.
        capture = graph in LOGITS_AT_X_GRAPHS and x is getattr(self._capture, "x", None)
        outputs = [output, "logits"] if capture else [output]
        parts, logits = [], []
        for sl in self._chunks(len(x)):
            feeds = {"x": x[sl], "seed": seeds[sl]}
            feeds.update({k: (v[sl] if np.ndim(v) and len(v) == len(x) else v) for k, v in extra.items()})
            got = self.run(graph, feeds, outputs)
            parts.append(got[0])
            if capture:
                logits.append(got[1])
        if capture:
            self._capture.logits = np.concatenate(logits)
        return np.concatenate(parts)

    def accumulate(
        self,
        graph: str,
        n_samples: int,
        shape: tuple[int, ...],
        make_rows: Callable[[np.ndarray], tuple[dict[str, np.ndarray], Any]],
        combine: Callable[[np.ndarray, np.ndarray, Any], np.ndarray],
        output: str | None = None,
    ) -> np.ndarray:
        """Sum, per ECG, ``n_samples`` passes of the backward ``graph``.

        Path, noise and baseline-distribution methods need many passes per ECG. Virtual
        row ``r`` is sample ``r // B`` of ECG ``r % B`` (B = ``shape[0]``); rows are built
        chunk by chunk (``make_rows(rows) -> (feeds, context)``), so the scaled or noisy
        inputs of a whole request never exist at once, and ``combine(rows, result,
        context)`` turns a chunk's ``output`` (default: the graph's second output, the
        gradient or attribution) into contributions. Returns the (B, ...) sums.
        """
        batch = shape[0]
        out = np.zeros(shape, np.float32)
        output = output or self.session(graph).get_outputs()[1].name
        for sl in self._chunks(n_samples * batch):
            rows = np.arange(sl.start, sl.stop)
            feeds, context = make_rows(rows)
            result = self.run(graph, feeds, [output])[0]
            own = self.ecg_of_rows(rows, batch)
            contribution = combine(rows, result, context)
            if isinstance(own, slice) or len(rows) <= batch:
                out[own] += contribution  # each ECG at most once in this chunk: plain indexing is safe
            else:
                _add_by_sample(out, sl, contribution)
        return out

    @staticmethod
    def ecg_of_rows(rows: np.ndarray, batch: int) -> slice | np.ndarray:
        """The ECG of each virtual row (``rows % batch``); a slice when the rows cover
        consecutive ECGs, so chunk inputs can be views instead of copies."""
        first = int(rows[0]) % batch
        if first + len(rows) <= batch and int(rows[-1]) - int(rows[0]) == len(rows) - 1:
            return slice(first, first + len(rows))
        return rows % batch

    def _chunks(self, n: int) -> Iterator[slice]:
        # Every batched pass (forward, backward, accumulate, the methods' own loops) goes through
        # here: a request's cancel token is looked at before each chunk of model rows.
        for start in range(0, n, self.max_batch):
            self.check_cancelled()
            yield slice(start, min(start + self.max_batch, n))

    def check_cancelled(self) -> None:
        """Raise the request's Cancelled / DeadlineExceeded now (methods call this in loops of
        their own that run no model rows); nothing without a cancel token."""
        if self._cancel is not None:
            self._cancel.check()

    def with_cancel(self, cancel: Any) -> AttributionEngine:
        """This engine for one request: the same sessions and weights (a shallow copy), with
        ``cancel`` (``ecgx.service.requests.CancelToken``: ``check()`` raises Cancelled or
        DeadlineExceeded) checked before every chunk of model rows, so cancelled or timed-out
        work stops within one chunk."""
        view = copy.copy(self)
        view._cancel = cancel
        return view

    # ------------------------------------------------------------------ attribution

    def attribute_with_logits(
        self, method: str, inputs: Any, /, target: Any = None, **params: Any
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`attribute`, and the logits (B, classes) of ``inputs`` when the method computed
        them on the way (a backward graph in ``LOGITS_AT_X_GRAPHS`` run on the inputs themselves:
        saliency, input x gradient, guided backprop, deconvolution, LRP), else None. A server
        uses them instead of running the forward graph again."""
        self._capture.x, self._capture.logits = None, None
        try:
            maps = self._attribute(method, inputs, target, params, capture=True)
            return maps, self._capture.logits
        finally:
            self._capture.x, self._capture.logits = None, None

    def attribute(self, method: str, inputs: Any, /, target: Any = None, **params: Any) -> np.ndarray:
        """Attribution map (B, 12, 600) float32 of ``method`` for ``inputs`` and ``target``.

        ``params`` are the method's own settings (see ``ecgx attribute --help`` or
        :mod:`ecgx.service.methods`); unknown names are an error, as are bad values and
        requests over a cost cap (:mod:`ecgx.service.limits`), all before any model pass.
        ``method`` and ``inputs`` are positional-only, so integrated gradients' own
        ``method`` setting can be passed as a keyword.
        """
        return self._attribute(method, inputs, target, params)

    def _attribute(
        self, method: str, inputs: Any, target: Any, params: dict[str, Any], capture: bool = False
    ) -> np.ndarray:
        from ecgx.service.methods import check_available, get_method

        impl = get_method(method)
        impl.check_params(params)
        check_available(self.package, method, params)  # a graph the export left out: say why, at once
        x = self.check_inputs(inputs)
        if capture:
            self._capture.x = x
        if self.max_request_ecgs is not None and len(x) > self.max_request_ecgs:
            raise ResourceExhausted(
                f"inputs hold {len(x)} ECGs; this engine takes at most {self.max_request_ecgs} per request "
                "(max_request_ecgs), which bounds the memory of one request: send them in several requests"
            )
        # Every setting is checked before any model pass (a target of None already needs one):
        # defaults filled in, each value by its declared check; ``attribute`` gets the checked values.
        settings = impl.settings(x, params)
        passes = impl.cost(x, settings)
        rows = passes * len(x)
        if self.max_request_rows is not None and rows > self.max_request_rows:
            raise ResourceExhausted(
                f"{method} with these settings needs {passes:,} model passes per ECG x {len(x)} ECGs = "
                f"{rows:,} passes; this engine allows at most {self.max_request_rows:,} per request "
                "(max_request_rows), which bounds the time of one request: send fewer ECGs per request "
                "or lower the method's sample, step or window count"
            )
        t = self.resolve_target(target, x)
        return np.ascontiguousarray(impl.attribute(self, x, t, settings), dtype=np.float32)


def _add_by_sample(out: np.ndarray, rows: slice, contribution: np.ndarray) -> None:
    """``np.add.at(out, rows % B, contribution)`` for consecutive ``rows``, bit for bit: the rows of one
    sample (one ``r // B``) hold each ECG once, so adding them sample by sample, in row order, is
    np.add.at's order of additions, as slices instead of its slow per-element path."""
    batch, start = out.shape[0], rows.start
    while start < rows.stop:
        stop = min((start // batch + 1) * batch, rows.stop)
        first = start % batch
        out[first : first + stop - start] += contribution[start - rows.start : stop - rows.start]
        start = stop


def _check_count(name: str, value: Any, limit: int | None, limit_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise InvalidArgument(
            f"{name}={value} is over the limit of {limit} (ecgx.service.limits.{limit_name}): every row of a "
            "run holds its layer activations in ONNX Runtime at once, so this bounds the engine's memory"
        )
    return int(value)


def _row_wise(sess: ort.InferenceSession) -> tuple[frozenset[str], tuple[str, ...]] | None:
    """(inputs, outputs) of a session whose first axis is the one symbolic batch axis they all
    share (so rows can be run apart and their outputs concatenated), or None if the graph has
    inputs or outputs of another batch axis. Inputs without that axis (settings such as
    ``maxpool_rescale`` or ``epsilon``) go whole to every part."""
    first = [(a.name, a.shape[0] if a.shape else None) for a in [*sess.get_inputs(), *sess.get_outputs()]]
    symbolic = {d for _, d in first if isinstance(d, str)}
    outputs = [a.name for a in sess.get_outputs()]
    if len(symbolic) != 1 or any(not isinstance(d, str) for n, d in first if n in outputs):
        return None
    inputs = frozenset(a.name for a in sess.get_inputs() if a.shape and isinstance(a.shape[0], str))
    return inputs, tuple(outputs)


def _as_index(t: Any) -> str | int:
    if isinstance(t, (bool, np.bool_)):
        raise InvalidArgument(f"target must be a class index, key or SNOMED code, got {t!r}")
    if isinstance(t, (int, np.integer)):
        return int(t)
    if isinstance(t, float) and t.is_integer():
        return int(t)
    return str(t)
