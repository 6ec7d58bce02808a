"""Standard gRPC health checking (``grpc.health.v1``) and server reflection for the serving port,
and :func:`register_extras`, which puts these and the Open Inference Protocol on a server.

Health: the overall status (service name ``""``) and each registered service name
(``ecgx.v1.ExplanationService``, ``inference.GRPCInferenceService``) are SERVING while the
server runs; each model of the repository has its own entry under its name, SERVING while it
has a serving default version (the newest version whose gate passed), NOT_SERVING otherwise
(also once the model is removed from the repository). :class:`HealthPublisher` computes these
from the repository: ``update()`` after a reload, or ``start(interval_s)`` to do it in a
thread; ``shutdown()`` turns everything NOT_SERVING for good (at SIGTERM, before draining).

Reflection lists the registered services so grpcurl-style tools work without the ``.proto``.

No PyTorch here (the serving path).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ecgx.core.errors import InvalidArgument

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health.SERVICE_NAME  # "grpc.health.v1.Health"
OVERALL = health.OVERALL_HEALTH  # ""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthPublisher:
    """Keeps a ``grpc_health`` :class:`~grpc_health.v1.health.HealthServicer` in step with a repository.

    Args:
        repository: the model repository (``models()``, ``default_version(model)``).
        servicer: the health servicer registered on the server.
        services: service names that are SERVING while the server runs (besides ``""``).
    """

    def __init__(self, repository: Any, servicer: health.HealthServicer, services: Iterable[str] = ()):
        self.repository = repository
        self.servicer = servicer
        self.services = tuple(services)
        self._models: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shut = False

    def statuses(self) -> dict[str, int]:
        """What update() would publish: service name -> SERVING or NOT_SERVING."""
        try:
            models = self.repository.models()
        except Exception:  # a repository that cannot list its models cannot serve: say so, keep running
            log.exception("health: the repository could not list its models")
            return {OVERALL: NOT_SERVING, **{s: NOT_SERVING for s in self.services}}
        out = {OVERALL: SERVING, **{s: SERVING for s in self.services}}
        for model in models:
            try:
                serving = self.repository.default_version(model) is not None
            except Exception:  # a model removed between models() and default_version()
                serving = False
            out[model] = SERVING if serving else NOT_SERVING
        return out

    def update(self) -> None:
        """Publish the current state (models that left the repository turn NOT_SERVING)."""
        with self._lock:
            if self._shut:
                return
            now = self.statuses()
            for gone in self._models - set(now):
                self.servicer.set(gone, NOT_SERVING)
            for name, status in now.items():
                self.servicer.set(name, status)
            self._models = {m for m in now if m != OVERALL and m not in self.services}

    def start(self, interval_s: float = 2.0) -> None:
        """update() now and every ``interval_s`` seconds in a daemon thread (until shutdown/stop)."""
        if interval_s <= 0:
            raise InvalidArgument(f"interval_s must be positive, got {interval_s}")
        self.update()
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.update()
                except Exception:  # never die; the next round tries again
                    log.exception("health update failed")

        self._thread = threading.Thread(target=loop, name="ecgx-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def shutdown(self) -> None:
        """Everything NOT_SERVING from now on (later updates are ignored): call at SIGTERM."""
        self.stop()
        with self._lock:
            self._shut = True
            # Sets every known name NOT_SERVING and ignores later set() calls.
            self.servicer.enter_graceful_shutdown()


def add_health(server: grpc.Server, repository: Any, services: Iterable[str] = ()) -> HealthPublisher:
    """Register ``grpc.health.v1.Health`` on ``server`` and publish the repository's state once;
    returns the publisher (call ``start(interval)`` or ``update()`` after reloads, ``shutdown()``
    at SIGTERM)."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    publisher = HealthPublisher(repository, servicer, services)
    publisher.update()
    return publisher


def add_reflection(server: grpc.Server, service_names: Iterable[str]) -> tuple[str, ...]:
    """Enable server reflection for ``service_names`` (plus health and reflection themselves).
    Their descriptors must be in the default pool, i.e. their ``*_pb2`` modules imported."""
    names = tuple(dict.fromkeys([*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME]))
    reflection.enable_server_reflection(names, server)
    return names


ECGX_SERVICE_NAME = "ecgx.v1.ExplanationService"


@dataclass(frozen=True)
class Extras:
    """What :func:`register_extras` put on a server."""

    oip: Any  # ecgx.service.oip.OipServicer
    health: HealthPublisher
    services: tuple[str, ...]  # the names reflection lists

    def start(self, interval_s: float = 2.0) -> None:
        """Follow repository reloads in health every ``interval_s`` (call after server.start())."""
        self.health.start(interval_s)

    def shutdown(self) -> None:
        """Health NOT_SERVING everywhere and OIP ServerReady/ModelReady false: call at SIGTERM,
        before ``server.stop(grace)``."""
        self.health.shutdown()
        self.oip.shutdown()


def register_extras(
    server: grpc.Server,
    repository: Any,
    *,
    explanation_servicer: Any = None,
    max_batch: int = 64,
) -> Extras:
    """Register the Open Inference Protocol, health and reflection on ``server`` (not started).

    ``explanation_servicer``: the ``ecgx.v1`` servicer already registered on the server, if any:
    reflection and health then list ``ecgx.v1.ExplanationService`` too, and ModelInfer takes its
    request slots (``ecgx.service.oip.shared_slots``), so its concurrency limits bound both protocols.
    """
    from ecgx.service.oip import SERVICE_NAME as OIP_SERVICE_NAME
    from ecgx.service.oip import OipServicer, shared_slots

    services = [OIP_SERVICE_NAME]
    admit = None
    if explanation_servicer is not None:
        services.insert(0, ECGX_SERVICE_NAME)
        admit = shared_slots(explanation_servicer)
    oip = OipServicer(repository, max_batch=max_batch, admit=admit)
    oip.add_to_server(server)
    publisher = add_health(server, repository, services)
    reflected = add_reflection(server, services)
    return Extras(oip, publisher, reflected)


__all__ = [
    "ECGX_SERVICE_NAME",
    "HEALTH_SERVICE_NAME",
    "NOT_SERVING",
    "OVERALL",
    "SERVING",
    "Extras",
    "HealthPublisher",
    "add_health",
    "add_reflection",
    "register_extras",
]
