"""What online stability sampling costs the Explain request path (issue #11).

One run, side by side: the same gRPC server (``build_server`` with ``ServiceMetrics``, as
``ecgx serve`` builds it) at stability share 0, the default share and 1.0, each its own
process, all up at once; a closed loop of ``--clients`` concurrent clients (threads of this
process, one channel each) sends Explain requests to one of them for ``--seconds`` after
``--warmup`` seconds. Configurations take turns in rotated order over ``--rounds`` rounds, so
slow drift of the shared machine falls on all of them alike; after each cell the server's
stability worker is drained (not timed) so its backlog never lands on the next cell.

Configurations:
  off          share 0
  default      share ecgx.service.stability.DEFAULT_SHARE and the worker's defaults: nice 19, its
               own single-threaded ONNX Runtime sessions, CPU budget DEFAULT_CPU_BUDGET cores
  all          share 1.0, the worker's defaults
  all-nobudget share 1.0, nice 19, own sessions, no CPU budget
  all-shared   share 1.0, no budget, normal priority, the serving engine's sessions
               (do the priority, the own sessions and the budget help?)

Ratios are against "off" in the same round (paired), the median over rounds; the pooled
percentiles are over all rounds. "others" is the CPU (in cores) that processes outside this
benchmark used during the measured windows (/proc/stat less the benchmark's processes).

Scenarios (explicit target, so the server runs one attribution per request):
  saliency1    saliency on 1 ECG (the cheapest gated method; partner: gradcam)
  ig4          integrated gradients, default 50 steps, on 4 ECGs (a typical one; partner: saliency)

The model is the default CNN (ecgx.training.models.ModelConfig), untrained, torch seed 0: the work
per request does not depend on the weights. Its gate report (saliency and gradcam, a small
policy in research mode) is edited to serve saliency, gradcam and integrated gradients with
saliency and gradcam passed, and signed with a fresh key: the verdicts decide what is served and
which partner is used, not how much work a request is.

    python benchmarks/bench_stability_sampling.py [--rounds 3] [--seconds 10] [--warmup 2]
        [--clients 4] [--dir /tmp/ecgx_bench_stability]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"
MODEL, VERSION = "ecg", "1"
ROOT = Path(__file__).resolve().parents[1]
SERVED = ["saliency", "gradcam", "integrated_gradients"]
SCENARIOS = {"saliency1": ("saliency", 1), "ig4": ("integrated_gradients", 4)}
GATE_POLICY = """
[gate]
ecgs = 32
allow_incomplete_data = true
[checks.randomisation]
ecgs = 8
draws = 1
[checks.perturbation]
bootstrap = 100
"""
REQUEST_TIMEOUT_S = 120.0


def configurations() -> dict[str, list[str]]:
    from ecgx.service.stability import DEFAULT_SHARE

    return {
        "off": ["--share", "0"],
        "default": ["--share", str(DEFAULT_SHARE)],
        "all": ["--share", "1"],
        "all-nobudget": ["--share", "1", "--cpu-budget", "1"],
        "all-shared": ["--share", "1", "--cpu-budget", "1", "--sampler-threads", "0", "--nice", "0"],
    }


# ------------------------------------------------------------------------------ preparation


def prepare(work: Path) -> None:
    """Package, keys, signed report and repository under ``work`` (its own process: PyTorch)."""
    import torch

    from ecgx.core.package_reader import load_package
    from ecgx.core.signing import load_private_key
    from ecgx.training.data.synth import generate, synthesize_dataset
    from ecgx.training.export import export_package
    from ecgx.training.models import ModelConfig, build_model
    from ecgx.validation.gate import package_record, run_gate
    from ecgx.validation.signing import generate_keypair, sign_report

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    x = generate(64, np.random.default_rng(0)).signals.astype(np.float32)
    np.save(work / "x.npy", x)
    pkg = export_package(model, work / "pkg", sample_inputs=x[:8], overwrite=True)
    data = synthesize_dataset(work / "data", 64, seed=4, show_progress=False)
    private, _ = generate_keypair(work / "keys")
    (work / "policy.toml").write_text(GATE_POLICY)
    run = run_gate(
        pkg, data, policy=work / "policy.toml", methods=["saliency", "gradcam"], workers=1,
        show_progress=False, research=True,
    )  # fmt: skip
    methods = {m: {**run.report["methods"][m], "verdict": "pass"} for m in ("saliency", "gradcam")}
    dest = work / "repo" / MODEL / VERSION
    shutil.copytree(pkg, dest)
    report = {
        **run.report,
        "research": False,
        "servable": True,
        "verdict": "pass",
        "serve": SERVED,
        "methods": {**run.report["methods"], **methods},
        "package": package_record(load_package(dest)),
    }
    (dest / "gate.json").write_text(json.dumps(sign_report(report, load_private_key(private)), indent=1))


# ------------------------------------------------------------------------------ server side


def serve(args: argparse.Namespace) -> None:
    """A server with metrics; stdin commands: ``idle`` (drain the sampler, print its counters),
    ``quit``. Prints ``READY <port>`` when it listens."""
    from ecgx.core.signing import load_public_key
    from ecgx.service.metrics import ServiceMetrics
    from ecgx.service.repository import ModelRepository
    from ecgx.service.security import ServerSecurity
    from ecgx.service.server import build_server
    from ecgx.service.stability import DEFAULT_CPU_BUDGET, WorkerSettings

    work = Path(args.dir)
    repository = ModelRepository(work / "repo", [load_public_key(work / "keys" / "gate_public_key.pem")])
    worker = WorkerSettings(
        threads=args.sampler_threads or None,
        nice=args.nice,
        cpu_budget=DEFAULT_CPU_BUDGET if args.cpu_budget is None else args.cpu_budget,
    )
    metrics = ServiceMetrics(repository, stability_share=args.share, seed=0, worker=worker)
    built = build_server(
        repository, host=HOST, port=0, security=ServerSecurity.plaintext_unauthenticated(), metrics=metrics
    )
    built.server.start()
    metrics.start()
    print("READY", built.port, flush=True)
    for line in sys.stdin:
        if line.strip() == "idle":
            metrics.wait_idle(600)
            print(json.dumps(sampler_counts(metrics)), flush=True)
        elif line.strip() == "quit":
            break
    metrics.stop()
    built.server.stop(None)


def sampler_counts(metrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in metrics.registry.collect():
        if fam.name in ("ecgx_stability_samples", "ecgx_stability_samples_dropped"):
            for s in fam.samples:
                if s.name.endswith("_total"):
                    key = (
                        "sampled" if fam.name == "ecgx_stability_samples" else "dropped_" + s.labels["reason"]
                    )
                    out[key] = out.get(key, 0) + s.value
    return out


class Server:
    def __init__(self, name: str, options: list[str], work: Path):
        self.name = name
        cmd = [sys.executable, __file__, "--side", "server", "--dir", str(work), *options]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError(f"server {name} did not start (exit {self.proc.poll()})")
        self.port = int(line[1])
        self.counts: dict[str, float] = {}

    def drain(self) -> dict[str, float]:
        """The sampler's counters since the last drain, once its backlog is processed."""
        self.proc.stdin.write("idle\n")
        self.proc.stdin.flush()
        now = json.loads(self.proc.stdout.readline())
        delta = {k: v - self.counts.get(k, 0) for k, v in now.items()}
        self.counts = now
        return delta

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ------------------------------------------------------------------------------ client side


def request_for(scenario: str, x: np.ndarray):
    from ecgx.core.schema import LEADS
    from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb

    method, batch = SCENARIOS[scenario]
    ecgs = [
        pb.Ecg(leads=list(LEADS), sampling_rate_hz=500.0, units=pb.MILLIVOLT, samples_per_lead=600,
               samples=np.asarray(b, dtype="<f4").tobytes())
        for b in x[:batch]
    ]  # fmt: skip
    return pb.ExplainRequest(
        model=MODEL, version=VERSION, ecgs=ecgs, methods=[method], targets=[pb.Target(index=0)]
    )


def busy_jiffies() -> int:
    """CPU time all processes used since boot (/proc/stat, clock ticks)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait


def process_jiffies(pid: int) -> int:
    """User + system CPU of a process and its threads (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def measure(port: int, request, clients: int, warmup: float, seconds: float, pids: list[int]) -> dict:
    """Latencies of the requests that completed in the measured window (closed loop), and the
    cores used in the window by processes other than ``pids``."""
    import grpc

    from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc

    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds
    lat: list[list[float]] = [[] for _ in range(clients)]

    def client(k: int) -> None:
        opts = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(f"{HOST}:{port}", options=opts) as ch:
            explain = pb_grpc.ExplanationServiceStub(ch).Explain
            while (t0 := time.perf_counter()) < t_end:
                explain(request, timeout=REQUEST_TIMEOUT_S)
                t1 = time.perf_counter()
                if t_start <= t1 <= t_end:
                    lat[k].append(t1 - t0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, t_start - time.perf_counter()))
    b0, m0 = busy_jiffies(), sum(process_jiffies(p) for p in pids)
    time.sleep(max(0.0, t_end - time.perf_counter()))
    b1, m1 = busy_jiffies(), sum(process_jiffies(p) for p in pids)
    for t in threads:
        t.join()
    others = max(0, (b1 - b0) - (m1 - m0)) / os.sysconf("SC_CLK_TCK") / seconds
    return {"latencies": [v for x in lat for v in x], "others": others}


# ------------------------------------------------------------------------------ orchestration


def run(args: argparse.Namespace) -> None:
    work = Path(args.dir)
    t0 = time.perf_counter()
    if not (work / "repo").is_dir():
        subprocess.run(
            [sys.executable, __file__, "--side", "prepare", "--dir", str(work)], check=True, cwd=ROOT
        )
    print(f"prepared in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()}", flush=True)
    x = np.load(work / "x.npy")
    configs = configurations()
    servers = {name: Server(name, opts, work) for name, opts in configs.items()}
    pids = [os.getpid()] + [s.proc.pid for s in servers.values()]
    names = list(configs)
    cells: dict[tuple[str, str], list[dict]] = {(c, s): [] for c in names for s in SCENARIOS}
    try:
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for scenario in SCENARIOS:
                request = request_for(scenario, x)
                for c in order:
                    cell = measure(servers[c].port, request, args.clients, args.warmup, args.seconds, pids)
                    cell["counts"] = servers[c].drain()
                    cells[c, scenario].append(cell)
            print(f"round {r + 1}/{args.rounds} done; load average {os.getloadavg()}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    report(args, cells)


def summary(cells: list[dict], base: list[dict], seconds: float) -> dict[str, float]:
    """Pooled percentiles and throughput, and per-round ratios against ``base`` (medians)."""

    def stats(cell: dict) -> tuple[float, float, float]:
        v = np.asarray(cell["latencies"]) * 1e3
        return float(np.percentile(v, 50)), float(np.percentile(v, 95)), len(v) / seconds

    pooled = np.concatenate([np.asarray(c["latencies"]) for c in cells]) * 1e3
    ratios = np.array([np.divide(stats(c), stats(b)) for c, b in zip(cells, base, strict=True)])
    counts = {k: sum(c["counts"].get(k, 0) for c in cells) for k in {k for c in cells for k in c["counts"]}}
    return {
        "n": len(pooled),
        "p50": float(np.percentile(pooled, 50)),
        "p95": float(np.percentile(pooled, 95)),
        "rps": float(np.mean([stats(c)[2] for c in cells])),
        "r50": float(np.median(ratios[:, 0])),
        "r95": float(np.median(ratios[:, 1])),
        "rrps": float(np.median(ratios[:, 2])),
        "sampled": counts.get("sampled", 0),
        "dropped": sum(v for k, v in counts.items() if k.startswith("dropped_")),
        "others": float(np.mean([c["others"] for c in cells])),
    }


def report(args: argparse.Namespace, cells: dict[tuple[str, str], list[dict]]) -> None:
    others = [c["others"] for v in cells.values() for c in v]
    print(
        f"\n{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{args.rounds} rounds x {args.seconds:.0f} s per cell, {args.clients} clients; other processes "
        f"used {min(others):.2f}-{max(others):.2f} cores (mean {np.mean(others):.2f}) during the windows\n"
    )
    print("| scenario | config | n | p50 ms | p95 ms | req/s | p50 / off | p95 / off | req/s / off ", end="")
    print("| sampled | dropped |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for scenario in SCENARIOS:
        for c in configurations():
            m = summary(cells[c, scenario], cells["off", scenario], args.seconds)
            print(
                f"| {scenario} | {c} | {m['n']} | {m['p50']:.2f} | {m['p95']:.2f} | {m['rps']:.1f} | "
                f"{m['r50']:.3f} | {m['r95']:.3f} | {m['rrps']:.3f} | "
                f"{m['sampled']:.0f} | {m['dropped']:.0f} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=["run", "prepare", "server"], default="run", help=argparse.SUPPRESS)
    p.add_argument("--dir", default="/tmp/ecgx_bench_stability")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--share", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--sampler-threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--nice", type=int, default=19, help=argparse.SUPPRESS)
    p.add_argument("--cpu-budget", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "prepare":
        prepare(Path(args.dir))
    elif args.side == "server":
        serve(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
