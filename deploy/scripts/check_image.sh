#!/usr/bin/env bash
# Run the CPU serving image for real and check it from outside: the image's own HEALTHCHECK (gRPC
# health) until healthy, one Explain with the host's `ecgx client`, the Prometheus endpoint, that
# it runs as non-root without PyTorch on a read-only /models, and that SIGTERM stops it cleanly.
# The container is removed afterwards, whatever happened. Exit status 0 only when every check passed.
#
# Usage: deploy/scripts/check_image.sh --repo DIR --key PEM --ecg FILE.npy [options]
#   --repo DIR       model repository (DIR/MODEL/VERSION), mounted read-only at /models
#   --key PEM        trusted gate public key (ecgx gate keygen), mounted in /etc/ecgx/keys
#   --ecg FILE.npy   (12, 600) median beat(s) for the Explain call
#   --method NAME    attribution method to ask for (default gradcam)
#   --model NAME     model (default: the server's only model)
#   --tls DIR        server TLS: DIR/tls.crt, DIR/tls.key, DIR/ca.crt (the CA that issued tls.crt,
#                    which the client and the health check trust); mounted at /etc/ecgx/tls
#   --tokens FILE    access file (ecgx token new); the client's token comes from ECGX_TOKEN
#   --insecure       no TLS and no tokens: passes --insecure to ecgx serve (a local try)
#   --image IMAGE    default ecgx:cpu
#   --timeout S      seconds to wait for health (default 120)
# The secure default (--tls and --tokens) is what the image runs with no extra arguments.
# Secrets are copied into a private folder owned by the image's user (uid 10001), as a Kubernetes
# Secret volume with fsGroup would present them. Needs root, podman and `ecgx` (or ECGX=path).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
image="ecgx:cpu"
repo="" key="" ecg="" method="gradcam" model="" tls="" tokens="" insecure=0 timeout=120
while [ $# -gt 0 ]; do
    case "$1" in
        --repo) repo="${2:?}"; shift ;;
        --key) key="${2:?}"; shift ;;
        --ecg) ecg="${2:?}"; shift ;;
        --method) method="${2:?}"; shift ;;
        --model) model="${2:?}"; shift ;;
        --tls) tls="${2:?}"; shift ;;
        --tokens) tokens="${2:?}"; shift ;;
        --insecure) insecure=1 ;;
        --image) image="${2:?}"; shift ;;
        --timeout) timeout="${2:?}"; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "check_image.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "check_image.sh: $*"; }
die() { echo "check_image.sh: FAILED: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (rootful podman)"
command -v podman >/dev/null || die "podman not found (apt-get install -y podman runc debootstrap)"
ecgx="${ECGX:-$(command -v ecgx || true)}"
[ -n "$ecgx" ] || die "the host's ecgx client was not found (put it on PATH or set ECGX)"
[ -d "$repo" ] || die "--repo: no model repository folder at '${repo}'"
[ -f "$key" ] || die "--key: no gate public key at '${key}'"
[ -f "$ecg" ] || die "--ecg: no .npy file at '${ecg}'"
if [ "$insecure" = 0 ]; then
    if [ -z "$tls" ] || [ -z "$tokens" ]; then
        die "give --tls DIR and --tokens FILE (the secure default), or --insecure"
    fi
    for f in tls.crt tls.key ca.crt; do [ -f "$tls/$f" ] || die "--tls: $tls/$f is missing"; done
    [ -f "$tokens" ] || die "--tokens: no access file at '${tokens}'"
    [ -n "${ECGX_TOKEN:-}" ] || die "--tokens needs the client's token in ECGX_TOKEN"
fi
podman image exists "$image" || die "image $image not found (deploy/scripts/build_image.sh)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$repo_root/deploy/docker/containers.conf}"

# Free ports on the host: the container shares the host's network (no CNI here).
read -r port metrics_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

name="ecgx-check-$$"
work="$(mktemp -d /tmp/ecgx-check.XXXXXX)"
cleanup() {
    podman rm --force --time 0 "$name" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
logs() { echo "---- container log (last 40 lines) ----" >&2; podman logs --tail 40 "$name" >&2 || true; }

# Secrets as the image's user reads them: owned by uid 10001, private.
mkdir -p "$work/keys" "$work/out"
cp "$key" "$work/keys/gate_public_key.pem"
mounts=(--volume "$(cd "$repo" && pwd):/models:ro" --volume "$work/keys:/etc/ecgx/keys:ro")
client=(--server "127.0.0.1:$port")
args=()
if [ "$insecure" = 1 ]; then
    args+=(--insecure)
else
    mkdir -p "$work/tls" "$work/access"
    cp "$tls/tls.crt" "$tls/tls.key" "$tls/ca.crt" "$work/tls/"
    cp "$tokens" "$work/access/access.toml"
    chmod 0700 "$work/tls" "$work/access"
    chmod 0600 "$work/tls/tls.key" "$work/access/access.toml"
    chown -R 10001:10001 "$work/tls" "$work/access"
    mounts+=(--volume "$work/tls:/etc/ecgx/tls:ro" --volume "$work/access:/etc/ecgx/access:ro")
    client+=(--tls-ca "$tls/ca.crt")
fi
chown -R 10001:10001 "$work/keys"

say "starting $image as $name (gRPC 127.0.0.1:$port, metrics :$metrics_port)"
start=$(date +%s)
# --health-interval=disable: podman's periodic health runs need systemd; the checks below run the
# image's HEALTHCHECK command themselves (podman healthcheck run).
podman run --detach --name "$name" --network host --health-interval=disable \
    --env "ECGX_PORT=$port" --env "ECGX_METRICS_PORT=$metrics_port" \
    "${mounts[@]}" "$image" "${args[@]}" >/dev/null 2>"$work/run.err" || {
    cat "$work/run.err" >&2
    die "podman run failed"
}

healthy=0
while [ $(( $(date +%s) - start )) -lt "$timeout" ]; do
    state="$(podman inspect --format '{{.State.Status}}' "$name" 2>/dev/null || echo gone)"
    if [ "$state" != running ]; then
        logs
        die "the container stopped before it was healthy (state $state)"
    fi
    if podman healthcheck run "$name" >/dev/null 2>&1; then healthy=1; break; fi
    sleep 1
done
if [ "$healthy" = 0 ]; then
    logs
    echo "last health check: $(podman exec "$name" ecgx-healthcheck 2>&1 || true)" >&2
    die "not healthy (gRPC health SERVING) within ${timeout} s"
fi
say "healthy after $(( $(date +%s) - start )) s (the image's HEALTHCHECK: gRPC health SERVING)"

# Inside: who it runs as, no PyTorch, the repository is read-only.
uid="$(podman exec "$name" id -u)"
[ "$uid" != 0 ] || die "the service runs as root"
if podman exec "$name" python -c "import torch" >/dev/null 2>&1; then die "PyTorch is importable in the image"; fi
if podman exec "$name" touch /models/.ecgx-write-test >/dev/null 2>&1; then die "/models is writable"; fi
say "runs as uid $uid, no PyTorch, /models read-only"

# From outside, with the host's client: the models, then one Explain.
model_args=()
[ -z "$model" ] || model_args=(--model "$model")
if ! "$ecgx" client models "${client[@]}" -q >"$work/out/models.txt" 2>"$work/out/models.err"; then
    cat "$work/out/models.err" >&2
    logs
    die "ecgx client models failed"
fi
if ! "$ecgx" client explain "${client[@]}" "${model_args[@]}" --ecg "$ecg" --method "$method" \
    --timeout 120 --json "$work/out/explain.json" -q >"$work/out/explain.txt" 2>"$work/out/explain.err"; then
    cat "$work/out/explain.err" >&2
    logs
    die "ecgx client explain failed"
fi
python3 - "$work/out/explain.json" "$method" <<'EOF' || die "the Explain result is not what was asked for"
import json, sys
result = json.load(open(sys.argv[1]))
text = json.dumps(result)
assert sys.argv[2] in text, f"method {sys.argv[2]} not in the result"
EOF
say "Explain ($method) answered from outside the container"

# The Prometheus endpoint counted that call.
python3 - "$metrics_port" <<'EOF' || die "the metrics endpoint did not count the Explain call"
import re, sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
# rpc is the full method name (ecgx.v1.ExplanationService/Explain); the call succeeded (code OK).
rpc = re.compile(r'rpc="[^"]*/Explain"')
lines = [l for l in body.splitlines() if l.startswith("ecgx_requests_total{") and rpc.search(l) and 'code="OK"' in l]
assert lines and any(float(l.rsplit(" ", 1)[1]) >= 1 for l in lines), "no successful Explain in ecgx_requests_total"
EOF
say "metrics endpoint counts the Explain call"

# SIGTERM: drain and exit 0.
podman stop --time 30 "$name" >/dev/null || die "podman stop failed"
code="$(podman inspect --format '{{.State.ExitCode}}' "$name")"
if [ "$code" != 0 ]; then
    logs
    die "ecgx serve exited $code on SIGTERM (expected 0)"
fi
say "stopped cleanly on SIGTERM; all checks passed in $(( $(date +%s) - start )) s"
