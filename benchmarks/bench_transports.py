"""The three transports under load, under a flood, and under cancellation (issue 19).

1. **Load**: 64 clients issue a gated method (gradcam, which the version's gate passed) back to
   back on each transport in turn, ecgx.v1 Explain over gRPC, the OIP ModelInfer over gRPC and
   over REST (binary tensors, as tritonclient.http sends them), against one ``ecgx serve
   --http-port`` process with its default limits (8 request slots, 32 queue places). Clients run
   in separate processes (16 threads each, one connection per thread). Reported per transport:
   completed requests/s, p50/p99 latency of the completed ones, and the share of requests
   refused, by status code and by the refusal reason the server's audit log records.
2. **Flood**: 24 concurrent unauthenticated ~57 MB requests on each port of a server that
   requires tokens; the server's RSS is sampled every 5 ms from /proc: growth = peak - before.
3. **Cancel to free slot**: a server with one slot and no queue (research mode, so a slow
   method serves: smoothgrad, 8 ECGs x 2000 samples, seconds of work). A client starts the
   request and cancels it (gRPC: the call is cancelled; REST: the connection is closed); a
   probe then asks for a Predict every 5 ms: the time from the cancel to the first Predict the
   server admits is the time the slot took to free.

The model: a small CNN trained for a few epochs on synthetic data (as the test suite's), its
gate run on 32 ECGs under the test suite's small policy (randomisation and perturbation for
information, the changed-model check blocking), which gradcam passes; that policy is below the
floor, so the gate marks the report research and this script takes the mark off and signs it
with a fresh key (the test suite does the same). The verdict does not change the work per request.

    python benchmarks/bench_transports.py [--seconds 60] [--warmup 5] [--clients 64]
        [--dir /tmp/ecgx_bench_transports] [--parts load flood cancel]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import GATE_POLICY

HOST = "127.0.0.1"
MODEL, VERSION, METHOD = "ecg", "1", "gradcam"
TRANSPORTS = ("ecgx.v1 gRPC", "OIP gRPC", "OIP REST")
ROOT = Path(__file__).resolve().parents[1]
SERVER_START_S = 120.0
REQUEST_TIMEOUT_S = 60.0
FLOOD_REQUESTS, FLOOD_BYTES = 24, 57 * 2**20
# ------------------------------------------------------------------------------ preparation


def prepare(work: Path) -> dict[str, Any]:
    """A trained package with a signed gate report that passes gradcam, in a repository (own
    process: it imports PyTorch, which the server must not share)."""
    from ecgx.core.package_reader import load_package
    from ecgx.core.signing import load_private_key
    from ecgx.training.config import TrainConfig
    from ecgx.training.data.synth import synthesize_dataset
    from ecgx.training.export import export_checkpoint
    from ecgx.training.models import ModelConfig
    from ecgx.training.train import CHECKPOINT_FILE, seed_dir, train_run
    from ecgx.validation.gate import package_record, run_gate
    from ecgx.validation.signing import generate_keypair, sign_report

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    data = synthesize_dataset(work / "train", 3000, seed=3, show_progress=False)
    validation = synthesize_dataset(work / "validation", 64, seed=4, show_progress=False)
    train_run(
        data,
        [0],
        work / "runs",
        ModelConfig(widths=(8, 16, 16), stem_stride=2),
        TrainConfig(max_epochs=12),
        show_progress=False,
    )
    pkg = export_checkpoint(seed_dir(work / "runs", 0) / CHECKPOINT_FILE, work / "pkg")
    private, public = generate_keypair(work / "keys")
    (work / "policy.toml").write_text(GATE_POLICY)
    run = run_gate(
        pkg,
        validation,
        policy=work / "policy.toml",
        methods=[METHOD],
        workers=1,
        show_progress=False,
        research=True,
    )
    report = {**run.report, "research": False, "servable": run.report["verdict"] == "pass"}
    dest = work / "repo" / MODEL / VERSION
    shutil.copytree(pkg, dest)
    report["package"] = package_record(load_package(dest))
    (dest / "gate.json").write_text(json.dumps(sign_report(report, load_private_key(private)), indent=1))
    from ecgx.core.dataset import load_dataset

    np.save(work / "x.npy", np.asarray(load_dataset(validation).signals[:8], dtype=np.float32))
    return {
        "public": str(public),
        "repo": str(work / "repo"),
        "verdict": run.report["verdict"],
        "served": sorted(run.report.get("serve", [])),
    }


# ------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Server:
    """``ecgx serve --http-port`` in a child process; always terminated (stop(), atexit)."""

    def __init__(self, info: dict, work: Path, name: str, *extra: str):
        self.port, self.http_port = free_port(), free_port()
        self.audit = work / f"{name}.audit.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "ecgx.cli",
            "serve",
            "--repo",
            info["repo"],
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
            "--trusted-key",
            info["public"],
            "--grace",
            "2",
            "-q",
            "--insecure",
            "--no-metrics",
            "--audit-log",
            str(self.audit),
            *extra,
        ]
        self.log = open(work / f"{name}.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        atexit.register(self.stop)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ecgx serve exited with {self.proc.returncode}; see {self.log.name}")
            with contextlib.suppress(OSError):
                c = http.client.HTTPConnection(HOST, self.http_port, timeout=2)
                c.request("GET", f"/v2/models/{MODEL}/ready")
                if c.getresponse().status in (200, 401):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"ecgx serve did not answer within {SERVER_START_S:.0f} s; see {self.log.name}")

    def audit_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]

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


# ------------------------------------------------------------------------------ requests


def rest_body(x: np.ndarray, parameters: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor infer body, as tritonclient.http builds it."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "ecg",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True, **parameters},
        }
    ).encode()
    return head + raw, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def ecg_messages(x: np.ndarray) -> list:
    from ecgx.core.schema import LEADS
    from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb

    return [
        pb.Ecg(
            leads=list(LEADS),
            sampling_rate_hz=500.0,
            units=pb.MILLIVOLT,
            samples_per_lead=x.shape[-1],
            samples=np.asarray(b, "<f4").tobytes(),
        )
        for b in x
    ]


def oip_request(x: np.ndarray, parameters: dict[str, str]):
    from tritonclient.grpc import service_pb2 as oip_pb

    request = oip_pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="ecg", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    for k, v in parameters.items():
        request.parameters[k].string_param = v
    return request


def caller(transport: str, port: int, http_port: int, x: np.ndarray, method: str | None, settings: str = ""):
    """A function making one call on its own connection: returns the status code name ("OK"...)."""
    import grpc

    if transport == "OIP REST":
        params = {"method": method, **({"parameters": settings} if settings else {})} if method else {}
        body, headers = rest_body(x, params)
        conn = http.client.HTTPConnection(HOST, http_port, timeout=REQUEST_TIMEOUT_S)

        def call() -> str:
            nonlocal conn
            try:
                conn.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                if r.getheader("Connection", "").lower() == "close":
                    conn.close()
                return "OK" if r.status == 200 else r.getheader("Ecgx-Status", str(r.status))
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(HOST, http_port, timeout=REQUEST_TIMEOUT_S)
                return "CONNECTION_ERROR"

        return call
    channel = grpc.insecure_channel(f"{HOST}:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
    if transport == "ecgx.v1 gRPC":
        from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
        from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc

        stub = pb_grpc.ExplanationServiceStub(channel)
        if method:
            request = pb.ExplainRequest(
                model=MODEL,
                ecgs=ecg_messages(x),
                methods=[method],
                parameters_json={method: settings} if settings else {},
            )
            rpc = stub.Explain
        else:
            request, rpc = pb.PredictRequest(model=MODEL, ecgs=ecg_messages(x)), stub.Predict
    else:
        from tritonclient.grpc import service_pb2_grpc as oip_grpc

        params = {"method": method, **({"parameters": settings} if settings else {})} if method else {}
        request, rpc = oip_request(x, params), oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer

    def call() -> str:
        try:
            rpc(request, timeout=REQUEST_TIMEOUT_S)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    return call


# ------------------------------------------------------------------------------ 1. load


def run_clients(args: argparse.Namespace) -> None:
    """One client process: ``--n-threads`` threads calling back to back; prints JSON with the
    latencies of OK calls and the codes of the others completed in the measured window."""
    x = np.load(Path(args.dir) / "x.npy")[:1]
    t_start, t_end = args.t_start, args.t_start + args.seconds
    lat: list[float] = []
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def client() -> None:
        call = caller(args.transport, args.port, args.http_port, x, METHOD)
        while time.time() < t_end:
            t0 = time.perf_counter()
            code = call()
            dt, now = time.perf_counter() - t0, time.time()
            if t_start <= now <= t_end:
                with lock:
                    if code == "OK":
                        lat.append(dt)
                    else:
                        codes[code] = codes.get(code, 0) + 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.n_threads)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, t_end - time.time() + 0.3))
    with lock:
        print(json.dumps({"latencies": lat, "codes": codes}), flush=True)
    os._exit(0)  # calls in flight are abandoned; the server sees the connections close


def ended(line: dict) -> float:
    """UNIX time an audit line's call ended."""
    started = datetime.fromisoformat(line["time"].replace("Z", "+00:00")).timestamp()
    return started + line.get("latency_ms", 0.0) / 1000


def measure_load(args: argparse.Namespace, server: Server, transport: str) -> dict[str, Any]:
    per = 16
    sizes = [per] * (args.clients // per) + ([args.clients % per] if args.clients % per else [])
    t_start = time.time() + args.warmup + 2.0
    before = len(server.audit_lines())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--side",
                "client",
                "--dir",
                args.dir,
                "--transport",
                transport,
                "--port",
                str(server.port),
                "--http-port",
                str(server.http_port),
                "--n-threads",
                str(n),
                "--t-start",
                repr(t_start),
                "--seconds",
                str(args.seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for n in sizes
    ]
    outs = [p.communicate(timeout=args.warmup + args.seconds + 120)[0] for p in procs]
    lat: list[float] = []
    codes: dict[str, int] = {}
    for out in outs:
        r = json.loads(out.strip().splitlines()[-1])
        lat += r["latencies"]
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
    time.sleep(1.0)  # the audit lines of the last calls
    window = [a for a in server.audit_lines()[before:] if t_start <= ended(a) <= t_start + args.seconds]
    reasons: dict[str, int] = {}
    for a in window:
        if a.get("code") != "OK":
            key = f"{a.get('code')}/{a.get('refusal') or '-'}"
            reasons[key] = reasons.get(key, 0) + 1
    total = len(lat) + sum(codes.values())
    lat.sort()
    return {
        "transport": transport,
        "ok": len(lat),
        "rps": len(lat) / args.seconds,
        "p50": float(np.percentile(lat, 50)) if lat else float("nan"),
        "p99": float(np.percentile(lat, 99)) if lat else float("nan"),
        "refused": sum(codes.values()) / total if total else 0.0,
        "codes": codes,
        "reasons": reasons,
        "audited": len(window),
    }


# ------------------------------------------------------------------------------ 2. flood


def _flood_grpc(port: int, method: str, payload: bytes, out: list[str]) -> None:
    import grpc

    with grpc.insecure_channel(f"{HOST}:{port}", options=[("grpc.max_send_message_length", 2**30)]) as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(payload, timeout=60)
            out.append("OK")
        except grpc.RpcError as e:
            out.append(e.code().name)


def _flood_rest(port: int, payload: memoryview, out: list[str]) -> None:
    try:
        with socket.create_connection((HOST, port), timeout=60) as s:
            s.sendall(
                b"POST /v2/models/ecg/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload)
            )
            with contextlib.suppress(OSError):
                s.sendall(payload)
            answer = s.recv(64)
            out.append(answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed")
    except OSError as e:
        out.append(type(e).__name__)


def measure_flood(server: Server, transport: str) -> dict[str, Any]:
    from tritonclient.grpc import service_pb2 as oip_pb

    from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb

    n_values = FLOOD_BYTES // 4
    if transport == "ecgx.v1 gRPC":
        ecg = pb.Ecg(samples=bytes(FLOOD_BYTES), samples_per_lead=n_values // 12, sampling_rate_hz=500.0)
        payload = pb.PredictRequest(model=MODEL, ecgs=[ecg]).SerializeToString()
        target = functools.partial(_flood_grpc, server.port, "/ecgx.v1.ExplanationService/Predict", payload)
    elif transport == "OIP gRPC":
        request = oip_pb.ModelInferRequest(model_name=MODEL)
        request.raw_input_contents.append(bytes(FLOOD_BYTES))
        payload = request.SerializeToString()
        target = functools.partial(
            _flood_grpc, server.port, "/inference.GRPCInferenceService/ModelInfer", payload
        )
    else:
        body = memoryview(bytes(FLOOD_BYTES))
        target = functools.partial(_flood_rest, server.http_port, body)
    time.sleep(1.0)
    before = rss_bytes(server.proc.pid)
    peak, done, out = [before], threading.Event(), []

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(server.proc.pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=target, args=(out,)) for _ in range(FLOOD_REQUESTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    seconds = time.monotonic() - t0
    time.sleep(0.5)
    done.set()
    sampler.join()
    answers: dict[str, int] = {}
    for a in out:
        answers[a] = answers.get(a, 0) + 1
    return {
        "transport": transport,
        "growth_mb": (peak[0] - before) / 2**20,
        "before_mb": before / 2**20,
        "seconds": seconds,
        "answers": answers,
    }


# ------------------------------------------------------------------------------ 3. cancel


def measure_cancel(server: Server, transport: str, x: np.ndarray, repeats: int = 3) -> list[float]:
    """Seconds from a client's cancel of a running slow request to the slot admitting a Predict."""
    import grpc

    settings = json.dumps({"n_samples": 2000})
    probe = caller(transport, server.port, server.http_port, x[:1], None)
    times = []
    for _ in range(repeats):
        if transport == "OIP REST":
            body, headers = rest_body(x, {"method": "smoothgrad", "parameters": settings})
            conn = http.client.HTTPConnection(HOST, server.http_port, timeout=60)
            conn.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers)
            cancel = conn.close
        else:
            channel = grpc.insecure_channel(f"{HOST}:{server.port}")
            if transport == "ecgx.v1 gRPC":
                from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
                from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc

                request = pb.ExplainRequest(
                    model=MODEL,
                    ecgs=ecg_messages(x),
                    methods=["smoothgrad"],
                    parameters_json={"smoothgrad": settings},
                )
                future = pb_grpc.ExplanationServiceStub(channel).Explain.future(request, timeout=60)
            else:
                from tritonclient.grpc import service_pb2_grpc as oip_grpc

                request = oip_request(x, {"method": "smoothgrad", "parameters": settings})
                future = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(request, timeout=60)
            cancel = future.cancel
        deadline = time.monotonic() + 10
        while probe() == "OK" and time.monotonic() < deadline:  # until the slow request holds the slot
            time.sleep(0.005)
        time.sleep(0.5)  # it is computing
        t0 = time.monotonic()
        cancel()
        while probe() != "OK" and time.monotonic() - t0 < 30:
            time.sleep(0.005)
        times.append(time.monotonic() - t0)
        time.sleep(0.5)
    return times


# ------------------------------------------------------------------------------ report


def machine() -> str:
    return f"{os.cpu_count()}-vCPU {platform.machine()} ({platform.platform()})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/ecgx_bench_transports", help="scratch folder")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds per transport")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument(
        "--parts", nargs="+", choices=("load", "flood", "cancel"), default=["load", "flood", "cancel"]
    )
    p.add_argument("--reuse", action="store_true", help="reuse a prepared --dir")
    p.add_argument("--side", choices=("prepare", "client"), help=argparse.SUPPRESS)
    p.add_argument("--transport", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--http-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--t-start", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.dir)
    if args.side == "client":
        run_clients(args)
        return
    if args.side == "prepare":
        print(json.dumps(prepare(work)), flush=True)
        return
    started = time.time()
    if args.reuse and (work / "info.json").exists():
        info = json.loads((work / "info.json").read_text())
    else:
        out = subprocess.run(
            [sys.executable, __file__, "--side", "prepare", "--dir", str(work)],
            cwd=ROOT,
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        ).stdout
        info = json.loads(out.strip().splitlines()[-1])
        (work / "info.json").write_text(json.dumps(info))
    print(f"# bench_transports on {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}")
    print(f"gate verdict {info['verdict']}, served {info['served']}")
    if "load" in args.parts:
        server = Server(info, work, "load")
        print(
            f"\n## Load: {args.clients} clients, {METHOD} on 1 ECG, {args.seconds:.0f} s per transport "
            f"(+{args.warmup:.0f} s warm-up), default slots (8) and queue (32)"
        )
        print("| transport | OK/s | p50 ms | p99 ms | refused | refused by code | audit: by code/reason |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for transport in TRANSPORTS:
            r = measure_load(args, server, transport)
            codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items())) or "-"
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items())) or "-"
            print(
                f"| {transport} | {r['rps']:.1f} | {1000 * r['p50']:.0f} | {1000 * r['p99']:.0f} | "
                f"{100 * r['refused']:.1f} % | {codes} | {reasons} |",
                flush=True,
            )
        server.stop()
    if "flood" in args.parts:
        access = work / "access.toml"
        if not access.exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ecgx.cli",
                    "token",
                    "new",
                    "--file",
                    str(access),
                    "--name",
                    "bench",
                    "--scope",
                    "predict",
                ],
                cwd=ROOT,
                check=True,
                capture_output=True,  # the token is never needed: the flood sends none
            )
        print(
            f"\n## Flood: {FLOOD_REQUESTS} concurrent unauthenticated {FLOOD_BYTES / 2**20:.0f} MiB "
            "requests (server requires tokens)"
        )
        print("| transport | server RSS before | growth (peak - before) | seconds | answers |")
        print("| --- | --- | --- | --- | --- |")
        for transport in TRANSPORTS:
            server = Server(info, work, "flood", "--tokens", str(access))
            r = measure_flood(server, transport)
            answers = ", ".join(f"{k} {v}" for k, v in sorted(r["answers"].items()))
            print(
                f"| {transport} | {r['before_mb']:.0f} MB | {r['growth_mb']:.0f} MB | {r['seconds']:.1f} | "
                f"{answers} |",
                flush=True,
            )
            server.stop()
    if "cancel" in args.parts:
        x = np.load(work / "x.npy")[:8]
        server = Server(info, work, "cancel", "--max-concurrent", "1", "--max-queued", "0", "--allow-ungated")
        print("\n## Cancel to free slot: smoothgrad, 8 ECGs x 2000 samples; one slot, no queue")
        print("| transport | seconds from cancel to a Predict admitted (3 runs) |")
        print("| --- | --- |")
        for transport in TRANSPORTS:
            times = measure_cancel(server, transport, x)
            print(f"| {transport} | {', '.join(f'{t:.3f}' for t in times)} |", flush=True)
        server.stop()
    print(f"\ntotal {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
