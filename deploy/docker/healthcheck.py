#!/opt/ecgx/bin/python
"""The image's HEALTHCHECK: the gRPC health protocol (grpc.health.v1) against the local `ecgx serve`.

Exit 0 when the overall service ("") or ``ECGX_HEALTHCHECK_SERVICE`` is SERVING, 1 otherwise
(one line on standard output says why). It reaches the server the way the entrypoint configured
it, from the same environment and mounts:

- port: ``ECGX_PORT`` (default 50051), on 127.0.0.1;
- TLS when a server certificate is configured (``ECGX_TLS_CERT``, else /etc/ecgx/tls/tls.crt):
  the certificate is checked against ``ECGX_HEALTHCHECK_CA``, else /etc/ecgx/tls/ca.crt (the CA
  that issued the server certificate, as cert-manager writes it), else the server certificate
  itself (self-signed); the expected name is ``ECGX_HEALTHCHECK_SERVER_NAME``, else the
  certificate's first DNS name (the probe dials 127.0.0.1, which the certificate need not name);
- mutual TLS: a client certificate from ``ECGX_HEALTHCHECK_CERT``/``ECGX_HEALTHCHECK_KEY``, else
  /etc/ecgx/probe/tls.crt and tls.key when present;
- no token: the image's config serves health without credentials (open_health = true).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TLS_DIR = Path("/etc/ecgx/tls")
PROBE_DIR = Path("/etc/ecgx/probe")


def _pem(value: str | None, default: Path | None = None) -> bytes | None:
    """PEM bytes from an environment value (a path, or the PEM text itself) or a default file."""
    if value and value.strip().startswith("-----BEGIN"):
        return value.strip().encode() + b"\n"
    if value:
        return Path(value).read_bytes()
    if default is not None and default.is_file():
        return default.read_bytes()
    return None


def _first_dns_name(cert_pem: bytes) -> str | None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    names = san.get_values_for_type(x509.DNSName)
    return names[0] if names else None


def main() -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"127.0.0.1:{os.environ.get('ECGX_PORT') or '50051'}"
    service = os.environ.get("ECGX_HEALTHCHECK_SERVICE", "")
    cert = _pem(os.environ.get("ECGX_TLS_CERT"), TLS_DIR / "tls.crt")
    if cert is None:
        channel = grpc.insecure_channel(target)
    else:
        roots = _pem(os.environ.get("ECGX_HEALTHCHECK_CA"), TLS_DIR / "ca.crt") or cert
        client_cert = _pem(os.environ.get("ECGX_HEALTHCHECK_CERT"), PROBE_DIR / "tls.crt")
        client_key = _pem(os.environ.get("ECGX_HEALTHCHECK_KEY"), PROBE_DIR / "tls.key")
        credentials = grpc.ssl_channel_credentials(roots, client_key, client_cert)
        name = os.environ.get("ECGX_HEALTHCHECK_SERVER_NAME") or _first_dns_name(cert)
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = grpc.secure_channel(target, credentials, options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        except grpc.RpcError as e:
            print(f"unhealthy: {target} {e.code().name}: {e.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} service {service!r}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a probe reports, it never prints a traceback
        print(f"unhealthy: {type(e).__name__}: {e}")
        sys.exit(1)
