#!/usr/bin/env bash
# Build the CPU serving image (deploy/docker/Dockerfile) with podman, without a Docker daemon or
# a registry: FROM the debootstrapped ecgx-base:bookworm (build_base.sh), chroot isolation, the
# host's network and the host's pip index (a local file:// index is mounted read-only).
#
# Usage: deploy/scripts/build_image.sh [--tag NAME:TAG] [--base IMAGE] [--file DOCKERFILE]
#   --tag   image to make (default ecgx:cpu)
#   --base  the BASE build argument (default ecgx-base:bookworm, made by build_base.sh if missing)
#   --file  Dockerfile (default deploy/docker/Dockerfile)
# Needs root and podman. CONTAINERS_CONF defaults to deploy/docker/containers.conf.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
tag="ecgx:cpu"
base="ecgx-base:bookworm"
file="$repo_root/deploy/docker/Dockerfile"
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag="${2:?--tag needs NAME:TAG}"; shift ;;
        --base) base="${2:?--base needs an image}"; shift ;;
        --file) file="${2:?--file needs a path}"; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "build_image.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "build_image.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (rootful podman with chroot isolation)"
command -v podman >/dev/null || die "podman not found (apt-get install -y podman runc debootstrap)"
[ -f "$file" ] || die "no Dockerfile at $file"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$repo_root/deploy/docker/containers.conf}"

if [ "$base" = "ecgx-base:bookworm" ] && ! podman image exists "$base"; then
    "$here/build_base.sh" --tag "$base"
fi
podman image exists "$base" || die "base image $base not found (pull it, or make one with build_base.sh)"

# The pip configuration this machine uses (pip config and PIP_* variables), handed to the build
# as build arguments; file:// indexes and find-links folders are bind-mounted read-only at the
# same path so that the same URLs work inside.
pip_value() {  # the value of pip option $1 (e.g. index-url): environment first, then pip config
    local env_name
    env_name="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
    if [ -n "${!env_name:-}" ]; then echo "${!env_name}"; return; fi
    local pip
    pip="$(command -v pip || command -v pip3 || true)"
    [ -n "$pip" ] || return 0
    "$pip" config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | head -n1
}
build_args=()
volumes=()
declare -A mounted=()
for option in index-url extra-index-url find-links trusted-host; do
    value="$(pip_value "$option")"
    [ -n "$value" ] || continue
    build_args+=(--build-arg "PIP_$(echo "$option" | tr 'a-z-' 'A-Z_')=$value")
    [ "$option" = trusted-host ] && continue
    for location in $value; do
        path="${location#file://}"
        # Local folders: mount the folder (for .../simple, its parent, where the files lie).
        case "$path" in /*) ;; *) continue ;; esac
        [ -d "$path" ] || continue
        case "$path" in */simple|*/simple/) path="$(dirname "${path%/}")" ;; esac
        if [ -z "${mounted[$path]:-}" ]; then
            volumes+=(--volume "$path:$path:ro")
            mounted[$path]=1
        fi
    done
done

# pip's CA bundle (PIP_CERT / pip config cert): where HTTPS goes through an intercepting proxy,
# its CA is in the host's bundle and not in the image's. Mounted beside, never over, the image's own.
cert="$(pip_value cert)"
if [ -n "$cert" ] && [ -f "$cert" ]; then
    volumes+=(--volume "$cert:/run/ecgx-build/pip-ca.pem:ro")
    build_args+=(--build-arg "PIP_CERT=/run/ecgx-build/pip-ca.pem")
fi

echo "build_image.sh: building $tag from $base ($(basename "$file"))"
start=$(date +%s)
# --format docker: the OCI format has no HEALTHCHECK, and podman would drop it.
podman build \
    --isolation=chroot \
    --network=host \
    --format=docker \
    --file "$file" \
    --ignorefile "$repo_root/deploy/docker/Dockerfile.dockerignore" \
    --build-arg "BASE=$base" \
    "${build_args[@]}" \
    "${volumes[@]}" \
    --tag "$tag" \
    "$repo_root" || die "podman build failed (output above)"
size=$(podman image inspect --format '{{.Size}}' "$tag")
echo "build_image.sh: $tag built in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB"
