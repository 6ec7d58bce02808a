#!/usr/bin/env bash
# Release gate: run the validation gate on a candidate model package, keep the signed report as an
# artefact (pass or fail), verify it against the public key the servers trust, and only when the gate
# passed put the package into the model repository with `ecgx repo add`.
#
# Exit status: 0 published; 1 the gate failed, or its report does not verify, or the repository
# refused the version; 2 bad usage or input, or ecgx could not gate (no verdict). The last line on
# stderr is a one-line reason whenever the status is not 0. The repository is touched only on success.
set -euo pipefail

PROG=gate_and_publish.sh

usage() {
    cat <<EOF
usage: $PROG --package PKG --data DIR --repo DIR --model NAME --artefacts DIR [options]

Gate the candidate model package PKG with \`ecgx validate\` (signed report), copy the report into the
artefact folder whatever the verdict, verify it with \`ecgx gate verify\`, and call \`ecgx repo add\`
only when the gate passed. The candidate folder itself is never written: it is gated in a copy.

required (option or environment variable):
  --package PKG          candidate model package folder               ECGX_CANDIDATE
  --data DIR             validation dataset folder                    ECGX_VALIDATION_DATA
  --repo DIR             model repository root                        ECGX_MODEL_REPOSITORY
  --model NAME           model name in the repository                 ECGX_MODEL_NAME
  --artefacts DIR        where the report and logs are kept           ECGX_ARTEFACT_DIR
  --signing-key PEM      Ed25519 private key file                     ECGX_GATE_SIGNING_KEY_FILE
                         (or the PEM text itself in ECGX_GATE_SIGNING_KEY)
  --public-key PEM       Ed25519 public key file the servers trust    ECGX_GATE_PUBLIC_KEY_FILE
                         (or the PEM text itself in ECGX_GATE_PUBLIC_KEY)

options:
  --version V            version name (default: the repository's largest integer version + 1)
                                                                      ECGX_MODEL_VERSION
  --policy TOML          gate policy (default: the policy shipped with ecgx)   ECGX_GATE_POLICY
  --allowed-policy SHA256
                         policy hash the servers accept (repeatable); also ECGX_ALLOWED_POLICIES.
                         Default: with --policy, the hash of that policy as the report records it;
                         without, ecgx's default policy only.
  --allowed-policies FILE
                         file of accepted policy hashes, one per line (repeatable)
  --family PKG           a seed sibling of the candidate (repeatable)
  --methods "M1 M2 ..."  methods to gate (default: all)                ECGX_GATE_METHODS
  --workers N            methods computed side by side                 ECGX_GATE_WORKERS
  --ray ADDRESS          run the gate's work on a Ray cluster: \`ecgx validate --ray ADDRESS\`
                         (auto: the cluster this runs in, as in a KubeRay RayJob; local: a
                         local cluster; host:port or ray://host:port: that cluster's head).
                         Needs ecgx's ray extra; the numbers are the same as without it
                                                                      ECGX_RAY_ADDRESS
  --replace              if the version exists, retire it (renamed to a hidden .retired-* folder that
                         servers never read) and publish the candidate in its place; without it an
                         existing version is refused before any gating
  --work DIR             scratch folder for the gated copy (default: a fresh temporary folder)
  --ecgx CMD             the ecgx command (default: ecgx)              ECGX_BIN
  -h, --help             show this help

exit status: 0 published; 1 gate failed / report does not verify / refused;
             2 bad usage or input, or ecgx stopped without a verdict (ERROR).
artefacts: gate.json (the signed report, if the gate ran), validate.log, verify.log, publish.log,
           outcome.txt (one line: PUBLISHED, GATE FAILED, NOT VERIFIED, REFUSED or ERROR).
EOF
}

# One-line reason on stderr (and in the artefacts, once the folder exists), then exit.
die() {
    local status=$1 kind=$2
    shift 2
    echo "$PROG: $kind: $*" >&2
    if [[ -n "${ARTEFACTS:-}" && -d "${ARTEFACTS}" ]]; then
        echo "$kind: $*" >"$ARTEFACTS/outcome.txt"
    fi
    exit "$status"
}
bad_usage() {
    echo "$PROG: error: $* (see $PROG --help)" >&2
    exit 2
}

# Same rule as ecgx's model and version names (service/repository.py is_plain_name).
is_plain_name() {
    [[ "$1" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]]
}

PACKAGE=${ECGX_CANDIDATE:-}
DATA=${ECGX_VALIDATION_DATA:-}
REPO=${ECGX_MODEL_REPOSITORY:-}
MODEL=${ECGX_MODEL_NAME:-}
VERSION=${ECGX_MODEL_VERSION:-}
ARTEFACTS=
ARTEFACTS_ARG=${ECGX_ARTEFACT_DIR:-}
POLICY=${ECGX_GATE_POLICY:-}
SIGNING_KEY=${ECGX_GATE_SIGNING_KEY_FILE:-}
PUBLIC_KEY=${ECGX_GATE_PUBLIC_KEY_FILE:-}
METHODS=${ECGX_GATE_METHODS:-}
WORKERS=${ECGX_GATE_WORKERS:-}
RAY_ADDRESS_ARG=${ECGX_RAY_ADDRESS:-}
ECGX=${ECGX_BIN:-ecgx}
REPLACE=0
WORK=
ALLOWED=()
ALLOWED_FILES=()
FAMILY=()

need_value() {
    [[ $# -ge 2 && -n "$2" ]] || bad_usage "$1 needs a value"
}
while [[ $# -gt 0 ]]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --package) need_value "$@"; PACKAGE=$2; shift 2 ;;
    --data) need_value "$@"; DATA=$2; shift 2 ;;
    --repo) need_value "$@"; REPO=$2; shift 2 ;;
    --model) need_value "$@"; MODEL=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --artefacts) need_value "$@"; ARTEFACTS_ARG=$2; shift 2 ;;
    --policy) need_value "$@"; POLICY=$2; shift 2 ;;
    --signing-key) need_value "$@"; SIGNING_KEY=$2; shift 2 ;;
    --public-key) need_value "$@"; PUBLIC_KEY=$2; shift 2 ;;
    --allowed-policy) need_value "$@"; ALLOWED+=("$2"); shift 2 ;;
    --allowed-policies) need_value "$@"; ALLOWED_FILES+=("$2"); shift 2 ;;
    --family) need_value "$@"; FAMILY+=("$2"); shift 2 ;;
    --methods) need_value "$@"; METHODS=$2; shift 2 ;;
    --workers) need_value "$@"; WORKERS=$2; shift 2 ;;
    --ray) need_value "$@"; RAY_ADDRESS_ARG=$2; shift 2 ;;
    --work) need_value "$@"; WORK=$2; shift 2 ;;
    --ecgx) need_value "$@"; ECGX=$2; shift 2 ;;
    --replace) REPLACE=1; shift ;;
    *) bad_usage "unknown argument '$1'" ;;
    esac
done

# ------------------------------------------------------------------ checks before minutes of gating
missing=()
[[ -n "$PACKAGE" ]] || missing+=("--package")
[[ -n "$DATA" ]] || missing+=("--data")
[[ -n "$REPO" ]] || missing+=("--repo")
[[ -n "$MODEL" ]] || missing+=("--model")
[[ -n "$ARTEFACTS_ARG" ]] || missing+=("--artefacts")
[[ -n "$SIGNING_KEY" || -n "${ECGX_GATE_SIGNING_KEY:-}" ]] || missing+=("--signing-key")
[[ -n "$PUBLIC_KEY" || -n "${ECGX_GATE_PUBLIC_KEY:-}" ]] || missing+=("--public-key")
if [[ ${#missing[@]} -gt 0 ]]; then
    usage >&2
    bad_usage "missing ${missing[*]} (or its environment variable)"
fi

command -v "$ECGX" >/dev/null 2>&1 || bad_usage "the ecgx command '$ECGX' is not found (install ecgx or pass --ecgx)"
[[ -d "$PACKAGE" ]] || bad_usage "candidate package $PACKAGE is not a folder"
[[ -f "$PACKAGE/manifest.json" ]] || bad_usage "$PACKAGE is not a model package: manifest.json is missing"
[[ -d "$DATA" ]] || bad_usage "validation dataset $DATA is not a folder"
[[ -z "$POLICY" || -f "$POLICY" ]] || bad_usage "policy $POLICY is not a file"
[[ -z "$SIGNING_KEY" || -f "$SIGNING_KEY" ]] || bad_usage "signing key $SIGNING_KEY is not a file"
[[ -z "$PUBLIC_KEY" || -f "$PUBLIC_KEY" ]] || bad_usage "public key $PUBLIC_KEY is not a file"
for f in ${ALLOWED_FILES[@]+"${ALLOWED_FILES[@]}"}; do
    [[ -f "$f" ]] || bad_usage "allowed policies file $f is not a file"
done
for f in ${FAMILY[@]+"${FAMILY[@]}"}; do
    [[ -d "$f" ]] || bad_usage "family member $f is not a folder"
done
[[ -z "$WORKERS" || "$WORKERS" =~ ^[1-9][0-9]*$ ]] || bad_usage "--workers must be a positive integer, not '$WORKERS'"
# One word: auto, local, host:port or ray://host:port (ecgx validate says whether it can connect).
ray_address_re='^[][A-Za-z0-9_.:/-]+$'  # ']' first in a bracket expression: IPv6 [::1]:6379
[[ -z "$RAY_ADDRESS_ARG" || "$RAY_ADDRESS_ARG" =~ $ray_address_re ]] ||
    bad_usage "--ray must be auto, local or a cluster address (host:port), not '$RAY_ADDRESS_ARG'"
is_plain_name "$MODEL" || bad_usage "model name '$MODEL' is not a plain name (letters, digits, '.', '_', '-')"
[[ -z "$VERSION" ]] || is_plain_name "$VERSION" ||
    bad_usage "version name '$VERSION' is not a plain name (letters, digits, '.', '_', '-')"
if [[ -e "$REPO" ]]; then
    [[ -d "$REPO" ]] || bad_usage "model repository $REPO is not a folder"
    [[ -w "$REPO" ]] || bad_usage "model repository $REPO is not writable"
fi
if [[ -n "$VERSION" && -e "$REPO/$MODEL/$VERSION" && $REPLACE -eq 0 ]]; then
    bad_usage "version $REPO/$MODEL/$VERSION already exists (pass --replace to retire it, or choose another --version)"
fi
[[ $REPLACE -eq 0 || -n "$VERSION" ]] || bad_usage "--replace needs --version (the version to replace)"

if [[ -d "$REPO" ]]; then
    # Anything else in the repository folder would be read by the servers as a model.
    case "$(realpath -m "$ARTEFACTS_ARG")/" in
    "$(cd "$REPO" && pwd -P)"/*) bad_usage "artefact folder $ARTEFACTS_ARG is inside the model repository $REPO" ;;
    esac
fi
mkdir -p "$ARTEFACTS_ARG" 2>/dev/null || bad_usage "artefact folder $ARTEFACTS_ARG cannot be created"
[[ -w "$ARTEFACTS_ARG" ]] || bad_usage "artefact folder $ARTEFACTS_ARG is not writable"
ARTEFACTS=$(cd "$ARTEFACTS_ARG" && pwd -P)
# Artefacts of an earlier run in the same folder must not pass for this run's.
rm -f "$ARTEFACTS/gate.json" "$ARTEFACTS/validate.log" "$ARTEFACTS/verify.log" \
    "$ARTEFACTS/publish.log" "$ARTEFACTS/outcome.txt"

# ------------------------------------------------------------------ gate a private copy
# The candidate may sit on a read-only volume, and `ecgx repo add` wants the report inside the
# package: gate a copy, so the candidate is never written and a failed run leaves nothing behind.
if [[ -n "$WORK" ]]; then
    mkdir -p "$WORK"
    STAGE=$(mktemp -d "$WORK/gate.XXXXXX")
else
    STAGE=$(mktemp -d "${TMPDIR:-/tmp}/ecgx-gate.XXXXXX")
fi
# Whatever ends the run, the scratch copy goes, and the artefacts say how it ended.
on_exit() {
    local status=$?
    rm -rf "$STAGE"
    if [[ $status -ne 0 && ! -f "$ARTEFACTS/outcome.txt" ]]; then
        echo "ERROR: $PROG stopped unexpectedly (exit $status); see the job log" >"$ARTEFACTS/outcome.txt"
    fi
}
trap on_exit EXIT
CANDIDATE="$STAGE/$MODEL"
cp -R "$PACKAGE" "$CANDIDATE"
chmod -R u+w "$CANDIDATE"
# A report that came with the candidate is not this run's: it would be replaced anyway.
rm -f "$CANDIDATE/gate.json"

validate=("$ECGX" validate "$CANDIDATE" --data "$DATA" --quiet)
[[ -z "$POLICY" ]] || validate+=(--policy "$POLICY")
[[ -z "$SIGNING_KEY" ]] || validate+=(--signing-key "$SIGNING_KEY")
[[ ${#FAMILY[@]} -eq 0 ]] || validate+=(--family "${FAMILY[@]}")
if [[ -n "$METHODS" ]]; then
    read -r -a method_list <<<"$METHODS"
    validate+=(--methods "${method_list[@]}")
fi
[[ -z "$WORKERS" ]] || validate+=(--workers "$WORKERS")
[[ -z "$RAY_ADDRESS_ARG" ]] || validate+=(--ray "$RAY_ADDRESS_ARG")

echo "$PROG: gating $PACKAGE for $MODEL${VERSION:+ version $VERSION}${RAY_ADDRESS_ARG:+ on Ray ($RAY_ADDRESS_ARG)}" >&2
set +e
"${validate[@]}" >"$ARTEFACTS/validate.log" 2>&1
gate_status=$?
set -e
# Keep the report whatever the verdict: a failed gate's report is what the team reads next.
if [[ -f "$CANDIDATE/gate.json" ]]; then
    cp "$CANDIDATE/gate.json" "$ARTEFACTS/gate.json"
fi
cat "$ARTEFACTS/validate.log" >&2

# A field of the report, on one line (json from the standard library of the Python ecgx runs on).
report_field() {
    "${ECGX_PYTHON:-python3}" - "$ARTEFACTS/gate.json" "$1" <<'EOF' 2>/dev/null || true
import json, sys
value = json.load(open(sys.argv[1], encoding="utf-8"))
for key in sys.argv[2].split("."):
    value = value[key]
print(" ".join(str(value).split()))
EOF
}

# A verdict is an exit status that agrees with a report this run wrote (the copy had none before):
# ecgx crashing (exit 1 with a traceback, say) is no gate failure, and nothing may pass for a pass.
verdict=
[[ ! -f "$ARTEFACTS/gate.json" ]] || verdict=$(report_field verdict)
if [[ $gate_status -eq 1 && $verdict == fail ]]; then
    # The headline's first sentence says under which policy it failed and why; the rest lists methods.
    headline=$(report_field headline)
    headline=${headline%%. *}
    die 1 "GATE FAILED" "$PACKAGE did not pass the gate: ${headline:-see $ARTEFACTS/validate.log}; report in $ARTEFACTS/gate.json; repository untouched"
elif [[ $gate_status -ne 0 || $verdict != pass ]]; then
    reason=$(grep -m1 '^ecgx: error:' "$ARTEFACTS/validate.log" || grep -v '^[[:space:]]*$' "$ARTEFACTS/validate.log" | tail -n 1 || true)
    die 2 "ERROR" "ecgx validate exited $gate_status without a verdict (${reason:-no output}; $ARTEFACTS/validate.log); repository untouched"
fi

# ------------------------------------------------------------------ verify as a server would
policy_args=()
for h in ${ALLOWED[@]+"${ALLOWED[@]}"}; do policy_args+=(--allowed-policy "$h"); done
for f in ${ALLOWED_FILES[@]+"${ALLOWED_FILES[@]}"}; do policy_args+=(--allowed-policies "$f"); done
if [[ ${#policy_args[@]} -eq 0 && -z "${ECGX_ALLOWED_POLICIES:-}" && -n "$POLICY" ]]; then
    # No allow-list given: accept the policy this run gated under (what the caller asked for), as
    # the report records its hash. Production pipelines pin the servers' list instead.
    policy_hash=$(report_field policy.sha256)
    [[ -n "$policy_hash" ]] || die 2 "ERROR" "the report $ARTEFACTS/gate.json names no policy hash"
    policy_args+=(--allowed-policy "$policy_hash")
fi
key_args=()
[[ -z "$PUBLIC_KEY" ]] || key_args+=(--public-key "$PUBLIC_KEY")

set +e
"$ECGX" gate verify "$CANDIDATE" ${key_args[@]+"${key_args[@]}"} \
    ${policy_args[@]+"${policy_args[@]}"} >"$ARTEFACTS/verify.log" 2>&1
verify_status=$?
set -e
cat "$ARTEFACTS/verify.log" >&2
if [[ $verify_status -ne 0 ]]; then
    problem=$(grep -m1 -E '^  - |^ecgx: error:|NOT servable' "$ARTEFACTS/verify.log" | sed 's/^ *- *//' || true)
    die "$([[ $verify_status -eq 1 ]] && echo 1 || echo 2)" "NOT VERIFIED" \
        "the gate passed but its report does not verify: ${problem:-see $ARTEFACTS/verify.log}; repository untouched"
fi

# ------------------------------------------------------------------ publish
repo_policy_args=()
for h in ${ALLOWED[@]+"${ALLOWED[@]}"}; do repo_policy_args+=(--allowed-policy "$h"); done
if [[ ${#ALLOWED_FILES[@]} -gt 0 || -n "${ECGX_ALLOWED_POLICIES:-}" ]]; then
    # `ecgx repo add` takes hashes only: read the files and the variable as `ecgx gate verify` does.
    for f in ${ALLOWED_FILES[@]+"${ALLOWED_FILES[@]}"}; do
        while IFS= read -r line || [[ -n "$line" ]]; do
            line=${line%%#*}
            for h in $line; do repo_policy_args+=(--allowed-policy "$h"); done
        done <"$f"
    done
    env_hashes=${ECGX_ALLOWED_POLICIES:-}
    for h in ${env_hashes//,/ }; do repo_policy_args+=(--allowed-policy "$h"); done
elif [[ -n "${policy_hash:-}" ]]; then
    repo_policy_args+=(--allowed-policy "$policy_hash")
fi

retired=
if [[ -n "$VERSION" && -e "$REPO/$MODEL/$VERSION" ]]; then
    # --replace (checked above). Entries starting with a dot are never read by `ecgx serve`, so the
    # old version stops serving and stays on disk for audit or a manual rollback.
    retired="$REPO/$MODEL/.retired-$VERSION-$(date -u +%Y%m%dT%H%M%SZ)"
    mv "$REPO/$MODEL/$VERSION" "$retired"
    echo "$PROG: retired $REPO/$MODEL/$VERSION to $retired" >&2
fi

add=("$ECGX" repo add "$CANDIDATE" --repo "$REPO" --model "$MODEL" --quiet)
[[ -z "$VERSION" ]] || add+=(--version "$VERSION")
[[ -z "$PUBLIC_KEY" ]] || add+=(--public-key "$PUBLIC_KEY")
set +e
"${add[@]}" ${repo_policy_args[@]+"${repo_policy_args[@]}"} >"$ARTEFACTS/publish.log" 2>&1
add_status=$?
set -e
cat "$ARTEFACTS/publish.log" >&2
if [[ $add_status -ne 0 ]]; then
    if [[ -n "$retired" ]]; then
        mv "$retired" "$REPO/$MODEL/$VERSION"  # put the old version back: nothing was published
    fi
    reason=$(grep -m1 -E '^ecgx: (refused|error):' "$ARTEFACTS/publish.log" || true)
    die "$([[ $add_status -eq 1 ]] && echo 1 || echo 2)" "REFUSED" \
        "ecgx repo add exited $add_status: ${reason:-see $ARTEFACTS/publish.log}"
fi

published=$(sed -n 's/^promoted .* to //p' "$ARTEFACTS/publish.log" | tail -n 1)
echo "PUBLISHED: $PACKAGE as ${published:-$REPO/$MODEL}" >"$ARTEFACTS/outcome.txt"
echo "$PROG: PUBLISHED: $PACKAGE as ${published:-$REPO/$MODEL}" >&2
