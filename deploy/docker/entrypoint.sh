#!/bin/bash
# The image's ENTRYPOINT: `ecgx serve` with the image's config and whatever is mounted at the
# standard places, then the container's own arguments (which win: argparse keeps the last value).
#
#   /models                        model repository (mount read-only)      --repo, in serve.toml
#   /etc/ecgx/keys/*.pem           trusted gate public keys                --trusted-key each
#                                  (or ECGX_GATE_PUBLIC_KEY holding the PEM text)
#   /etc/ecgx/tls/tls.crt, tls.key server certificate chain and key        ECGX_TLS_CERT / ECGX_TLS_KEY
#   /etc/ecgx/client-ca/ca.crt     CA of client certificates (mutual TLS)  ECGX_TLS_CLIENT_CA
#   /etc/ecgx/access/access.toml   hashed bearer tokens (ecgx token new)   --tokens
#   ECGX_PORT, ECGX_METRICS_PORT   ports (default 50051, 9464)             --port, --metrics-port
#
# Nothing here weakens security: with no TLS material and no identity source `ecgx serve` refuses
# to start and says what is missing. A local try without them: `podman run ... IMAGE --insecure`.
set -euo pipefail

args=(--config "${ECGX_CONFIG:-/etc/ecgx/serve.toml}")
# Environment wins over the standard files; both are read by ecgx serve itself (service/security.py).
if [ -z "${ECGX_TLS_CERT:-}" ] && [ -f /etc/ecgx/tls/tls.crt ]; then export ECGX_TLS_CERT=/etc/ecgx/tls/tls.crt; fi
if [ -z "${ECGX_TLS_KEY:-}" ] && [ -f /etc/ecgx/tls/tls.key ]; then export ECGX_TLS_KEY=/etc/ecgx/tls/tls.key; fi
if [ -z "${ECGX_TLS_CLIENT_CA:-}" ] && [ -f /etc/ecgx/client-ca/ca.crt ]; then
    export ECGX_TLS_CLIENT_CA=/etc/ecgx/client-ca/ca.crt
fi
if [ -f /etc/ecgx/access/access.toml ]; then args+=(--tokens /etc/ecgx/access/access.toml); fi
shopt -s nullglob
for key in /etc/ecgx/keys/*.pem; do args+=(--trusted-key "$key"); done
if [ -n "${ECGX_PORT:-}" ]; then args+=(--port "$ECGX_PORT"); fi
if [ -n "${ECGX_METRICS_PORT:-}" ]; then args+=(--metrics-port "$ECGX_METRICS_PORT"); fi
# The GPU image's TensorRT engine and timing caches (a volume there; absent from the CPU image).
if [ -d /var/cache/ecgx/tensorrt ]; then args+=(--trt-cache /var/cache/ecgx/tensorrt); fi

exec ecgx serve "${args[@]}" "$@"
