"""Settings of ``ecgx serve``: defaults, a TOML file (``--config``) and command-line flags.

A config file has one ``[serve]`` table; every key is optional and a flag given on the
command line wins over the file::

    [serve]
    repo = "/srv/ecgx/models"
    host = "0.0.0.0"
    port = 50051
    http_port = 8000          # the OIP over REST (KServe v2) on host too; off unless given (docs/http.md)
    viewer = false            # the web viewer on the HTTP port, /viewer/ (docs/viewer.md); needs http_port
    trusted_keys = ["/etc/ecgx/gate_public_key.pem"]
    allowed_policies = ["<sha256 of an accepted gate policy>"]
    allow_ungated = false     # research mode
    max_batch = 64
    max_concurrent = 8
    max_queued = 32           # default: 4 x max_concurrent
    max_request_cost = 200000 # model rows one request may cost (docs/serving.md); 0: no budget
    caller_concurrent = 4     # requests one identified caller may run or queue; default: max_concurrent / 2
    caller_rate = "600/minute"  # Predict/Explain requests per identified caller ("off": no limit)
    grace_s = 10.0
    watch_interval_s = 2.0    # how often the repository is rescanned
    # Security (docs/security.md): TLS, and who may call. Without TLS and an identity source
    # (client CA or token file) the server refuses to start unless insecure = true.
    tls_cert = "/etc/ecgx/tls/server.crt"
    tls_key = "/etc/ecgx/tls/server.key"
    tls_client_ca = "/etc/ecgx/tls/clients-ca.crt"   # mutual TLS
    tokens = "/etc/ecgx/access.toml"                # hashed bearer tokens (ecgx token new)
    tls_crl = "/etc/ecgx/tls/clients.crl"           # revoked client certificates (mutual TLS)
    open_health = true        # health and reflection without credentials, for probes
    insecure = false
    audit_log = "/var/log/ecgx/audit.jsonl"         # hash-chained JSON lines; "-" is stderr
    audit_required = false    # true: refuse calls (UNAVAILABLE) while the audit log cannot be written
    # Monitoring (docs/monitoring.md)
    metrics = true
    metrics_host = "127.0.0.1"
    metrics_port = 9464
    metrics_tls_cert = "serving"  # HTTPS for /metrics: a PEM file, or "serving" (tls_cert's file)
    metrics_tls_key = "serving"
    stability_share = 0.05    # share of Explain requests re-checked under input noise
    stability_queue = 8       # samples waiting for the worker; more are dropped (counted)
    engine_threads = 1        # N >= 2 splits large passes over N single-thread runs; 0: ORT's choice
    trt_cache = "/var/cache/ecgx/tensorrt"  # TensorRT engine and timing caches (GPU only; default: none)

    # Dynamic batching (docs/serving.md): concurrent requests merged into one engine call. On by
    # default; every key is optional, and a model's own table overrides the defaults for it.
    [batching]
    enabled = true
    preferred_batch_size = 32   # ECGs; a batch starts once it holds this many
    max_queue_delay_ms = 2.0    # the longest a request waits for a busy engine before its batch starts
    [batching.models.ecg]       # model "ecg" (keys not given here come from [batching])
    preferred_batch_size = 16

Unknown keys, wrong types and out-of-range values are errors naming the file and key. The file is
read by the shared loader (:mod:`ecgx.core.config_file`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ecgx.core.config_file import ConfigError, build, check_tables, checked_fields, read_toml
from ecgx.core.errors import InvalidArgument
from ecgx.service.admission import check_rate
from ecgx.service.batcher import BatchingConfig, BatchingQuotas, BatchPolicy
from ecgx.service.metrics import DEFAULT_METRICS_PORT
from ecgx.service.requests import Quotas
from ecgx.service.stability import DEFAULT_QUEUE as DEFAULT_STABILITY_QUEUE
from ecgx.service.stability import DEFAULT_SHARE as DEFAULT_STABILITY_SHARE


class ServeConfigError(InvalidArgument):
    """A serve setting is missing, unknown or out of range; the message names it."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``ecgx serve`` needs to start (see the module docstring for the file format)."""

    repo: Path | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = None  # None: no REST port; 0: a free one
    viewer: bool = False  # the web viewer on the HTTP port (service/viewer.py)
    trusted_keys: tuple[Path, ...] = ()
    allowed_policies: tuple[str, ...] | None = None
    allow_ungated: bool = False
    max_batch: int = 64
    max_concurrent: int = 8
    max_queued: int | None = None
    max_request_cost: int = 200_000
    caller_concurrent: int | None = None
    caller_rate: str = "600/minute"
    grace_s: float = 10.0
    watch_interval_s: float = 2.0
    tls_cert: str | None = None  # a path, or None for ECGX_TLS_CERT (a path or the PEM itself)
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tokens: Path | None = None
    tls_crl: Path | None = None
    open_health: bool = False
    insecure: bool = False
    audit_log: str | None = None
    audit_required: bool = False
    metrics: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_tls_cert: str | None = None  # a PEM file, or "serving" for tls_cert's file
    metrics_tls_key: str | None = None
    stability_share: float = DEFAULT_STABILITY_SHARE
    stability_queue: int = DEFAULT_STABILITY_QUEUE
    # ONNX Runtime execution providers in priority order (None: TensorRT, CUDA, CPU as installed).
    providers: tuple[str, ...] | None = None
    batching: BatchingConfig = field(default_factory=BatchingConfig)  # the [batching] table
    # Engine threads (0: ONNX Runtime's choice). One: on the 2-vCPU reference machine two intra-op
    # threads lost to one at every batch size but a single ECG (benchmarks/RESULTS.md, "Dynamic
    # batching"); concurrent requests and the dynamic batcher use the cores instead. N >= 2 keeps
    # one intra-op thread per session and splits large passes over N concurrent runs (engine.py).
    engine_threads: int = 1
    # TensorRT's engine and timing cache folder, as provider options (service/providers.py); GPU only.
    trt_cache: Path | None = None

    def check(self, source: str) -> ServeConfig:
        """Raise :class:`ServeConfigError` on a missing repository or a value out of range."""
        if self.repo is None:
            raise ServeConfigError(f"{source}: give the model repository (--repo DIR or repo = in [serve])")
        ranges = [
            ("port", self.port, 0, 65535),
            ("http_port", self.http_port if self.http_port is not None else 0, 0, 65535),
            ("max_batch", self.max_batch, 1, 4096),
            ("max_concurrent", self.max_concurrent, 1, 1024),
            ("max_queued", self.max_queued if self.max_queued is not None else 0, 0, 65536),
            ("max_request_cost", self.max_request_cost, 0, 10**12),
            ("caller_concurrent", 1 if self.caller_concurrent is None else self.caller_concurrent, 1, 65536),
            ("grace_s", self.grace_s, 0, 3600),
            ("watch_interval_s", self.watch_interval_s, 0.1, 3600),
            ("metrics_port", self.metrics_port, 0, 65535),
            ("stability_share", self.stability_share, 0, 1),
            ("stability_queue", self.stability_queue, 1, 100_000),
            ("engine_threads", self.engine_threads, 0, 256),
        ]
        for key, value, low, high in ranges:
            if not (math.isfinite(value) and low <= value <= high):
                raise ServeConfigError(f"{source}: {key} must be in [{low}, {high}], got {value}")
        if self.viewer and self.http_port is None:
            raise ServeConfigError(f"{source}: the viewer is served on the HTTP port: give http_port too")
        if self.http_port and self.http_port == self.port:
            raise ServeConfigError(f"{source}: http_port and port are both {self.port}; give each its own")
        if self.caller_rate != "off":
            try:
                check_rate(self.caller_rate)
            except ValueError as e:
                raise ServeConfigError(f"{source}: {e}") from None
        if self.audit_required and not self.audit_log:
            raise ServeConfigError(f"{source}: audit_required needs an audit log (--audit-log FILE)")
        self.metrics_tls(source)
        return self

    def quotas(self) -> Quotas:
        """The serving core's admission limits (budget, per-caller quotas) from these settings, with
        the dynamic batching settings (the core reads them from its quotas)."""
        return BatchingQuotas(
            batching=self.batching,
            max_batch=self.max_batch,
            max_concurrent=self.max_concurrent,
            max_queued=self.max_queued,
            max_request_cost=self.max_request_cost or None,
            caller_concurrent=self.caller_concurrent,
            caller_rate=None if self.caller_rate == "off" else self.caller_rate,
        )

    def engine_threads_option(self) -> dict[str, int]:
        """The ``threads`` engine option (``ModelRepository(engine_options=...)``), none for 0."""
        return {"threads": self.engine_threads} if self.engine_threads else {}

    def provider_options(self) -> dict[str, Any]:
        """The engine's ``providers`` and ``provider_settings`` options, none left at their defaults."""
        from ecgx.service.providers import ProviderSettings, select_providers

        options: dict[str, Any] = {}
        if self.providers:  # checked before any key or model loads: a missing provider is a clear error
            options["providers"] = select_providers(list(self.providers))
        if self.trt_cache is not None:
            options["provider_settings"] = ProviderSettings(cache_dir=Path(self.trt_cache))
        return options

    def metrics_tls(self, source: str = "ecgx serve") -> tuple[str, str] | None:
        """The metrics endpoint's (certificate, key) files, None for plain HTTP; "serving" names
        the serving port's files."""
        cert, key = self.metrics_tls_cert, self.metrics_tls_key
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise ServeConfigError(
                f"{source}: metrics over TLS needs both --metrics-tls-cert and --metrics-tls-key"
            )
        cert = self.tls_cert if cert == "serving" else cert
        key = self.tls_key if key == "serving" else key
        if cert is None or key is None:
            raise ServeConfigError(
                f"{source}: --metrics-tls-cert/--metrics-tls-key 'serving' needs the serving port's "
                "certificate and key as files (--tls-cert and --tls-key)"
            )
        return str(cert), str(key)


_TYPES: dict[str, tuple[type, ...]] = {
    "repo": (str,),
    "host": (str,),
    "port": (int,),
    "http_port": (int,),
    "viewer": (bool,),
    "trusted_keys": (list,),
    "allowed_policies": (list,),
    "allow_ungated": (bool,),
    "max_batch": (int,),
    "max_concurrent": (int,),
    "max_queued": (int,),
    "max_request_cost": (int,),
    "caller_concurrent": (int,),
    "caller_rate": (str,),
    "grace_s": (int, float),
    "watch_interval_s": (int, float),
    "tls_cert": (str,),
    "tls_key": (str,),
    "tls_client_ca": (str,),
    "tokens": (str,),
    "tls_crl": (str,),
    "open_health": (bool,),
    "insecure": (bool,),
    "audit_log": (str,),
    "audit_required": (bool,),
    "metrics": (bool,),
    "metrics_host": (str,),
    "metrics_port": (int,),
    "metrics_tls_cert": (str,),
    "metrics_tls_key": (str,),
    "stability_share": (int, float),
    "stability_queue": (int,),
    "providers": (list,),
    "engine_threads": (int,),
    "trt_cache": (str,),
}


def read_serve_config(path: Path | str) -> dict[str, Any]:
    """The ``[serve]`` and ``[batching]`` tables of a TOML file, type-checked, as ServeConfig field
    values."""
    path = Path(path)
    where = f"config file {path}"
    try:
        document = read_toml(path)
        check_tables(document, ("serve", "batching"), where)
        batching = _batching(document.get("batching", {}))
    except ConfigError as e:  # one error type for every serve setting, each naming the file
        message = str(e)
        raise ServeConfigError(message if str(path) in message else f"{where}: {message}") from None
    table = document.get("serve", {})
    if not isinstance(table, dict):
        raise ServeConfigError(f"{where}: serve must be a table ([serve])")
    values = {key: _serve_value(where, key, value) for key, value in table.items()}
    for key in ("repo", "tokens", "tls_crl", "trt_cache"):
        if key in values:
            values[key] = Path(values[key])
    if "trusted_keys" in values:
        values["trusted_keys"] = tuple(Path(k) for k in values["trusted_keys"])
    for key in ("allowed_policies", "providers"):
        if key in values:
            values[key] = tuple(values[key])
    if batching is not None:
        values["batching"] = batching
    return values


def _serve_value(where: str, key: str, value: Any) -> Any:
    """One ``[serve]`` value, type-checked (these messages predate the shared loader's and are kept)."""
    if key not in _TYPES:
        raise ServeConfigError(f"{where}: unknown key serve.{key}; known: {sorted(_TYPES)}")
    types = _TYPES[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join(t.__name__ for t in types)
        raise ServeConfigError(f"{where}: serve.{key} must be {expected}, got {value!r}")
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ServeConfigError(f"{where}: serve.{key} must be a list of strings")
    return value


def _batching(table: Any) -> BatchingConfig | None:
    """The ``[batching]`` table: defaults, and ``[batching.models.<model>]`` overrides (a model's
    table starts from the defaults of ``[batching]``); None when the file has none."""
    if table == {}:
        return None
    if not isinstance(table, dict):
        raise ConfigError("batching must be a table ([batching])")
    table = dict(table)
    models = table.pop("models", {})
    if not isinstance(models, dict):
        raise ConfigError("batching.models must hold one table per model ([batching.models.NAME])")
    default = build(BatchPolicy, checked_fields(BatchPolicy, table, "batching"), "batching")
    overrides = {}
    for model, values in models.items():
        name = f"batching.models.{model}"
        given = checked_fields(BatchPolicy, values, name)
        overrides[model] = build(BatchPolicy, {**dataclasses.asdict(default), **given}, name)
    return BatchingConfig(default, overrides)


def resolve_serve_config(config_file: Path | None, flags: dict[str, Any]) -> ServeConfig:
    """Defaults, then the file's values, then the flags that were given (not None)."""
    values = read_serve_config(config_file) if config_file is not None else {}
    names = {f.name for f in fields(ServeConfig)}
    values.update({k: v for k, v in flags.items() if k in names and v is not None and v != ()})
    source = f"config file {config_file}" if config_file is not None else "ecgx serve"
    return dataclasses.replace(ServeConfig(), **values).check(source)
