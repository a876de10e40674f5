"""``edge-runtime bundle``: one tarball that installs the runtime and a model package on a
device that has no package index.

A bundle holds, under one top-level folder:

- ``wheelhouse/``: binary wheels of the base install (the project's dependencies without
  extras), resolved for the target with ``pip download --only-binary=:all: --platform ...
  --python-version ... --implementation cp``, and the project's own wheel;
- ``models/``: the model package, whose signature is checked with the signer key at build time;
- ``keys/``: the signer's public key. The device's private key is never copied: the bundle
  records only the path where the device keeps it;
- ``bundle.json``: what the bundle was built for and from;
- ``SHA256SUMS``: the SHA-256 of every other file, in ``sha256sum`` format;
- ``install.sh``: a POSIX sh script that checks the checksums, installs with no index and runs a
  self-test (see ``edge_runtime.bundle_script``).

The target is a CPU architecture and a minimum C library version, expressed as the pip
platform tags that a device with that C library accepts (see ``edge_runtime.bundle_wheels``,
which also defines ``BundleError`` and ``MissingWheelError``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.bundle_wheels import (  # noqa: F401 (the errors are re-exported for callers)
    BundleError,
    MissingWheelError,
    Progress,
    Target,
    build_project_wheel,
    check_requires_python,
    download_wheelhouse,
    read_wheel_metadata,
    resolve_target,
    send_progress,
)
from edge_runtime.errors import ConfigError

if TYPE_CHECKING:
    import tarfile

# The edge-runtime command imports this module to register the subcommand. So the modules that
# only a build uses (tarfile, zipfile, subprocess, shutil, tempfile, hashlib, platform) are
# imported in the functions that use them. At the top they added about 40 ms to every command
# (CPython 3.11, 2-vCPU x86-64 VM, bytecode not cached).

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "edge-runtime-bundle/1"
DEFAULT_PACKAGE = "models/clinc150-student.edgepkg"
DEFAULT_SIGNER_KEY = "models/keys/demo-signer.pub.pem"
DEFAULT_DEVICE_KEY = "/etc/edge-runtime/device.key.pem"
DEFAULT_OUTPUT_FOLDER = "dist"

WHEELHOUSE = "wheelhouse"
MODELS = "models"
KEYS = "keys"
MANIFEST_FILE = "bundle.json"
CHECKSUM_FILE = "SHA256SUMS"
INSTALL_SCRIPT = "install.sh"

# A short benchmark for the self-test: one cold start, 20 timed queries, one thread.
SELF_TEST_BENCH_OPTIONS = "--runs 20 --warmup 5 --cold-runs 1 --threads 1 --batch-sizes 1,8"
# The self-test query when the package lists no golden inputs; any label is accepted then.
FALLBACK_QUERY = "set an alarm for 7 am"


class PrivateKeyError(BundleError):
    """A private key was given where the bundle takes a public key or the path of a device
    key. A bundle goes to devices, so it must never carry or point at the signing key."""


@dataclass(frozen=True)
class BundleResult:
    """A written bundle: its path, size, SHA-256, target, wheel names and package."""

    path: Path
    size_bytes: int
    sha256: str
    target: Target
    wheels: tuple[str, ...]
    package_name: str
    package_version: int
    seconds: float


# Inputs: package and keys


def load_signer_public_key(path: str | Path) -> tuple[Any, bytes]:
    """Return the signer's ECDSA P-256 public key and its PEM bytes from ``path``.

    Raises PrivateKeyError when the file contains a private key, BundleError when it cannot be
    read, and signing.SigningKeyError when it is not a P-256 public key.
    """
    from edge_runtime import signing

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BundleError(
            f"signer public key not found: {path}; pass --signer-key with the "
            "public key of the key that signed the package"
        ) from None
    except OSError as exc:
        raise BundleError(f"cannot read the signer public key {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        raise PrivateKeyError(
            f"--signer-key {path} is a private key. A bundle goes to devices, so it takes only "
            "the signer's public key (for example release-signer.pub.pem from `edge-runtime "
            "keys generate --kind signer`). Keep the private signing key off devices."
        )
    return signing.load_public_key_pem(data), data


def check_device_key_reference(reference: str, signer_key_id: str) -> str:
    """Check the path where the device keeps its private key, and return it.

    The bundle records only the path and never copies the key. When a file exists at that path
    on the build machine, it is read to check that it is not the signer's private key
    (PrivateKeyError) or a public key (ConfigError).
    """
    from edge_runtime import signing

    if not os.path.isabs(reference):
        raise ConfigError(
            f"--device-key {reference!r} is not an absolute path; give the path "
            f"of the private key on the device, such as {DEFAULT_DEVICE_KEY}"
        )
    try:
        data = Path(reference).read_bytes()
    except OSError:
        return reference  # no such file here, which is normal: the device has it
    if b"PRIVATE KEY" not in data:
        if b"PUBLIC KEY" in data:
            raise ConfigError(
                f"--device-key {reference} is a public key; the self-test needs "
                "the path of the device's private key"
            )
        return reference
    try:
        key = signing.load_private_key_pem(data)
    except signing.SigningKeyError:
        return reference  # not a P-256 key without a password, so not the signing key
    if signing.key_id(key.public_key()) == signer_key_id:
        raise PrivateKeyError(
            f"--device-key {reference} is the private key of the package's signer "
            f"(key id {signer_key_id}), not a device key. Give the path of the device's own "
            "key (from `edge-runtime keys generate --kind device`), and keep the signing key "
            "off devices."
        )
    return reference


def inspect_bundle_package(path: str | Path, signer_key: Any) -> dict[str, Any]:
    """Check that ``path`` is a package signed by ``signer_key`` and return its name,
    version, signer key id and the self-test query with its expected label.

    Nothing is decrypted: the device key is not on this machine. Raises BundleError for a
    missing, unsigned or foreign-signed package, and PackageError for a malformed one.
    """
    from edge_runtime import signing
    from edge_runtime.package import MANIFEST_NAME, SIGNATURE_NAME, read_archive

    path = Path(path)
    if not path.is_file():
        raise BundleError(
            f"package file not found: {path}; pass --package with a .edgepkg "
            "file, such as the one `python -m export build` writes"
        )
    _, members = read_archive(path)
    signature = members.pop(SIGNATURE_NAME, None)
    if signature is None:
        raise BundleError(
            f"{path} is not signed, and devices reject unsigned packages; sign "
            "it with `edge-runtime package sign` first"
        )
    try:
        verified = signing.verify_members(signature, members, [signer_key])
    except signing.SignatureError as exc:
        raise BundleError(
            f"{path} does not verify with the signer key {signing.key_id(signer_key)}: {exc}. "
            "Pass --signer-key with the public key of the key that signed the package"
        ) from None
    manifest = json.loads(members[MANIFEST_NAME])
    query, label = FALLBACK_QUERY, ""
    for item in manifest.get("golden") or []:
        if (
            isinstance(item, dict)
            and isinstance(item.get("text"), str)
            and isinstance(item.get("label"), str)
        ):
            query, label = item["text"], item["label"]
            break
    return {
        "name": manifest.get("name"),
        "version": manifest.get("version"),
        "signer_key_id": verified.signer_key_id,
        "query": query,
        "label": label,
    }


# Bundle


def checksum_list(root: str | Path) -> str:
    """Return the ``sha256sum`` lines of every file under ``root`` except SHA256SUMS itself,
    sorted by path, with paths relative to ``root``."""
    root = Path(root)
    names = sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())
    return "".join(
        f"{sha256_file(root / name)}  {name}\n" for name in names if name != CHECKSUM_FILE
    )


def sha256_file(path: str | Path) -> str:
    """Return the SHA-256 of a file in hex."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_output(target: Target) -> Path:
    """Return dist/edge-runtime-bundle-<cpu>-<python tag>.tar.gz."""
    name = f"edge-runtime-bundle-{target.machine}-{target.python_tag}.tar.gz"
    return Path(DEFAULT_OUTPUT_FOLDER) / name


def build_bundle(
    *,
    package: str | Path = DEFAULT_PACKAGE,
    signer_key: str | Path = DEFAULT_SIGNER_KEY,
    device_key: str = DEFAULT_DEVICE_KEY,
    output: str | Path | None = None,
    platform_tag: str | None = None,
    python_version: str | None = None,
    wheel: str | Path | None = None,
    source: str | Path | None = None,
    progress: Progress | None = None,
) -> BundleResult:
    """Write a bundle tarball for one target and return what was written.

    The target, the signer key (public, not private), the package (signed by that key), the
    device key path (absolute, not the signing key) and the output (writable) are checked
    before the slow steps. ``wheel`` is a built edge-runtime wheel to ship. Without it, the
    wheel is built from ``source`` (by default the checkout this module is in). ``progress``
    receives one line per step and per downloaded wheel.
    """
    import tempfile

    started = time.monotonic()
    target = resolve_target(platform_tag, python_version)
    signer_public_key, signer_pem = load_signer_public_key(signer_key)
    package_info = inspect_bundle_package(package, signer_public_key)
    device_key = check_device_key_reference(device_key, package_info["signer_key_id"])
    if Path(signer_key).resolve() == Path(DEFAULT_SIGNER_KEY).resolve():
        log.warning(
            "using the demo signer key %s, which is public and protects nothing; pass "
            "--signer-key for real packages",
            signer_key,
        )
    output = Path(output) if output is not None else default_output(target)
    top_folder = _top_folder_name(output)
    send_progress(progress, f"bundle for {target.describe()}")

    handle = _open_output(output)
    try:
        with tempfile.TemporaryDirectory(prefix="edge-runtime-bundle-") as scratch:
            if wheel is None:
                checkout = Path(__file__).resolve().parent.parent if source is None else source
                wheel = build_project_wheel(checkout, Path(scratch) / "project", progress)
            root = Path(scratch) / top_folder
            metadata, wheels = _fill_wheelhouse(root / WHEELHOUSE, Path(wheel), target, progress)
            _write_bundle_files(
                root, target, metadata, package, package_info, signer_key, signer_pem, device_key
            )
            send_progress(progress, f"writing {output}")
            _write_tarball(handle, root, top_folder)
        handle.close()
        # NamedTemporaryFile creates the file with mode 0600, so set the mode a new file gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)
        os.replace(handle.name, output)
    except BaseException:
        handle.close()
        Path(handle.name).unlink(missing_ok=True)
        raise
    return BundleResult(
        path=output,
        size_bytes=output.stat().st_size,
        sha256=sha256_file(output),
        target=target,
        wheels=wheels,
        package_name=package_info["name"],
        package_version=package_info["version"],
        seconds=time.monotonic() - started,
    )


def _fill_wheelhouse(
    wheelhouse: Path, project_wheel: Path, target: Target, progress: Progress | None
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Copy the edge-runtime wheel into ``wheelhouse`` and download its base dependencies for
    ``target`` beside it. Return the wheel's metadata and the names of all wheels."""
    import shutil

    if not project_wheel.is_file():
        raise BundleError(f"wheel not found: {project_wheel}")
    metadata = read_wheel_metadata(project_wheel)
    if metadata["name"] != "edge-runtime":
        raise BundleError(f"{project_wheel} is a wheel of {metadata['name']!r}, not edge-runtime")
    check_requires_python(metadata["requires_python"], target)
    wheelhouse.mkdir(parents=True)
    shutil.copy2(project_wheel, wheelhouse / project_wheel.name)
    downloaded = download_wheelhouse(metadata["requirements"], target, wheelhouse, progress)
    return metadata, tuple(sorted(path.name for path in downloaded))


def _write_bundle_files(
    root: Path,
    target: Target,
    metadata: dict[str, Any],
    package: str | Path,
    package_info: dict[str, Any],
    signer_key: str | Path,
    signer_pem: bytes,
    device_key: str,
) -> None:
    """Write the package, the signer key, bundle.json, install.sh and SHA256SUMS under
    ``root``, beside the filled wheelhouse."""
    import shutil

    from edge_runtime.bundle_script import render_install_script

    requirement = f"edge-runtime=={metadata['version']}"
    (root / MODELS).mkdir()
    (root / KEYS).mkdir()
    package_file = f"{MODELS}/{Path(package).name}"
    signer_file = f"{KEYS}/{Path(signer_key).name}"
    shutil.copy2(package, root / package_file)
    (root / signer_file).write_bytes(signer_pem)

    manifest = _bundle_manifest(
        target,
        metadata,
        requirement,
        package_info,
        package_file,
        signer_file,
        device_key,
        root / WHEELHOUSE,
    )
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    script = render_install_script(
        {
            "BUNDLE_FORMAT": BUNDLE_FORMAT,
            "RUNTIME_REQUIREMENT": requirement,
            "TARGET_PYTHON": target.python_version,
            "TARGET_MACHINE": target.machine,
            "TARGET_LIBC": target.libc,
            "TARGET_LIBC_VERSION": ".".join(str(part) for part in target.libc_version),
            "PACKAGE_FILE": package_file,
            "SIGNER_KEY_FILE": signer_file,
            "DEVICE_KEY": device_key,
            "SELF_TEST_QUERY": package_info["query"],
            "SELF_TEST_LABEL": package_info["label"],
            "BENCH_OPTIONS": SELF_TEST_BENCH_OPTIONS,
        }
    )
    (root / INSTALL_SCRIPT).write_text(script, encoding="utf-8")
    (root / INSTALL_SCRIPT).chmod(0o755)
    (root / CHECKSUM_FILE).write_text(checksum_list(root), encoding="utf-8")


def _write_tarball(handle: Any, root: Path, top_folder: str) -> None:
    import tarfile

    with tarfile.open(fileobj=handle, mode="w:gz", compresslevel=6) as tar:
        tar.add(root, arcname=top_folder, filter=_normalise_member)


def _bundle_manifest(
    target: Target,
    metadata: dict[str, Any],
    requirement: str,
    package_info: dict[str, Any],
    package_file: str,
    signer_file: str,
    device_key: str,
    wheelhouse: Path,
) -> dict[str, Any]:
    return {
        "format": BUNDLE_FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runtime": {
            "requirement": requirement,
            "requires_python": metadata["requires_python"],
            "dependencies": metadata["requirements"],
        },
        "target": {
            "requested": target.requested,
            "machine": target.machine,
            "python_version": target.python_version,
            "implementation": "cp",
            "libc": target.libc,
            "libc_version": ".".join(str(part) for part in target.libc_version),
            "platform_tags": list(target.platform_tags),
        },
        "package": {
            "file": package_file,
            "name": package_info["name"],
            "version": package_info["version"],
            "signer_key_id": package_info["signer_key_id"],
        },
        "signer_public_key": signer_file,
        "device_key": {
            "path": device_key,
            "note": "a path on the device; the bundle holds no private key",
        },
        "self_test": {
            "query": package_info["query"],
            "expected_label": package_info["label"],
            "bench_options": SELF_TEST_BENCH_OPTIONS,
        },
        "wheels": [
            {"file": path.name, "sha256": sha256_file(path), "size_bytes": path.stat().st_size}
            for path in sorted(wheelhouse.iterdir())
        ],
    }


def _top_folder_name(output: Path) -> str:
    """Return the name of the tarball's top-level folder: the output's name without .tar.gz.
    Raises BundleError for an output that is a folder, and ConfigError for another suffix."""
    if output.is_dir():
        raise BundleError(
            f"--output {output} is a folder; give a file name such as {output / 'bundle.tar.gz'}"
        )
    name = output.name
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    raise ConfigError(f"--output {output} must end with .tar.gz or .tgz")


def _open_output(output: Path) -> Any:
    """Create a temporary file beside ``output``, so that an unwritable output fails before
    the download and a failed build leaves no partial tarball."""
    import tempfile

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.NamedTemporaryFile(
            dir=output.parent, prefix=f".{output.name}.", suffix=".tmp", delete=False
        )
    except OSError as exc:
        raise BundleError(
            f"cannot write --output {output}: {exc.strerror or exc}; choose a writable folder"
        ) from None


def _normalise_member(member: tarfile.TarInfo) -> tarfile.TarInfo:
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    executable = member.isdir() or member.name.endswith("/" + INSTALL_SCRIPT)
    member.mode = 0o755 if executable else 0o644
    return member


# Command line


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bundle",
        help="write one tarball that installs the runtime and a package offline",
        description="Write one tarball that installs the runtime and a model package on a "
        "device with no package index: binary wheels resolved for the target, "
        "the edge-runtime wheel, the package, the signer's public key, SHA256SUMS "
        "and install.sh, which installs and runs a self-test. See docs/bundle.md.",
    )
    parser.add_argument(
        "--platform",
        metavar="TAG",
        help="target: x86_64 or aarch64 (glibc 2.28 or newer), or a pip "
        "platform tag that names the oldest C library, such as "
        "manylinux_2_31_aarch64, manylinux2014_x86_64 or "
        "musllinux_1_2_aarch64 (default: this machine)",
    )
    parser.add_argument(
        "--python-version",
        metavar="X.Y",
        help="target CPython version (default: this interpreter's, {}.{})".format(
            *sys.version_info[:2]
        ),
    )
    parser.add_argument(
        "--package", default=DEFAULT_PACKAGE, help="model package to ship (default: %(default)s)"
    )
    parser.add_argument(
        "--signer-key",
        default=DEFAULT_SIGNER_KEY,
        metavar="PEM",
        help="public key of the package's signer, copied into the bundle "
        "(default: the demo key %(default)s)",
    )
    parser.add_argument(
        "--device-key",
        default=DEFAULT_DEVICE_KEY,
        metavar="PATH",
        help="absolute path of the device's private key on the device; "
        "recorded for the self-test, never copied into the bundle "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="tarball to write, ending in .tar.gz (default: "
        f"{DEFAULT_OUTPUT_FOLDER}/edge-runtime-bundle-<cpu>-cp<XY>.tar.gz)",
    )
    parser.add_argument(
        "--wheel", metavar="WHL", help="edge-runtime wheel to ship instead of building one"
    )
    parser.add_argument(
        "--source",
        metavar="DIR",
        help="checkout to build the edge-runtime wheel from (default: the "
        "one this command runs from)",
    )


def run(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = build_bundle(
        package=args.package,
        signer_key=args.signer_key,
        device_key=args.device_key,
        output=args.output,
        platform_tag=args.platform,
        python_version=args.python_version,
        wheel=args.wheel,
        source=args.source,
        progress=progress,
    )
    top_folder = _top_folder_name(result.path)
    print(
        f"wrote {result.path}: {result.size_bytes / 1e6:.1f} MB, {len(result.wheels)} wheels, "
        f"package {result.package_name} version {result.package_version}, "
        f"for {result.target.describe()}, in {result.seconds:.1f} s"
    )
    print(f"sha256 {result.sha256}  {result.path.name}")
    print(f"on the device: tar -xzf {result.path.name} && sh {top_folder}/{INSTALL_SCRIPT}")
    return 0
