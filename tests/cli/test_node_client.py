"""A client generated from the proto in another language (issue #9): the Node.js client in
clients/node (stubs generated from proto/ecgx/v1/ecgx.proto at run time by @grpc/proto-loader)
against a real server on loopback, its JSON checked against the same calls made with the
Python stubs.

The repository holds model ``ecg`` version 1, a copy of seed-0 signed with conftest's ``gated``
report, whose gate passes gradcam and fails saliency. Skipped when ``node`` is not on PATH or the
client's dependencies are not installed (``npm ci --prefix clients/node``; .ci/run does it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from repo_helpers import make_package

from ecgx.core.dataset import load_dataset
from ecgx.core.schema import LEADS
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc
from ecgx.service.repository import ModelRepository
from ecgx.service.security import ServerSecurity
from ecgx.service.server import build_server

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "node" / "explain.js"
NODE = shutil.which("node")
SERVED, REFUSED = "gradcam", "saliency"

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node (Node.js 20) is not on PATH"),
    pytest.mark.skipif(
        not (CLIENT.parent / "node_modules" / "@grpc" / "grpc-js").is_dir(),
        reason="the Node client's dependencies are not installed: npm ci --prefix clients/node",
    ),
]


def tensor(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, "<f4").reshape(tuple(t.shape))


def ecg_msg(x: np.ndarray) -> pb.Ecg:
    x = np.asarray(x, dtype="<f4")
    return pb.Ecg(
        leads=list(LEADS),
        sampling_rate_hz=500.0,
        units=pb.MILLIVOLT,
        samples_per_lead=x.shape[-1],
        samples=x.tobytes(),
    )


def serve(root: Path, public, **kwargs):
    """``build_server`` on a free loopback port; yields (address, Python stub)."""
    repository = ModelRepository(root, [public], engine_options={"threads": 1}, **kwargs)
    server, port, _, _ = build_server(
        repository,
        security=ServerSecurity.plaintext_unauthenticated(),
        host="127.0.0.1",
        port=0,
        max_batch=8,
        max_concurrent=2,
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield f"127.0.0.1:{port}", pb_grpc.ExplanationServiceStub(channel)
    channel.close()
    server.stop(None)


@pytest.fixture(scope="module")
def repo_root(gated, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("node") / "repo"
    make_package(gated, root / "ecg" / "1", 0)
    return root


@pytest.fixture(scope="module")
def served(repo_root, gated):
    yield from serve(repo_root, gated["public"])


@pytest.fixture(scope="module")
def research(repo_root, gated):
    yield from serve(repo_root, gated["public"], allow_ungated=True)


@pytest.fixture(scope="module")
def beats(gated) -> np.ndarray:
    return np.asarray(load_dataset(gated["family"]["data"]).signals[:3], dtype="<f4")


def run_node(address: str, beats: np.ndarray, methods: list[str], tmp: Path) -> tuple[dict, Path]:
    (tmp / "beats.f32").write_bytes(np.asarray(beats, "<f4").tobytes())
    args = [NODE, str(CLIENT), "--server", address, "--model", "ecg", "--ecg", str(tmp / "beats.f32")]
    args += ["--methods", ",".join(methods), "--attributions-out", str(tmp / "attr")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), tmp / "attr"


def explain(stub, beats: np.ndarray, method: str) -> pb.ExplainResponse:
    ecgs = [ecg_msg(b) for b in beats]
    return stub.Explain(
        pb.ExplainRequest(model="ecg", ecgs=ecgs, methods=[method], targets=[pb.Target(predicted=True)])
    )


def check_attributions(got: dict, r: pb.ExplainResponse, maps_file: Path) -> None:
    """The client's summary and decoded maps against the Python stub's response."""
    assert got["package_sha256"] == r.package_sha256 and got["gate_report_sha256"] == r.gate_report_sha256
    assert got["research_mode"] == r.research_mode
    n = len(r.attributions)
    assert len(got["attributions"]) == n
    node_maps = np.fromfile(maps_file, dtype="<f4").reshape(n, 12, 600)
    for i, (a, mine) in enumerate(zip(got["attributions"], r.attributions, strict=True)):
        assert a["ecg_index"] == mine.ecg_index == i and a["target_class"] == mine.target_class
        assert a["shape"] == [12, 600] and a["gate"]["ungated"] == mine.gate.ungated
        np.testing.assert_array_equal(node_maps[i], tensor(mine.attribution))
        shares = np.array(a["lead_relevance_share"])
        assert shares.shape == (12,) and shares.sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(shares, list(mine.lead_relevance_share), atol=1e-12)
        # The client's own shares, from the tensor it decoded, agree with the server's.
        np.testing.assert_allclose(a["client_lead_share"], shares, atol=1e-6)


@pytest.fixture(scope="module")
def node_run(served, beats, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return run_node(served[0], beats, [SERVED, REFUSED], tmp_path_factory.mktemp("node-out"))


def test_lists_and_describes_models(node_run, served) -> None:
    out, _ = node_run
    _, stub = served
    assert out["models"] == [{"name": "ecg", "default_version": "1", "versions": ["1"]}]
    (v1,) = out["model"]["versions"]
    assert v1["serving"] and v1["gate_verdict"] == "pass"
    info = stub.GetModel(pb.GetModelRequest(model="ecg")).versions[0]
    assert v1["servable_methods"] == [m.method for m in info.methods if m.servable]
    assert SERVED in v1["servable_methods"] and REFUSED not in v1["servable_methods"]


def test_probabilities_match_the_python_stub(node_run, served, beats) -> None:
    out, _ = node_run
    _, stub = served
    r = stub.Predict(pb.PredictRequest(model="ecg", ecgs=[ecg_msg(b) for b in beats]))
    assert out["predict"]["class_keys"] == list(r.class_keys)
    assert out["predict"]["package_sha256"] == r.package_sha256
    assert out["predict"]["shape"] == list(r.probabilities.shape) == [3, len(r.class_keys)]
    np.testing.assert_allclose(np.array(out["predict"]["probabilities"]), tensor(r.probabilities), atol=1e-6)


def test_attribution_matches_the_python_stub(node_run, served, beats) -> None:
    out, attr_dir = node_run
    got = out["explain"][SERVED]
    assert not got["research_mode"] and len(got["attributions"]) == 3
    assert all(a["gate"]["verdict"] == "pass" for a in got["attributions"])
    check_attributions(got, explain(served[1], beats, SERVED), attr_dir / f"{SERVED}.f32")


def test_refused_method_reports_failed_precondition(node_run, served, beats) -> None:
    out, attr_dir = node_run
    _, stub = served
    err = out["explain"][REFUSED]["error"]
    assert err["code"] == "FAILED_PRECONDITION"
    assert err["code_number"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert REFUSED in err["message"]
    with pytest.raises(grpc.RpcError) as e:
        stub.Explain(pb.ExplainRequest(model="ecg", ecgs=[ecg_msg(beats[0])], methods=[REFUSED]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and e.value.details() == err["message"]
    assert not (attr_dir / f"{REFUSED}.f32").exists()


def test_research_mode_serves_the_refused_method_marked(research, beats, tmp_path) -> None:
    """With --allow-ungated the refused method serves, marked; its per-lead map (unlike
    gradcam's, which is the same on every lead) checks the client's decoding lead by lead."""
    address, stub = research
    out, attr_dir = run_node(address, beats[:2], [REFUSED], tmp_path)
    got = out["explain"][REFUSED]
    assert got["research_mode"] and all(a["gate"]["ungated"] for a in got["attributions"])
    check_attributions(got, explain(stub, beats[:2], REFUSED), attr_dir / f"{REFUSED}.f32")
    assert np.ptp(got["attributions"][0]["client_lead_share"]) > 1e-3
