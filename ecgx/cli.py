"""The ``ecgx`` command line: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import ecgx

log = logging.getLogger("ecgx")

# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileExistsError, FileNotFoundError, KeyError)
EXIT_USAGE = 2


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _cmd_synth(args: argparse.Namespace) -> int:
    from training.data.synth import synthesize_dataset

    out = synthesize_dataset(
        args.out, args.n, args.seed, overwrite=args.overwrite, show_progress=not args.quiet
    )
    log.info("wrote %d synthetic beats to %s", args.n, out)
    return 0


def _cmd_import_wfdb(args: argparse.Namespace) -> int:
    from training.data.wfdb_import import import_wfdb

    report = import_wfdb(
        args.paths, args.out, overwrite=args.overwrite, show_progress=not args.quiet, min_beats=args.min_beats
    )
    log.info(
        "imported %d record(s) into %s; skipped %d", len(report.imported), report.out, len(report.skipped)
    )
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    from training.data.dataset import load_dataset
    from training.data.schema import CLASSES

    ds = load_dataset(args.dir)
    print(f"{ds.path}: {len(ds)} beats, source {ds.meta.get('source')}, ground truth {ds.has_ground_truth}")
    counts = ds.labels.sum(axis=0, dtype=int) if len(ds) else [0] * len(CLASSES)
    for c, k in zip(CLASSES, counts, strict=True):
        print(f"  {c.key:6s} {c.code:>10s}  {c.name:30s} {int(k):8d}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.train import train_run

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
        from training.summary import format_training_summary

        print(format_training_summary(Path(args.out), args.seeds))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ecgx.demo import run_demo

    run_demo(
        Path(args.out), n=args.n, seeds=args.seeds, overwrite=args.overwrite, show_progress=not args.quiet
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    _add_common(p)
    p.set_defaults(func=_cmd_synth)

    p = data_sub.add_parser(
        "import-wfdb",
        help="turn WFDB records into median beats",
        description="Read WFDB records (files, record paths without extension, or folders of records), "
        "compute one median beat per record and map '# Dx:' SNOMED codes to the nine classes. "
        "Unusable records are skipped with the reason; the rest are imported.",
    )
    p.add_argument("paths", nargs="+", help="records or folders holding records")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    p.add_argument("--min-beats", type=int, default=3, help="fewest usable beats per record (default 3)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    _add_common(p)
    p.set_defaults(func=_cmd_import_wfdb)

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
    p.add_argument("--overwrite", action="store_true", help="replace models already trained in RUNDIR")
    _add_common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "demo",
        help="generate data, train a seed family and show the results",
        description="The whole pipeline on the built-in defaults: synthesise a dataset, train three seeds "
        "and print per-class test AUROC.",
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="working folder (default ./demo)")
    p.add_argument("--n", type=int, default=None, help="number of synthetic beats (default: the demo's own)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--overwrite", action="store_true", help="redo steps whose outputs exist")
    _add_common(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet, args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"ecgx: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ecgx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
