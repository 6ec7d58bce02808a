"""Dynamic batching on and off (issue #21): the same ``ecgx serve`` under 1 and 64 concurrent clients
of single-ECG saliency and single-ECG integrated gradients, in one run.

Two servers run side by side from the same repository (bench_service.py's: the default CNN,
untrained, torch seed 0, its cheap gate report, run in research mode: the servers --allow-ungated),
one with ``[batching] enabled = true`` (``--preferred`` ECGs, ``--max-delay-ms``) in its serve
config, one with ``enabled = false``; both ``--max-concurrent 64 --max-queued 64`` so no client is
refused or waits for a slot. Cells alternate on / off for every scenario and client count, so both
see the same background load. The clients share the server's cores, so they are as cheap as can
be: one process (``--client-procs``) running every client as a grpc.aio coroutine over
``--channels`` channels, sending one request serialised once and never decoding the answers; each
issues requests back to back with an explicit target; after ``--warmup`` seconds every request
that completes in the next ``--seconds`` seconds is recorded. CPU columns are cores in use (CPU
seconds per second) by the server and by the clients over the window.

The table gives requests/s, p50 and p99 latency per cell and the ratios on / off; the targets
(issue #21): 64 clients, saliency >= 3x the requests/s of batching off with p99 no worse,
integrated gradients >= 1.5x; 1 client, p50 no more than 1 ms worse with batching on.

    python benchmarks/bench_batching.py [--seconds 15] [--warmup 3] [--clients 1 64]
        [--scenarios saliency ig1] [--preferred 32] [--max-delay-ms 2]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_service as svc  # its preparation, server readiness and helpers

HOST, MODEL, VERSION, ROOT = svc.HOST, svc.MODEL, svc.VERSION, svc.ROOT
SCENARIOS = {
    # name: (method, description); every request holds one ECG
    "saliency": ("saliency", "saliency, 1 ECG"),
    "ig1": ("integrated_gradients", "integrated gradients (default n_steps), 1 ECG"),
}


def prepare(work: Path) -> dict:
    """bench_service.py's package, data, keys and repository, with the gate run in research mode
    (its cheap policy is below the floor of a servable report): the servers run --allow-ungated,
    which does not change the work per request."""
    import shutil

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
    (work / "policy.toml").write_text(svc.GATE_POLICY)
    methods = [m for m, _ in SCENARIOS.values()]
    run = run_gate(
        pkg, data, policy=work / "policy.toml", methods=methods, workers=1, show_progress=False, research=True
    )
    dest = work / "repo" / MODEL / VERSION
    shutil.copytree(pkg, dest)
    (dest / "gate.json").unlink(missing_ok=True)
    report = {**run.report, "package": package_record(load_package(dest))}
    (dest / "gate.json").write_text(json.dumps(sign_report(report, load_private_key(private)), indent=1))
    return {"public": str(public), "repo": str(work / "repo"), "verdict": "research", "ungated": methods}


class Server(svc.ServerProcess):
    """``ecgx serve --config`` with a ``[batching]`` table, in a child process."""

    def __init__(self, info: dict, args: argparse.Namespace, work: Path, name: str, batching: str):
        self.port = svc.free_port()
        config = work / f"serve-{name}.toml"
        config.write_text(batching)
        self.cmd = [
            sys.executable, "-m", "ecgx.cli", "serve", "--config", str(config),
            "--repo", info["repo"], "--host", HOST, "--port", str(self.port),
            "--trusted-key", info["public"], "--max-batch", "64",
            "--max-concurrent", "64", "--max-queued", "64",
            "--grace", "2", "-q", "--insecure", "--no-metrics",
        ] + (["--allow-ungated"] if info["ungated"] else [])  # fmt: skip
        self.log = open(work / f"server-{name}.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        atexit.register(self.stop)
        self._wait_ready()


def request_for(scenario: str, x: np.ndarray):
    from ecgx.core.schema import LEADS
    from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb

    ecg = pb.Ecg(
        leads=list(LEADS),
        sampling_rate_hz=500.0,
        units=pb.MILLIVOLT,
        samples_per_lead=x.shape[-1],
        samples=np.asarray(x[0], dtype="<f4").tobytes(),
    )
    method = SCENARIOS[scenario][0]
    return pb.ExplainRequest(
        model=MODEL, version=VERSION, ecgs=[ecg], methods=[method], targets=[pb.Target(index=0)]
    )


def run_clients(args: argparse.Namespace) -> None:
    """One client process: ``--n-threads`` concurrent callers as grpc.aio coroutines on one event
    loop (no thread per client), over ``--channels`` channels, each sending the same request
    serialised once and never decoding the answer (its bytes are taken as they come), so the load
    generator takes as little of the machine's CPU as it can. Prints JSON with the latencies of
    the requests that completed in the window, the errors by status code and the process's own
    CPU seconds over the window."""
    import asyncio

    import grpc

    payload = request_for(args.scenario, np.load(Path(args.dir) / "x.npy")).SerializeToString()
    rpc = "/ecgx.v1.ExplanationService/Explain"
    t_start, t_end = args.t_start, args.t_start + args.seconds
    lat: list[float] = []
    errors: dict[str, int] = {}
    cpu: dict[str, float] = {}
    rng = np.random.default_rng(args.port * 1000 + args.n_threads)
    delays = rng.uniform(0.0, max(0.0, (t_start - time.time()) / 2), args.n_threads)

    def identity(b: bytes) -> bytes:
        return b

    async def client(k: int, call: Any) -> None:
        await asyncio.sleep(delays[k])
        for _ in range(svc.MAX_REQUESTS_PER_CLIENT):
            if time.time() >= t_end:
                break
            t0 = time.perf_counter()
            try:
                await call(payload, timeout=svc.REQUEST_TIMEOUT_S)
                code = None
            except grpc.RpcError as e:
                code = e.code().name
            dt, t1w = time.perf_counter() - t0, time.time()
            if t_start <= t1w <= t_end:
                if code is None:
                    lat.append(dt)
                else:
                    errors[code] = errors.get(code, 0) + 1

    async def window() -> None:
        await asyncio.sleep(max(0.0, t_start - time.time()))
        cpu["start"] = time.process_time()
        await asyncio.sleep(max(0.0, t_end - time.time()))
        cpu["end"] = time.process_time()

    async def main() -> None:
        opts = [("grpc.use_local_subchannel_pool", 1)]
        target = f"{HOST}:{args.port}"
        channels = [grpc.aio.insecure_channel(target, options=opts) for _ in range(args.channels)]
        calls = [
            ch.unary_unary(rpc, request_serializer=identity, response_deserializer=identity)
            for ch in channels
        ]
        tasks = [client(k, calls[k % len(calls)]) for k in range(args.n_threads)]
        await asyncio.gather(window(), *tasks)
        for ch in channels:
            await ch.close(grace=None)

    asyncio.run(main())
    cpu_s = cpu.get("end", 0.0) - cpu.get("start", 0.0)
    print(json.dumps({"latencies": lat, "errors": errors, "cpu_s": cpu_s}), flush=True)
    os._exit(0)


def measure_cell(args: argparse.Namespace, server: Server, scenario: str, clients: int) -> dict:
    per = max(1, -(-clients // args.client_procs))
    sizes = [per] * (clients // per) + ([clients % per] if clients % per else [])
    t_start = time.time() + args.warmup + 1.5 + 0.3 * len(sizes)
    procs = []
    try:
        for n in sizes:
            cmd = [
                sys.executable, __file__, "--side", "client", "--dir", args.dir,
                "--port", str(server.port), "--scenario", scenario, "--n-threads", str(n),
                "--t-start", repr(t_start), "--seconds", str(args.seconds),
                "--channels", str(min(n, args.channels)),
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT))
        time.sleep(max(0.0, t_start - time.time()))
        s0 = svc.cpu_seconds(server.proc.pid)
        time.sleep(max(0.0, t_start + args.seconds - time.time()))
        s1 = svc.cpu_seconds(server.proc.pid)
        outs = [p.communicate(timeout=args.warmup + 120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    lat: list[float] = []
    errors: dict[str, int] = {}
    client_cpu = 0.0
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"a client process exited with {p.returncode}")
        r = json.loads(out.strip().splitlines()[-1])
        lat += r["latencies"]
        client_cpu += r["cpu_s"]
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    lat.sort()
    return {
        "n": len(lat),
        "p50": svc.percentile(lat, 50),
        "p99": svc.percentile(lat, 99),
        "rps": len(lat) / args.seconds,
        "errors": sum(errors.values()),
        "server_cpu": (s1 - s0) / args.seconds,
        "client_cpu": client_cpu / args.seconds,
    }


ENGINE_CASES = (
    ("forward", 64),
    ("saliency", 1),
    ("saliency", 8),
    ("saliency", 32),
    ("saliency", 64),
    ("ig1", 1),
)


def engine_table(work: Path, rounds: int = 4) -> None:
    """The engine alone (this process, never PyTorch), ONNX Runtime intra-op threads 1 and 2 per
    session, alternating rounds: whether merging lowers the per-ECG cost, and whether two threads
    lose to one. Medians in ms."""
    import statistics

    from ecgx.service.engine import AttributionEngine

    assert "torch" not in sys.modules
    package = work / "repo" / MODEL / VERSION
    engines = {t: AttributionEngine(package, threads=t) for t in (1, 2)}
    for engine in engines.values():
        engine.warm_up()
    x = np.load(work / "x.npy")
    times: dict[tuple[str, int, int], list[float]] = {(c, b, t): [] for c, b in ENGINE_CASES for t in (1, 2)}
    for r in range(rounds):
        for t in (1, 2) if r % 2 == 0 else (2, 1):
            for case, batch in ENGINE_CASES:
                xb, target = np.ascontiguousarray(x[:batch]), np.zeros(batch, np.int64)
                method = SCENARIOS.get(case, (case,))[0]
                call = (
                    (lambda e=engines[t], xb=xb: e.logits(xb))
                    if case == "forward"
                    else (lambda e=engines[t], xb=xb, m=method, tg=target: e.attribute_with_logits(m, xb, tg))
                )
                call()
                for _ in range(3):
                    t0 = time.perf_counter()
                    call()
                    times[(case, batch, t)].append(time.perf_counter() - t0)
    print()
    print("Engine alone (`AttributionEngine`, medians of alternating rounds):")
    print()
    print("| pass | ECGs | 1 thread ms | ms per ECG | 2 threads ms | 1 / 2 (> 1: two faster) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for case, batch in ENGINE_CASES:
        one, two = (statistics.median(times[(case, batch, t)]) * 1e3 for t in (1, 2))
        name = "forward" if case == "forward" else SCENARIOS[case][0]
        print(f"| {name} | {batch} | {one:.2f} | {one / batch:.2f} | {two:.2f} | {one / two:.2f} |")


def report(args: argparse.Namespace, info: dict, rows: list[dict], started: float) -> None:
    import grpc
    import onnxruntime as ort

    ms = 1e3
    print()
    print(f"## Dynamic batching, on vs off ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))})")
    print()
    print(
        f"Machine: {svc.machine()}; Python {platform.python_version()}, onnxruntime {ort.__version__}, ",
        end="",
    )
    print(f"grpcio {grpc.__version__}.")
    print(
        f"Command: `python benchmarks/bench_batching.py {' '.join(sys.argv[1:])}` "
        f"({time.time() - started:.0f} s)."
    )
    print(
        f"Servers: `ecgx serve --max-concurrent 64 --max-queued 64 --max-batch 64` with `[batching]` "
        f"`preferred_batch_size = {args.preferred}`, `max_queue_delay_ms = {args.max_delay_ms:g}` (on) or "
        "`enabled = false` (off), side by side, cells alternating on / off; engine threads: the serve "
        "config's default (`engine_threads = 1`). Model: bench_service.py's default CNN; "
        f"gate verdict {info['verdict']}"
        + (f", research mode for {', '.join(info['ungated'])}" if info["ungated"] else "")
        + f". {args.seconds:g} s measured after {args.warmup:g} s warm-up per cell."
    )
    print()
    print(
        "| scenario | clients | req/s off | req/s on | ratio | p50 ms off | p50 ms on | p50 on - off ms "
        "| p99 ms off | p99 ms on | errors off / on | server CPU off / on | client CPU off / on |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        off, on = r["off"], r["on"]
        print(
            f"| {SCENARIOS[r['scenario']][1]} | {r['clients']} | {off['rps']:.1f} | {on['rps']:.1f} | "
            f"{on['rps'] / off['rps']:.2f}x | {off['p50'] * ms:.2f} | {on['p50'] * ms:.2f} | "
            f"{(on['p50'] - off['p50']) * ms:+.2f} | {off['p99'] * ms:.2f} | {on['p99'] * ms:.2f} | "
            f"{off['errors']} / {on['errors']} | {off['server_cpu']:.2f} / {on['server_cpu']:.2f} | "
            f"{off['client_cpu']:.2f} / {on['client_cpu']:.2f} |"
        )
    print()
    for r in rows:
        off, on = r["off"], r["on"]
        ratio = on["rps"] / off["rps"]
        if r["clients"] == 1:
            worse = (on["p50"] - off["p50"]) * ms
            verdict = "met" if worse <= 1.0 else "NOT met"
            print(
                f"- {r['scenario']}, 1 client: p50 {worse:+.2f} ms with batching on "
                f"(target <= +1 ms): {verdict}."
            )
        elif r["clients"] == max(args.clients):
            need = 3.0 if r["scenario"] == "saliency" else 1.5
            p99_ok = on["p99"] <= off["p99"]
            verdict = "met" if ratio >= need and (p99_ok or r["scenario"] != "saliency") else "NOT met"
            print(
                f"- {r['scenario']}, {r['clients']} clients: {ratio:.2f}x requests/s (target >= {need}x), "
                f"p99 {on['p99'] * ms:.1f} vs {off['p99'] * ms:.1f} ms: {verdict}."
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/ecgx_bench_batching", help="scratch folder (replaced)")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 64])
    p.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--preferred", type=int, default=32, help="[batching] preferred_batch_size (on)")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="[batching] max_queue_delay_ms (on)")
    p.add_argument("--client-procs", type=int, default=1, help="client processes (grpc.aio, one loop each)")
    p.add_argument("--channels", type=int, default=8, help="gRPC channels per client process")
    p.add_argument("--reuse", action="store_true", help="reuse --dir from an earlier run (no new export)")
    p.add_argument("--engine-only", action="store_true", help="only the engine table (threads 1 vs 2)")
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
    started = time.time()
    work = Path(args.dir)
    if args.reuse and (work / "info.json").is_file():
        info = json.loads((work / "info.json").read_text())
    else:
        print(f"preparing {work} ...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--side", "prepare", "--dir", str(work)],
            check=True, capture_output=True, text=True, cwd=ROOT, timeout=1800,
        ).stdout  # fmt: skip
        info = json.loads(out.strip().splitlines()[-1])
        (work / "info.json").write_text(json.dumps(info))
    if args.engine_only:
        engine_table(work)
        return
    on_config = (
        f"[batching]\nenabled = true\npreferred_batch_size = {args.preferred}\n"
        f"max_queue_delay_ms = {args.max_delay_ms}\n"
    )
    servers = {
        "on": Server(info, args, work, "on", on_config),
        "off": Server(info, args, work, "off", "[batching]\nenabled = false\n"),
    }
    rows = []
    try:
        for scenario in args.scenarios:
            for clients in args.clients:
                row = {"scenario": scenario, "clients": clients}
                for mode in ("off", "on"):
                    print(f"{scenario} x {clients} clients, batching {mode} ...", file=sys.stderr, flush=True)
                    row[mode] = measure_cell(args, servers[mode], scenario, clients)
                rows.append(row)
    finally:
        for s in servers.values():
            s.stop()
    report(args, info, rows, started)
    engine_table(work)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # atexit stops the servers
    main()
