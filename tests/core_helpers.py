"""Shared by the serving-core tests (tests/test_core_*.py): a repository whose gate report records
the settings it checked, and a real server on loopback with both gRPC protocols' stubs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from repo_helpers import make_package
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from ecgx.core.dataset import load_dataset
from ecgx.service.methods import get_method
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc
from ecgx.service.repository import ModelRepository
from ecgx.service.requests import Quotas
from ecgx.service.security import ServerSecurity
from ecgx.service.server import build_server

MODEL = "ecg"
IG_CHECKED_STEPS = 8  # the gate "checked" integrated gradients with 8 steps; more is declared safe


def settings(method: str, may_differ: dict[str, str] | None = None, **checked: Any) -> dict[str, Any]:
    """A report's ``settings`` entry: the method's defaults (seed left out) overridden by ``checked``."""
    base = {k: v for k, v in get_method(method).parameters().items() if k != "seed"}
    return {"checked": {**base, **checked}, "may_differ": may_differ or {}}


def make_core_repo(gated: dict, root: Path) -> Path:
    """Model ``ecg`` version 1: the gate serves gradcam (its report's entry without settings, as
    signed before settings were recorded: its defaults only), lrp (the same: its default rule only),
    integrated gradients checked with 8 steps and "at_least" declared safe, and kernel_shap (any
    n_samples and window, seed free)."""
    report = gated["report"]
    gradcam = {k: v for k, v in report["methods"]["gradcam"].items() if k != "settings"}
    methods = {
        **report["methods"],
        "gradcam": gradcam,
        "lrp": {"verdict": "pass", "checks": {}},
        "integrated_gradients": {
            "verdict": "pass",
            "checks": {},
            "settings": settings("integrated_gradients", {"n_steps": "at_least"}, n_steps=IG_CHECKED_STEPS),
        },
        "kernel_shap": {
            "verdict": "pass",
            "checks": {},
            "settings": settings("kernel_shap", {"n_samples": "any", "window": "any"}),
        },
    }
    serve = ["gradcam", "lrp", "integrated_gradients", "kernel_shap"]
    make_package(gated, root / MODEL / "1", 0, serve=serve, methods=methods)
    return root


def beats_of(gated: dict, n: int = 4) -> np.ndarray:
    return np.asarray(load_dataset(gated["family"]["data"]).signals[:n], dtype=np.float32)


def ecg_msg(x: np.ndarray, leads: Any, **over: Any) -> pb.Ecg:
    x = np.asarray(x, dtype="<f4")
    fields = dict(
        leads=list(leads),
        sampling_rate_hz=500.0,
        units=pb.MILLIVOLT,
        samples_per_lead=x.shape[-1],
        samples=x.tobytes(),
    )
    fields.update(over)
    return pb.Ecg(**fields)


class CoreServer:
    """``build_server`` on a free loopback port (ecgx.v1 and the OIP sharing one serving core)."""

    def __init__(
        self,
        root: Path,
        public: Any,
        *,
        allow_ungated: bool = False,
        security: ServerSecurity | None = None,
        quotas: Quotas | None = None,
        **kwargs: Any,
    ):
        self.repository = ModelRepository(
            root, [public], allow_ungated=allow_ungated, engine_options={"threads": 1}
        )
        self.security = security or ServerSecurity.plaintext_unauthenticated()
        self.server, self.port, self.servicer, self.extras = build_server(
            self.repository, security=self.security, host="127.0.0.1", port=0, quotas=quotas, **kwargs
        )
        self.server.start()
        self.security.start()
        self.core = self.servicer.core
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.ecgx = pb_grpc.ExplanationServiceStub(self.channel)
        self.oip = oip_grpc.GRPCInferenceServiceStub(self.channel)
        self.leads = self.repository.get(MODEL).engine.package.leads

    def explain(self, beats: np.ndarray, methods: list[str], params: dict | None = None, **kw: Any) -> Any:
        request = pb.ExplainRequest(
            model=MODEL,
            ecgs=[ecg_msg(b, self.leads) for b in beats],
            methods=methods,
            parameters_json={m: json.dumps(p) for m, p in (params or {}).items()},
            **{k: v for k, v in kw.items() if k in ("version", "targets")},
        )
        return self.ecgx.Explain(request, timeout=kw.get("timeout", 120), metadata=kw.get("metadata"))

    def infer(self, beats: np.ndarray, parameters: dict[str, Any] | None = None, **kw: Any) -> Any:
        request = infer_request(beats, parameters)
        return self.oip.ModelInfer(request, timeout=kw.get("timeout", 120), metadata=kw.get("metadata"))

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)
        self.security.stop()


def infer_request(beats: np.ndarray, parameters: dict[str, Any] | None = None) -> Any:
    request = oip_pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="ecg", datatype="FP32", shape=list(beats.shape))
    request.raw_input_contents.append(np.ascontiguousarray(beats, "<f4").tobytes())
    for name, value in (parameters or {}).items():
        p = request.parameters[name]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = value
    return request


def failure(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call that must fail."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError("the call succeeded")


def param(response: Any, name: str) -> Any:
    p = response.parameters[name]
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which)


def attribution_of(response: Any) -> np.ndarray:
    names = [o.name for o in response.outputs]
    i = names.index("attribution")
    return np.frombuffer(response.raw_output_contents[i], "<f4").reshape(list(response.outputs[i].shape))
