#!/usr/bin/env bash
# Run the device runtime's tests and `edge-runtime bench` on aarch64 under user-mode emulation.
#
# The script builds (or reuses) a Debian arm64 root with debootstrap and runs it through
# qemu-aarch64-static and binfmt_misc. It installs the base install of this repository from
# PyPI's aarch64 wheels into a virtual environment there. Then it runs the device-side tests and
# a short benchmark of models/clinc150-student.edgepkg. Everything it prints also goes to the log
# (benchmarks/results/arm64-emulation.log by default). docs/arm64.md describes what this proves.
#
# Needs: root, Debian or Ubuntu on x86-64 (or aarch64, where no emulation is needed), network
# access to a Debian mirror and to PyPI. Run `scripts/arm64-emulation.sh --help` for the options.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Kept for the re-execution under nice below, because option parsing consumes "$@".
ORIGINAL_ARGS=("$@")

# Defaults; each one has an option.
WORK_DIR=${EDGE_ARM64_DIR:-/var/tmp/edge-arm64}
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
LOG=$REPO/benchmarks/results/arm64-emulation.log
TEST_SET=device
BENCH_RUNS=50
RUN_BUNDLE=no
REBUILD_ROOT=no
NICENESS=10
# The emulated core. The Cortex-A72 is the Raspberry Pi 4's core and has no dot-product
# instructions (asimddp), so ONNX Runtime takes the int8 kernels a Pi 4 takes. cortex-a76 is the
# Pi 5's core, with asimddp.
CPU_MODEL=cortex-a72

# Test tools installed beside the base install. hypothesis drives the property tests of package
# parsing and redaction; neither tool is imported by the runtime itself.
TEST_TOOLS=(pytest hypothesis)

# Tests that assume a fast CPU, deselected under emulation, as pytest node ids. None at present.
SLOW_CPU_TESTS=()

# Device-side test files: the ones that need only the base install. Left out: the gateway
# (test_gateway*, test_state, test_ratelimit, test_monitor, test_defences, test_decoys,
# test_backends, test_randomize_watermark import starlette, redis or prometheus_client) and the
# export pipeline (test_calibrate*, test_config, test_extra_train, test_export_integration,
# test_vocab need torch or onnx). In the files below, tests that need the tiny model build
# (torch), onnx or model-signing skip themselves and show up as skipped with their reason.
DEVICE_TESTS=(
    tests/test_archive.py
    tests/test_package.py
    tests/test_package_security.py
    tests/test_signing.py
    tests/test_signing_interop.py
    tests/test_encryption.py
    tests/test_keyformat.py
    tests/test_package_cli.py
    tests/test_models.py
    tests/test_model_options.py
    tests/test_gate.py
    tests/test_runtime.py
    tests/test_cli.py
    tests/test_cache.py
    tests/test_escalation_log.py
    tests/test_redaction.py
    tests/test_teacher_client.py
    tests/test_data.py
    tests/test_bench.py
)
# A shorter set for busy hosts: read, verify and decrypt packages, classify with ONNX Runtime
# from the packages in models/, gate, cache and redact. It leaves out the files whose tests
# spend most of their time starting Python processes or running property-based fuzzing.
CORE_TESTS=(
    tests/test_archive.py
    tests/test_package.py
    tests/test_signing.py
    tests/test_encryption.py
    tests/test_keyformat.py
    tests/test_models.py
    tests/test_gate.py
    tests/test_runtime.py
    tests/test_cache.py
    tests/test_redaction.py
)

usage() {
    cat <<USAGE
Usage: scripts/arm64-emulation.sh [options]

Build or reuse a Debian arm64 root, install the base install of this repository there from
PyPI's aarch64 wheels, run the device-side tests and \`edge-runtime bench\` under qemu user-mode
emulation, and write a log. Must run as root. Timings under emulation are not device figures.

Options:
  --dir DIR          folder for the arm64 root and the setup log, outside the repository
                     (default: \$EDGE_ARM64_DIR or /var/tmp/edge-arm64)
  --suite NAME       Debian release of the root; its python3 must be 3.10 or newer
                     (default: $SUITE)
  --mirror URL       Debian mirror for debootstrap (default: $MIRROR)
  --log FILE         log to write (default: benchmarks/results/arm64-emulation.log)
  --tests SET        device: every device-side test file (default); core: package
                     reading, signing, encryption, the models in models/, the gate, the
                     caches and redaction, several times faster under emulation
  --bench-runs N     single queries timed per thread count by the benchmark (default: $BENCH_RUNS)
  --cpu MODEL        core that qemu emulates: cortex-a72 (Raspberry Pi 4), cortex-a76
                     (Raspberry Pi 5), cortex-a53, cortex-a57 or neoverse-n1 (default: $CPU_MODEL)
  --bundle           also build an aarch64 bundle with \`edge-runtime bundle\` and run its
                     offline install and self-test in the root
  --rebuild-root     delete the root and build it again
  --niceness N       scheduling niceness the script runs at (default: $NICENESS)
  -h, --help         show this help
USAGE
}

die() {
    printf 'arm64-emulation: error: %s\n' "$*" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case $1 in
        --dir) WORK_DIR=${2:?--dir needs a folder}; shift 2 ;;
        --suite) SUITE=${2:?--suite needs a release name}; shift 2 ;;
        --mirror) MIRROR=${2:?--mirror needs a URL}; shift 2 ;;
        --log) LOG=${2:?--log needs a file}; shift 2 ;;
        --tests) TEST_SET=${2:?--tests needs device or core}; shift 2 ;;
        --bench-runs) BENCH_RUNS=${2:?--bench-runs needs a number}; shift 2 ;;
        --cpu) CPU_MODEL=${2:?--cpu needs a core name}; shift 2 ;;
        --bundle) RUN_BUNDLE=yes; shift ;;
        --rebuild-root) REBUILD_ROOT=yes; shift ;;
        --niceness) NICENESS=${2:?--niceness needs a number}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option: $1; run with --help for the options" ;;
    esac
done

case $TEST_SET in
    device) TEST_FILES=("${DEVICE_TESTS[@]}") ;;
    core) TEST_FILES=("${CORE_TESTS[@]}") ;;
    *) die "invalid --tests value: $TEST_SET; use device or core" ;;
esac
# The part numbers that Arm assigns to each core, as the kernel shows them in /proc/cpuinfo.
case $CPU_MODEL in
    cortex-a53) CPU_PART=0xd03 ;;
    cortex-a57) CPU_PART=0xd07 ;;
    cortex-a72) CPU_PART=0xd08 ;;
    cortex-a76) CPU_PART=0xd0b ;;
    neoverse-n1) CPU_PART=0xd0c ;;
    *) die "invalid --cpu value: $CPU_MODEL; use cortex-a72, cortex-a76, cortex-a53," \
        "cortex-a57 or neoverse-n1" ;;
esac
if ! [[ $BENCH_RUNS =~ ^[1-9][0-9]*$ ]]; then
    die "invalid --bench-runs value: $BENCH_RUNS; use a positive integer"
fi
if ! [[ $NICENESS =~ ^[0-9]+$ ]] || [ "$NICENESS" -gt 19 ]; then
    die "invalid --niceness value: $NICENESS; use an integer from 0 to 19"
fi
if [ "$(id -u)" -ne 0 ]; then
    die "must run as root, because debootstrap, chroot and mount need it; rerun with sudo"
fi

# Emulation is CPU-heavy for an hour at a time, so the script lowers its own priority once.
if [ "$(nice)" -lt "$NICENESS" ] && [ -z "${EDGE_ARM64_RENICED:-}" ]; then
    export EDGE_ARM64_RENICED=1
    exec nice -n $((NICENESS - $(nice))) "$0" "${ORIGINAL_ARGS[@]}"
fi

WORK_DIR=$(realpath -m "$WORK_DIR")
case $WORK_DIR/ in
    "$REPO"/*) die "--dir $WORK_DIR is inside the repository; choose a folder outside it" ;;
    / | /bin/ | /boot/ | /dev/ | /etc/ | /home/ | /proc/ | /root/ | /sys/ | /usr/ | /var/ | \
        /var/tmp/ | /tmp/)
        die "--dir $WORK_DIR is a system folder; choose a dedicated folder such as" \
            "/var/tmp/edge-arm64" ;;
esac
ROOTFS=$WORK_DIR/rootfs
SETUP_LOG=$WORK_DIR/setup.log
STAGE1_MARK=$WORK_DIR/stage1.done
STAGE2_MARK=$WORK_DIR/stage2.done
GUEST_BASE=/opt/edge-runtime
GUEST_REPO=$GUEST_BASE/main
GUEST_VENV=$GUEST_BASE/venv
HOST_MACHINE=$(uname -m)

mkdir -p "$WORK_DIR" "$(dirname "$LOG")"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

START_SECONDS=$SECONDS
ROOT_STATE=reused
MOUNTED=()

step() {
    printf '\n==> [%s, +%d s] %s\n' "$(date -u +%H:%M:%S)" $((SECONDS - START_SECONDS)) "$*"
}

note() {
    printf '    %s\n' "$*"
}

# Run a noisy command with its output in the setup log; show the log's tail if it fails.
quietly() {
    printf '\n$ %s\n' "$*" >>"$SETUP_LOG"
    if ! "$@" >>"$SETUP_LOG" 2>&1; then
        printf '    failed: %s\n    last lines of %s:\n' "$*" "$SETUP_LOG"
        tail -n 25 "$SETUP_LOG" | sed 's/^/      /'
        return 1
    fi
}

# Run a command inside the root with a clean environment. The CA bundle is the root's own
# store, which also contains the host's local CAs (see install_host_cas).
in_root() {
    chroot "$ROOTFS" /usr/bin/env -i \
        HOME=/root LANG=C.UTF-8 TERM=dumb \
        PATH=$GUEST_VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
        DEBIAN_FRONTEND=noninteractive QEMU_CPU="$CPU_MODEL" \
        "$@"
}

unmount_all() {
    local index
    for ((index = ${#MOUNTED[@]} - 1; index >= 0; index--)); do
        umount -R "${MOUNTED[index]}" 2>/dev/null || umount -R -l "${MOUNTED[index]}" || true
    done
    MOUNTED=()
}

finish() {
    local status=$?
    unmount_all
    if [ "$status" -ne 0 ]; then
        printf '\nFAILED with exit code %d after %d s; setup output is in %s\n' \
            "$status" $((SECONDS - START_SECONDS)) "$SETUP_LOG"
    fi
}
trap finish EXIT

# Refuse to delete the root while anything is mounted under it: a bind mount of /dev there
# would let rm reach the host's device nodes.
remove_rootfs() {
    unmount_all
    if findmnt -rn -o TARGET | grep -q "^$ROOTFS/"; then
        die "something is still mounted under $ROOTFS; unmount it (findmnt | grep $ROOTFS)" \
            "and rerun"
    fi
    rm -rf --one-file-system "$ROOTFS"
    rm -f "$STAGE1_MARK" "$STAGE2_MARK"
}

install_host_tools() {
    step "Host tools: qemu-user-static, binfmt-support, debootstrap"
    local packages=(debootstrap)
    if [ "$HOST_MACHINE" != aarch64 ]; then
        packages+=(qemu-user-static binfmt-support)
    fi
    local missing=()
    local package
    for package in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$package")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        note "already installed: ${packages[*]}"
        return
    fi
    note "installing ${missing[*]} (apt-get update first)"
    quietly apt-get update
    quietly env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "${missing[@]}"
}

# The kernel must hand aarch64 executables to qemu-aarch64-static, including those that the
# tests and the benchmark start as child processes. The F flag makes the kernel open the
# interpreter when it is registered, so the root needs no copy of qemu.
register_binfmt() {
    step "binfmt_misc: run aarch64 executables through qemu-aarch64-static"
    if [ "$HOST_MACHINE" = aarch64 ]; then
        note "host is aarch64; no emulation needed"
        return
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
        note "mounting binfmt_misc on /proc/sys/fs/binfmt_misc"
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
            die "cannot mount binfmt_misc (mount -t binfmt_misc failed); a container needs \
--privileged, or the host must load the binfmt_misc module. Without it the kernel cannot start \
the aarch64 child processes that the tests and the benchmark spawn"
    fi
    local entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
    if [ ! -e "$entry" ] || ! grep -q '^enabled' "$entry"; then
        note "registering qemu-aarch64 with update-binfmts"
        update-binfmts --enable qemu-aarch64 >>"$SETUP_LOG" 2>&1 || true
    fi
    if [ ! -e "$entry" ]; then
        # update-binfmts can fail where its own database is missing; write the entry directly.
        note "registering qemu-aarch64 directly through /proc/sys/fs/binfmt_misc/register"
        local magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
        local mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
        printf ':qemu-aarch64:M::%s:%s:/usr/bin/qemu-aarch64-static:F\n' "$magic" "$mask" \
            >/proc/sys/fs/binfmt_misc/register ||
            die "writing the qemu-aarch64 entry to /proc/sys/fs/binfmt_misc/register failed"
    fi
    grep -q '^enabled' "$entry" || die "binfmt_misc entry $entry exists but is disabled; \
enable it with: echo 1 > $entry"
    grep -q '^flags:.*F' "$entry" || die "binfmt_misc entry $entry lacks the F flag, so \
processes inside the root cannot find qemu-aarch64-static; remove it (echo -1 > $entry) and rerun"
    sed -n 's/^interpreter /    interpreter: /p; s/^flags: /    flags: /p' "$entry"
    note "$(qemu-aarch64-static --version | head -n 1)"
}

root_is_complete() {
    [ -e "$STAGE2_MARK" ] && [ -x "$ROOTFS/usr/bin/python3" ] &&
        grep -qx "$SUITE arm64" "$STAGE2_MARK"
}

build_root() {
    step "Debian $SUITE arm64 root in $ROOTFS"
    if [ "$REBUILD_ROOT" = yes ] && [ -e "$ROOTFS" ]; then
        note "--rebuild-root: deleting the existing root"
        remove_rootfs
    fi
    local mark
    for mark in "$STAGE1_MARK" "$STAGE2_MARK"; do
        if [ -e "$mark" ] && ! grep -qx "$SUITE arm64" "$mark"; then
            die "$ROOTFS was built for '$(cat "$mark")', not '$SUITE arm64'; rerun with \
--rebuild-root or choose another --dir"
        fi
    done
    if root_is_complete; then
        note "reusing the root built on $(date -u -r "$STAGE2_MARK" '+%Y-%m-%d %H:%M UTC')"
        return
    fi
    ROOT_STATE=built

    if [ ! -e "$STAGE1_MARK" ]; then
        if [ -e "$ROOTFS" ]; then
            note "deleting an unfinished first stage"
            remove_rootfs
        fi
        local foreign=(--foreign)
        [ "$HOST_MACHINE" = aarch64 ] && foreign=()
        note "debootstrap first stage: download and unpack (output in $SETUP_LOG)"
        mkdir -p "$ROOTFS"
        quietly debootstrap --arch=arm64 "${foreign[@]}" --variant=minbase \
            --include=python3,python3-venv,python3-pip,ca-certificates \
            "$SUITE" "$ROOTFS" "$MIRROR"
        echo "$SUITE arm64" >"$STAGE1_MARK"
    else
        note "first stage already done; resuming at the second stage"
    fi

    if [ -e "$ROOTFS/debootstrap/debootstrap" ]; then
        note "debootstrap second stage under emulation: configure every package (the slow part)"
        quietly chroot "$ROOTFS" /debootstrap/debootstrap --second-stage ||
            die "the second stage failed; rerun to retry it, or rerun with --rebuild-root"
    fi
    echo "$SUITE arm64" >"$STAGE2_MARK"
    note "root ready: $(du -sh --one-file-system "$ROOTFS" | cut -f1)"
}

mount_root() {
    step "Mounts and network settings for the root"
    local target
    # Mounts left by an interrupted run are replaced, so each run starts from the same state.
    for target in proc sys dev; do
        if mountpoint -q "$ROOTFS/$target"; then
            umount -R "$ROOTFS/$target"
        fi
    done
    mount -t proc proc "$ROOTFS/proc"
    MOUNTED+=("$ROOTFS/proc")
    for target in sys dev; do
        mount --rbind "/$target" "$ROOTFS/$target"
        mount --make-rslave "$ROOTFS/$target"
        MOUNTED+=("$ROOTFS/$target")
    done
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    cp -L /etc/hosts "$ROOTFS/etc/hosts"
    note "mounted proc, sys and dev; copied resolv.conf and hosts"
    if [ "$HOST_MACHINE" != aarch64 ]; then
        mount_cpuinfo
    fi
}

# qemu-user passes /proc/cpuinfo through from the host, so an aarch64 program reads an x86
# description. With that file, onnxruntime 1.32.0's aarch64 extension crashed with a
# segmentation fault on import (qemu 7.2), and with a file in the arm64 format it imported. So a
# /proc/cpuinfo in the arm64 format is mounted over it. Its Features line lists the HWCAP bits
# that qemu reports for the emulated core, and its CPU part is that core's.
mount_cpuinfo() {
    local cpuinfo=$WORK_DIR/cpuinfo-$CPU_MODEL
    local features
    features=$(in_root python3 - <<'PYTHON'
import struct

# Feature names by bit position in AT_HWCAP and AT_HWCAP2, as the arm64 kernel defines the
# HWCAP_* and HWCAP2_* bits. HWCAP2 bits above 18 (mte) are left out.
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
         "jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc "
         "flagm ssbs sb paca pacg").split()
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm "
          "svef32mm svef64mm svebf16 i8mm bf16 dgh rng bti mte").split()
AT_HWCAP, AT_HWCAP2 = 16, 26

with open("/proc/self/auxv", "rb") as handle:
    vector = dict(struct.iter_unpack("<QQ", handle.read()))
names = [name for bit, name in enumerate(HWCAP) if vector.get(AT_HWCAP, 0) >> bit & 1]
names += [name for bit, name in enumerate(HWCAP2) if vector.get(AT_HWCAP2, 0) >> bit & 1]
print(" ".join(names))
PYTHON
)
    local index
    : >"$cpuinfo"
    for ((index = 0; index < $(nproc); index++)); do
        printf 'processor\t: %d\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\n' \
            "$index" "$features" >>"$cpuinfo"
        printf 'CPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: 0\n\n' "$CPU_PART" >>"$cpuinfo"
    done
    mount --bind "$cpuinfo" "$ROOTFS/proc/cpuinfo"
    note "emulated core: $CPU_MODEL (QEMU_CPU); /proc/cpuinfo in the root is written by this"
    note "script for that core, with the features qemu reports: $features"
}

# Behind a TLS-inspecting proxy the host trusts a local CA that the new root does not.
install_host_cas() {
    local cas=(/usr/local/share/ca-certificates/*.crt)
    [ -e "${cas[0]}" ] || return 0
    local target=$ROOTFS/usr/local/share/ca-certificates
    local ca changed=no
    mkdir -p "$target"
    for ca in "${cas[@]}"; do
        if ! cmp -s "$ca" "$target/${ca##*/}"; then
            cp "$ca" "$target/"
            changed=yes
        fi
    done
    if [ "$changed" = no ]; then
        note "the host's local CA certificates are already in the root: ${cas[*]##*/}"
        return
    fi
    quietly in_root update-ca-certificates
    note "added the host's local CA certificates: ${cas[*]##*/}"
}

check_root_python() {
    step "Python in the root"
    if ! in_root python3 -c 'import ensurepip, venv' 2>/dev/null; then
        note "python3-venv missing; installing python3-venv and python3-pip with apt-get"
        quietly in_root apt-get update
        quietly in_root apt-get install -y --no-install-recommends python3-venv python3-pip \
            ca-certificates
    fi
    install_host_cas
    note "$(in_root python3 --version) at $(in_root readlink -f /usr/bin/python3)"
    in_root python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "python3 in $SUITE is older than 3.10, which the runtime requires; use --suite bookworm"
}

copy_repository() {
    step "Copy the working tree into the root at $GUEST_REPO"
    rm -rf --one-file-system "$ROOTFS$GUEST_REPO"
    mkdir -p "$ROOTFS$GUEST_REPO"
    tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build \
        --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache \
        --exclude=.hypothesis --exclude='*.egg-info' -cf - . | tar -C "$ROOTFS$GUEST_REPO" -xf -
    note "copied $(du -sh "$ROOTFS$GUEST_REPO" | cut -f1) from $REPO"
    # The tests read data sets from ../shared/data beside the repository.
    local data=$REPO/../shared/data
    rm -rf --one-file-system "$ROOTFS$GUEST_BASE/shared"
    if [ -d "$data" ]; then
        mkdir -p "$ROOTFS$GUEST_BASE/shared"
        cp -r "$data" "$ROOTFS$GUEST_BASE/shared/data"
        note "copied the data sets from $(realpath "$data")"
    else
        note "no data sets at $data; tests that read CLINC150 will skip"
    fi
}

install_runtime() {
    step "Base install and test tools in $GUEST_VENV (PyPI aarch64 wheels)"
    local stamp_file=$ROOTFS$GUEST_VENV/.edge-arm64-install
    local stamp
    stamp="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1) ${TEST_TOOLS[*]}"
    if [ -e "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] &&
        in_root python -c 'import edge_runtime.runtime' 2>/dev/null; then
        note "reusing the environment: pyproject.toml and the test tools are unchanged"
        return
    fi
    if [ ! -x "$ROOTFS$GUEST_VENV/bin/python" ]; then
        quietly in_root python3 -m venv "$GUEST_VENV"
    fi
    note "pip install -e . ${TEST_TOOLS[*]} (no extras: no gateway, no torch, no transformers)"
    quietly in_root sh -c "cd $GUEST_REPO && python -m pip install -e . ${TEST_TOOLS[*]}"
    echo "$stamp" >"$stamp_file"
}

report_environment() {
    step "Environment inside the root"
    # shellcheck disable=SC2016 # expanded by the shell inside the root
    in_root sh -c 'printf "    uname -m: %s\n    uname -sr: %s\n" "$(uname -m)" "$(uname -sr)"'
    # shellcheck disable=SC2016
    in_root sh -c 'printf "    C library: %s\n" "$(ldd --version | head -n 1)"'
    # e_machine of the interpreter and of onnxruntime's extension, read from their ELF headers,
    # shows that aarch64 code runs, not the host's.
    in_root python - <<'PYTHON'
import platform
import struct
import sys
from importlib import metadata
from pathlib import Path

import onnxruntime

MACHINES = {0x3E: "x86-64", 0xB7: "AArch64"}


def elf_machine(path):
    with open(path, "rb") as handle:
        header = handle.read(20)
    return MACHINES.get(struct.unpack_from("<H", header, 18)[0], "other")


capi = next(Path(onnxruntime.__file__).parent.glob("capi/onnxruntime_pybind11_state*.so"))
print(f"    platform.machine(): {platform.machine()}")
interpreter = sys.executable
print(f"    Python {platform.python_version()} ({interpreter}, ELF {elf_machine(interpreter)})")
print(f"    onnxruntime {onnxruntime.__version__} ({capi.name}, ELF {elf_machine(capi)})")
for name in ("numpy", "tokenizers", "cryptography", "httpx", "pytest", "hypothesis"):
    print(f"    {name} {metadata.version(name)}")
print(f"    onnxruntime providers: {', '.join(onnxruntime.get_available_providers())}")
PYTHON
    note "wheels installed from PyPI:"
    in_root python -m pip list --format=freeze 2>/dev/null | sed 's/^/      /'
}

run_tests() {
    step "Device-side tests under emulation (--tests $TEST_SET, ${#TEST_FILES[@]} files)"
    local deselect=()
    local test_id
    if [ "$HOST_MACHINE" != aarch64 ] && [ ${#SLOW_CPU_TESTS[@]} -gt 0 ]; then
        note "deselected, because they assume a fast CPU (see SLOW_CPU_TESTS in this script):"
        for test_id in "${SLOW_CPU_TESTS[@]}"; do
            note "  $test_id"
            deselect+=("--deselect '$test_id'")
        done
    fi
    note "python -m pytest -q -rfEs -p no:cacheprovider ${TEST_FILES[*]}"
    local started=$SECONDS
    local status=0
    in_root sh -c "cd $GUEST_REPO && exec python -m pytest -q -rfEs -p no:cacheprovider \
--durations=5 ${deselect[*]} ${TEST_FILES[*]}" || status=$?
    note "pytest exit code $status after $((SECONDS - started)) s"
    TEST_STATUS=$status
}

run_bench() {
    step "edge-runtime bench models/clinc150-student.edgepkg under emulation"
    # shellcheck disable=SC2054 # the commas belong to the option values
    local options=(--runs "$BENCH_RUNS" --warmup 5 --cold-runs 2 --threads 1,2
        --batch-sizes 1,8 --signer-key models/keys/demo-signer.pub.pem
        --device-key models/keys/demo-device.key.pem --state-file '')
    note "edge-runtime bench models/clinc150-student.edgepkg ${options[*]}"
    if [ "$HOST_MACHINE" != aarch64 ]; then
        note "NOTE: these timings come from qemu user-mode emulation on the host above. They"
        note "are not device figures and say nothing about the speed of an ARM board. The cpu"
        note "and int8 isa lines describe the emulated $CPU_MODEL, from the /proc/cpuinfo that"
        note "this script wrote. Peak memory includes qemu's own memory."
    fi
    local status=0
    in_root sh -c "cd $GUEST_REPO && exec edge-runtime bench models/clinc150-student.edgepkg \
$(printf "'%s' " "${options[@]}")" || status=$?
    note "edge-runtime bench exit code $status"
    BENCH_STATUS=$status
}

# The offline bundle, built on the host as on a workstation, then installed inside the root with
# no package index by scripts/offline-install-check.sh, which also runs the bundle's self-test.
run_bundle() {
    step "Offline bundle: build for aarch64 on the host, install and self-test in the root"
    if [ ! -e "$REPO/edge_runtime/bundle.py" ] ||
        [ ! -e "$REPO/scripts/offline-install-check.sh" ]; then
        note "edge_runtime/bundle.py or scripts/offline-install-check.sh is missing from this" \
            "checkout"
        BUNDLE_STATUS=2
        return
    fi
    local guest_python
    guest_python=$(in_root python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')

    # A host environment of its own, so the step does not depend on what the host has installed.
    local host_venv=$WORK_DIR/host-venv
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        note "installing python3-venv on the host"
        quietly env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3-venv
    fi
    if [ ! -x "$host_venv/bin/python" ]; then
        quietly python3 -m venv "$host_venv"
    fi
    # Installed from the copy in the root, so the build writes nothing into the working tree.
    note "host environment $host_venv: pip install -e $ROOTFS$GUEST_REPO"
    quietly "$host_venv/bin/python" -m pip install -e "$ROOTFS$GUEST_REPO"

    local bundle_dir=$GUEST_BASE/bundle
    local bundle=$bundle_dir/edge-runtime-aarch64-cp${guest_python/./}.tar.gz
    rm -rf --one-file-system "$ROOTFS$bundle_dir"
    local options=(--platform aarch64 --python-version "$guest_python"
        --package models/clinc150-student.edgepkg --signer-key models/keys/demo-signer.pub.pem
        --device-key "$GUEST_REPO/models/keys/demo-device.key.pem" --output "$ROOTFS$bundle")
    note "edge-runtime bundle ${options[*]} (progress in $SETUP_LOG)"
    local status=0
    local build_output=$WORK_DIR/bundle-build.out
    (cd "$ROOTFS$GUEST_REPO" && "$host_venv/bin/edge-runtime" bundle "${options[@]}") \
        >"$build_output" 2>&1 || status=$?
    cat "$build_output" >>"$SETUP_LOG"
    if [ "$status" -ne 0 ]; then
        tail -n 25 "$build_output" | sed 's/^/      /'
        note "edge-runtime bundle exit code $status"
        BUNDLE_STATUS=$status
        return
    fi
    grep -E '^(wrote|sha256) ' "$build_output" | sed 's/^/    /'

    note "inside the root: PYTHON=/usr/bin/python3 sh scripts/offline-install-check.sh $bundle"
    in_root sh -c "cd $GUEST_REPO && PYTHON=/usr/bin/python3 exec sh \
scripts/offline-install-check.sh $bundle" || status=$?
    note "offline install and self-test exit code $status"
    BUNDLE_STATUS=$status
}

print_header() {
    echo "edge-runtime on aarch64 under emulation: scripts/arm64-emulation.sh"
    echo "started $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    local os_name commit changes=""
    # shellcheck disable=SC1091
    os_name=$(. /etc/os-release && echo "$PRETTY_NAME")
    commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
    if git -C "$REPO" --no-optional-locks status --porcelain 2>/dev/null | grep -q .; then
        changes=", with uncommitted changes"
    fi
    echo "host: $(uname -m), $(nproc) CPUs, $os_name, kernel $(uname -r)"
    echo "host CPU: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "repository: $REPO ($commit$changes)"
    echo "root: $ROOTFS (Debian $SUITE arm64), emulated core $CPU_MODEL, niceness $(nice)"
    echo
    if [ "$HOST_MACHINE" = aarch64 ]; then
        echo "The host is aarch64, so this run used no emulation."
        return
    fi
    echo "NOTE: every timing in this log, the bench output included, was measured under qemu"
    echo "user-mode emulation of aarch64 on an $HOST_MACHINE host. Emulated timings are not"
    echo "device figures and must not be reported as ARM latency. docs/arm64.md says how to"
    echo "measure a Raspberry Pi."
}

TEST_STATUS=0
BENCH_STATUS=0
BUNDLE_STATUS=0

print_header
install_host_tools
register_binfmt
build_root
mount_root
check_root_python
copy_repository
install_runtime
report_environment
run_tests
run_bench
if [ "$RUN_BUNDLE" = yes ]; then
    run_bundle
fi
unmount_all

step "Summary"
note "root: $ROOT_STATE ($ROOTFS)"
note "tests: $([ "$TEST_STATUS" -eq 0 ] && echo passed || echo "FAILED (pytest exit code $TEST_STATUS)")"
note "bench: $([ "$BENCH_STATUS" -eq 0 ] && echo completed || echo "FAILED (exit code $BENCH_STATUS)")"
if [ "$RUN_BUNDLE" = yes ]; then
    note "bundle: $([ "$BUNDLE_STATUS" -eq 0 ] && echo passed || echo "FAILED (exit code $BUNDLE_STATUS)")"
fi
elapsed=$((SECONDS - START_SECONDS))
echo "Total time: $((elapsed / 60)) min $((elapsed % 60)) s (root $ROOT_STATE)"
[ "$TEST_STATUS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ] && [ "$BUNDLE_STATUS" -eq 0 ]
