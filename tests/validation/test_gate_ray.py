"""The gate and the experiments on a Ray cluster (issue 24): the same numbers as the local run,
a worker killed mid-run survived, a tampered package copy refused, and Ray never imported
without ``--ray``.

The cluster is a private local one (`tests.ray_helpers`: ``ray start --head --num-cpus 2`` in
its own process group and temp dir, stopped at the end of the module).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_helpers import LocalRayCluster, local_ray_cluster

from ecgx.core.errors import FailedPrecondition
from ecgx.core.package_reader import load_package
from ecgx.validation.gate import run_gate

pytest.importorskip("ray")

# Small, so a local and a Ray run fit the suite; a stochastic method (smoothgrad: its noise is
# drawn per call from its seed) and a perturbation method, so equal numbers mean equal draws.
POLICY = """
[gate]
ecgs = 16
[checks.randomisation]
ecgs = 8
draws = 1
[checks.perturbation]
steps = 4
bootstrap = 100
margin = -1.0
[checks.changed_model]
ecgs = 8
draws = 1
bootstrap = 100
"""
METHODS = ["saliency", "smoothgrad", "occlusion"]
SHA = "[0-9a-f]{64}"
ECGX = [str(Path(sys.executable).with_name("ecgx"))]


def numbers(report: dict) -> str:
    """The report without what differs between any two runs (time, timings, the row drawn from
    fresh OS entropy) and without where it ran: every number of the two runs must be equal."""
    r = {k: v for k, v in report.items() if k not in ("created", "timings_s", "execution")}
    r["references"] = {k: v for k, v in r["references"].items() if k != "ref:unseeded_random"}
    return json.dumps(r, sort_keys=True)


def gate(family: dict[str, Path], policy: Path, **kwargs):
    return run_gate(
        family["seed-0"],
        family["data"],
        family=[family["seed-1"]],
        policy=policy,
        methods=METHODS,
        workers=2,
        show_progress=False,
        research=True,
        **kwargs,
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    """One private 2-CPU cluster for the module."""
    with local_ray_cluster(num_cpus=2) as c:
        yield c


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray-policy") / "policy.toml"
    path.write_text(POLICY)
    return path


@pytest.fixture(scope="module")
def local_report(trained_family: dict[str, Path], policy: Path) -> dict:
    return gate(trained_family, policy).report


def test_the_gate_on_ray_equals_the_local_run(
    trained_family: dict[str, Path], policy: Path, local_report: dict, cluster: LocalRayCluster
):
    on_ray = gate(trained_family, policy, ray=cluster.address).report
    assert numbers(on_ray) == numbers(local_report)
    assert on_ray["execution"] == {"backend": "ray", "workers": 2}
    assert local_report["execution"] == {"backend": "local", "workers": 2}
    # The comparison compares something: the checks ran and produced numbers.
    row = on_ray["methods"]["smoothgrad"]["checks"]
    for check in ("randomisation", "perturbation", "changed_model", "self_consistency"):
        assert row[check]["score"] is not None, check


def _kill_a_worker_mid_run(cluster: LocalRayCluster, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first actor process seen computing a call (its title names the call)."""
    while not stop.is_set() and not killed:
        for pid in cluster.session_pids():
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::_Worker.run"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.05)


def test_a_worker_killed_mid_run_is_survived_with_the_same_report(
    trained_family: dict[str, Path], policy: Path, local_report: dict, cluster: LocalRayCluster
):
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_mid_run, args=(cluster, killed, stop))
    killer.start()
    try:
        on_ray = gate(trained_family, policy, ray=cluster.address).report
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was seen computing, so none was killed"
    assert numbers(on_ray) == numbers(local_report)


def test_a_tampered_package_copy_on_a_node_is_refused(
    trained_family: dict[str, Path], tmp_path: Path, cluster: LocalRayCluster
):
    import ray

    from ecgx.validation.ray_backend import connect

    pkg = load_package(trained_family["seed-0"])
    cache = tmp_path / "node-cache"
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        with connect(cluster.address, [pkg], workers=1, cache_root=str(cache)):
            pass  # the node's copy is written and verified
        (copy,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
        weights = next(p for p in copy.iterdir() if p.suffix == ".bin" or "weights" in p.name)
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        with (
            pytest.raises(
                FailedPrecondition, match=rf"{weights.name} has sha256 [0-9a-f]{{64}}.*has [0-9a-f]{{64}}"
            ),
            connect(cluster.address, [pkg], workers=1, cache_root=str(cache)),
        ):
            pass
    finally:
        ray.shutdown()


@pytest.mark.slow  # two gate runs of three models (about a minute on two loaded cores)
def test_the_experiments_on_ray_equal_the_local_run(
    trained_family: dict[str, Path], policy: Path, tmp_path: Path, cluster: LocalRayCluster
):
    from ecgx.validation.experiments import run_experiments

    reports = {}
    for name, ray in (("local", None), ("ray", cluster.address)):
        html = run_experiments(
            trained_family["data"],
            trained_family["seed-0"].parent,  # the family's packages: seed-0, seed-1, seed-2
            tmp_path / name,
            policy=policy,
            methods=["saliency", "smoothgrad"],
            show_progress=False,
            ray=ray,
            workers=2,
        )
        reports[name] = json.loads((html.parent / "experiments.json").read_text())
    assert numbers(reports["ray"]) == numbers(reports["local"])
    assert reports["ray"]["execution"] == {"backend": "ray", "workers": 2}
    assert len(reports["ray"]["family"]) == 2


def _actor_pids(cluster: LocalRayCluster) -> list[int]:
    """The cluster's processes that are gate actors (Ray titles them by their class)."""
    pids = []
    for pid in cluster.session_pids():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_Worker"):
                pids.append(pid)
    return pids


# The Ctrl-C test's gate does several times the module policy's work (about 10 s), so the signal
# lands while the actors compute, whatever the machine's speed.
SLOW_POLICY = POLICY.replace("draws = 1", "draws = 4").replace("steps = 4", "steps = 16")


def _as_from_a_terminal() -> None:
    """The driver starts with Ctrl-C's default disposition and unblocked, as a terminal starts it. A
    shell starts background jobs with SIGINT ignored, a child inherits that from pytest's process,
    and Python keeps an inherited SIG_IGN: run so (`nohup ... &`), the driver ignored the signal and
    ran to the end (as tests/core/test_outputs.py's interrupted command restores the default too)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _sigint_state() -> str:
    """This process's blocked and ignored signal masks (for a failure's message)."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return "; ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn")))


def test_ctrl_c_on_the_driver_leaves_no_actor(
    trained_family: dict[str, Path], tmp_path: Path, cluster: LocalRayCluster
):
    policy = tmp_path / "policy.toml"
    policy.write_text(SLOW_POLICY)
    before = set(_actor_pids(cluster))  # actors of an earlier test still exiting are not this run's
    command = [
        *ECGX,
        "validate",
        str(trained_family["seed-0"]),
        "--data",
        str(trained_family["data"]),
        "--family",
        str(trained_family["seed-1"]),
        "--policy",
        str(policy),
        "--research",
        "--unsigned",
        "--out",
        str(tmp_path / "gate.json"),
        "--ray",
        cluster.address,
        "--workers",
        "2",
    ]
    inherited = _sigint_state()
    driver = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_as_from_a_terminal
    )
    try:
        deadline = time.monotonic() + 120
        while (
            len(set(_actor_pids(cluster)) - before) < 2
            and driver.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert driver.poll() is None, driver.stderr.read().decode()
        assert len(set(_actor_pids(cluster)) - before) == 2
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=60) == 130, (
            f"pytest's SIGINT state {inherited}; " + driver.stderr.read().decode()
        )
    finally:
        if driver.poll() is None:
            driver.kill()
    deadline = time.monotonic() + 30
    while _actor_pids(cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _actor_pids(cluster) == []
    assert not (tmp_path / "gate.json").exists()


def test_a_node_copy_missing_a_file_or_differing_is_refused(tmp_path: Path):
    from ecgx.validation.ray_backend import files_digest, materialise

    files = {"manifest.json": b"{}", "weights.bin": b"1234"}
    hashes = files_digest(files)
    folder = materialise(files, hashes, tmp_path, "node-a")
    (folder / "weights.bin").unlink()
    lacks = rf"node-a: the package copy .* lacks weights.bin \(sha256 {SHA}\)"
    with pytest.raises(FailedPrecondition, match=lacks):
        materialise(files, hashes, tmp_path, "node-a")
    (folder / "weights.bin").write_bytes(b"4321")
    with pytest.raises(FailedPrecondition, match=rf"weights.bin has sha256 {SHA}, the driver's package has"):
        materialise(files, hashes, tmp_path, "node-a")


def test_without_ray_the_gate_never_imports_ray():
    code = (
        "import sys\n"
        "import ecgx.cli, ecgx.validation.gate, ecgx.validation.experiments\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
