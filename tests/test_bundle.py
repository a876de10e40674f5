"""`edge-runtime bundle`: target platform tags, the checks on keys, package and output, the
install script's checksum and interpreter checks, and an offline install of a real bundle for
this machine into a fresh virtual environment with its self-test."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_runtime import bundle, bundle_wheels, cli
from edge_runtime.bundle import (
    BundleError,
    MissingWheelError,
    PrivateKeyError,
    build_bundle,
    checksum_list,
)
from edge_runtime.bundle_script import render_install_script
from edge_runtime.bundle_wheels import (
    build_project_wheel,
    check_requires_python,
    read_wheel_metadata,
    resolve_target,
)
from edge_runtime.errors import ConfigError
from tests.conftest import (
    DEVICE_PRIVATE,
    DEVICE_PUBLIC,
    MODELS_DIR,
    ROOT,
    SIGNER_PRIVATE,
    SIGNER_PUBLIC,
    demo_trust,
)

STUDENT_PACKAGE = MODELS_DIR / "clinc150-student.edgepkg"
CHECK_SCRIPT = ROOT / "scripts" / "offline-install-check.sh"
THIS_PYTHON = "{}.{}".format(*sys.version_info[:2])


def student_manifest() -> dict:
    """The manifest of the default student package, read without verification."""
    with zipfile.ZipFile(STUDENT_PACKAGE) as archive:
        return json.loads(archive.read("manifest.json"))


# Targets


def test_short_forms_mean_manylinux_2_28():
    for name, machine in [
        ("aarch64", "aarch64"),
        ("arm64", "aarch64"),
        ("x86_64", "x86_64"),
        ("amd64", "x86_64"),
    ]:
        target = resolve_target(name, "3.11")
        assert target.machine == machine
        assert target.libc == "glibc"
        assert target.libc_version == (2, 28)
        assert target.platform_tags[0] == f"manylinux_2_28_{machine}"
        assert f"manylinux2014_{machine}" in target.platform_tags
        assert target.python_tag == "cp311"


def test_aarch64_tags_stop_at_manylinux2014():
    target = resolve_target("aarch64", "3.11")
    expected = [f"manylinux_2_{minor}_aarch64" for minor in range(28, 16, -1)]
    expected.insert(expected.index("manylinux_2_17_aarch64") + 1, "manylinux2014_aarch64")
    assert list(target.platform_tags) == expected


def test_manylinux2014_tag_means_glibc_2_17():
    target = resolve_target("manylinux2014_aarch64", "3.12")
    assert target.libc_version == (2, 17)
    assert target.platform_tags == ("manylinux_2_17_aarch64", "manylinux2014_aarch64")
    assert target.python_version == "3.12"
    assert target.requested == "manylinux2014_aarch64"


def test_x86_tags_include_legacy_names():
    target = resolve_target("manylinux_2_12_x86_64", "3.11")
    assert target.platform_tags[0] == "manylinux_2_12_x86_64"
    assert target.platform_tags[-1] == "manylinux1_x86_64"
    assert "manylinux2010_x86_64" in target.platform_tags
    assert "manylinux_2_5_x86_64" in target.platform_tags
    assert "manylinux2014_x86_64" not in target.platform_tags  # glibc 2.17 is newer than 2.12
    assert len(target.platform_tags) == 8 + 2


def test_musllinux_tags():
    target = resolve_target("musllinux_1_2_aarch64", "3.11")
    assert target.libc == "musl"
    assert target.platform_tags == (
        "musllinux_1_2_aarch64",
        "musllinux_1_1_aarch64",
        "musllinux_1_0_aarch64",
    )


def test_default_target_is_this_machine():
    target = resolve_target()
    libc, version = platform.libc_ver()
    major, minor = (int(part) for part in version.split(".")[:2])
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine()
    )
    assert libc == "glibc"
    assert target.machine == machine
    assert target.python_version == THIS_PYTHON
    assert target.libc_version == (major, minor)
    assert target.platform_tags[0] == f"manylinux_{major}_{minor}_{machine}"
    assert target.requested == "this machine"


@pytest.mark.parametrize(
    "value",
    ["win_amd64", "macosx_14_0_arm64", "manylinux2014_sparc", "linux_x86_64", "aarch65", ""],
)
def test_unsupported_platform_rejected(value):
    with pytest.raises(ConfigError, match="--platform"):
        resolve_target(value, "3.11")


def test_glibc_below_manylinux_floor_rejected():
    with pytest.raises(ConfigError, match="manylinux_2_17_aarch64"):
        resolve_target("manylinux_2_12_aarch64", "3.11")


@pytest.mark.parametrize("value", ["3", "2.7", "3.11.4", "py311", "three"])
def test_invalid_python_version_rejected(value):
    with pytest.raises(ConfigError, match="--python-version"):
        resolve_target("aarch64", value)


def test_python_below_requires_python_rejected():
    target = resolve_target("aarch64", "3.9")
    with pytest.raises(ConfigError, match=r"3\.9 is older than the runtime supports"):
        check_requires_python(">=3.10", target)
    check_requires_python(">=3.10", resolve_target("aarch64", "3.10"))


# Wheel metadata and pip's errors


def test_wheel_metadata_leaves_out_extras(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    metadata = "\n".join(
        [
            "Metadata-Version: 2.4",
            "Name: edge-runtime",
            "Version: 1.2.3",
            "Requires-Python: >=3.10",
            "Requires-Dist: onnxruntime>=1.20",
            "Requires-Dist: numpy>=1.24",
            'Requires-Dist: tomli>=2; python_version < "3.11"',
            "Provides-Extra: gateway",
            'Requires-Dist: starlette>=0.40; extra == "gateway"',
            'Requires-Dist: tomli>=2; python_version < "3.11" and extra == "gateway"',
            "",
            "Requires-Dist: not-a-header-in-the-description",
        ]
    )
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo-1.0.dist-info/METADATA", metadata)
    info = read_wheel_metadata(wheel)
    assert info["name"] == "edge-runtime"
    assert info["version"] == "1.2.3"
    assert info["requires_python"] == ">=3.10"
    assert info["requirements"] == [
        "onnxruntime>=1.20",
        "numpy>=1.24",
        'tomli>=2; python_version < "3.11"',
    ]


def test_pip_no_matching_distribution_parsed():
    output = [
        "Collecting onnxruntime>=1.20",
        "ERROR: Could not find a version that satisfies the requirement onnxruntime>=1.20 "
        "(from versions: 1.15.0, 1.16.3)",
        "ERROR: No matching distribution found for onnxruntime>=1.20",
    ]
    assert bundle_wheels._missing_dependency(output) == ("onnxruntime>=1.20", ["1.15.0", "1.16.3"])
    assert bundle_wheels._missing_dependency(
        output[:1]
        + [
            "ERROR: Could not find a version that satisfies the requirement numpy (from versions: "
            "none)",
            "ERROR: No matching distribution found for numpy",
        ]
    ) == ("numpy", [])
    assert (
        bundle_wheels._missing_dependency(["ERROR: Could not install packages due to an OSError"])
        is None
    )


# Keys, package and output: every check runs before the wheel build and the download


def bundle_with(tmp_path, **changes):
    """Call build_bundle with the demo package and keys, changed by ``changes``."""
    arguments = {
        "package": STUDENT_PACKAGE,
        "signer_key": SIGNER_PUBLIC,
        "device_key": str(DEVICE_PRIVATE),
        "output": tmp_path / "b.tar.gz",
    }
    arguments.update(changes)
    return build_bundle(**arguments)


def test_private_signer_key_rejected(tmp_path):
    output = tmp_path / "out" / "bundle.tar.gz"
    with pytest.raises(PrivateKeyError, match="is a private key") as raised:
        bundle_with(tmp_path, signer_key=SIGNER_PRIVATE, output=output, platform_tag="aarch64")
    assert str(SIGNER_PRIVATE) in str(raised.value)
    assert "BEGIN" not in str(raised.value)
    assert not output.parent.exists()


def test_signing_key_as_device_key_rejected(tmp_path):
    output = tmp_path / "bundle.tar.gz"
    with pytest.raises(PrivateKeyError, match="private key of the package's signer"):
        bundle_with(tmp_path, device_key=str(SIGNER_PRIVATE), output=output,
                    platform_tag="aarch64")
    assert list(tmp_path.iterdir()) == []


def test_device_key_reference_checks():
    from edge_runtime import signing

    signer_id = signing.key_id(signing.load_public_key_pem(SIGNER_PUBLIC.read_bytes()))
    with pytest.raises(ConfigError, match="not an absolute path"):
        bundle.check_device_key_reference("keys/device.key.pem", signer_id)
    with pytest.raises(ConfigError, match="is a public key"):
        bundle.check_device_key_reference(str(DEVICE_PUBLIC), signer_id)
    # The device's own private key, and a path this machine does not have, are recorded.
    assert bundle.check_device_key_reference(str(DEVICE_PRIVATE), signer_id) == str(DEVICE_PRIVATE)
    assert (
        bundle.check_device_key_reference("/etc/edge-runtime/device.key.pem", signer_id)
        == "/etc/edge-runtime/device.key.pem"
    )


def test_missing_package_rejected(tmp_path):
    with pytest.raises(BundleError, match="package file not found: .*nothing.edgepkg"):
        bundle_with(tmp_path, package=tmp_path / "nothing.edgepkg")


def test_package_from_another_signer_rejected(tmp_path):
    # The device public key is a valid P-256 key, but not the one that signed the package.
    with pytest.raises(BundleError, match="does not verify with the signer key"):
        bundle_with(tmp_path, signer_key=DEVICE_PUBLIC)


def test_unsigned_package_rejected(tmp_path):
    from edge_runtime import encryption
    from edge_runtime.package import read_package, rebuild_package

    unsigned = rebuild_package(
        read_package(STUDENT_PACKAGE, demo_trust()),
        tmp_path / "unsigned.edgepkg",
        recipients=[encryption.load_public_key(DEVICE_PUBLIC)],
    )
    with pytest.raises(BundleError, match="is not signed"):
        bundle_with(tmp_path, package=unsigned)


def test_unwritable_output_rejected(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    with pytest.raises(BundleError, match="cannot write --output"):
        bundle_with(tmp_path, output=blocker / "bundle.tar.gz",
                    wheel=tmp_path / "never-read.whl")
    with pytest.raises(BundleError, match="is a folder"):
        bundle_with(tmp_path, output=tmp_path)
    with pytest.raises(ConfigError, match="must end with .tar.gz or .tgz"):
        bundle_with(tmp_path, output=tmp_path / "bundle.zip")


def test_cli_reports_private_key(capsys):
    status = cli.main(
        [
            "bundle",
            "--signer-key",
            str(SIGNER_PRIVATE),
            "--package",
            str(STUDENT_PACKAGE),
            "--platform",
            "aarch64",
        ]
    )
    stderr = capsys.readouterr().err
    assert status == 2
    assert stderr.startswith("edge-runtime bundle: error: --signer-key")
    assert "is a private key" in stderr


# The install script, on a small bundle laid out by hand


def install_values(**changes: str) -> dict[str, str]:
    target = resolve_target()
    values = {
        "BUNDLE_FORMAT": bundle.BUNDLE_FORMAT,
        "RUNTIME_REQUIREMENT": "edge-runtime==0.1.0",
        "TARGET_PYTHON": target.python_version,
        "TARGET_MACHINE": target.machine,
        "TARGET_LIBC": "glibc",
        "TARGET_LIBC_VERSION": "2.17",
        "PACKAGE_FILE": "models/demo.edgepkg",
        "SIGNER_KEY_FILE": "keys/demo-signer.pub.pem",
        "DEVICE_KEY": "/etc/edge-runtime/device.key.pem",
        "SELF_TEST_QUERY": "set an alarm for 7 am",
        "SELF_TEST_LABEL": "alarm",
        "BENCH_OPTIONS": bundle.SELF_TEST_BENCH_OPTIONS,
    }
    values.update(changes)
    return values


def lay_out_bundle(root: Path, **changes: str) -> Path:
    """Write a bundle-shaped folder with small stand-in files and a real install.sh and
    SHA256SUMS, and return the install script's path."""
    (root / "wheelhouse").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "keys").mkdir()
    (root / "wheelhouse" / "demo-1.0-py3-none-any.whl").write_bytes(os.urandom(4096))
    (root / "models" / "demo.edgepkg").write_bytes(os.urandom(8192))
    shutil.copy(SIGNER_PUBLIC, root / "keys" / "demo-signer.pub.pem")
    (root / "bundle.json").write_text("{}\n")
    script = root / "install.sh"
    script.write_text(render_install_script(install_values(**changes)))
    (root / "SHA256SUMS").write_text(checksum_list(root))
    return script


def run_install(script: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(script), "--python", sys.executable, *options],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_checksum_list_format(tmp_path):
    lay_out_bundle(tmp_path)
    lines = (tmp_path / "SHA256SUMS").read_text().splitlines()
    names = [line.split("  ", 1)[1] for line in lines]
    assert names == sorted(names)
    assert names == [
        "bundle.json",
        "install.sh",
        "keys/demo-signer.pub.pem",
        "models/demo.edgepkg",
        "wheelhouse/demo-1.0-py3-none-any.whl",
    ]
    for line in lines:
        digest, name = line.split("  ", 1)
        assert digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


def test_checksum_list_readable_by_sha256sum(tmp_path):
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum (GNU coreutils or busybox) is not installed")
    lay_out_bundle(tmp_path)
    result = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": OK") == 5


def test_install_script_accepts_intact_bundle(tmp_path):
    script = lay_out_bundle(tmp_path)
    result = run_install(script, "--check-only")
    assert result.returncode == 0, result.stderr
    assert "install.sh: 5 files match SHA256SUMS" in result.stdout
    assert f"CPython {THIS_PYTHON}" in result.stdout
    assert "nothing installed (--check-only)" in result.stdout


def test_install_script_catches_flipped_byte(tmp_path):
    script = lay_out_bundle(tmp_path)
    package = tmp_path / "models" / "demo.edgepkg"
    data = bytearray(package.read_bytes())
    data[1000] ^= 0x01
    package.write_bytes(bytes(data))
    result = run_install(script)  # a full install, which must stop before the venv
    assert result.returncode == 1
    assert re.search(
        r"models/demo\.edgepkg has SHA-256 [0-9a-f]{64}; SHA256SUMS lists", result.stderr
    )
    assert "the bundle is damaged or was changed" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_install_script_catches_added_and_missing_files(tmp_path):
    script = lay_out_bundle(tmp_path)
    (tmp_path / "wheelhouse" / "extra-9.9-py3-none-any.whl").write_bytes(b"not listed")
    (tmp_path / "keys" / "demo-signer.pub.pem").unlink()
    result = run_install(script, "--check-only")
    assert result.returncode == 1
    assert "wheelhouse/extra-9.9-py3-none-any.whl is not listed in SHA256SUMS" in result.stderr
    assert "keys/demo-signer.pub.pem is listed in SHA256SUMS but missing" in result.stderr


def test_install_script_rejects_other_interpreter(tmp_path):
    script = lay_out_bundle(
        tmp_path, TARGET_PYTHON="3.99", TARGET_MACHINE="s390x", TARGET_LIBC_VERSION="9.99"
    )
    result = run_install(script, "--check-only")
    assert result.returncode == 1
    assert f"the interpreter is Python {THIS_PYTHON}; the bundle needs 3.99" in result.stderr
    assert "the bundle is for s390x" in result.stderr
    assert "the bundle needs 9.99 or newer" in result.stderr
    assert "edge-runtime bundle --platform" in result.stderr


def test_install_script_needs_device_key_first(tmp_path):
    script = lay_out_bundle(tmp_path, DEVICE_KEY=str(tmp_path / "missing.key.pem"))
    result = run_install(script)
    assert result.returncode == 1
    assert f"device key {tmp_path / 'missing.key.pem'} not found" in result.stderr
    assert not (tmp_path / "venv").exists()
    checked = run_install(script, "--check-only")  # checks only, so no key is needed
    assert checked.returncode == 0, checked.stderr


def test_install_script_values_are_quoted(tmp_path):
    device_key = "/etc/it's $HOME/`id`/device.key.pem"
    script = lay_out_bundle(tmp_path, DEVICE_KEY=device_key)
    result = run_install(script, "--help")
    assert result.returncode == 0, result.stderr
    assert f"(default: {device_key})" in result.stdout


def test_install_script_placeholders_checked():
    with pytest.raises(ValueError, match="missing \\['BENCH_OPTIONS'\\]"):
        values = install_values()
        del values["BENCH_OPTIONS"]
        render_install_script(values)
    with pytest.raises(ValueError, match="unknown \\['EXTRA'\\]"):
        render_install_script(install_values(EXTRA="x"))


# A real bundle for this machine: pip download from the configured index, then an offline
# install. Slow: about 15 s to build (with pip's cache) and 30 s to install and self-test.


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory) -> Path:
    return build_project_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


@dataclass(frozen=True)
class BuiltBundle:
    path: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def built_bundle(project_wheel, tmp_path_factory) -> BuiltBundle:
    """A bundle for this machine, built once through the command line."""
    output = tmp_path_factory.mktemp("bundle") / "edge-bundle.tar.gz"
    command = [
        sys.executable,
        "-m",
        "edge_runtime",
        "bundle",
        "--package",
        str(STUDENT_PACKAGE),
        "--signer-key",
        str(SIGNER_PUBLIC),
        "--device-key",
        str(DEVICE_PRIVATE),
        "--output",
        str(output),
        "--wheel",
        str(project_wheel),
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return BuiltBundle(output, result.stdout, result.stderr)


@pytest.mark.slow
def test_bundle_command_output(built_bundle):
    assert "downloading wheels for CPython" in built_bundle.stderr
    assert re.search(
        r"^  saved onnxruntime-\S+\.whl \(\d+\.\d MB\)$", built_bundle.stderr, re.MULTILINE
    )
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(built_bundle.path.stat().st_mode) == 0o666 & ~umask
    size_mb = built_bundle.path.stat().st_size / 1e6
    assert f"wrote {built_bundle.path}: {size_mb:.1f} MB, " in built_bundle.stdout
    digest = hashlib.sha256(built_bundle.path.read_bytes()).hexdigest()
    assert f"sha256 {digest}  edge-bundle.tar.gz" in built_bundle.stdout
    assert (
        "on the device: tar -xzf edge-bundle.tar.gz && sh edge-bundle/install.sh"
        in built_bundle.stdout
    )


@pytest.mark.slow
def test_bundle_contents(built_bundle):
    with tarfile.open(built_bundle.path) as tar:
        members = {member.name: member for member in tar.getmembers()}
        files = {
            name: tar.extractfile(member).read()
            for name, member in members.items()
            if member.isfile() and not name.endswith(".whl")
        }
    assert all(name == "edge-bundle" or name.startswith("edge-bundle/") for name in members)
    assert members["edge-bundle/install.sh"].mode == 0o755
    wheels = sorted(name.split("/")[-1] for name in members if name.endswith(".whl"))
    assert f", {len(wheels)} wheels, " in built_bundle.stdout
    for name in (
        "edge_runtime-0.1.0-",
        "onnxruntime-",
        "numpy-",
        "tokenizers-",
        "cryptography-",
        "httpx-",
    ):
        assert any(wheel.startswith(name) for wheel in wheels), name
    for extra in ("starlette-", "uvicorn-", "torch-", "transformers-", "pytest-"):
        assert not any(wheel.startswith(extra) for wheel in wheels), extra

    listed = [
        line.split("  ", 1)[1] for line in files["edge-bundle/SHA256SUMS"].decode().splitlines()
    ]
    assert sorted(listed) == sorted(
        name[len("edge-bundle/") :]
        for name, member in members.items()
        if member.isfile() and name != "edge-bundle/SHA256SUMS"
    )
    assert files["edge-bundle/models/clinc150-student.edgepkg"] == STUDENT_PACKAGE.read_bytes()
    assert files["edge-bundle/keys/demo-signer.pub.pem"] == SIGNER_PUBLIC.read_bytes()
    for name, data in files.items():
        assert b"PRIVATE KEY" not in data, name

    manifest = json.loads(files["edge-bundle/bundle.json"])
    assert manifest["format"] == "edge-runtime-bundle/1"
    assert manifest["device_key"]["path"] == str(DEVICE_PRIVATE)
    assert manifest["target"]["python_version"] == THIS_PYTHON
    assert manifest["target"]["platform_tags"] == list(resolve_target().platform_tags)
    golden = student_manifest()["golden"][0]
    assert manifest["package"]["name"] == student_manifest()["name"]
    assert manifest["self_test"]["query"] == golden["text"]
    assert manifest["self_test"]["expected_label"] == golden["label"]
    assert sorted(entry["file"] for entry in manifest["wheels"]) == wheels


@pytest.mark.slow
def test_offline_install_self_test(built_bundle, project_wheel):
    version = project_wheel.name.split("-")[1]
    manifest = student_manifest()
    golden = manifest["golden"][0]
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        ["sh", str(CHECK_SCRIPT), str(built_bundle.path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert re.search(r"install\.sh: \d+ files match SHA256SUMS", output)
    assert "Successfully installed" in output
    installed = re.search(rf"edge-runtime {re.escape(version)} imported from (\S+)", output)
    assert installed, output[-4000:]
    assert "/venv/" in installed[1]
    assert f"ok  {manifest['name']} version {manifest['version']} is trusted" in output
    assert f"install.sh: query {golden['text']!r} -> {golden['label']} (source local," in output
    assert "Cold start: 1 fresh process(es)" in output
    assert "Warm single-query latency: 20 queries per row" in output
    count = len(manifest["golden"])
    assert f"golden inputs: {count} of {count} match on this CPU" in output
    assert "install.sh: self-test passed" in output
    assert "offline-install-check: passed" in output


@pytest.mark.slow
def test_target_without_wheel_names_dependency(project_wheel, tmp_path):
    # The last onnxruntime with a manylinux2014 (glibc 2.17) aarch64 wheel is 1.16.3.
    output = tmp_path / "bundle.tar.gz"
    with pytest.raises(MissingWheelError) as raised:
        bundle_with(tmp_path, output=output, platform_tag="manylinux2014_aarch64",
                    python_version="3.11", wheel=project_wheel)
    error = raised.value
    assert error.dependency == "onnxruntime"
    assert error.requirement == "onnxruntime>=1.20"
    message = str(error)
    assert "no binary wheel of onnxruntime (onnxruntime>=1.20)" in message
    assert "on aarch64, glibc 2.17 or newer" in message
    assert "manylinux_2_17_aarch64" in message
    assert list(tmp_path.iterdir()) == []
