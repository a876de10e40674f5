"""The install script that ``edge-runtime bundle`` writes into every bundle.

The script uses only POSIX sh features (checked with ``shellcheck -s sh``; run under dash and
bash), so it does not depend on the device's /bin/sh or CPU. It needs only the target's Python
3 interpreter and ``mktemp``. It runs in this order and stops at the
first failure:

1. check every file against ``SHA256SUMS``, and reject files in the bundle's folders that the
   list does not name;
2. check that the interpreter matches the bundle's target (CPython version, CPU, C library),
   and that the device key for the self-test exists;
3. create a virtual environment (or use the interpreter's own environment with ``--no-venv``);
4. install the runtime with ``pip install --no-index --find-links wheelhouse``, with pip's
   configuration files and ``PIP_*`` environment variables ignored, so nothing is fetched;
5. run the self-test: verify the package, answer one query locally, run a short benchmark.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

# Placeholders are @NAME@ rather than str.format fields, because the script is full of braces.
INSTALL_SCRIPT_TEMPLATE = r"""#!/bin/sh
# Install edge-runtime from this bundle with no package index, then run a self-test.
# Written by `edge-runtime bundle`. The values below describe what the bundle was built for.
# Run `sh install.sh --help` for the options.
set -eu

BUNDLE_FORMAT=@BUNDLE_FORMAT@
RUNTIME_REQUIREMENT=@RUNTIME_REQUIREMENT@
TARGET_PYTHON=@TARGET_PYTHON@
TARGET_MACHINE=@TARGET_MACHINE@
TARGET_LIBC=@TARGET_LIBC@
TARGET_LIBC_VERSION=@TARGET_LIBC_VERSION@
PACKAGE_FILE=@PACKAGE_FILE@
SIGNER_KEY_FILE=@SIGNER_KEY_FILE@
DEVICE_KEY=@DEVICE_KEY@
SELF_TEST_QUERY=@SELF_TEST_QUERY@
SELF_TEST_LABEL=@SELF_TEST_LABEL@
BENCH_OPTIONS=@BENCH_OPTIONS@

note() {
    printf 'install.sh: %s\n' "$*"
}

fail() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<USAGE
Usage: sh install.sh [options]

Install $RUNTIME_REQUIREMENT for CPython $TARGET_PYTHON on $TARGET_MACHINE
($TARGET_LIBC $TARGET_LIBC_VERSION or newer) from this bundle, with no package index,
then run a self-test with $PACKAGE_FILE.

Options:
  --python PATH      Python interpreter to install for (default: python3)
  --venv DIR         virtual environment to create or reuse (default: venv in this folder)
  --no-venv          install into the environment of --python instead of a virtual one
  --device-key PATH  this device's private key for the self-test
                     (default: $DEVICE_KEY)
  --skip-self-test   install only
  --check-only       check the checksums and the interpreter, then stop
  -h, --help         show this help
USAGE
}

here=$(cd "$(dirname "$0")" && pwd)
python=python3
venv="$here/venv"
use_venv=yes
device_key=$DEVICE_KEY
self_test=yes
check_only=no

while [ $# -gt 0 ]; do
    case $1 in
        --python)
            [ $# -ge 2 ] || fail "--python needs a path"
            python=$2
            shift 2
            ;;
        --venv)
            [ $# -ge 2 ] || fail "--venv needs a folder"
            venv=$2
            shift 2
            ;;
        --no-venv)
            use_venv=no
            shift
            ;;
        --device-key)
            [ $# -ge 2 ] || fail "--device-key needs a path"
            device_key=$2
            shift 2
            ;;
        --skip-self-test)
            self_test=no
            shift
            ;;
        --check-only)
            check_only=yes
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            fail "unknown option '$1'; run 'sh install.sh --help' for the options"
            ;;
    esac
done

# Relative paths are made absolute, because the self-test runs from the bundle folder.
case $venv in
    /*) ;;
    *) venv="$(pwd)/$venv" ;;
esac
case $device_key in
    /*) ;;
    *) device_key="$(pwd)/$device_key" ;;
esac
case $python in
    /*) ;;
    */*) python="$(pwd)/$python" ;;
esac

command -v "$python" >/dev/null 2>&1 \
    || fail "Python interpreter '$python' not found;" \
        "install CPython $TARGET_PYTHON or pass --python PATH"

note "bundle $BUNDLE_FORMAT: $RUNTIME_REQUIREMENT for CPython $TARGET_PYTHON on $TARGET_MACHINE"

# 1. Every listed file must match its SHA-256, and the folders that pip and the runtime read
# may hold no file that the list does not name.
[ -f "$here/SHA256SUMS" ] || fail "SHA256SUMS not found in $here; unpack the whole bundle"
damaged="the bundle is damaged or was changed; copy it again from the machine that built it"
"$python" - "$here" <<'PYTHON' || fail "$damaged"
import hashlib
import os
import sys

root = sys.argv[1]
checked_folders = ("wheelhouse", "models", "keys")
listed = {}
problems = []
with open(os.path.join(root, "SHA256SUMS"), encoding="utf-8") as handle:
    for number, line in enumerate(handle, 1):
        line = line.rstrip("\n")
        if not line:
            continue
        digest, separator, name = line.partition("  ")
        parts = name.split("/")
        if (not separator or len(digest) != 64 or name.startswith("/")
                or ".." in parts or "" in parts):
            problems.append("SHA256SUMS line %d is malformed: %r" % (number, line[:120]))
            continue
        listed[name] = digest.lower()

for name in sorted(listed):
    sha256 = hashlib.sha256()
    try:
        with open(os.path.join(root, name), "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha256.update(chunk)
    except FileNotFoundError:
        problems.append("%s is listed in SHA256SUMS but missing" % name)
        continue
    if sha256.hexdigest() != listed[name]:
        problems.append("%s has SHA-256 %s; SHA256SUMS lists %s"
                        % (name, sha256.hexdigest(), listed[name]))

for folder in checked_folders:
    for directory, _, filenames in os.walk(os.path.join(root, folder)):
        for filename in filenames:
            name = os.path.relpath(os.path.join(directory, filename), root)
            name = name.replace(os.sep, "/")
            if name not in listed:
                problems.append("%s is not listed in SHA256SUMS" % name)

for problem in problems:
    print("install.sh: " + problem, file=sys.stderr)
if problems:
    sys.exit(1)
print("install.sh: %d files match SHA256SUMS" % len(listed))
PYTHON

# 2. The interpreter must be the one the wheelhouse was resolved for.
check_interpreter() {
    "$1" - "$TARGET_PYTHON" "$TARGET_MACHINE" "$TARGET_LIBC" "$TARGET_LIBC_VERSION" <<'PYTHON'
import platform
import sys

python, machine, libc, libc_version = sys.argv[1:5]
problems = []
if platform.python_implementation() != "CPython":
    problems.append("the interpreter is %s; the bundle needs CPython"
                    % platform.python_implementation())
have_python = "%d.%d" % sys.version_info[:2]
if have_python != python:
    problems.append("the interpreter is Python %s; the bundle needs %s" % (have_python, python))
aliases = {"amd64": "x86_64", "arm64": "aarch64"}
have_machine = aliases.get(platform.machine().lower(), platform.machine())
if have_machine != machine:
    problems.append("the CPU is %s; the bundle is for %s" % (have_machine, machine))
have_libc, have_version = platform.libc_ver()
if libc == "glibc":
    if have_libc != "glibc":
        problems.append("the C library is not glibc; the bundle needs glibc %s or newer"
                        % libc_version)
    else:
        have = tuple(int(part) for part in have_version.split(".")[:2])
        need = tuple(int(part) for part in libc_version.split(".")[:2])
        if have < need:
            problems.append("glibc is %s; the bundle needs %s or newer"
                            % (have_version, libc_version))
elif have_libc == "glibc":
    problems.append("the C library is glibc; the bundle was built for musl")
for problem in problems:
    print("install.sh: " + problem, file=sys.stderr)
if problems:
    print("install.sh: build a bundle for this device with `edge-runtime bundle --platform "
          "%s --python-version %s`, or pass --python with a matching interpreter"
          % (have_machine, have_python), file=sys.stderr)
    sys.exit(1)
print("install.sh: interpreter %s: CPython %s on %s, %s %s"
      % (sys.executable, have_python, have_machine, have_libc or "unknown libc", have_version))
PYTHON
}

check_interpreter "$python" || fail "'$python' cannot run this bundle's wheels"
if [ "$check_only" = yes ]; then
    note "checks passed; nothing installed (--check-only)"
    exit 0
fi
# The self-test needs the device key, so its absence stops the script before it installs.
if [ "$self_test" = yes ] && [ ! -f "$device_key" ]; then
    fail "device key $device_key not found; provision this device's key there," \
        "or pass --device-key PATH, or --skip-self-test"
fi

# 3. The environment to install into.
if [ "$use_venv" = yes ]; then
    if [ ! -x "$venv/bin/python" ]; then
        note "creating a virtual environment in $venv"
        "$python" -m venv "$venv" \
            || fail "could not create a virtual environment in $venv; on Debian and" \
                "Raspberry Pi OS install the python3-venv package, or pass --no-venv"
    else
        note "reusing the virtual environment in $venv"
        check_interpreter "$venv/bin/python" \
            || fail "the virtual environment in $venv cannot run this bundle's wheels;" \
                "remove it or pass another --venv"
    fi
    py="$venv/bin/python"
else
    py=$python
fi

# 4. Install with no index: PIP_CONFIG_FILE=/dev/null skips every pip configuration file and
# --isolated ignores the PIP_* environment variables, so only the wheelhouse is read.
note "installing $RUNTIME_REQUIREMENT from $here/wheelhouse with no package index"
PIP_CONFIG_FILE=/dev/null "$py" -m pip --isolated --disable-pip-version-check install \
    --no-index --find-links "$here/wheelhouse" --only-binary :all: --force-reinstall \
    "$RUNTIME_REQUIREMENT" \
    || fail "pip could not install $RUNTIME_REQUIREMENT from the wheelhouse;" \
        "see pip's message above"

if [ "$self_test" = no ]; then
    note "installed $RUNTIME_REQUIREMENT with $py; self-test skipped (--skip-self-test)"
    exit 0
fi

# 5. Self-test. It runs from the bundle folder with PYTHONPATH unset, so that Python imports
# the installed edge_runtime and not a source checkout. It keeps the rollback state in a
# temporary file, so that it does not record the package version for the device.
unset PYTHONPATH
cd "$here"
state_dir=$(mktemp -d)
trap 'rm -rf "$state_dir"' EXIT
state_file="$state_dir/accepted-versions.json"
package="$here/$PACKAGE_FILE"
signer_key="$here/$SIGNER_KEY_FILE"

"$py" -c 'import edge_runtime, importlib.metadata, os, sys
print("install.sh: edge-runtime %s imported from %s"
      % (importlib.metadata.version("edge-runtime"), os.path.dirname(edge_runtime.__file__)))' \
    || fail "the installed edge_runtime cannot be imported"

note "self-test 1/3: verify $PACKAGE_FILE"
"$py" -m edge_runtime package verify "$package" --signer-key "$signer_key" \
    --device-key "$device_key" --state-file "$state_file" \
    || fail "self-test failed: $PACKAGE_FILE did not verify with $SIGNER_KEY_FILE and $device_key"

note "self-test 2/3: answer one query locally"
answer=$("$py" -m edge_runtime ask "$SELF_TEST_QUERY" --route local-only --json \
    --package "$package" --signer-key "$signer_key" --device-key "$device_key" \
    --state-file "$state_file") \
    || fail "self-test failed: the runtime could not answer the query"
printf '%s\n' "$answer" | "$py" -c 'import json, sys
answer = json.load(sys.stdin)
query, expected = sys.argv[1:3]
print("install.sh: query %r -> %s (source %s, %.2f ms)"
      % (query, answer["label"], answer["source"], answer["timings_ms"]["total"]))
if answer["source"] != "local":
    sys.exit("install.sh: the answer came from %s; expected local" % answer["source"])
if expected and answer["label"] != expected:
    sys.exit("install.sh: the label is %s; the package lists %s for this query"
             % (answer["label"], expected))' "$SELF_TEST_QUERY" "$SELF_TEST_LABEL" \
    || fail "self-test failed: the local answer is not the expected one"

note "self-test 3/3: edge-runtime bench $BENCH_OPTIONS"
# BENCH_OPTIONS is unquoted on purpose, because it contains several options without spaces.
# shellcheck disable=SC2086
"$py" -m edge_runtime bench "$package" $BENCH_OPTIONS --signer-key "$signer_key" \
    --device-key "$device_key" --state-file "$state_file" \
    || fail "self-test failed: edge-runtime bench did not finish"

note "self-test passed: package verified, local answer $SELF_TEST_LABEL, bench summary above"
note "installed $RUNTIME_REQUIREMENT with $py"
"""


def render_install_script(values: Mapping[str, str]) -> str:
    """Return the install script with each @NAME@ placeholder set to ``values[NAME]``, quoted
    for sh. Raises ValueError unless ``values`` names exactly the template's placeholders."""
    placeholders = set(re.findall(r"@([A-Z_]+)@", INSTALL_SCRIPT_TEMPLATE))
    if placeholders != set(values):
        missing = sorted(placeholders - set(values))
        unknown = sorted(set(values) - placeholders)
        raise ValueError(f"install script values: missing {missing}, unknown {unknown}")
    script = INSTALL_SCRIPT_TEMPLATE
    for name, value in values.items():
        script = script.replace(f"@{name}@", shlex.quote(value))
    return script
