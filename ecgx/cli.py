"""The ``ecgx`` command line: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import ecgx
from ecgx.core.errors import EcgxError, InvalidArgument

log = logging.getLogger("ecgx")

# Errors a user can cause and fix: ecgx's own (file-system errors are told apart in main()).
# Anything else, a ValueError of NumPy's included, is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (EcgxError,)
EXIT_USAGE = 2
# Modules only an extra installs -> that extra (pyproject.toml): the serving install leaves them out.
OPTIONAL_MODULES = {"torch": "train", "captum": "train", "wfdb": "data"}
EXIT_TERMINATED = 143  # 128 + SIGTERM


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _cmd_synth(args: argparse.Namespace) -> int:
    from ecgx.training.data.synth import synthesize_dataset

    out = synthesize_dataset(
        args.out, args.n, args.seed, overwrite=args.overwrite, show_progress=not args.quiet
    )
    log.info("wrote %d synthetic beats to %s", args.n, out)
    return 0


def _cmd_import_wfdb(args: argparse.Namespace) -> int:
    from ecgx.training.data.wfdb_import import import_wfdb

    report = import_wfdb(
        args.paths, args.out, overwrite=args.overwrite, show_progress=not args.quiet, min_beats=args.min_beats
    )
    log.info(
        "imported %d record(s) into %s; skipped %d", len(report.imported), report.out, len(report.skipped)
    )
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 0


def _cmd_import_documents(args: argparse.Namespace) -> int:
    from ecgx.training.data.document_import import import_documents

    report = import_documents(
        args.paths, args.out, fmt=args.format, overwrite=args.overwrite, show_progress=not args.quiet
    )
    log.info(
        "imported %d document(s) into %s; skipped %d", len(report.imported), report.out, len(report.skipped)
    )
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 0


def _document_formats() -> tuple[str, ...]:
    from ecgx.core.ecg_formats import FORMATS

    return FORMATS


def _cmd_data_info(args: argparse.Namespace) -> int:
    from ecgx.core.dataset import load_dataset
    from ecgx.core.schema import CLASSES

    ds = load_dataset(args.dir)
    print(f"{ds.path}: {len(ds)} beats, source {ds.meta.get('source')}, ground truth {ds.has_ground_truth}")
    counts = ds.labels.sum(axis=0, dtype=int) if len(ds) else [0] * len(CLASSES)
    for c, k in zip(CLASSES, counts, strict=True):
        print(f"  {c.key:6s} {c.code:>10s}  {c.name:30s} {int(k):8d}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ecgx.training.config import load_config
    from ecgx.training.train import train_run

    model_cfg, train_cfg = load_config(args.config)
    summary = train_run(
        args.data,
        args.seeds,
        args.out,
        model_cfg,
        train_cfg,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
    )
    if summary["seeds"]:
        from ecgx.training.summary import format_training_summary

        print(format_training_summary(Path(args.out), args.seeds))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ecgx.training.export.input_forms import is_factory_spec

    checkpoint = args.checkpoint
    if checkpoint is not None and (Path(checkpoint) / "manifest.json").is_file():
        raise InvalidArgument(
            f"{checkpoint} is already a model package (it holds manifest.json): nothing to export. "
            f"Gate it with `ecgx validate {checkpoint} --data DATA --family OTHER_PACKAGES`, or promote a "
            f"gated one with `ecgx repo add {checkpoint} --repo REPO --model NAME --public-key KEY`; "
            "`ecgx export` takes a checkpoint "
            "(RUNDIR/seed-<s>/checkpoint.pt) or --model"
        )
    model = args.model
    if (
        model is not None
        and not is_factory_spec(model)
        and Path(model).suffix.lower() not in (".pt2", ".onnx")
        and Path(model).is_file()
    ):
        # --model CHECKPOINT: the same export as the positional form (training metadata included)
        args.checkpoint, args.model = Path(model), None
    if args.model is None:
        for flag, value in (
            ("--weights", args.weights),
            ("--input-length", args.input_length),
            ("--sampling-rate", args.sampling_rate),
            ("--classes", args.classes),
        ):
            if value is not None:
                raise InvalidArgument(
                    f"{flag} does not apply to a project checkpoint: it carries its own weights, input "
                    "length, sampling rate and classes"
                )
        from ecgx.training.export import export_checkpoint

        out = export_checkpoint(
            args.checkpoint,
            args.out,
            gradcam_layer=args.gradcam_layer,
            overwrite=args.overwrite,
            check_data=args.check_data,
            check_samples=args.check_samples,
        )
    else:
        from ecgx.training.export import export_package
        from ecgx.training.export.input_forms import load_source

        classes = args.classes
        if classes is not None and Path(classes).is_file():
            classes = Path(classes)
        source = load_source(
            args.model,
            weights=args.weights,
            input_length=args.input_length,
            sampling_rate_hz=args.sampling_rate,
            classes=classes,
            partial=not args.no_partial,
        )
        out = export_package(
            source,
            args.out,
            gradcam_layer=args.gradcam_layer,
            overwrite=args.overwrite,
            check_data=args.check_data,
            check_samples=args.check_samples,
            partial=not args.no_partial,
        )
    log.info("wrote model package %s", out)
    _report_unavailable(out)
    return 0


def _report_unavailable(package: Path) -> None:
    """Print each graph the export left out, and why: methods a user would otherwise only find
    refused at serving time."""
    import json

    manifest = json.loads((Path(package) / "manifest.json").read_text())
    partial = manifest.get("partial")
    if partial:
        print(
            f"PARTIAL PACKAGE (forward pass only; methods: {', '.join(partial['methods'])}; "
            f"blocked by {partial['blocked_by']}): {partial['reason']}"
        )
    unavailable = manifest.get("unavailable") or {}
    for graph, entry in unavailable.items():
        print(f"UNAVAILABLE {graph} (methods: {', '.join(entry['methods']) or 'none'}): {entry['reason']}")


def _parse_param(text: str) -> tuple[str, object]:
    """``name=value``; the value is read as JSON when it parses (numbers, true, null), else kept as text."""
    import json

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise InvalidArgument(f"--param must look like name=value, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _cmd_attribute(args: argparse.Namespace) -> int:
    params = dict(_parse_param(p) for p in args.param)
    if args.seed is not None:
        params["seed"] = args.seed
    if args.workers is not None and not args.ray:
        raise InvalidArgument("--workers counts Ray workers: it needs --ray")
    if args.out.suffix == ".npy":
        if args.ray or args.resume or args.shard_size is not None:
            raise InvalidArgument(
                "--ray, --resume and --shard-size write sharded Parquet: give --out a folder, "
                f"not the .npy file {args.out}"
            )
        return _attribute_npy(args, params)
    if args.out.suffix:
        raise InvalidArgument(
            f"--out {args.out} must name a .npy file (e.g. {args.out.with_suffix('.npy')}) or a folder "
            f"without a suffix for sharded Parquet (e.g. {args.out.with_suffix('')})"
        )
    return _attribute_sharded(args, params)


def _attribute_npy(args: argparse.Namespace, params: dict[str, object]) -> int:
    import numpy as np

    from ecgx.core.dataset import load_dataset
    from ecgx.core.outputs import ATTRIBUTIONS, StagedOutput, check_output
    from ecgx.service.engine import AttributionEngine

    if "://" in args.data:
        raise InvalidArgument(f"--data {args.data}: a URI is read by the sharded output: give --out a folder")
    check_output(args.out, ATTRIBUTIONS, overwrite=args.overwrite)  # before the work, not after
    engine = AttributionEngine(args.package, providers=args.providers, max_batch=args.max_batch)
    ds = load_dataset(args.data)
    stop = len(ds) if args.count is None else args.start + args.count
    if not 0 <= args.start < len(ds) or stop > len(ds) or stop <= args.start:
        raise InvalidArgument(
            f"--start/--count select beats {args.start}..{stop - 1}, but {args.data} holds {len(ds)}"
        )
    x = np.asarray(ds.signals[args.start : stop])
    attributions = engine.attribute(args.method, x, args.target, **params)
    with StagedOutput(args.out, ATTRIBUTIONS, overwrite=args.overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, attributions)
        back = np.load(tmp, mmap_mode="r")
        if back.shape != attributions.shape or back.dtype != attributions.dtype:
            raise OSError(errno.EIO, "the written array does not read back", str(args.out))
    log.info(
        "wrote %s attributions %s for beats %d..%d to %s (providers %s)",
        args.method,
        attributions.shape,
        args.start,
        stop - 1,
        args.out,
        engine.providers,
    )
    return 0


def _attribute_sharded(args: argparse.Namespace, params: dict[str, object]) -> int:
    from ecgx.core.outputs import ATTRIBUTION_SHARDS, classify_output
    from ecgx.validation.batch_attribute import DEFAULT_SHARD_SIZE, Backend, make_spec, run_sharded

    state = classify_output(args.out, ATTRIBUTION_SHARDS)  # before the work, not after
    if state == "ours" and not (args.resume or args.overwrite):
        raise InvalidArgument(
            f"{args.out} already holds an attribution run; --resume finishes it, --overwrite replaces it"
        )
    spec, source = make_spec(
        package=args.package,
        data=args.data,
        method=args.method,
        params=params,
        target=args.target,
        start=args.start,
        count=args.count,
        shard_size=DEFAULT_SHARD_SIZE if args.shard_size is None else args.shard_size,
    )
    backend = Backend("ray", args.ray, args.workers) if args.ray else Backend("local")
    manifest = run_sharded(
        spec,
        source,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        backend=backend,
        providers=args.providers,
        max_batch=args.max_batch,
        show_progress=not args.quiet,
        seed_given="seed" in params,
    )
    counts = manifest["counts"]
    log.info(
        "wrote %s attributions of %d ECGs in %d Parquet shard(s) to %s (%s)",
        args.method,
        counts["ecgs"],
        counts["shards"],
        args.out,
        "on Ray " + args.ray if args.ray else "here",
    )
    return 0


EXIT_GATE_FAILED = 1


def _cmd_validate(args: argparse.Namespace) -> int:
    from ecgx.core.outputs import GATE_REPORT, check_output
    from ecgx.core.signing import load_private_key
    from ecgx.validation.gate import run_gate, save_report, summary_lines
    from ecgx.validation.signing import sign_report

    # The package, the key, the report path and user methods are checked before the (minutes-long)
    # gate runs; the package first: no key makes a folder that is not a package gateable.
    _check_is_package(args.package, "validate")
    key = None if args.unsigned else load_private_key(args.signing_key)
    user_methods = _user_methods(args.method or [])
    out = args.out or args.package / "gate.json"
    # Re-gating is validate's normal use: the package's own report (the default) is replaced,
    # as long as it is a gate report; a report at an explicit --out needs --overwrite.
    replace = args.overwrite or args.out is None
    check_output(out, GATE_REPORT, overwrite=replace)
    run = run_gate(
        args.package,
        args.data,
        family=args.family,
        policy=args.policy,
        methods=args.methods,
        attributors=user_methods,
        providers=args.providers,
        workers=args.workers,
        show_progress=not args.quiet,
        research=args.research,
        ray=args.ray,
    )
    report = run.report if key is None else sign_report(run.report, key)
    save_report(report, out, overwrite=replace)
    print("\n".join(summary_lines(report)))
    log.info("wrote %s gate report %s", "unsigned" if key is None else "signed", out)
    return 0 if run.passed else EXIT_GATE_FAILED


def _check_is_package(path: Path, command: str) -> None:
    """``path`` is a model package folder (``manifest.json``), else a clear error saying what it is."""
    from ecgx.core.errors import NotFound

    if (path / "manifest.json").is_file():
        return
    if not path.exists():
        raise NotFound(f"{path} does not exist; `ecgx {command}` takes a model package folder (ecgx export)")
    if path.is_dir() and any((child / "manifest.json").is_file() for child in _subfolders(path)):
        raise InvalidArgument(
            f"{path} holds packages, not one: give one of them (e.g. {next(_packages_in(path))})"
        )
    raise InvalidArgument(
        f"{path} is not a model package (no manifest.json): `ecgx export` writes one from a checkpoint"
    )


def _subfolders(path: Path) -> list[Path]:
    try:
        return [c for c in sorted(path.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    except OSError:
        return []


def _packages_in(path: Path):
    return (c for c in _subfolders(path) if (c / "manifest.json").is_file())


def _user_methods(options: Sequence[str]) -> dict[str, Callable]:
    """``--method NAME=module:function`` options, loaded and checked (:mod:`ecgx.validation.user_methods`)."""
    from ecgx.validation.user_methods import load_method, parse_method_option

    methods: dict[str, Callable] = {}
    for text in options:
        name, spec = parse_method_option(text)
        if name in methods:
            raise InvalidArgument(f"--method {text!r}: the name {name!r} is given twice")
        methods[name] = load_method(spec, name)
    return methods


def _cmd_gate_verify(args: argparse.Namespace) -> int:
    from ecgx.core.signing import load_public_key, verify_gate
    from ecgx.validation.signing import allowed_policy_hashes

    allowed = allowed_policy_hashes(args.allowed_policy or (), args.allowed_policies or ())
    result = verify_gate(
        args.package, load_public_key(args.public_key), args.report, allowed_policies=allowed
    )
    if not result.ok:
        print(f"gate report {result.report_path} does NOT verify for {result.package_path}:")
        for problem in result.problems:
            print(f"  - {problem}")
        return EXIT_GATE_FAILED
    print(f"gate report {result.report_path}: signature valid, every package file unchanged, policy allowed")
    print(f"verdict: {result.verdict}")
    if result.research:
        print("NOT servable: a RESEARCH report (ecgx validate --research); gate again without --research")
        return EXIT_GATE_FAILED
    if result.verdict != "pass":
        print("NOT servable: the gate failed (see the report's headline)")
    return 0 if result.servable else EXIT_GATE_FAILED


def _cmd_gate_keygen(args: argparse.Namespace) -> int:
    from ecgx.validation.signing import generate_keypair

    private, public = generate_keypair(args.out, overwrite=args.overwrite)
    print(f"signing key (keep secret): {private}")
    print(f"public key (give to verifiers and servers): {public}")
    return 0


def _cmd_repo_add(args: argparse.Namespace) -> int:
    from ecgx.core.signing import load_public_key
    from ecgx.service.repository import PromotionRefused, promote

    keys = [load_public_key(k) for k in args.public_key] if args.public_key else [load_public_key()]
    try:
        out = promote(
            args.package, args.repo, args.model, args.version, keys, allowed_policies=args.allowed_policy
        )
    except PromotionRefused as e:
        print(f"ecgx: refused: {e}", file=sys.stderr)
        return EXIT_GATE_FAILED
    print(f"promoted {args.package} to {out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    # The serving path never imports PyTorch (tests/service/test_grpc_service.py runs it without).
    from ecgx.core.signing import load_public_key
    from ecgx.service.audit import AuditLog
    from ecgx.service.metrics import ServiceMetrics
    from ecgx.service.oip_http import rest_ssl_context
    from ecgx.service.repository import ModelRepository
    from ecgx.service.security import load_server_security
    from ecgx.service.serve_config import resolve_serve_config
    from ecgx.service.server import serve

    cfg = resolve_serve_config(
        args.config,
        {
            "repo": args.repo,
            "host": args.host,
            "port": args.port,
            "http_port": args.http_port,
            "trusted_keys": tuple(args.trusted_key or ()),
            "allowed_policies": tuple(args.allowed_policy) if args.allowed_policy else None,
            "allow_ungated": args.allow_ungated,
            "max_batch": args.max_batch,
            "max_concurrent": args.max_concurrent,
            "max_queued": args.max_queued,
            "max_request_cost": args.max_request_cost,
            "caller_concurrent": args.caller_concurrent,
            "caller_rate": args.caller_rate,
            "grace_s": args.grace,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "tls_client_ca": args.tls_client_ca,
            "tokens": args.tokens,
            "tls_crl": args.tls_crl,
            "open_health": args.open_health,
            "insecure": args.insecure,
            "audit_log": args.audit_log,
            "audit_required": args.audit_required,
            "metrics": args.metrics,
            "metrics_host": args.metrics_host,
            "metrics_port": args.metrics_port,
            "metrics_tls_cert": args.metrics_tls_cert,
            "metrics_tls_key": args.metrics_tls_key,
            "stability_share": args.stability_share,
            "stability_queue": args.stability_queue,
            "providers": tuple(args.providers) if args.providers else None,
            "engine_threads": args.engine_threads,
            "trt_cache": args.trt_cache,
            "viewer": args.viewer,
        },
    )
    if args.no_batching:
        from ecgx.service.batcher import BatchingConfig

        cfg = dataclasses.replace(cfg, batching=BatchingConfig.off())
    # Security first: a server that would start insecure by accident refuses before loading models.
    security = load_server_security(
        tls_cert=cfg.tls_cert,
        tls_key=cfg.tls_key,
        tls_client_ca=cfg.tls_client_ca,
        tokens_file=cfg.tokens,
        tls_crl=cfg.tls_crl,
        open_health=cfg.open_health,
        insecure=cfg.insecure,
    )
    engine_options = cfg.provider_options()
    engine_options.update(cfg.engine_threads_option())
    keys = [load_public_key(k) for k in cfg.trusted_keys] if cfg.trusted_keys else [_default_trusted_key()]
    _warn_not_a_repository(Path(cfg.repo))
    repository = ModelRepository(
        cfg.repo,
        keys,
        allowed_policies=cfg.allowed_policies,
        allow_ungated=cfg.allow_ungated,
        engine_options=engine_options,
    )
    if cfg.allow_ungated:
        log.warning("RESEARCH MODE (--allow-ungated): methods the gate did not pass serve, marked ungated")
    _report_stale(cfg.repo)
    metrics = (
        ServiceMetrics(repository, stability_share=cfg.stability_share, stability_queue=cfg.stability_queue)
        if cfg.metrics
        else None
    )
    # The REST port gets the gRPC port's TLS (checked above by load_server_security).
    tls_files = (cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
    http_tls = None if cfg.http_port is None else rest_ssl_context(*tls_files)
    return serve(
        repository,
        security=security,
        audit=AuditLog(cfg.audit_log, required=cfg.audit_required) if cfg.audit_log else None,
        metrics=metrics,
        metrics_host=cfg.metrics_host,
        metrics_port=cfg.metrics_port,
        metrics_tls=cfg.metrics_tls(),
        host=cfg.host,
        port=cfg.port,
        max_batch=cfg.max_batch,
        max_concurrent=cfg.max_concurrent,
        max_queued=cfg.max_queued,
        quotas=cfg.quotas(),
        grace_s=cfg.grace_s,
        watch_interval_s=cfg.watch_interval_s,
        http_port=cfg.http_port,
        http_tls=http_tls,
        viewer=cfg.viewer,
    )


def _default_trusted_key():
    """The gate's public key from the environment, or an error naming serve's own flag."""
    import os

    from ecgx.core.signing import PUBLIC_KEY_ENV, load_public_key

    if not os.environ.get(PUBLIC_KEY_ENV):
        raise InvalidArgument(
            "serve checks every gate report against a trusted public key: pass --trusted-key FILE "
            f"(the gate_public_key.pem of `ecgx gate keygen`; the demo's is demo/keys/gate_public_key.pem) "
            f"or set {PUBLIC_KEY_ENV}"
        )
    return load_public_key()


def _warn_not_a_repository(repo: Path) -> None:
    """A folder of packages (or one package) is not a repository: serve would start and serve
    nothing, logging one "skipping" line per file; say what to do instead, once."""
    if (repo / "manifest.json").is_file():
        packages = [repo]
    elif repo.is_dir():
        packages = list(_packages_in(repo))
    else:
        return
    if packages:
        log.warning(
            "%s holds model packages (%s), not a model repository (MODEL/VERSION/ folders): nothing "
            "will be served. Make one with `ecgx repo add PACKAGE --repo REPO --model NAME --public-key "
            "KEY` for each gated package, then `ecgx serve --repo REPO`",
            repo,
            ", ".join(p.name for p in packages[:3]) + (", ..." if len(packages) > 3 else ""),
        )


def _cmd_tls_dev_cert(args: argparse.Namespace) -> int:
    from ecgx.service.security import write_dev_certificate

    cert, key = write_dev_certificate(args.out, args.name, days=args.days, overwrite=args.overwrite)
    print(f"certificate: {cert}\nprivate key (ECDSA P-256, mode 600): {key}")
    print("for local testing only (self-signed). Serve and call with:")
    print(f"  ecgx serve --repo REPO --trusted-key KEY --tls-cert {cert} --tls-key {key} --tokens TOKENS")
    print(f"  ecgx client models --server {args.name[0]}:50051 --tls-ca {cert} --token ...")
    return 0


def _report_stale(repo: Path) -> None:
    """Log what an interrupted `ecgx repo add` left in the repository (never served; takes disk)."""
    from ecgx.service.stale import DEFAULT_MIN_AGE_S, describe, stale_temporaries

    for stale in stale_temporaries(repo, DEFAULT_MIN_AGE_S):
        log.warning(
            "stale temporary folder %s left by an interrupted `ecgx repo add`; remove with "
            "`ecgx repo stale --repo %s --remove`",
            describe(stale),
            repo,
        )


def _cmd_experiments(args: argparse.Namespace) -> int:
    from ecgx.validation.experiments import run_experiments

    html = run_experiments(
        args.data,
        args.runs,
        args.out,
        policy=args.policy,
        methods=args.methods,
        providers=args.providers,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
        ray=args.ray,
        workers=args.workers,
    )
    print(f"report: {html}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ecgx.demo import run_demo

    run_demo(
        Path(args.out),
        n=args.n,
        seeds=args.seeds,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
        quick=args.quick,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecgx",
        description="ECG classifiers served from ONNX, with attribution methods gated by sanity checks.",
    )
    parser.add_argument("--version", action="version", version=f"ecgx {ecgx.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="create, import and inspect dataset folders")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    p = data_sub.add_parser(
        "synth",
        help="generate synthetic 12-lead median beats with ground-truth masks",
        description="Generate N synthetic 12-lead median beats (dipole model, nine classes, noise) with "
        "a ground-truth mask per beat. The same seed always gives identical files.",
    )
    p.add_argument("--n", type=int, required=True, help="number of beats")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder ecgx wrote")
    _add_common(p)
    p.set_defaults(func=_cmd_synth)

    p = data_sub.add_parser(
        "import-wfdb",
        help="turn WFDB records into median beats",
        description="Read WFDB records (files, record paths without extension, or folders of records, "
        "searched with their subfolders), "
        "compute one median beat per record and map '# Dx:' SNOMED codes to the nine classes. "
        "Unusable records are skipped with the reason; the rest are imported.",
    )
    p.add_argument("paths", nargs="+", help="records, or folders holding records (subfolders included)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    p.add_argument("--min-beats", type=int, default=3, help="fewest usable beats per record (default 3)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder ecgx wrote")
    _add_common(p)
    p.set_defaults(func=_cmd_import_wfdb)

    p = data_sub.add_parser(
        "import",
        help="turn ECG documents (DICOM, HL7 aECG, GE MUSE, Philips Sierra, FHIR) into median beats",
        description="Read ECG documents as hospitals store them and compute one median beat per file with "
        "the server's own code (the document's median beat when it holds one at 500 Hz, else its rhythm "
        "strip's). The format is given by --format, else each file's extension and content. The beats are "
        "imported unlabelled; unreadable files are skipped with the reason.",
    )
    p.add_argument("paths", nargs="+", type=Path, help="document files")
    p.add_argument("--format", choices=_document_formats(), help="the documents' format (default: per file)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder ecgx wrote")
    _add_common(p)
    p.set_defaults(func=_cmd_import_documents)

    p = data_sub.add_parser(
        "info", help="validate a dataset folder and count its labels", description="Validate and summarise."
    )
    p.add_argument("dir", type=Path, help="dataset folder")
    _add_common(p)
    p.set_defaults(func=_cmd_data_info)

    p = sub.add_parser(
        "train",
        help="train a seed family of CNNs",
        description="Train one model per seed (multi-label BCE, early stopping on validation loss) and write "
        "RUNDIR/seed-<s>/checkpoint.pt and metrics.json (per-class test AUROC). The split depends only on "
        "the config's split_seed. Runs under torchrun for multi-process training.",
    )
    p.add_argument("--data", type=Path, required=True, help="dataset folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default 0)")
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument("--config", type=Path, help="TOML file with [model] and [train] tables")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the whole run folder (without it, new seeds of the same dataset and config are added)",
    )
    _add_common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "export",
        help="export a trained checkpoint, or your own model, as an ONNX model package",
        description="Write PKGDIR with the forward graph, the backward graphs every attribution method needs "
        "(gradient, guided backprop, deconvnet, DeepLIFT, LRP, GradCAM), one shared weights file and "
        "manifest.json. Each graph is checked against a reference implementation first: one that "
        "disagrees is left out and its methods are marked unavailable (listed at the end); if the forward "
        "or gradient graph disagrees, nothing is written. The model is a project checkpoint (CHECKPOINT) "
        "or, with --model, your own network: "
        "a Python factory pkg.module:function plus --weights (a state dict), a torch.export program (.pt2) "
        "or a forward-only ONNX model (.onnx). --input-length is needed when the model does not fix it "
        "(a factory defaults to 600 samples), --sampling-rate unless the input is the project's 600-sample "
        "beat at 500 Hz or the file records it, --classes unless the model has the project's 9 outputs.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("checkpoint", type=Path, nargs="?", help="RUNDIR/seed-<s>/checkpoint.pt (ecgx train)")
    which.add_argument(
        "--model",
        metavar="SPEC",
        help="your own model: pkg.module:function (called with no arguments, returns the torch.nn.Module; "
        "needs --weights), a torch.export program file .pt2 (torch.export.save), or an ONNX file .onnx",
    )
    p.add_argument(
        "--weights",
        type=Path,
        metavar="FILE",
        help="with a factory: its state dict (torch.save(model.state_dict(), FILE)), read as data only and "
        "loaded strictly (every key and shape must match)",
    )
    p.add_argument(
        "--input-length",
        type=int,
        metavar="N",
        help="samples per lead of one ECG: required for a .pt2 or .onnx model whose length is dynamic; a "
        "factory defaults to 600",
    )
    p.add_argument(
        "--sampling-rate",
        type=float,
        metavar="HZ",
        help="the rate the model was trained at: required unless the input is 600 samples (500 Hz) or the "
        ".onnx/.pt2 file records sampling_rate_hz",
    )
    p.add_argument(
        "--classes",
        metavar="NAMES_OR_FILE",
        help="class names, comma-separated or a file with one per line, one per model output: required "
        "unless the model has the project's 9 outputs",
    )
    p.add_argument("--out", type=Path, required=True, help="package folder to write")
    p.add_argument("--gradcam-layer", help="IR tensor GradCAM reads (default: last convolutional block)")
    p.add_argument(
        "--check-data",
        type=Path,
        metavar="FOLDER",
        help="ECGs the export checks its graphs on (default: 8 synthetic ECGs of the model's shape): a "
        "dataset folder, or .npy arrays of the model's shape (one ECG (leads, samples) or a stack)",
    )
    p.add_argument(
        "--check-samples",
        type=int,
        default=8,
        metavar="N",
        help="how many of the --check-data ECGs the check uses, evenly spaced (default 8)",
    )
    p.add_argument(
        "--no-partial",
        action="store_true",
        help="refuse a model the export's IR cannot read instead of writing a partial package (forward "
        "pass only: occlusion, feature ablation, KernelSHAP, LIME)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing package ecgx wrote")
    _add_common(p)
    p.set_defaults(func=_cmd_export)

    from ecgx.service.methods import METHOD_NAMES

    p = sub.add_parser(
        "attribute",
        help="compute attributions of a package for beats of a dataset",
        description="Run one attribution method from a model package on ONNX Runtime (no PyTorch) and save "
        "(B, 12, 600) float32 to a .npy file, or to a folder of Parquet shards with the ECG ids (resumable, "
        "computed here or with --ray on a Ray cluster). Method settings go in --param name=value.",
    )
    p.add_argument("--package", type=Path, required=True, help="model package folder")
    p.add_argument(
        "--data",
        required=True,
        help="dataset folder, or (sharded output) a URI pyarrow reads: file://, s3://, gs://, hdfs://",
    )
    p.add_argument(
        "--method",
        required=True,
        choices=METHOD_NAMES,
        metavar="METHOD",
        help="one of: " + ", ".join(METHOD_NAMES),
    )
    p.add_argument(
        "--target", help="class key (AF), SNOMED code or index; default: each beat's predicted class"
    )
    p.add_argument("--start", type=int, default=0, help="first beat (default 0)")
    p.add_argument("--count", type=int, help="number of beats (default: all from --start)")
    p.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="method setting, repeatable"
    )
    p.add_argument("--seed", type=int, help="seed of stochastic methods")
    p.add_argument("--providers", nargs="+", help="ONNX Runtime execution providers, in priority order")
    p.add_argument("--max-batch", type=int, default=64, help="rows per ONNX Runtime run (default 64)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help=".npy file to write, or a folder (no suffix) for sharded Parquet with ECG ids (docs/cli.md)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing .npy file or folder")
    p.add_argument("--shard-size", type=int, metavar="N", help="ECGs per Parquet shard (default 256)")
    p.add_argument(
        "--resume", action="store_true", help="finish the run in the --out folder: compute missing shards"
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="compute the shards on a Ray cluster: auto, local (start one here) or its address",
    )
    p.add_argument("--workers", type=int, metavar="N", help="Ray workers (default: one per cluster CPU)")
    _add_common(p)
    p.set_defaults(func=_cmd_attribute)

    _add_gate_parsers(sub, METHOD_NAMES)

    p = sub.add_parser(
        "demo",
        help="generate data, train a seed family, export and gate packages, serve one explanation",
        description="The whole pipeline on the built-in defaults: synthesise a dataset, train three seeds, "
        "print per-class test AUROC, export each model as an ONNX package, gate the packages under the "
        "default policy (signed reports, an HTML report in OUT/report), draw attributions of one test "
        "window per class marked with the gate's verdicts (OUT/figures), serve the gated versions "
        "(OUT/repo) on loopback and fetch an explanation over gRPC (OUT/figures/grpc_explanation.png). "
        "It ends with what it wrote where, the verdict per package and the commands to go on with. "
        "What the demo trims for time (methods gated; with --quick also beats, epochs and packages "
        "gated) it prints first and writes into the report; the gate policy itself is never trimmed.",
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="working folder (default ./demo)")
    p.add_argument("--n", type=int, default=None, help="number of synthetic beats (default: the demo's own)")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; with --quick 0 1)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo every step, replacing the outputs of an earlier demo in OUT",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a first look in a few minutes: fewer beats and epochs, 5 methods, the first package gated "
        "(it says what it trimmed)",
    )
    _add_common(p)
    p.set_defaults(func=_cmd_demo)

    from ecgx.client import add_parser as add_client_parser  # no PyTorch: the client path stays light

    add_client_parser(sub, _add_common)
    from ecgx.token_cli import add_parser as add_token_parser  # no PyTorch

    add_token_parser(sub, _add_common)
    from ecgx.audit_cli import add_parser as add_audit_parser  # no PyTorch

    add_audit_parser(sub, _add_common)
    return parser


def _add_gate_ray_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the gate's work on a Ray cluster: HOST:PORT, auto (RAY_ADDRESS or the running one) "
        "or local (a cluster for this run); the numbers are those of the local run (needs ecgx[ray])",
    )


def _add_gate_parsers(sub: argparse._SubParsersAction, method_names: Sequence[str]) -> None:
    p = sub.add_parser(
        "validate",
        help="gate a model package: sanity checks of every attribution method",
        description="Run the validation gate on PKG through its ONNX graphs: model randomisation, "
        "perturbation faithfulness against the random control, self-consistency across the seed family, "
        "inter-method similarity and ground-truth localisation. Writes a signed JSON report. "
        "Exit status: 0 the gate passed, 1 it failed, 2 bad usage or input.",
    )
    p.add_argument("package", type=Path, metavar="PKG", help="model package folder")
    p.add_argument("--data", type=Path, required=True, help="validation dataset folder")
    p.add_argument("--family", type=Path, nargs="+", default=[], metavar="PKG", help="seed siblings of PKG")
    p.add_argument("--policy", type=Path, help="policy TOML (default: the shipped default policy)")
    p.add_argument(
        "--out", type=Path, help="report file to write (default PKG/gate.json, replaced when re-gating)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing gate report at --out")
    key_help = "Ed25519 private key PEM (default: the ECGX_GATE_SIGNING_KEY environment variable)"
    p.add_argument("--signing-key", type=Path, help=key_help)
    p.add_argument("--unsigned", action="store_true", help="write the report without a signature")
    p.add_argument("--methods", nargs="+", choices=method_names, metavar="METHOD", help="default: all")
    p.add_argument("--providers", nargs="+", help="ONNX Runtime execution providers, in priority order")
    p.add_argument(
        "--workers", type=int, help="methods side by side (default: CPU count; with --ray: cluster CPUs)"
    )
    _add_gate_ray_flag(p)
    p.add_argument(
        "--method",
        action="append",
        metavar="NAME=MODULE:FUNCTION",
        help="also gate your own method, fn(engine, x, target) -> (B, 12, 600) array, from module:function "
        "or path/to/file.py:function; repeatable. Its verdict is informational: the service serves only "
        "built-in methods",
    )
    p.add_argument(
        "--research",
        action="store_true",
        help="gate under a policy below the floor (refused otherwise); the report is marked research "
        "and can never be served or verified as servable",
    )
    _add_common(p)
    p.set_defaults(func=_cmd_validate)

    gate = sub.add_parser("gate", help="keys for gate reports, and verification of a gated package")
    gate_sub = gate.add_subparsers(dest="gate_command", required=True, metavar="GATE_COMMAND")
    p = gate_sub.add_parser(
        "verify",
        help="check a package's gate report: signature, file hashes, verdict",
        description="Check that PKG's gate report is signed by the given public key, that no package file "
        "changed since gating and that its policy is on the allow-list (default: this ecgx's default "
        "policy). Exit status: 0 authentic, intact, allowed, passed and not a research report; 1 otherwise; "
        "2 bad input.",
    )
    p.add_argument("package", type=Path, metavar="PKG", help="model package folder")
    p.add_argument("--report", type=Path, help="gate report (default PKG/gate.json)")
    p.add_argument(
        "--public-key", type=Path, help="Ed25519 public key PEM (default: the ECGX_GATE_PUBLIC_KEY variable)"
    )
    p.add_argument(
        "--allowed-policy",
        action="append",
        metavar="SHA256",
        help="accept reports made under this policy hash (repeatable); with no --allowed-policy, "
        "--allowed-policies or ECGX_ALLOWED_POLICIES, only this ecgx's default policy is accepted",
    )
    p.add_argument(
        "--allowed-policies",
        action="append",
        type=Path,
        metavar="FILE",
        help="file of accepted policy hashes, one per line, '#' comments (repeatable)",
    )
    _add_common(p)
    p.set_defaults(func=_cmd_gate_verify)
    p = gate_sub.add_parser(
        "keygen", help="create an Ed25519 key pair for signing gate reports", description="Create a key pair."
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the two PEM files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing key folder")
    _add_common(p)
    p.set_defaults(func=_cmd_gate_keygen)

    tls = sub.add_parser("tls", help="TLS material for local testing")
    tls_sub = tls.add_subparsers(dest="tls_command", required=True, metavar="TLS_COMMAND")
    p = tls_sub.add_parser(
        "dev-cert",
        help="a self-signed certificate and ECDSA P-256 key that gRPC accepts, for local testing",
        description="Write OUT/cert.pem (self-signed, for --name, valid --days) and OUT/key.pem (ECDSA "
        "P-256, mode 600): a key type gRPC's TLS signs with (Ed25519 keys load but every handshake "
        "fails). Serve with --tls-cert OUT/cert.pem --tls-key OUT/key.pem; clients trust it with "
        "--tls-ca OUT/cert.pem. Not for production: no CA vouches for it (docs/security.md).",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for cert.pem and key.pem")
    p.add_argument(
        "--name",
        nargs="+",
        default=["localhost", "127.0.0.1"],
        help="DNS names and IP addresses the certificate is valid for (default: localhost 127.0.0.1)",
    )
    p.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    p.add_argument("--overwrite", action="store_true", help="replace cert.pem and key.pem in OUT")
    _add_common(p)
    p.set_defaults(func=_cmd_tls_dev_cert)

    repo = sub.add_parser("repo", help="the model repository that `ecgx serve` reads")
    repo_sub = repo.add_subparsers(dest="repo_command", required=True, metavar="REPO_COMMAND")
    p = repo_sub.add_parser(
        "add",
        help="promote a gated package into a model repository",
        description="Copy PKG into DIR/NAME/VERSION, atomically, only when its gate report (PKG/gate.json) "
        "is signed by a given public key, names exactly PKG's files, passed, and (with --allowed-policy) was "
        "made under an allowed policy. An existing version is never replaced. Exit status: 0 promoted; "
        "1 the gate failed or its report does not verify; 2 bad usage or input.",
    )
    p.add_argument("package", type=Path, metavar="PKG", help="gated model package folder")
    p.add_argument("--repo", type=Path, required=True, metavar="DIR", help="model repository folder")
    p.add_argument("--model", required=True, metavar="NAME", help="model name (a plain name)")
    p.add_argument("--version", metavar="V", help="version name (default: the largest integer version + 1)")
    p.add_argument(
        "--public-key",
        type=Path,
        action="append",
        metavar="PEM",
        help="trusted Ed25519 public key, repeatable (default: the ECGX_GATE_PUBLIC_KEY variable)",
    )
    p.add_argument(
        "--allowed-policy", nargs="+", metavar="SHA256", help="accept only reports made under these policies"
    )
    _add_common(p)
    p.set_defaults(func=_cmd_repo_add)
    from ecgx.repo_cli import add_stale_parser  # no PyTorch

    add_stale_parser(repo_sub, _add_common)

    p = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC (ecgx.v1.ExplanationService)",
        description="Serve the verified, gated versions under DIR (DIR/MODEL/VERSION, see `ecgx repo add`) "
        "over gRPC, picking up new and removed versions without a restart. It refuses to start without TLS "
        "and an identity source (--tls-client-ca and/or --tokens) unless --insecure is given "
        "(docs/security.md). Prometheus metrics on --metrics-port (docs/monitoring.md). SIGTERM or "
        "Ctrl-C: stop accepting, let in-flight requests finish within --grace seconds, exit 0.",
    )
    p.add_argument("--repo", type=Path, metavar="DIR", help="model repository folder (or repo = in --config)")
    p.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file with a [serve] table; flags win over it"
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 50051; 0 picks a free one)")
    p.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help="also serve the Open Inference Protocol over HTTP/REST (KServe v2) on this port, same host, "
        "TLS and tokens (0 picks a free one; default: off; docs/http.md)",
    )
    p.add_argument(
        "--viewer",
        action="store_true",
        default=None,
        help="also serve the web viewer at /viewer/ on the HTTP port, behind the same tokens "
        "(needs --http-port; docs/viewer.md)",
    )
    p.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        metavar="PEM",
        help="trusted Ed25519 public key for gate reports, repeatable (default: ECGX_GATE_PUBLIC_KEY)",
    )
    p.add_argument(
        "--allowed-policy", nargs="+", metavar="SHA256", help="serve only reports made under these policies"
    )
    p.add_argument(
        "--allow-ungated",
        action="store_true",
        default=None,
        help="research mode: also serve methods (and versions) the gate did not pass, marked ungated",
    )
    p.add_argument("--max-batch", type=int, metavar="N", help="most ECGs a request (default 64)")
    p.add_argument(
        "--max-concurrent",
        type=int,
        metavar="N",
        help="most Predict/Explain requests running at once (default 8)",
    )
    p.add_argument(
        "--max-queued",
        type=int,
        metavar="N",
        help="requests that may wait for a slot (up to 30 s) beyond --max-concurrent; more get "
        "RESOURCE_EXHAUSTED at once (default 4 x --max-concurrent)",
    )
    p.add_argument(
        "--max-request-cost",
        type=int,
        metavar="ROWS",
        help="most model rows (ECGs x targets x methods x rows per ECG) one request may cost; more is "
        "RESOURCE_EXHAUSTED before any work (default 200000; 0: no budget)",
    )
    p.add_argument(
        "--caller-concurrent",
        type=int,
        metavar="N",
        help="most requests one identified caller may have running or queued (default: half of "
        "--max-concurrent)",
    )
    p.add_argument(
        "--caller-rate",
        metavar="RATE",
        help="Predict/Explain requests per identified caller, e.g. 600/minute (default), or off",
    )
    p.add_argument(
        "--grace",
        type=float,
        metavar="S",
        help="seconds in-flight requests get at SIGTERM; then they are cancelled (default 10)",
    )
    _add_security_flags(p)
    _add_monitoring_flags(p)
    _add_common(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "experiments",
        help="the study's experiments over all methods and a seed family, as an HTML report",
        description="Inter-method similarity, self-consistency across seeds, cascading randomisation, "
        "perturbation curves and ground-truth localisation for every method, as OUT/report.html (figures "
        "embedded, and also written as PNG) with the measurements in OUT/experiments.json. RUNDIR holds "
        "seed-<s> folders: training runs (exported on first use) or packages.",
    )
    p.add_argument("--data", type=Path, required=True, help="validation dataset folder")
    p.add_argument("--runs", type=Path, required=True, help="folder of seed-<s> runs or packages (>= 3)")
    p.add_argument("--out", type=Path, required=True, help="report folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder ecgx wrote")
    p.add_argument("--policy", type=Path, help="policy TOML (ECG counts, settings)")
    p.add_argument("--methods", nargs="+", choices=method_names, metavar="METHOD", help="default: all")
    p.add_argument("--providers", nargs="+", help="ONNX Runtime execution providers, in priority order")
    p.add_argument(
        "--workers", type=int, help="methods side by side (default: CPU count; with --ray: cluster CPUs)"
    )
    _add_gate_ray_flag(p)
    _add_common(p)
    p.set_defaults(func=_cmd_experiments)


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (docs/security.md)")
    g.add_argument("--tls-cert", metavar="PEM", help="server certificate chain (default: ECGX_TLS_CERT)")
    g.add_argument("--tls-key", metavar="PEM", help="server private key (default: ECGX_TLS_KEY)")
    g.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="CA of client certificates: mutual TLS; the certificate names the caller "
        "(default: ECGX_TLS_CLIENT_CA)",
    )
    g.add_argument(
        "--tokens", type=Path, metavar="FILE", help="access file of hashed bearer tokens (ecgx token new)"
    )
    g.add_argument(
        "--open-health",
        action="store_true",
        default=None,
        help="serve gRPC health and reflection without credentials, for probes",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow plaintext and/or no authentication: for a trusted network only (logged loudly)",
    )
    g.add_argument(
        "--tls-crl",
        type=Path,
        metavar="FILE",
        help="revocation list of client certificates (PEM or DER, signed by the client CA), reloaded",
    )
    g.add_argument(
        "--audit-log",
        metavar="FILE",
        help="append one hash-chained JSON line per call to FILE ('-': stderr); reopened on SIGHUP",
    )
    g.add_argument(
        "--audit-required",
        action="store_true",
        default=None,
        help="fail closed: refuse calls (UNAVAILABLE) while the audit log cannot be written",
    )


def _add_monitoring_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("monitoring (docs/monitoring.md)")
    g.add_argument(
        "--no-metrics", dest="metrics", action="store_false", default=None, help="no Prometheus endpoint"
    )
    g.add_argument("--metrics-host", metavar="ADDR", help="metrics endpoint's address (default 127.0.0.1)")
    g.add_argument("--metrics-port", type=int, metavar="PORT", help="metrics port (default 9464; 0: free)")
    g.add_argument(
        "--metrics-tls-cert",
        metavar="PEM",
        help="serve metrics over HTTPS with this certificate ('serving': the --tls-cert file)",
    )
    g.add_argument("--metrics-tls-key", metavar="PEM", help="its private key ('serving': the --tls-key file)")
    g.add_argument(
        "--stability-share",
        type=float,
        metavar="P",
        help="share of Explain requests re-checked under input noise, off the request path (default 0.05)",
    )
    g.add_argument(
        "--stability-queue", type=int, metavar="N", help="stability samples that may wait (default 8)"
    )
    p.add_argument(
        "--providers",
        nargs="+",
        metavar="PROVIDER",
        help="ONNX Runtime execution providers in priority order, e.g. CUDAExecutionProvider "
        "CPUExecutionProvider (default: TensorRT, CUDA, CPU, as the installed onnxruntime offers them)",
    )
    p.add_argument(
        "--engine-threads",
        type=int,
        metavar="N",
        help="engine threads (default 1: requests run side by side instead, which measured faster on "
        "small CPUs; N >= 2 splits large passes over N single-thread runs; 0 lets ONNX Runtime choose)",
    )
    p.add_argument(
        "--trt-cache",
        type=Path,
        metavar="DIR",
        help="TensorRT engine and timing caches in DIR, passed as provider options (GPU only; "
        "default: none, every start builds its engines again; docs/deployment.md)",
    )
    p.add_argument(
        "--no-batching",
        action="store_true",
        help="answer each request with its own engine call (dynamic batching is on by default; "
        "docs/serving.md)",
    )


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def describe_os_error(e: OSError) -> str:
    """One line naming the file and what is wrong, never a bare ``[Errno 22] Invalid argument``."""
    if e.errno is None or not e.strerror:  # raised by ecgx with a message of its own
        return str(e)
    what = {
        errno.ENOENT: "does not exist",
        errno.EISDIR: "is a folder, where a file is needed",
        errno.ENOTDIR: "is not a folder, or a part of the path is a file",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EINVAL: "invalid argument: the operating system refused this path or operation",
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "is on a read-only file system",
        errno.ENAMETOOLONG: "file name too long",
        errno.EEXIST: "already exists",
        errno.ENOTEMPTY: "is a folder that is not empty",
    }.get(e.errno, e.strerror.lower())
    if e.filename is None:
        return f"file system error: {what} (errno {e.errno}; --verbose shows where)"
    target = f" -> {e.filename2}" if e.filename2 is not None else ""
    return f"{e.filename}{target}: {what}"


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so temporary outputs are removed on the way out.
    raise SystemExit(EXIT_TERMINATED)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet, args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return func(args)
    except USER_ERRORS as e:
        _error(str(e))
        return EXIT_USAGE
    except ModuleNotFoundError as e:
        extra = OPTIONAL_MODULES.get((e.name or "").partition(".")[0])
        if extra is None:
            raise
        _error(
            f"`ecgx {args.command}` needs {e.name}, which this install lacks: "
            f"pip install 'ecgx[{extra}]' (see the README's set-up)"
        )
        return EXIT_USAGE
    except OSError as e:
        log.debug("file system error", exc_info=True)
        _error(describe_os_error(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ecgx: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _error(message: str) -> None:
    """The one ``ecgx: error:`` line (a message of several lines is joined, never cut)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    print(f"ecgx: error: {'; '.join(lines) or 'unknown error'}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
