#!/usr/bin/env bash
# Make the Debian bookworm base image `ecgx-base:bookworm` from scratch, without a registry:
# debootstrap (minbase) from the apt mirror this machine uses, then `podman import`.
#
# Why: the CPU image's Dockerfile starts FROM debian:bookworm-slim, which needs a registry. Where
# there is none (CI, air-gapped hosts), this base stands in for it (build_image.sh passes
# --build-arg BASE=ecgx-base:bookworm).
#
# Idempotent: does nothing when the image exists, unless --rebuild. Needs root, debootstrap and
# podman (Debian: apt-get install -y podman runc debootstrap).
#
# Usage: deploy/scripts/build_base.sh [--rebuild] [--tag NAME:TAG]
# Environment: ECGX_DEBIAN_MIRROR (default: the first bookworm mirror in /etc/apt/sources.list*),
#              ECGX_DEBIAN_SECURITY_MIRROR (default: likewise for bookworm-security, if any),
#              CONTAINERS_CONF (default: deploy/docker/containers.conf).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tag="ecgx-base:bookworm"
rebuild=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rebuild) rebuild=1 ;;
        --tag) tag="${2:?--tag needs NAME:TAG}"; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "build_base.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "build_base.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap and rootful podman)"
for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y podman runc debootstrap)"
done
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/../docker/containers.conf}"

if [ "$rebuild" = 0 ] && podman image exists "$tag"; then
    echo "build_base.sh: $tag exists (--rebuild to make it again)"
    exit 0
fi

# The mirror: the URI of the first apt source listing SUITE, in one-line (sources.list) or
# deb822 (*.sources) format. Only plain http(s) Debian mirrors qualify.
find_mirror() {
    local suite="$1" f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        awk -v s="$suite" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { if ($(i+1) == s) { print $i; exit } break } }' "$f"
    done | head -n1
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        # deb822 stanzas are separated by blank lines: RS="" reads one stanza per record.
        awk -v s="$suite" 'BEGIN { RS = "" } {
            uri = ""; hit = 0
            n = split($0, lines, "\n")
            for (j = 1; j <= n; j++) {
                if (lines[j] ~ /^URIs:/) { split(lines[j], u, /[ \t]+/); uri = u[2] }
                if (lines[j] ~ /^Suites:/) { m = split(lines[j], w, /[ \t]+/); for (k = 2; k <= m; k++) if (w[k] == s) hit = 1 }
            }
            if (hit && uri ~ /^https?:/) { print uri; exit }
        }' "$f"
    done | head -n1
}
mirror="${ECGX_DEBIAN_MIRROR:-$(find_mirror bookworm | head -n1)}"
security="${ECGX_DEBIAN_SECURITY_MIRROR:-$(find_mirror bookworm-security | head -n1)}"
[ -n "$mirror" ] || die "no bookworm mirror in /etc/apt/sources.list*; set ECGX_DEBIAN_MIRROR"

work="$(mktemp -d /var/tmp/ecgx-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
echo "build_base.sh: debootstrap --variant=minbase bookworm from $mirror (takes minutes)"
start=$(date +%s)
if ! debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    die "debootstrap failed (log above)"
fi

# The same apt sources an official image has (updates and security too), so the Dockerfile's
# apt-get install gets the current point release.
{
    echo "deb $mirror bookworm main"
    echo "deb $mirror bookworm-updates main"
    [ -z "$security" ] || echo "deb $security bookworm-security main"
} >"$root/etc/apt/sources.list"
# Slim it like debian:bookworm-slim: no documentation, manuals or translations from later
# installs (dpkg path-exclude), no package caches or lists in the base layer.
cat >"$root/etc/dpkg/dpkg.cfg.d/ecgx-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log \
    "$root"/tmp/* "$root"/var/tmp/*

echo "build_base.sh: importing as $tag"
tar --numeric-owner -C "$root" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null \
    || die "podman import failed"
echo "build_base.sh: $tag ready in $(( $(date +%s) - start )) s ($(podman image inspect --format '{{.Size}}' "$tag") bytes)"
