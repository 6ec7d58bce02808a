"""The study's four experiments plus ground-truth localisation, over a seed family, as a report.

The experiments are the gate's checks run over every method with a family of at
least three seeds: inter-method similarity, self-consistency across seeds,
cascading randomisation and perturbation curves, and localisation where the data
has masks. They reuse :func:`ecgx.validation.gate.run_gate`, so the numbers in the
report are exactly what the gate measures.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from ecgx.core.errors import InvalidArgument
from ecgx.core.outputs import EXPERIMENTS, StagedOutput
from ecgx.core.package_reader import MANIFEST_FILE
from ecgx.validation.gate import GateRun, run_gate
from ecgx.validation.policy import Policy

log = logging.getLogger(__name__)

MIN_SEEDS = 3
REPORT_JSON = "experiments.json"
REPORT_FILE = "report.html"  # ecgx.validation.html_report.REPORT_FILE, without importing matplotlib
# ecgx.training.train.CHECKPOINT_FILE; importing that module would load PyTorch for every run.
CHECKPOINT_FILE = "checkpoint.pt"


def find_packages(runs: Path, export_dir: Path, reuse_dir: Path | None = None) -> list[Path]:
    """One package per ``seed-<s>`` folder of ``runs``, in seed order.

    A folder holding ``manifest.json`` is a package already (``ecgx demo``'s
    ``packages/``); one holding ``checkpoint.pt`` is a training run, exported into
    ``export_dir/seed-<s>`` (with the export's Captum check), or copied from
    ``reuse_dir/seed-<s>`` (an earlier report's exports) when that is an export of the
    very same checkpoint file.
    """
    runs = Path(runs)
    if not runs.is_dir():
        raise FileNotFoundError(f"run folder {runs} does not exist")
    seeds = sorted(
        (d for d in runs.iterdir() if d.is_dir() and re.fullmatch(r"seed-\d+", d.name)),
        key=lambda d: int(d.name.split("-")[1]),
    )
    packages = []
    for d in seeds:
        if (d / MANIFEST_FILE).is_file():
            packages.append(d)
        elif (d / CHECKPOINT_FILE).is_file():
            reuse = None if reuse_dir is None else reuse_dir / d.name
            packages.append(_exported(d / CHECKPOINT_FILE, export_dir / d.name, reuse))
    if len(packages) < MIN_SEEDS:
        raise InvalidArgument(
            f"{runs} holds {len(packages)} trained seed(s) (seed-<s>/{CHECKPOINT_FILE} or packages); "
            f"the self-consistency experiment needs at least {MIN_SEEDS}: train more with "
            f"`ecgx train --seeds 0 1 2`"
        )
    return packages


def _exported(checkpoint: Path, package: Path, reuse: Path | None = None) -> Path:
    if (package / MANIFEST_FILE).is_file():
        return package
    if reuse is not None and _is_export_of(reuse, checkpoint):
        log.info("reusing %s, an export of %s", reuse, checkpoint)
        package.parent.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copytree(reuse, package))
    from ecgx.training.export import export_checkpoint  # PyTorch is needed only here

    log.info("exporting %s to %s", checkpoint, package)
    return export_checkpoint(checkpoint, package)


def _is_export_of(package: Path, checkpoint: Path) -> bool:
    """True when ``package`` was exported from exactly this checkpoint file (its SHA-256)."""
    from ecgx.core.package_reader import sha256_file

    try:
        manifest = json.loads((package / MANIFEST_FILE).read_text())
        return manifest["source"]["sha256"] == sha256_file(checkpoint)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_experiments(
    data: Path,
    runs: Path,
    out: Path,
    *,
    policy: Policy | Path | None = None,
    methods: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    ray: str | None = None,
    workers: int | None = None,
) -> Path:
    """Gate the first seed with the others as its family and write the report folder ``out``.

    ``out`` follows the output rule (:mod:`ecgx.core.outputs`): it is built in a temporary sibling,
    exported packages included (``out/packages``), and renamed into place when complete; with
    ``overwrite`` an earlier report's exports of the same checkpoints are reused. ``ray``: run the
    gate's work on a Ray cluster (``auto``, ``local`` or HOST:PORT) with ``workers`` actors; the
    numbers are those of the local run.
    """
    out = Path(out)
    with StagedOutput(out, EXPERIMENTS, overwrite=overwrite) as tmp:
        reuse = out / "packages" if overwrite and (out / "packages").is_dir() else None
        packages = find_packages(runs, tmp / "packages", reuse)
        run = run_gate(
            packages[0],
            data,
            family=packages[1:],
            policy=policy,
            methods=methods,
            providers=providers,
            show_progress=show_progress,
            workers=workers,
            ray=ray,
            research=True,  # the study's experiments take any policy; their report is never served
        )
        _relocate(run.report, tmp, out)
        _write_report(run, tmp)
    return out / REPORT_FILE


def _relocate(report: dict, tmp: Path, out: Path) -> None:
    """Packages exported into the temporary folder are recorded where they will end up."""
    for record in [report["package"], *report["family"]]:
        path = Path(record["path"])
        if path.is_relative_to(tmp):
            record["path"] = str(out / path.relative_to(tmp))


def write_experiments(run: GateRun, out: Path, *, overwrite: bool = False) -> Path:
    """The HTML report with its PNG figures, and the measurements as JSON, as the folder ``out``
    (the output rule of :mod:`ecgx.core.outputs`); returns the path of ``report.html``."""
    out = Path(out)
    with StagedOutput(out, EXPERIMENTS, overwrite=overwrite) as tmp:
        _write_report(run, tmp)
    return out / REPORT_FILE


def _write_report(run: GateRun, out: Path) -> None:
    from ecgx.validation.html_report import study_comparison_rows, write_html_report

    (out / REPORT_JSON).write_text(json.dumps(run.report, indent=1, allow_nan=False))
    n_models = 1 + len(run.report["family"])
    notes = [
        f"Package {run.report['package']['path']} gated with {n_models - 1} seed sibling(s) as its family; "
        f"{run.report['data']['ecgs']} validation ECGs from {run.report['data']['path']}.",
        "Correlations between maps are Pearson correlations of absolute attributions, per ECG, then "
        "averaged; randomisation similarity is Spearman of absolute attributions (and signed, and SSIM).",
        "Stochastic methods use the same random draws for every model, so differences between seeds "
        "come from the models. The random control draws anew for each trained model: it is the floor.",
    ]
    write_html_report(
        run,
        out,
        title="Attribution sanity experiments",
        study_comparison=study_comparison_rows(run.report),
        notes=notes,
    )
