#!/bin/sh
# Prove that a bundle from `edge-runtime bundle` installs with no package index: unpack it into
# a temporary folder, run its install.sh into a fresh virtual environment with every index out
# of reach, and let install.sh run its self-test. Exits with install.sh's exit code.
#
# Usage: scripts/offline-install-check.sh BUNDLE.tar.gz [install.sh options]
#   PYTHON=/path/to/python3   interpreter for the virtual environment (default: python3)
#   KEEP=1                    keep the temporary folder and print its path
#
# Where the system allows a new network namespace (root, or unprivileged user namespaces),
# install.sh runs inside one with no network interface but loopback, so any fetch fails outright.
# Elsewhere the network stays, and the pip settings below still point every index at a closed
# loopback port. POSIX sh, so the same script runs on an aarch64 device or under emulation.
set -eu

note() {
    printf 'offline-install-check: %s\n' "$*"
}

fail() {
    printf 'offline-install-check: error: %s\n' "$*" >&2
    exit 2
}

[ $# -ge 1 ] || fail "usage: scripts/offline-install-check.sh BUNDLE.tar.gz [install.sh options]"
bundle=$1
shift
[ -f "$bundle" ] || fail "bundle $bundle not found; build one with 'edge-runtime bundle'"
python=${PYTHON:-python3}

work=$(mktemp -d "${TMPDIR:-/tmp}/edge-runtime-offline.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then
    note "keeping $work"
else
    trap 'rm -rf "$work"' EXIT
fi

tar -xzf "$bundle" -C "$work" \
    || fail "cannot unpack $bundle; is it a .tar.gz from 'edge-runtime bundle'?"
count=0
script=
for candidate in "$work"/*/install.sh; do
    if [ -f "$candidate" ]; then
        count=$((count + 1))
        script=$candidate
    fi
done
[ "$count" -eq 1 ] \
    || fail "$bundle holds $count install.sh files in its top-level folders; expected 1"
note "unpacked $bundle into $work"

isolate=
if command -v unshare >/dev/null 2>&1; then
    if unshare -n true 2>/dev/null; then
        isolate="unshare -n"
    elif unshare -r -n true 2>/dev/null; then
        isolate="unshare -r -n"
    fi
fi
if [ -n "$isolate" ]; then
    note "network: none, install.sh runs under '$isolate'"
else
    note "network: left on, because this system does not allow a new network namespace"
fi

# Port 9 (discard) on loopback: nothing listens there, so a request would fail at once.
PIP_NO_INDEX=1
PIP_INDEX_URL=http://127.0.0.1:9/simple
PIP_EXTRA_INDEX_URL=http://127.0.0.1:9/simple
export PIP_NO_INDEX PIP_INDEX_URL PIP_EXTRA_INDEX_URL

status=0
# $isolate is unquoted on purpose: it is empty or a command with its options.
# shellcheck disable=SC2086
$isolate sh "$script" --python "$python" --venv "$work/venv" "$@" || status=$?
if [ "$status" -eq 0 ]; then
    note "passed: offline install and self-test of $bundle"
else
    note "FAILED: install.sh exited with code $status"
fi
exit "$status"
