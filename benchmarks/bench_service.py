"""The gRPC service under load: latency and throughput of Explain, and the serving overhead.

Scenarios: saliency on one ECG, and integrated gradients (default settings) on a batch of 16
ECGs, each at 1, 8 and 64 concurrent clients. For every cell, ``ecgx serve`` runs as its own
process (the load generator never shares its GIL) on a free loopback port, the clients run in
separate processes (at most ``--threads-per-proc`` client threads each, one gRPC channel per
client thread), issue requests back to back, and after ``--warmup`` seconds record every request
that completes in the next ``--seconds`` seconds (requests still in flight at the end are
abandoned and cancelled). The table gives p50 and p99 latency, requests/s and ECGs/s, the
error count (any status other than OK), and the CPU the server and each client process used,
so a client process that is pinned at one core (its GIL, not the server, is the limit) shows.

Serving overhead: the engine's own time for the same call (``AttributionEngine`` in this
process, same package, same thread settings as ``ecgx serve``, the same explicit target, so
the server runs exactly one ``attribute_with_logits``) is measured before and after the load
runs; overhead = p50(gRPC, 1 client) - p50(engine).

Server settings: --max-concurrent 64 --max-queued 64 by default, so no client of 64 is refused
and none waits for a slot: with fewer slots, integrated gradients at 64 clients queues requests
past the server's 30 s slot wait (QUEUE_WAIT_S) and they fail RESOURCE_EXHAUSTED. ``ecgx serve``
has no thread option; its engines use ONNX Runtime's default intra-op threads, and so does the
engine timing here. Each request has a 120 s deadline. The issue's target: single-ECG saliency
within 2 ms of the engine; no error at 64 clients.

The model is the default CNN (ecgx.training.models.ModelConfig defaults), untrained, torch seed 0:
latency does not depend on the weights. Its gate report is built cheaply (32 synthetic ECGs,
a small policy) and signed with a fresh key; when the gate does not pass saliency and
integrated gradients (an untrained model usually fails the randomisation check), the server
runs in research mode (--allow-ungated), which the output says: the verdict does not change
the work done per request.

    python benchmarks/bench_service.py [--seconds 60] [--warmup 5] [--clients 1 8 64]
        [--scenarios saliency ig16] [--threads-per-proc 16] [--dir /tmp/ecgx_bench_service]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"  # loopback only
MODEL, VERSION = "ecg", "1"
SCENARIOS = {
    # name: (method, batch, description)
    "saliency": ("saliency", 1, "saliency, 1 ECG"),
    "ig16": ("integrated_gradients", 16, "integrated gradients (default n_steps), 16 ECGs"),
}
GATE_POLICY = """
[gate]
ecgs = 32
allow_incomplete_data = true
[checks.randomisation]
ecgs = 8
[checks.perturbation]
bootstrap = 100
"""
REQUEST_TIMEOUT_S = 120.0  # per request deadline; a request past it counts as an error
MAX_REQUESTS_PER_CLIENT = 1_000_000  # count bound on every client loop besides the time bound
SERVER_START_S = 120.0
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ preparation


def prepare(work: Path) -> dict:
    """Package, data, keys, signed gate report and repository under ``work`` (runs in its own
    process: it imports PyTorch, which neither the server nor the engine timing may share)."""
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
    private, public = generate_keypair(work / "keys")
    (work / "policy.toml").write_text(GATE_POLICY)
    methods = [SCENARIOS[s][0] for s in SCENARIOS]
    run = run_gate(pkg, data, policy=work / "policy.toml", methods=methods, workers=1, show_progress=False)
    dest = work / "repo" / MODEL / VERSION
    shutil.copytree(pkg, dest)
    (dest / "gate.json").unlink(missing_ok=True)
    report = {**run.report, "package": package_record(load_package(dest))}
    (dest / "gate.json").write_text(json.dumps(sign_report(report, load_private_key(private)), indent=1))
    served = sorted(run.report.get("serve", []))
    return {
        "public": str(public),
        "repo": str(work / "repo"),
        "verdict": run.report["verdict"],
        "served": served,
        "ungated": sorted(set(methods) - set(served)),
    }


# ------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """``ecgx serve`` in a child process; always terminated (stop(), atexit)."""

    def __init__(self, info: dict, args: argparse.Namespace, work: Path):
        self.port = free_port()
        self.cmd = [
            sys.executable, "-m", "ecgx.cli", "serve",
            "--repo", info["repo"], "--host", HOST, "--port", str(self.port),
            "--trusted-key", info["public"],
            "--max-batch", "64",
            "--max-concurrent", str(args.max_concurrent),
            "--max-queued", str(args.max_queued),
            "--grace", "2", "-q", "--insecure", "--no-metrics",
        ] + (["--allow-ungated"] if info["ungated"] else [])  # fmt: skip
        self.log = open(work / "server.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        atexit.register(self.stop)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import grpc

        from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
        from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc

        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ecgx serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with grpc.insecure_channel(f"{HOST}:{self.port}") as ch:
                    models = pb_grpc.ExplanationServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=2)
                    if any(m.name == MODEL for m in models.models):
                        return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"ecgx serve did not answer within {SERVER_START_S:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self.log.closed:
            self.log.close()


# ------------------------------------------------------------------------------ client side


def request_for(scenario: str, x: np.ndarray):
    from ecgx.core.schema import LEADS
    from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb

    method, batch, _ = SCENARIOS[scenario]
    ecgs = [
        pb.Ecg(
            leads=list(LEADS),
            sampling_rate_hz=500.0,
            units=pb.MILLIVOLT,
            samples_per_lead=x.shape[-1],
            samples=np.asarray(b, dtype="<f4").tobytes(),
        )
        for b in x[:batch]
    ]
    # An explicit target: the server runs one attribute_with_logits, as the engine timing does.
    return pb.ExplainRequest(
        model=MODEL, version=VERSION, ecgs=ecgs, methods=[method], targets=[pb.Target(index=0)]
    )


def run_clients(args: argparse.Namespace) -> None:
    """One client process: ``--n-threads`` client threads, each with its own channel, issuing
    requests back to back; prints JSON with latencies of the requests that completed in the
    measured window, errors by status code, and this process's CPU seconds in the window."""
    import grpc

    from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc

    x = np.load(Path(args.dir) / "x.npy")
    request = request_for(args.scenario, x)
    t_start, t_end = args.t_start, args.t_start + args.seconds  # time.time(): shared by processes
    lat: list[list[float]] = [[] for _ in range(args.n_threads)]
    errors: list[dict[str, int]] = [{} for _ in range(args.n_threads)]

    rng = np.random.default_rng(args.port * 1000 + args.n_threads)
    delays = rng.uniform(0.0, max(0.0, (t_start - time.time()) / 2), args.n_threads)

    def client(k: int) -> None:
        opts = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, as a separate client
        with grpc.insecure_channel(f"{HOST}:{args.port}", options=opts) as ch:
            explain = pb_grpc.ExplanationServiceStub(ch).Explain
            time.sleep(delays[k])  # staggered starts: clients of long requests do not move in lockstep
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if time.time() >= t_end:
                    break
                t0 = time.perf_counter()
                try:
                    explain(request, timeout=REQUEST_TIMEOUT_S)
                    code = None
                except grpc.RpcError as e:
                    code = e.code().name
                dt, t1w = time.perf_counter() - t0, time.time()
                if t_start <= t1w <= t_end:  # completed in the window (started in it or in the warm-up)
                    if code is None:
                        lat[k].append(dt)
                    else:
                        errors[k][code] = errors[k].get(code, 0) + 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.n_threads)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, t_start - time.time()))
    c0 = time.process_time()
    time.sleep(max(0.0, t_end - time.time()))
    c1 = time.process_time()
    time.sleep(0.2)  # results of requests that completed by t_end are appended by now
    merged: dict[str, int] = {}
    for e in errors:
        for code, n in e.items():
            merged[code] = merged.get(code, 0) + n
    print(
        json.dumps({"latencies": [v for x_ in lat for v in x_], "errors": merged, "cpu_s": c1 - c0}),
        flush=True,
    )
    # Requests still in flight are abandoned: exiting closes the channels, the server cancels them.
    os._exit(0)


def measure_cell(
    args: argparse.Namespace, server: ServerProcess, scenario: str, clients: int
) -> dict[str, float | int | str]:
    per = args.threads_per_proc
    sizes = [per] * (clients // per) + ([clients % per] if clients % per else [])
    t_start = time.time() + args.warmup + 1.0 + 0.2 * len(sizes)  # processes start, then warm up
    procs = []
    try:
        for n in sizes:
            cmd = [
                sys.executable, __file__, "--side", "client", "--dir", args.dir,
                "--port", str(server.port), "--scenario", scenario, "--n-threads", str(n),
                "--t-start", repr(t_start), "--seconds", str(args.seconds),
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT))
        time.sleep(max(0.0, t_start - time.time()))
        s0 = cpu_seconds(server.proc.pid)
        time.sleep(max(0.0, t_start + args.seconds - time.time()))
        s1 = cpu_seconds(server.proc.pid)
        outs = [p.communicate(timeout=args.warmup + 60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    lat: list[float] = []
    errors: dict[str, int] = {}
    cpu = []
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"a client process exited with {p.returncode}")
        r = json.loads(out.strip().splitlines()[-1])
        lat += r["latencies"]
        cpu.append(r["cpu_s"] / args.seconds)
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    lat.sort()
    batch = SCENARIOS[scenario][1]
    n_err = sum(errors.values())
    return {
        "scenario": scenario,
        "clients": clients,
        "procs": len(sizes),
        "n": len(lat),
        "p50": percentile(lat, 50),
        "p99": percentile(lat, 99),
        "rps": len(lat) / args.seconds,
        "eps": len(lat) * batch / args.seconds,
        "errors": n_err,
        "error_codes": ", ".join(f"{k} {v}" for k, v in sorted(errors.items())),
        "server_cpu": (s1 - s0) / args.seconds,
        "client_cpu": max(cpu) if cpu else float("nan"),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(np.percentile(np.asarray(sorted_values), q))


# ------------------------------------------------------------------------------ engine side


def engine_times(work: Path, scenarios: list[str], calls: int, budget_s: float) -> dict[str, list[float]]:
    """The engine's own time for each scenario's call: same package, thread settings as
    ``ecgx serve`` (ONNX Runtime's default), one attribute_with_logits with target 0."""
    from ecgx.core.package_reader import load_package
    from ecgx.service.engine import AttributionEngine

    assert "torch" not in sys.modules, "the engine timing must not share the process with PyTorch"
    engine = AttributionEngine(load_package(work / "repo" / MODEL / VERSION))
    engine.warm_up()
    x = np.load(work / "x.npy")
    out: dict[str, list[float]] = {}
    for name in scenarios:
        method, batch, _ = SCENARIOS[name]
        xb, t = np.ascontiguousarray(x[:batch]), np.zeros(batch, np.int64)
        for _ in range(3):
            engine.attribute_with_logits(method, xb, t)
        ts = []
        deadline = time.monotonic() + budget_s
        for _ in range(calls):
            t0 = time.perf_counter()
            engine.attribute_with_logits(method, xb, t)
            ts.append(time.perf_counter() - t0)
            if time.monotonic() > deadline and len(ts) >= 10:
                break
        out[name] = ts
    return out


# ------------------------------------------------------------------------------ report


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}, {platform.machine()}"


def report(args, info, cells, eng, started: float) -> None:
    import grpc
    import onnxruntime as ort

    ms = 1e3
    print()
    print(f"## gRPC service ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))})")
    print()
    print(
        f"Machine: {machine()}; Python {platform.python_version()}, onnxruntime {ort.__version__}, ", end=""
    )
    print(f"grpcio {grpc.__version__}.")
    cmd = " ".join(["python", "benchmarks/bench_service.py", *sys.argv[1:]])
    print(f"Command: `{cmd}` ({time.time() - started:.0f} s wall in all).")
    print(
        f"Server: `ecgx serve --max-concurrent {args.max_concurrent} --max-queued {args.max_queued} "
        f"--max-batch 64{' --allow-ungated' if info['ungated'] else ''}` on {HOST}, its own process; "
        "engine threads: ONNX Runtime's default (ecgx serve has no thread option)."
    )
    gate = f"gate verdict {info['verdict']}, serves {', '.join(info['served']) or 'nothing'}"
    if info["ungated"]:
        gate += (
            f"; RESEARCH MODE (--allow-ungated) for {', '.join(info['ungated'])}, which the gate did not pass"
        )
    print(f"Model: default CNN, untrained (torch seed 0); {gate}.")
    print(
        f"Load: {args.seconds:g} s measured after {args.warmup:g} s warm-up per cell; at most "
        f"{args.threads_per_proc} client threads per client process, one channel each; "
        "explicit target index 0. A client process near 1.0 core would mean its GIL, not the server, "
        "limits the load."
    )
    print()
    print(
        "| scenario | clients | client procs | requests | p50 ms | p99 ms | requests/s | ECGs/s | errors "
        "| server CPU (cores) | busiest client proc CPU (cores) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in cells:
        err = f"{c['errors']}" + (f" ({c['error_codes']})" if c["errors"] else "")
        print(
            f"| {SCENARIOS[c['scenario']][2]} | {c['clients']} | {c['procs']} | {c['n']} | "
            f"{c['p50'] * ms:.2f} | {c['p99'] * ms:.2f} | {c['rps']:.1f} | {c['eps']:.1f} | {err} | "
            f"{c['server_cpu']:.2f} | {c['client_cpu']:.2f} |"
        )
    print()
    print("Serving overhead (engine: `AttributionEngine.attribute_with_logits` in the benchmark process, ")
    print("before and after the load runs; gRPC: 1 client):")
    print()
    print(
        "| scenario | engine p50 ms (before / after / all) | engine calls | gRPC p50 ms, 1 client "
        "| overhead ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in SCENARIOS:
        if name not in eng["before"]:
            continue
        before, after = eng["before"][name], eng["after"][name]
        p_all = statistics.median(before + after)
        one = next((c for c in cells if c["scenario"] == name and c["clients"] == 1), None)
        g = one["p50"] if one else float("nan")
        print(
            f"| {SCENARIOS[name][2]} | {statistics.median(before) * ms:.2f} / "
            f"{statistics.median(after) * ms:.2f} / {p_all * ms:.2f} | {len(before) + len(after)} | "
            f"{g * ms:.2f} | {(g - p_all) * ms:+.2f} |"
        )
    sal = next((c for c in cells if c["scenario"] == "saliency" and c["clients"] == 1), None)
    if sal and "saliency" in eng["before"]:
        over = (sal["p50"] - statistics.median(eng["before"]["saliency"] + eng["after"]["saliency"])) * ms
        print()
        print(f"Target, single-ECG saliency p50 within 2 ms of the engine: {over:+.2f} ms, "
              f"{'met' if over <= 2.0 else 'NOT met'}.")  # fmt: skip
    at64 = [c for c in cells if c["clients"] == 64]
    if at64:
        n = sum(c["errors"] for c in at64)
        print(f"Target, no error at 64 clients: {n} errors, {'met' if n == 0 else 'NOT met'}.")


# ------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/ecgx_bench_service", help="scratch folder (replaced)")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds per cell")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--threads-per-proc", type=int, default=16, help="client threads per client process")
    p.add_argument("--max-concurrent", type=int, default=64, help="ecgx serve --max-concurrent")
    p.add_argument("--max-queued", type=int, default=64, help="ecgx serve --max-queued")
    p.add_argument(
        "--engine-calls", type=int, default=300, help="engine calls per scenario, before and after"
    )
    p.add_argument("--side", choices=("prepare", "client"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--scenario", help=argparse.SUPPRESS)
    p.add_argument("--n-threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--t-start", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "prepare":
        print(json.dumps(prepare(Path(args.dir))))
        return
    if args.side == "client":
        run_clients(args)
        return
    if args.seconds <= 0 or args.warmup < 0 or args.threads_per_proc < 1 or min(args.clients) < 1:
        p.error("--seconds must be > 0, --warmup >= 0, --threads-per-proc and --clients >= 1")
    if args.max_queued + args.max_concurrent < max(args.clients):
        p.error(
            "--max-concurrent + --max-queued must be at least the largest --clients, or requests are refused"
        )
    started = time.time()
    work = Path(args.dir)
    print(f"preparing {work} (export, gate, sign, repository) ...", file=sys.stderr, flush=True)
    out = subprocess.run(
        [sys.executable, __file__, "--side", "prepare", "--dir", str(work)],
        check=True, capture_output=True, text=True, cwd=ROOT, timeout=1800,
    ).stdout  # fmt: skip
    info = json.loads(out.strip().splitlines()[-1])
    print(f"gate: {info}", file=sys.stderr, flush=True)
    budget = max(5.0, args.seconds / 4)
    eng = {"before": engine_times(work, args.scenarios, args.engine_calls, budget)}
    cells = []
    server = ServerProcess(info, args, work)
    try:
        for scenario in args.scenarios:
            for clients in args.clients:
                print(f"{scenario}, {clients} clients ...", file=sys.stderr, flush=True)
                cells.append(measure_cell(args, server, scenario, clients))
    finally:
        server.stop()
    eng["after"] = engine_times(work, args.scenarios, args.engine_calls, budget)
    report(args, info, cells, eng, started)


if __name__ == "__main__":
    main()
