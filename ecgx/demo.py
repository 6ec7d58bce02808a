"""``ecgx demo``: the whole pipeline on the built-in defaults.

Synthesise data, train a seed family, export each model as an ONNX package,
draw attributions of the exported package for one test beat per class, gate
every package (signed reports, with its siblings as the seed family), write
the experiments report, and finally promote the gated packages into a model
repository (``OUT/repo``, as ``ecgx repo add`` does), serve it on a free loopback
port in this process and fetch an explanation of one test beat over gRPC with the
client's code (``OUT/figures/grpc_explanation.png``).

OUT is the demo's working folder, marked by ``ecgx-demo.json``: the demo continues a
folder it wrote (each step up to the export skips itself when its output exists, so
an interrupted demo resumes there; ``overwrite`` redoes every step), and refuses any
other non-empty folder. Every step writes its output by the rule of :mod:`ecgx.core.outputs`.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import resource
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ecgx.core.dataset import load_dataset
from ecgx.core.errors import InvalidArgument
from ecgx.core.outputs import (
    DEMO,
    FIGURES,
    OutputError,
    OutputKind,
    StagedOutput,
    classify_output,
    write_text_atomic,
)
from ecgx.core.progress import progress, progress_bar
from ecgx.core.schema import CLASSES
from ecgx.service.engine import AttributionEngine
from ecgx.service.methods import METHOD_NAMES
from ecgx.training.config import TrainConfig
from ecgx.training.data.synth import synthesize_dataset
from ecgx.training.export import export_checkpoint
from ecgx.training.models import ModelConfig
from ecgx.training.summary import format_training_summary
from ecgx.training.train import CHECKPOINT_FILE, check_seeds, make_split, seed_dir, train_run

if TYPE_CHECKING:
    from ecgx.validation.gate import GateRun

log = logging.getLogger(__name__)
FIGURES_DIR = "figures"

DEMO_BEATS = 8000
DEMO_DATA_SEED = 0
# Drawn in the figures, those the demo gated (each marked with its verdict).
DEMO_METHODS = (
    "gradient_shap",
    "deeplift_shap",
    "saliency",
    "integrated_gradients",
    "input_x_gradient",
    "lrp",
    "gradcam",
)
# Validation beats come from another generator seed than the training beats.
VALIDATION_SEED = 1000
# The demo gates under the default policy (256 ECGs): a smaller one would be below the gate's
# floor, and its reports could never be promoted and served. The validation set holds more beats
# than that so every class has enough positives.
DEMO_VALIDATION_BEATS = 384
MARKER_FILE = "ecgx-demo.json"
TIMINGS_FILE = "timings.json"  # OUT/timings.json: wall and CPU seconds per step (benchmarks/demo_timing.py)
DEMO_MODEL = "ecg"  # the model name in OUT/repo
GRPC_FIGURE = "grpc_explanation.png"
# The method explained over gRPC: the first of these the gate passed on the served version
# (cheap ones first), else the first method the gate passed.
GRPC_METHODS = ("gradient_shap", "deeplift_shap", "gradcam", "integrated_gradients", "saliency", "deeplift")
RECORDS = "records"  # OUT/records/test-beat.npy: the test window explained over gRPC, for `ecgx client`
RECORD_FILE = "test-beat.npy"


def _is_repository(folder: Path) -> bool:
    """A model repository the demo wrote: <model>/<version>/ package folders (hidden copies aside)."""
    for model in folder.iterdir():
        if model.name.startswith("."):
            continue
        if not model.is_dir():
            return False
        for version in model.iterdir():
            if not version.name.startswith(".") and not (version / "manifest.json").is_file():
                return False
    return True


REPOSITORY = OutputKind("model repository", True, _is_repository, "<model>/<version>/manifest.json")


@dataclass(frozen=True)
class DemoPlan:
    """What one flavour of the demo does. The gate policy is always the default one (its ECG
    counts, draws and thresholds are the floor for servable reports); what a plan trims is the
    training data, the epochs, the methods gated and which packages are gated, and
    :meth:`trims` says so in the demo's output and in its report."""

    name: str
    beats: int
    max_epochs: int  # TrainConfig's own default for the full demo
    gate_methods: tuple[str, ...]
    gate_every_package: bool
    seeds: tuple[int, ...] = (0, 1, 2)  # the seed family trained (the gate needs two at least)

    def trims(self, n: int, seeds: Sequence[int]) -> list[str]:
        """What this demo leaves out compared with gating for real use, one sentence each."""
        left_out = [m for m in METHOD_NAMES if m not in self.gate_methods and m != "random"]
        lines = []
        if n < DEMO_BEATS or self.max_epochs < TrainConfig().max_epochs:
            lines.append(
                f"trains on {n} synthetic beats for at most {self.max_epochs} epochs "
                f"(the full demo: {DEMO_BEATS} beats, {TrainConfig().max_epochs} epochs), "
                "so its models are weaker"
            )
        if left_out:
            lines.append(
                f"gates {len(self.gate_methods)} of {len(METHOD_NAMES) - 1} methods; left out, for time: "
                f"{', '.join(left_out)} (`ecgx validate PACKAGE ...` gates them all); "
                "a method not gated is never served"
            )
        if len(seeds) < len(FULL_SEEDS):
            lines.append(
                f"trains {len(seeds)} seeds (the full demo: {len(FULL_SEEDS)}), so the gate's seed "
                f"family holds {len(seeds) - 1} sibling{'s' if len(seeds) > 2 else ''} and the "
                "self-consistency check has less to compare"
            )
        if not self.gate_every_package and len(seeds) > 1:
            lines.append(
                f"gates the first package only (seed {seeds[0]}, with the others as its seed family); "
                "the others are exported but not gated, so they are not served"
            )
        lines.append(
            "the gate policy is the default one, not trimmed: the same ECG counts, "
            "randomisation draws and thresholds as for real use"
        )
        return lines


FULL_SEEDS = (0, 1, 2)
# The four slowest methods (occlusion, feature ablation, KernelSHAP, LIME: about 70 % of an
# attribution pass, benchmarks/RESULTS.md) and SmoothGrad are left out of the demo's gate; the
# rest include the two that pass on the demo's configuration (GradientSHAP, DeepLIFT-SHAP) and
# failures worth seeing (input-multiplied maps, raw gradients, GradCAM).
FULL = DemoPlan(
    "full",
    DEMO_BEATS,
    TrainConfig().max_epochs,
    (
        "saliency",
        "input_x_gradient",
        "integrated_gradients",
        "gradient_shap",
        "deeplift",
        "deeplift_shap",
        "guided_backprop",
        "gradcam",
        "lrp",
    ),
    # One gate is most of the demo's time (profiled in benchmarks/RESULTS.md, issue #22): the
    # first package is gated with the other two as its family; gating all three would triple it.
    gate_every_package=False,
    seeds=FULL_SEEDS,
)
# The first look: GradientSHAP (passes), raw gradients and GradCAM (each fails differently). Input x
# gradient and LRP-eps, one method on this ReLU network, are left to the full demo; so is the third
# seed (a family of one sibling is the gate's minimum).
QUICK = DemoPlan(
    "quick",
    3000,
    8,
    ("saliency", "gradient_shap", "gradcam"),
    gate_every_package=False,
    seeds=(0, 1),
)


@dataclass(frozen=True)
class StepTime:
    """One step's wall-clock and CPU seconds (user + system of this process and its children:
    CPU time above the wall clock means the step used both cores)."""

    step: str
    wall: float
    cpu: float


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextmanager
def timed_step(steps: list[StepTime], name: str) -> Iterator[None]:
    """Append ``name``'s wall and CPU seconds to ``steps`` when the block ends (also on error)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    try:
        yield
    finally:
        steps.append(StepTime(name, time.perf_counter() - wall, cpu_seconds() - cpu))


def run_demo(
    out: Path,
    *,
    n: int | None = None,
    seeds: Sequence[int] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    quick: bool = False,
) -> DemoResult:
    """Run every step, then print what was written where, the gate's verdict per package and the
    commands to go on with (:func:`closing_summary`)."""
    started = time.perf_counter()
    out = Path(out)
    plan = QUICK if quick else FULL
    n = plan.beats if n is None else n
    seeds = plan.seeds if seeds is None else seeds
    data_dir, run_dir, pkg_dir, fig_dir = out / "data", out / "runs", out / "packages", out / "figures"
    # Everything that can be checked is checked before anything is written.
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgument(f"--n must be a whole number >= 1, got {n!r}")
    seeds = check_seeds(seeds)
    state = classify_output(out, DEMO)  # a non-empty folder without the marker is refused, whatever the flags
    if state == "ours":
        _check_reusable_data(data_dir, n, overwrite)
        log.info("continuing the demo in %s", out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / MARKER_FILE, json.dumps({"ecgx_demo": 1, "created": time.time()}) + "\n")
    trims = plan.trims(n, seeds)
    print(f"ecgx demo ({plan.name}) in {out}; this demo:")
    print("\n".join(f"  - {t}" for t in trims), flush=True)
    steps: list[StepTime] = []
    with timed_step(steps, "data"):
        _synthesise(data_dir, n, overwrite, show_progress)
    with timed_step(steps, "training and export"):
        packages = _train_and_export(data_dir, run_dir, pkg_dir, seeds, plan, overwrite, show_progress)
    print(format_training_summary(run_dir, seeds), flush=True)
    result = DemoResult(out=out, packages=packages, trims=trims, steps=steps)
    if len(packages) > 1:
        gated = packages if plan.gate_every_package else packages[:1]
        with timed_step(steps, "gate"):
            verdicts, first_run = _gate(out, gated, packages, plan, show_progress)
        result.verdicts = verdicts
        with timed_step(steps, "report"):
            result.report = _write_report(out, first_run, trims, show_progress)
        print(f"experiments report: {result.report}", flush=True)
        with timed_step(steps, "figures"):
            result.figures = _draw(data_dir, packages[0], fig_dir, first_run.report, show_progress)
        with timed_step(steps, "serve and explain"):
            _serve_and_explain(out, gated, data_dir, fig_dir, result)
    else:
        log.warning(
            "one seed only: the gate needs a seed family, so gating, the report and serving are skipped"
        )
        with timed_step(steps, "figures"):
            result.figures = _draw(data_dir, packages[0], fig_dir, None, show_progress)
    result.seconds = time.perf_counter() - started
    write_text_atomic(out / TIMINGS_FILE, json.dumps(timings_record(result), indent=1) + "\n")
    print("\n".join(closing_summary(result)))
    return result


def _check_reusable_data(data_dir: Path, n: int, overwrite: bool) -> None:
    """An earlier demo's dataset is reused only if it is what this demo would generate."""
    if overwrite or not (data_dir / "meta.json").is_file():
        return
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return  # not a dataset: the synthesis step refuses it by the output rule
    if not isinstance(meta, dict):
        return
    if (meta.get("n"), meta.get("seed")) != (n, DEMO_DATA_SEED):
        raise OutputError(
            f"{data_dir} holds {meta.get('n')} beats (seed {meta.get('seed')}), not the {n} "
            f"(seed {DEMO_DATA_SEED}) this demo uses; pass --overwrite to redo every step, "
            "or choose another --out"
        )


def _synthesise(data_dir: Path, n: int, overwrite: bool, show_progress: bool) -> None:
    if overwrite or not (data_dir / "meta.json").is_file():
        log.info("step 1/7: generating %d synthetic beats into %s", n, data_dir)
        synthesize_dataset(data_dir, n, DEMO_DATA_SEED, overwrite=True, show_progress=show_progress)
    else:
        log.info("step 1/7: reusing dataset %s", data_dir)


def _train_and_export(
    data_dir: Path,
    run_dir: Path,
    pkg_dir: Path,
    seeds: Sequence[int],
    plan: DemoPlan,
    overwrite: bool,
    show_progress: bool,
) -> list[Path]:
    """Train the seeds one after another and export each while the next one trains.

    Training runs on one thread (the weights then do not depend on the machine), so the export
    and its Captum check take the second core, in a child process rather than a thread: both
    draw from torch's global random state, which the training must have to itself. Each seed is
    added to the run folder when done, so an interrupted demo keeps the seeds it finished;
    --overwrite replaces the run folder with the first one."""
    todo = [s for s in seeds if overwrite or not (seed_dir(run_dir, s) / CHECKPOINT_FILE).is_file()]
    exports = []
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for s in seeds:
            if s in todo:
                log.info("step 2/7: training seed %d into %s", s, run_dir)
                train_run(
                    data_dir,
                    [s],
                    run_dir,
                    ModelConfig(),
                    TrainConfig(max_epochs=plan.max_epochs),
                    overwrite=overwrite and s == todo[0],
                    show_progress=show_progress,
                )
            else:
                log.info("step 2/7: reusing trained seed %d in %s", s, run_dir)
            pkg = pkg_dir / f"seed-{s}"
            if overwrite or not (pkg / "manifest.json").is_file():
                log.info(
                    "step 3/7: exporting seed %d to %s beside the training (checked against Captum)", s, pkg
                )
                checkpoint = seed_dir(run_dir, s) / CHECKPOINT_FILE
                exports.append(pool.submit(export_checkpoint, checkpoint, pkg, overwrite=overwrite))
        for future in exports:
            future.result()  # an export's error is raised here, after the training it ran beside
    return [pkg_dir / f"seed-{s}" for s in seeds]


def _gate(
    out: Path, gated: list[Path], packages: list[Path], plan: DemoPlan, show_progress: bool
) -> tuple[dict[Path, PackageVerdict], GateRun]:
    """Gate each of ``gated`` with the other ``packages`` as its family (default policy, the
    plan's methods) and sign the reports with a demo key. Returns the verdicts and the first
    package's gate run, which the report and the figures show."""
    from ecgx.core.signing import load_private_key
    from ecgx.validation.gate import run_gate, save_report, summary_lines
    from ecgx.validation.signing import generate_keypair, sign_report

    validation = out / "validation"
    if not (validation / "meta.json").is_file() or len(load_dataset(validation)) != DEMO_VALIDATION_BEATS:
        # the demo's own folder: one of another size (an older demo) is replaced
        synthesize_dataset(
            validation, DEMO_VALIDATION_BEATS, VALIDATION_SEED, overwrite=True, show_progress=show_progress
        )
    keys = out / "keys"
    if not (keys / "gate_signing_key.pem").is_file():
        generate_keypair(
            keys, overwrite=True
        )  # half a pair left by hand is replaced: the folder is the demo's
    key = load_private_key(keys / "gate_signing_key.pem")
    verdicts: dict[Path, PackageVerdict] = {}
    first = None
    # Some of the gate's steps have no progress of their own: without a terminal this one's
    # lines say the gate is still working at least every 30 s.
    with progress_bar(total=len(gated), desc="step 4/7 gate", unit="package", enabled=show_progress) as bar:
        for i, pkg in enumerate(gated, 1):
            log.info("step 4/7: gating %s (%d of %d; family: the other seeds)", pkg, i, len(gated))
            family = [p for p in packages if p != pkg]
            run = run_gate(
                pkg, validation, family=family, methods=plan.gate_methods, show_progress=show_progress
            )
            save_report(
                sign_report(run.report, key), pkg / "gate.json", overwrite=True
            )  # re-gating replaces it
            print(f"\ngate of {pkg} ({pkg / 'gate.json'}):")
            print("\n".join(summary_lines(run.report)), flush=True)
            verdicts[pkg] = PackageVerdict.of(run.report)
            first = run if first is None else first
            bar.update(1)
    assert first is not None  # gated is never empty
    return verdicts, first


def _write_report(out: Path, run: GateRun, trims: Sequence[str], show_progress: bool) -> Path:
    """The experiments report of the first package's gate run, saying what the demo trimmed."""
    from ecgx.validation.experiments import write_experiments
    from ecgx.validation.html_report import REPORT_FILE, add_notice

    log.info("step 5/7: writing the experiments report into %s", out / "report")
    with progress_bar(total=1, desc="step 5/7 report", unit="report", enabled=show_progress) as bar:
        report = write_experiments(run, out / "report", overwrite=True)
        bar.update(1)
    html = report / REPORT_FILE if report.is_dir() else report
    add_notice(html, "What this demo trimmed", trims)
    return html


def _draw(
    data_dir: Path, package: Path, fig_dir: Path, report: dict | None, show_progress: bool = True
) -> list[Path]:
    """For each class, the test window the model finds most typical of it, explained by the
    gated methods from the ONNX package, each marked with the gate's verdict."""
    from ecgx.validation.figures import plot_gated_attributions

    log.info("step 6/7: drawing attributions of %s into %s", package, fig_dir)
    ds = load_dataset(data_dir, check_values=False)
    test = make_split(len(ds), TrainConfig()).test
    engine = AttributionEngine(package)
    x = np.asarray(ds.signals[test])
    probs = engine.probabilities(x)
    gated = (report or {}).get("methods", {})
    methods = [m for m in DEMO_METHODS if m in gated] or list(DEMO_METHODS)
    verdicts = {m: gated[m]["verdict"] if m in gated else "not gated" for m in methods}
    figures = []
    stage = StagedOutput(fig_dir, FIGURES, overwrite=True)  # the demo redraws its own figures
    for c, cls in progress(
        list(enumerate(CLASSES)), desc="step 6/7 figures", unit="class", enabled=show_progress
    ):
        positives = np.flatnonzero(ds.labels[test, c])
        if len(positives) == 0:
            continue
        i = positives[np.argmax(probs[positives, c])]
        beat = x[i : i + 1]
        maps = {m: engine.attribute(m, beat, c)[0] for m in methods}
        title = (
            f"record {test[i]} of {data_dir.name} (test split), {cls.name} ({cls.key}, SNOMED {cls.code}), "
            f"p = {probs[i, c]:.3f}"
        )
        mask = (np.asarray(ds.masks[test[i]]) >> c) & 1
        name = f"attributions_{cls.key}.png"
        try:
            plot_gated_attributions(
                beat[0], maps, verdicts, stage.path / name, title=title, mask=mask.astype(bool)
            )
        except BaseException:
            stage.abort()
            raise
        figures.append(fig_dir / name)
    stage.commit()
    return figures


def _serve_and_explain(
    out: Path, packages: list[Path], data_dir: Path, fig_dir: Path, result: DemoResult | None = None
) -> Path | None:
    """Promote the gated packages into ``OUT/repo`` (rebuilt every run: the reports may be new),
    serve it on a free loopback port in this process, call Explain over gRPC for one test beat
    with a method the gate passed, and draw the answer with the client's code."""
    from ecgx.client import (
        Client,
        EcgInput,
        ecg_messages,
        format_checks,
        servable_methods,
        version_info,
        write_explanation_pngs,
    )
    from ecgx.core.signing import load_public_key
    from ecgx.service.repository import ModelRepository, PromotionRefused, promote
    from ecgx.service.security import ServerSecurity
    from ecgx.service.server import build_server

    started = time.perf_counter()
    repo = out / "repo"
    log.info("step 7/7: promoting the gated packages into %s and explaining a test beat over gRPC", repo)
    public = load_public_key(out / "keys" / "gate_public_key.pem")
    promoted = []
    with StagedOutput(repo, REPOSITORY, overwrite=True) as tmp:  # the demo rebuilds its own repository
        for pkg in packages:
            try:
                promote(pkg, tmp, DEMO_MODEL, None, [public])  # what `ecgx repo add` does
                promoted.append(pkg)
            except PromotionRefused as e:
                log.warning("%s", e)
    if not promoted:
        print(f"model repository {repo}: no package passed its gate, so nothing is served over gRPC")
        return None
    repository = ModelRepository(repo, [public])
    server, port, _, _ = build_server(
        repository, security=ServerSecurity.plaintext_unauthenticated(), host="127.0.0.1", port=0
    )
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            info = client.get_model(DEMO_MODEL)
            passed = servable_methods(info)
            method = next((m for m in GRPC_METHODS if m in passed), passed[0] if passed else None)
            if method is None:
                print(f"model repository {repo}: the gate passed no method, so no explanation is served")
                return None
            ds = load_dataset(data_dir, check_values=False)
            index = int(make_split(len(ds), TrainConfig()).test[0])
            beat = np.asarray(ds.signals[index], dtype=np.float32)
            record = out / RECORDS / RECORD_FILE  # one name, so the README's commands work as printed
            record.parent.mkdir(exist_ok=True)
            np.save(record, beat)  # the demo's own folder: `ecgx client explain --ecg` reads it
            messages = ecg_messages(EcgInput([beat], 500.0, "demo"))
            # Echoed back in the response: the picture's title names the record (ecg_ids).
            messages[0].id = f"{index} of {data_dir.name} (test split)"
            r = client.explain(DEMO_MODEL, messages, [method])
            v = version_info(info, r.version)
            leads = list(v.leads) if v is not None else None
            kwargs = {"leads": leads} if leads and len(leads) == beat.shape[0] else {}
            (figure,) = write_explanation_pngs(r, fig_dir / GRPC_FIGURE, overwrite=True, **kwargs)
    finally:
        server.stop(None)
        repository.stop()
    a = r.attributions[0]
    print(
        f"model repository {repo}: {len(promoted)} version(s) of {DEMO_MODEL!r} promoted; served on "
        f"127.0.0.1:{port} and stopped"
    )
    print(
        f"explanation over gRPC: {a.method} for {a.target_class} of test beat {index} by {r.model} version "
        f"{r.version}, gate {a.gate.verdict} ({format_checks(a.gate)}), in "
        f"{time.perf_counter() - started:.1f} s: {figure}"
    )
    if result is not None:  # for the closing summary's next commands
        result.record, result.method = record, method
    return figure


@dataclass(frozen=True)
class PackageVerdict:
    """The gate's verdict on one package, as the closing summary shows it."""

    verdict: str
    passed: tuple[str, ...]
    checked: int

    @classmethod
    def of(cls, report: dict) -> PackageVerdict:
        checked = [m for m in report.get("methods", {}) if m != "random"]  # the control never counts
        return cls(report["verdict"], tuple(report.get("passed", ())), len(checked))


@dataclass
class DemoResult:
    """What a demo run wrote (paths under ``out``) and decided."""

    out: Path
    packages: list[Path]
    trims: list[str] = field(default_factory=list)
    verdicts: dict[Path, PackageVerdict] = field(default_factory=dict)
    report: Path | None = None
    figures: list[Path] = field(default_factory=list)
    record: Path | None = None  # the test window explained over gRPC, as .npy
    method: str | None = None  # the method it was explained with (one the gate passed)
    seconds: float = 0.0
    steps: list[StepTime] = field(default_factory=list)


def timings_record(result: DemoResult) -> dict:
    """OUT/timings.json: the whole run's and each step's wall and CPU seconds."""
    return {
        "wall_s": round(result.seconds, 2),
        "steps": [
            {"step": s.step, "wall_s": round(s.wall, 2), "cpu_s": round(s.cpu, 2)} for s in result.steps
        ],
    }


def closing_summary(result: DemoResult) -> list[str]:
    """What was written where (only what exists), one line per package with the gate's verdict,
    and the commands to go on with. Every path is as the user passed ``out``."""
    out = result.out
    lines = [f"\ndemo finished in {result.seconds:.0f} s."]
    if result.steps:
        times = ", ".join(f"{s.step} {s.wall:.0f} / {s.cpu:.0f}" for s in result.steps)
        lines.append(f"time per step (wall / CPU seconds; CPU above wall: both cores busy): {times}")
    lines.append(f"Written in {out}:")
    written = [
        ("experiments report (HTML)", result.report),
        ("attribution figures", out / FIGURES_DIR if result.figures else None),
        ("explanation over gRPC (PNG)", out / FIGURES_DIR / GRPC_FIGURE),
        ("model repository (gated versions)", out / "repo"),
        ("packages (ONNX, gate.json)", out / "packages"),
        ("gate signing key (private; keep it)", out / "keys" / "gate_signing_key.pem"),
        ("gate public key (for serve --trusted-key)", out / "keys" / "gate_public_key.pem"),
        ("record explained over gRPC", result.record),
        ("time per step (JSON)", out / TIMINGS_FILE),
        ("training runs", out / "runs"),
        ("training and validation data (synthetic)", out / "data"),
    ]
    lines += [f"  {what:42s} {path}" for what, path in written if path is not None and path.exists()]
    lines.append("gate verdicts (default policy):")
    for pkg in result.packages:
        v = result.verdicts.get(pkg)
        if v is None:
            lines.append(f"  {pkg.name}: not gated by this demo (not served)")
        else:
            passed = ", ".join(v.passed) if v.passed else "none"
            lines.append(
                f"  {pkg.name}: {v.verdict.upper()}, {len(v.passed)} of {v.checked} methods pass: {passed}"
            )
    lines += [f"  note: {t}" for t in result.trims[:-1]]
    lines += next_commands(result)
    return lines


def next_commands(result: DemoResult) -> list[str]:
    """The exact commands to serve the demo's repository, explain its record and open the report."""
    out, lines = result.out, []
    public = out / "keys" / "gate_public_key.pem"
    repo = out / "repo"
    if repo.is_dir() and public.is_file() and result.record is not None and result.method is not None:
        lines += [
            "next: serve the repository on this machine (plaintext, loopback only), in one terminal:",
            f"  ecgx serve --repo {repo} --trusted-key {public} --insecure --port 50051",
            f"then, in another, explain a real test record with {result.method} (the gate passed it):",
            f"  ecgx client explain --server 127.0.0.1:50051 --ecg {result.record} --method {result.method} "
            f"--png {out / 'explanation.png'}",
        ]
    if result.report is not None and result.report.exists():
        lines += ["open the report:", f"  python -m webbrowser file://{result.report.resolve()}"]
    return lines
