"""A small local Ray cluster for tests, started and stopped without touching anyone else's.

The test machine is shared: several engineers (and CI jobs) may run Ray clusters at once, so
`ray stop` / `pkill raylet` are forbidden.  `local_ray_cluster()` starts
`ray start --head --block` in its own session with a unique temp dir and
fresh ports for every Ray service, and tears down exactly the processes of that session plus
any Ray process whose command line names this cluster's temp dir (workers re-parent and may
leave the group).  Use it as a context manager or through the `ray_cluster` fixture::

    from ray_helpers import local_ray_cluster

    with local_ray_cluster() as cluster:
        ray.init(address=cluster.address)
        ...
        ray.shutdown()

    # or, in a test module
    from ray_helpers import ray_cluster  # noqa: F401  (module-scoped fixture)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Small on purpose: 2 cores and 24 GB are shared by everyone on the machine.
OBJECT_STORE_BYTES = 300_000_000
START_TIMEOUT_S = 90.0
# `ray start --block` and the GCS can sit on SIGTERM for >10 s; nothing of a test cluster is
# worth keeping, so SIGKILL follows soon.
STOP_GRACE_S = 2.0


@dataclass(frozen=True)
class LocalRayCluster:
    """A running local cluster: connect with `ray.init(address=cluster.address)`."""

    address: str
    temp_dir: Path
    num_cpus: int
    sid: int  # the session (`ray start`'s pid) every process of the cluster belongs to

    def session_pids(self) -> list[int]:
        """Every live process of this cluster (its session, or naming its temp dir)."""
        return _cluster_pids(self.sid, str(self.temp_dir))


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free right now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


def _start_command(num_cpus: int, temp_dir: Path, ports: list[int]) -> list[str]:
    gcs, node_manager, object_manager, client, agent_http, agent_grpc, env_agent, metrics = ports
    return [
        _ray_executable(),
        "start",
        "--head",
        "--block",
        f"--num-cpus={num_cpus}",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
        f"--temp-dir={temp_dir}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]


def _cluster_pids(sid: int, temp_dir: str) -> list[int]:
    """Live (non-zombie) pids of session `sid` (Ray's workers get process groups of their own,
    but stay in the session), or whose command line names `temp_dir`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            if _is_zombie(entry):
                continue
            in_session = os.getsid(pid) == sid
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
        if in_session or temp_dir in cmdline:
            pids.append(pid)
    return pids


def _is_zombie(proc_dir: Path) -> bool:
    # The state follows the parenthesised command name, which may itself contain spaces.
    stat = (proc_dir / "stat").read_text()
    return stat[stat.rindex(")") + 2 :].startswith("Z")


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_ready(proc: subprocess.Popen, temp_dir: Path, gcs_port: int, log: Path) -> None:
    """Block until the GCS answers and the raylet socket exists (or fail with the log)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()}")
        raylet = list(temp_dir.glob("session_*/sockets/raylet"))
        if raylet and _port_open(gcs_port):
            return
        time.sleep(0.25)
    raise RuntimeError(f"ray start not ready after {START_TIMEOUT_S}s:\n{log.read_text()}")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def stop_cluster(cluster: LocalRayCluster) -> None:
    """SIGTERM then SIGKILL exactly this cluster's processes; remove its temp dir."""
    _signal_all(cluster.session_pids(), signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while cluster.session_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_all(cluster.session_pids(), signal.SIGKILL)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def local_ray_cluster(num_cpus: int = 2) -> Iterator[LocalRayCluster]:
    """Start a private head node (`ray start --head --block`) and stop it on exit."""
    # Short path: Ray's unix sockets live under it and AF_UNIX paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    ports = _free_ports(8)
    log = temp_dir / "ray-start.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _start_command(num_cpus, temp_dir, ports),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # No token auth: a driver-local `ray.init()` elsewhere on the machine writes
            # ~/.ray/auth_token, and a head started after that would then demand the token from
            # drivers that do not have token auth on. This cluster listens on loopback only.
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"},
        )
    cluster = LocalRayCluster(f"127.0.0.1:{ports[0]}", temp_dir, num_cpus, proc.pid)
    try:
        _wait_ready(proc, temp_dir, ports[0], log)
        yield cluster
    finally:
        _disconnect_driver()
        stop_cluster(cluster)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _disconnect_driver() -> None:
    """`ray.shutdown()` in this process if a test left the driver connected."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def ray_address_env(cluster: LocalRayCluster) -> dict[str, str]:
    """Environment for a subprocess (e.g. the CLI) that should find this cluster."""
    return {**os.environ, "RAY_ADDRESS": cluster.address}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """A 2-CPU local cluster shared by one test module; skipped when Ray is not installed."""
    pytest.importorskip("ray")
    with local_ray_cluster(num_cpus=2) as cluster:
        yield cluster
