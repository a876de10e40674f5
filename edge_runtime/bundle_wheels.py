"""Targets and wheels of ``edge-runtime bundle``: the pip platform tags that a target device
accepts, the edge-runtime wheel, and the wheelhouse that ``pip download`` resolves for the
target.

NOTE: pip evaluates the environment markers of dependencies against the machine that builds
the bundle, not the target (issue 11664 of github.com/pypa/pip). The base dependencies have no
markers, but a transitive dependency that a marker limits to another CPU would be missing from
a cross-built wheelhouse. The install then fails on the device with pip's "No matching
distribution" naming it, before anything is installed.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError, EdgeRuntimeError

# The edge-runtime command imports this module (through edge_runtime.bundle) to register the
# subcommand, so the modules that only a build uses are imported in the functions that use them.

# The short forms x86_64 and aarch64 mean manylinux_2_28, because onnxruntime 1.30 to 1.32
# publish Linux wheels for glibc 2.28 and newer only (1.16.3 is the last one with a glibc 2.17
# wheel). Debian 10, Ubuntu 20.04, Raspberry Pi OS 11 and later releases ship glibc 2.28 or newer.
SHORT_FORM_GLIBC = (2, 28)
MACHINE_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
# CPU names that manylinux and musllinux tags use.
KNOWN_MACHINES = ("x86_64", "i686", "aarch64", "armv7l", "ppc64le", "s390x", "riscv64")
# The legacy manylinux names of glibc levels (PEP 600 keeps them as aliases).
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}

Progress = Callable[[str], None]


class BundleError(EdgeRuntimeError):
    """A bundle cannot be built: an input is missing or unusable, pip failed, or the output
    cannot be written."""


class MissingWheelError(BundleError):
    """pip found no binary wheel of a dependency for the bundle's target.

    ``dependency`` is the distribution name, ``requirement`` the requirement pip could not
    meet, ``target`` the target's description and ``versions`` the versions that pip found a
    wheel of for the target (none of them meets the requirement).
    """

    def __init__(self, dependency: str, requirement: str, target: Target, versions: Sequence[str]):
        self.dependency = dependency
        self.requirement = requirement
        self.target = target.describe()
        self.versions = tuple(versions)
        if versions:
            found = (
                f"{dependency} has wheels for this target only in versions "
                f"{', '.join(versions)}, which do not meet {requirement}"
            )
        else:
            found = f"{dependency} publishes no wheel for this target"
        super().__init__(
            f"no binary wheel of {dependency} ({requirement}) for {self.target}: {found}. "
            f"Choose a target that {dependency} has wheels for, such as --platform aarch64 or "
            "x86_64 (glibc 2.28 or newer), or another --python-version"
        )


@dataclass(frozen=True)
class Target:
    """The platform a bundle is built for.

    ``libc_version`` is the oldest glibc (or musl) version the target may have, and
    ``platform_tags`` are the pip platform tags such a device accepts, newest first.
    ``requested`` is the --platform value, or "this machine".
    """

    machine: str
    python_version: str
    libc: str
    libc_version: tuple[int, int]
    platform_tags: tuple[str, ...]
    requested: str

    @property
    def python_tag(self) -> str:
        return "cp" + self.python_version.replace(".", "")

    def describe(self) -> str:
        version = ".".join(str(part) for part in self.libc_version)
        return (
            f"CPython {self.python_version} on {self.machine}, {self.libc} {version} or "
            f"newer (pip platform {self.platform_tags[0]})"
        )


# Targets


def resolve_target(platform_tag: str | None = None, python_version: str | None = None) -> Target:
    """Return the target for a --platform value and a Python version.

    ``platform_tag`` is None for this machine. ``x86_64``, ``amd64``, ``aarch64`` and
    ``arm64`` mean a manylinux_2_28 device. A manylinux tag (``manylinux_2_31_aarch64``,
    ``manylinux2014_x86_64``) or musllinux tag (``musllinux_1_2_x86_64``) names the oldest C
    library the device may have. ``python_version`` is ``3.N``, by default this interpreter's.
    Raises ConfigError for any other value.
    """
    if python_version is None:
        python_version = "{}.{}".format(*sys.version_info[:2])
    if not re.fullmatch(r"3\.\d{1,2}", python_version.strip()):
        raise ConfigError(
            f"--python-version {python_version!r} is not a CPython version; "
            "give major.minor, such as 3.11"
        )
    python_version = python_version.strip()

    if platform_tag is None:
        machine, libc, libc_version = _this_machine()
        requested = "this machine"
    else:
        machine, libc, libc_version = _parse_platform(platform_tag)
        requested = platform_tag
    tags = platform_tags(machine, libc, libc_version)
    return Target(
        machine=machine,
        python_version=python_version,
        libc=libc,
        libc_version=libc_version,
        platform_tags=tags,
        requested=requested,
    )


def platform_tags(machine: str, libc: str, libc_version: tuple[int, int]) -> tuple[str, ...]:
    """Return the pip platform tags that a device with this CPU and C library accepts, newest
    first: every manylinux_2_N (or musllinux_1_N) level up to ``libc_version``, with the
    legacy manylinux names of the levels that have one."""
    major, minor = libc_version
    tags = []
    if libc == "glibc":
        # manylinux starts at glibc 2.5 on x86, and at 2.17 (manylinux2014) on other CPUs.
        lowest = 5 if machine in ("x86_64", "i686") else 17
        if major != 2 or minor < lowest:
            raise ConfigError(
                f"glibc {major}.{minor} has no manylinux tag for {machine}; "
                f"the oldest is manylinux_2_{lowest}_{machine}"
            )
        legacy_names = {level: name for name, level in LEGACY_MANYLINUX.items()}
        for level in range(minor, lowest - 1, -1):
            tags.append(f"manylinux_2_{level}_{machine}")
            if (2, level) in legacy_names:
                tags.append(f"{legacy_names[(2, level)]}_{machine}")
    elif libc == "musl":
        if major != 1:
            raise ConfigError(
                f"musl {major}.{minor} has no musllinux tag; musllinux tags "
                "name musl 1.x, such as musllinux_1_2"
            )
        tags = [f"musllinux_1_{level}_{machine}" for level in range(minor, -1, -1)]
    else:
        raise ConfigError(f"C library {libc!r} is not glibc or musl")
    return tuple(tags)


def _parse_platform(value: str) -> tuple[str, str, tuple[int, int]]:
    text = value.strip().lower()
    if text in MACHINE_ALIASES:
        return MACHINE_ALIASES[text], "glibc", SHORT_FORM_GLIBC
    legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", text)
    modern = re.fullmatch(r"(manylinux|musllinux)_(\d+)_(\d+)_(\w+)", text)
    if legacy:
        machine, libc, version = legacy[2], "glibc", LEGACY_MANYLINUX[legacy[1]]
    elif modern:
        machine = modern[4]
        libc = "glibc" if modern[1] == "manylinux" else "musl"
        version = (int(modern[2]), int(modern[3]))
    else:
        raise ConfigError(
            f"--platform {value!r} is not a supported target; use x86_64 or aarch64, a "
            "manylinux tag such as manylinux_2_28_aarch64 or manylinux2014_x86_64, or a "
            "musllinux tag such as musllinux_1_2_x86_64"
        )
    if machine not in KNOWN_MACHINES:
        raise ConfigError(
            f"--platform {value!r} names CPU {machine!r}, which no manylinux or "
            f"musllinux tag uses; use one of {', '.join(KNOWN_MACHINES)}"
        )
    return machine, libc, version


def _this_machine() -> tuple[str, str, tuple[int, int]]:
    import platform

    if not sys.platform.startswith("linux"):
        raise ConfigError(
            f"bundles are for Linux devices and this machine runs {sys.platform}; "
            "pass --platform, for example aarch64 or x86_64"
        )
    machine = MACHINE_ALIASES.get(platform.machine().lower(), platform.machine())
    libc, version = platform.libc_ver()
    match = re.match(r"(\d+)\.(\d+)", version)
    if libc != "glibc" or match is None:
        raise ConfigError(
            "this machine's C library is not glibc, so its platform cannot be "
            f"derived; pass --platform, such as musllinux_1_2_{machine}"
        )
    return machine, "glibc", (int(match[1]), int(match[2]))


# Wheels


def build_project_wheel(
    source: str | Path, dest: str | Path, progress: Progress | None = None
) -> Path:
    """Build the edge-runtime wheel from the checkout ``source`` into ``dest`` with
    ``pip wheel --no-deps``, and return its path.

    The build runs on a copy of pyproject.toml, README.md and edge_runtime/, so that it leaves
    no build/ or egg-info folder in the checkout. NOTE: a file that pyproject.toml starts to
    need (a license file, another package) must be added to the copy here.
    """
    import shutil
    import subprocess
    import tempfile

    source, dest = Path(source), Path(dest)
    if not (source / "pyproject.toml").is_file() or not (source / "edge_runtime").is_dir():
        raise BundleError(
            f"{source} is not an edge-runtime checkout (no pyproject.toml and "
            "edge_runtime/); pass --source with the repository folder, or "
            "--wheel with a built edge-runtime wheel"
        )
    send_progress(progress, f"building the edge-runtime wheel from {source}")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-runtime-wheel-") as scratch:
        copy = Path(scratch) / "source"
        copy.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(source / name, copy / name)
        shutil.copytree(
            source / "edge_runtime",
            copy / "edge_runtime",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        command = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(dest),
            str(copy),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise BundleError(
            f"pip wheel failed with exit code {completed.returncode} for {source}:"
            f"\n{_tail(completed.stdout + completed.stderr)}"
        )
    wheels = sorted(dest.glob("edge_runtime-*.whl"))
    if len(wheels) != 1:
        raise BundleError(
            f"pip wheel wrote {len(wheels)} edge_runtime wheels to {dest}; expected one"
        )
    return wheels[0]


def read_wheel_metadata(wheel: str | Path) -> dict[str, Any]:
    """Return the name, version, Requires-Python and base requirements (the Requires-Dist
    entries that no extra selects) of a wheel."""
    import zipfile

    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [
                name
                for name in archive.namelist()
                if name.count("/") == 1 and name.endswith(".dist-info/METADATA")
            ]
            if len(names) != 1:
                raise BundleError(
                    f"{wheel} has {len(names)} .dist-info/METADATA files; expected one"
                )
            text = archive.read(names[0]).decode("utf-8")
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"cannot read the wheel {wheel}: {exc}") from None
    headers = _metadata_headers(text)
    requirements = [
        requirement
        for requirement in headers.get("Requires-Dist", [])
        if not re.search(r";.*\bextra\s*==", requirement)
    ]
    return {
        "name": _first(headers, "Name"),
        "version": _first(headers, "Version"),
        "requires_python": _first(headers, "Requires-Python"),
        "requirements": requirements,
    }


def _metadata_headers(text: str) -> dict[str, list[str]]:
    """Return the values of each header of a core metadata file (RFC 822 style: the headers
    end at the first empty line, and indented lines continue the previous header)."""
    headers: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        if line[0] in " \t":
            continue  # a continuation line; only Description and License use them
        name, separator, value = line.partition(":")
        if separator:
            headers.setdefault(name.strip(), []).append(value.strip())
    return headers


def _first(headers: dict[str, list[str]], name: str) -> str:
    return headers[name][0] if headers.get(name) else ""


def check_requires_python(requires_python: str, target: Target) -> None:
    """Raise ConfigError when the target's Python is below a ``>=3.N`` bound of
    Requires-Python. Other specifier forms are left to pip on the device."""
    have = tuple(int(part) for part in target.python_version.split("."))
    for specifier in requires_python.split(","):
        bound = re.fullmatch(r"\s*>=\s*(\d+)\.(\d+)\s*", specifier)
        if bound and have < (int(bound[1]), int(bound[2])):
            raise ConfigError(
                f"--python-version {target.python_version} is older than the "
                f"runtime supports ({requires_python.strip()})"
            )


def download_wheelhouse(
    requirements: Sequence[str], target: Target, dest: str | Path, progress: Progress | None = None
) -> list[Path]:
    """Download binary wheels of ``requirements`` and their dependencies for ``target`` into
    ``dest`` and return their paths.

    Uses the package index that pip is configured with on this machine. Raises
    MissingWheelError when a dependency has no wheel for the target, and BundleError when pip
    fails for another reason (no network, a conflict).
    """
    import subprocess

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        target.python_version,
        "--dest",
        str(dest),
        "--progress-bar",
        "off",
        "--disable-pip-version-check",
    ]
    for tag in target.platform_tags:
        command += ["--platform", tag]
    command += list(requirements)
    send_progress(
        progress, f"downloading wheels for {target.describe()}: {', '.join(requirements)}"
    )

    output: list[str] = []
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert process.stdout is not None  # stdout=PIPE
    with process.stdout:
        for line in process.stdout:
            line = line.rstrip()
            output.append(line)
            _report_pip_line(line, dest, progress)
    returncode = process.wait()
    if returncode != 0:
        missing = _missing_dependency(output)
        if missing is not None:
            requirement, versions = missing
            name = re.match(r"[A-Za-z0-9._-]+", requirement)
            raise MissingWheelError(name[0] if name else requirement, requirement, target, versions)
        raise BundleError(
            f"pip download failed with exit code {returncode} for "
            f"{target.describe()}:\n{_tail(output)}"
        )

    files = sorted(dest.iterdir())
    not_wheels = [path.name for path in files if path.suffix != ".whl"]
    if not_wheels:
        raise BundleError(f"pip download wrote files that are not wheels: {not_wheels}")
    return files


def _report_pip_line(line: str, dest: Path, progress: Progress | None) -> None:
    for prefix in ("Collecting ", "Processing "):
        if line.startswith(prefix):
            send_progress(progress, f"  resolving {line[len(prefix) :]}")
            return
    if line.lstrip().startswith("Downloading "):
        send_progress(progress, f"  downloading {line.strip()[len('Downloading ') :]}")
        return
    saved = re.match(r"(?:Saved|File was already downloaded) (.+\.whl)$", line)
    if saved:
        path = Path(saved[1])
        path = path if path.is_absolute() else dest / path.name
        size = f" ({path.stat().st_size / 1e6:.1f} MB)" if path.is_file() else ""
        send_progress(progress, f"  saved {path.name}{size}")


def _missing_dependency(output: Sequence[str]) -> tuple[str, list[str]] | None:
    """Return the requirement and the versions found from pip's "No matching distribution"
    error, or None when pip failed for another reason."""
    text = "\n".join(output)
    missing = re.search(r"No matching distribution found for (\S+)", text)
    if missing is None:
        return None
    requirement = missing[1]
    versions: list[str] = []
    found = re.search(
        r"satisfies the requirement " + re.escape(requirement) + r" \(from versions: ([^)]*)\)",
        text,
    )
    if found and found[1].strip() != "none":
        versions = [version.strip() for version in found[1].split(",") if version.strip()]
    return requirement, versions


def _tail(output: str | Sequence[str], lines: int = 15) -> str:
    text = output.splitlines() if isinstance(output, str) else list(output)
    return "\n".join(text[-lines:])


def send_progress(progress: Progress | None, message: str) -> None:
    """Pass ``message`` to the ``progress`` callback, unless there is none."""
    if progress is not None:
        progress(message)
