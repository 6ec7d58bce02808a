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
import time
from collections.abc import Sequence
from pathlib import Path

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
from ecgx.core.plots import plot_attributions
from ecgx.core.schema import CLASSES
from ecgx.service.engine import AttributionEngine
from ecgx.training.config import TrainConfig
from ecgx.training.data.synth import synthesize_dataset
from ecgx.training.export import export_checkpoint
from ecgx.training.models import ModelConfig
from ecgx.training.summary import format_training_summary
from ecgx.training.train import CHECKPOINT_FILE, check_seeds, make_split, seed_dir, train_run

log = logging.getLogger(__name__)

DEMO_BEATS = 8000
DEMO_DATA_SEED = 0
DEMO_METHODS = ("saliency", "integrated_gradients", "deeplift", "lrp", "gradcam", "occlusion")
# Validation beats come from another generator seed than the training beats.
VALIDATION_SEED = 1000
# The demo gates under the default policy (256 ECGs): a smaller one would be below the gate's
# floor, and its reports could never be promoted and served. The validation set holds more beats
# than that so every class has enough positives.
DEMO_VALIDATION_BEATS = 384
MARKER_FILE = "ecgx-demo.json"
DEMO_MODEL = "ecg"  # the model name in OUT/repo
GRPC_FIGURE = "grpc_explanation.png"
# The method explained over gRPC: the first of these the gate passed on the served version
# (cheap ones first), else the first method the gate passed.
GRPC_METHODS = ("gradcam", "integrated_gradients", "saliency", "deeplift", "lrp", "input_x_gradient")


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


def run_demo(
    out: Path,
    *,
    n: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    overwrite: bool = False,
    show_progress: bool = True,
) -> None:
    """Run every step and print per-class test AUROC and where the pictures are."""
    started = time.perf_counter()
    out = Path(out)
    n = DEMO_BEATS if n is None else n
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
    _synthesise(data_dir, n, overwrite, show_progress)
    _train(data_dir, run_dir, seeds, overwrite, show_progress)
    packages = _export(run_dir, pkg_dir, seeds, overwrite)
    figures = _draw(data_dir, packages[0], fig_dir)
    print(format_training_summary(run_dir, seeds))
    print(f"packages: {', '.join(str(p) for p in packages)}")
    print(f"attribution pictures ({len(figures)}, package {packages[0].name}): {fig_dir}")
    if len(packages) > 1:
        report = _gate(out, packages, show_progress)
        print(f"experiments report: {report}")
        _serve_and_explain(out, packages, data_dir, fig_dir)
    else:
        log.warning(
            "one seed only: the gate needs a seed family, so gating, the report and serving are skipped"
        )
    print(f"demo finished in {time.perf_counter() - started:.0f} s; outputs in {out}")


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


def _train(data_dir: Path, run_dir: Path, seeds: Sequence[int], overwrite: bool, show_progress: bool) -> None:
    todo = [s for s in seeds if overwrite or not (seed_dir(run_dir, s) / CHECKPOINT_FILE).is_file()]
    if todo:
        log.info("step 2/7: training seeds %s into %s", todo, run_dir)
        # One seed at a time, each added to the run folder when done, so an interrupted demo
        # keeps the seeds it finished; --overwrite replaces the run folder with the first one.
        for i, s in enumerate(todo):
            train_run(
                data_dir,
                [s],
                run_dir,
                ModelConfig(),
                TrainConfig(),
                overwrite=overwrite and i == 0,
                show_progress=show_progress,
            )
    else:
        log.info("step 2/7: reusing trained seeds in %s", run_dir)


def _export(run_dir: Path, pkg_dir: Path, seeds: Sequence[int], overwrite: bool) -> list[Path]:
    packages = []
    for s in seeds:
        pkg = pkg_dir / f"seed-{s}"
        if overwrite or not (pkg / "manifest.json").is_file():
            log.info("step 3/7: exporting seed %d to %s (checked against Captum)", s, pkg)
            export_checkpoint(seed_dir(run_dir, s) / CHECKPOINT_FILE, pkg, overwrite=overwrite)
        packages.append(pkg)
    return packages


def _gate(out: Path, packages: list[Path], show_progress: bool) -> Path:
    """Gate every package with its siblings as the family, sign the reports with a demo key,
    and write the experiments report from the first package's gate run."""
    from ecgx.validation.experiments import write_experiments
    from ecgx.validation.gate import run_gate, save_report, summary_lines
    from ecgx.validation.signing import generate_keypair, load_private_key, sign_report

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
    report = out / "report"
    for i, pkg in enumerate(packages):
        log.info("step 5/7: gating %s (family: the other seeds)", pkg)
        family = [p for p in packages if p != pkg]
        run = run_gate(pkg, validation, family=family, show_progress=show_progress)
        save_report(sign_report(run.report, key), pkg / "gate.json", overwrite=True)  # re-gating replaces it
        print(f"\ngate of {pkg} ({pkg / 'gate.json'}):")
        print("\n".join(summary_lines(run.report)))
        if i == 0:  # the report shows the first package; its gate run has every measurement
            log.info("step 6/7: writing the experiments report")
            report = write_experiments(run, report, overwrite=True)
    public = keys / "gate_public_key.pem"
    verify = f"ecgx gate verify {packages[0]} --public-key {public}"  # the default policy is allowed
    print(f"verify a package with: {verify}")
    return report


def _draw(data_dir: Path, package: Path, fig_dir: Path) -> list[Path]:
    """For each class, the test beat the model finds most typical of it, explained by
    several methods from the ONNX package."""
    log.info("step 4/7: drawing attributions of %s into %s", package, fig_dir)
    ds = load_dataset(data_dir, check_values=False)
    test = make_split(len(ds), TrainConfig()).test
    engine = AttributionEngine(package)
    x = np.asarray(ds.signals[test])
    probs = engine.probabilities(x)
    figures = []
    stage = StagedOutput(fig_dir, FIGURES, overwrite=True)  # the demo redraws its own figures
    for c, cls in enumerate(CLASSES):
        positives = np.flatnonzero(ds.labels[test, c])
        if len(positives) == 0:
            continue
        i = positives[np.argmax(probs[positives, c])]
        beat = x[i : i + 1]
        maps = {m: engine.attribute(m, beat, c)[0] for m in DEMO_METHODS}
        title = f"{cls.name} ({cls.key}, SNOMED {cls.code}): test beat {test[i]}, p = {probs[i, c]:.3f}"
        mask = (np.asarray(ds.masks[test[i]]) >> c) & 1
        name = f"attributions_{cls.key}.png"
        try:
            plot_attributions(beat[0], maps, stage.path / name, title=title, mask=mask.astype(bool))
        except BaseException:
            stage.abort()
            raise
        figures.append(fig_dir / name)
    stage.commit()
    return figures


def _serve_and_explain(out: Path, packages: list[Path], data_dir: Path, fig_dir: Path) -> Path | None:
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
    from ecgx.service.repository import ModelRepository, PromotionRefused, promote
    from ecgx.service.security import ServerSecurity
    from ecgx.service.server import build_server
    from ecgx.validation.signing import load_public_key

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
            r = client.explain(DEMO_MODEL, ecg_messages(EcgInput([beat], 500.0, "demo")), [method])
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
    return figure
