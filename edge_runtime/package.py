"""Model packages: one file holding a manifest, an ONNX model and its tokenizer.

Format, schema version 1: a ZIP archive (members stored, not compressed) with

- ``manifest.json``: UTF-8 JSON; ``schema_version``, package ``name`` and integer ``version``,
  ``task``, ``labels``, the ``model`` entry (member name, input and output names, precision,
  quantization recipe, maximum sequence length), the ``tokenizer`` entry, the confidence ``gate``
  (calibration temperature and threshold with the figures they came from; absent for a teacher),
  build ``provenance``, and ``members``: every other member with its SHA-256 and size in bytes.
- the members named there, for example ``model.onnx`` and ``tokenizer.json``.

Reading checks, in order: archive limits (member count, sizes), member names (no absolute paths,
no ``..``, no duplicates), the manifest's schema, then every member's size and digest. Every
failure is a ``PackageError`` naming the check and the value. Signing and encryption are planned
as schema version 2; a version-1 reader rejects any other schema version.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edge_runtime.errors import PackageError, PackageIntegrityError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PACKAGE_SUFFIX = ".edgepkg"

# Limits that a reader enforces before it allocates anything large.
MAX_MEMBERS = 16
MAX_MEMBER_BYTES = 512 * 1024 * 1024  # bytes
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # bytes


@dataclass(frozen=True)
class GateSettings:
    """Calibrated confidence gate: answer locally when the calibrated top-1 probability
    (softmax of logits divided by ``temperature``) is at least ``threshold``."""

    temperature: float
    threshold: float
    # How the two numbers were chosen: target, split, and the figures measured there.
    fitted_on: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a package."""

    name: str
    version: int
    task: str
    labels: tuple[str, ...]
    model_member: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    max_length: int
    precision: str
    tokenizer_member: str
    gate: GateSettings | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class ModelPackage:
    """A package read and checked in memory: the manifest and the bytes of each member."""

    path: str
    manifest: Manifest
    members: dict[str, bytes]

    @property
    def model_bytes(self) -> bytes:
        return self.members[self.manifest.model_member]

    @property
    def tokenizer_json(self) -> str:
        return self.members[self.manifest.tokenizer_member].decode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_package(path: str | Path, manifest: dict[str, Any], members: dict[str, bytes]) -> Path:
    """Write a package file atomically; ``manifest`` gets its ``members`` and ``schema_version``
    entries filled in here. Returns the written path."""
    for name in members:
        _check_member_name(name, seen=set())
    if MANIFEST_NAME in members:
        raise PackageError(f"member name {MANIFEST_NAME!r} is reserved for the manifest")
    manifest = dict(manifest)
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["members"] = {
        name: {"sha256": sha256_hex(data), "size": len(data)}
        for name, data in sorted(members.items())
    }
    _parse_manifest(manifest, source=str(path))  # a writer never produces what a reader rejects

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
                manifest_text = json.dumps(manifest, indent=2, sort_keys=True)
                archive.writestr(MANIFEST_NAME, manifest_text.encode("utf-8"))
                for name, data in sorted(members.items()):
                    archive.writestr(name, data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def read_package(source: str | Path | bytes) -> ModelPackage:
    """Read a package from a path or from its bytes, check it, and return it in memory."""
    if isinstance(source, (bytes, bytearray)):
        data, label = bytes(source), "<bytes>"
    else:
        label = str(source)
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise PackageError(
                f"package file not found: {label}; pass the path of a {PACKAGE_SUFFIX} file "
                "(the default student is models/clinc150-student.edgepkg)"
            ) from None
        except OSError as exc:
            raise PackageError(f"cannot read package {label}: {exc}") from exc

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise PackageError(f"{label} is not a model package (not a ZIP archive: {exc})") from None

    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise PackageError(f"{label} has {len(infos)} members; the limit is {MAX_MEMBERS}")
        seen: set[str] = set()
        for info in infos:
            _check_member_name(info.filename, seen, label)
            if info.file_size > MAX_MEMBER_BYTES:
                raise PackageError(
                    f"{label}: member {info.filename!r} is {info.file_size} bytes; "
                    f"the limit is {MAX_MEMBER_BYTES}"
                )
        if MANIFEST_NAME not in seen:
            raise PackageError(f"{label} has no {MANIFEST_NAME}")

        manifest_info = archive.getinfo(MANIFEST_NAME)
        if manifest_info.file_size > MAX_MANIFEST_BYTES:
            raise PackageError(
                f"{label}: {MANIFEST_NAME} is {manifest_info.file_size} bytes; "
                f"the limit is {MAX_MANIFEST_BYTES}"
            )
        try:
            raw = json.loads(archive.read(MANIFEST_NAME).decode("utf-8"))
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise PackageIntegrityError(f"{label}: {MANIFEST_NAME} is unreadable: {exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackageError(f"{label}: {MANIFEST_NAME} is not valid UTF-8 JSON: {exc}") from None
        manifest = _parse_manifest(raw, label)

        listed = set(raw["members"])
        unlisted = sorted(seen - listed - {MANIFEST_NAME})
        if unlisted:
            raise PackageIntegrityError(f"{label}: members not listed in the manifest: {unlisted}")
        members: dict[str, bytes] = {}
        mismatches = []
        for name, entry in sorted(raw["members"].items()):
            if name not in seen:
                mismatches.append(f"{name}: missing from the archive")
                continue
            try:
                blob = archive.read(name)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                mismatches.append(f"{name}: unreadable ({exc})")
                continue
            if len(blob) != entry["size"]:
                mismatches.append(f"{name}: size {len(blob)} bytes, manifest says {entry['size']}")
            elif sha256_hex(blob) != entry["sha256"]:
                mismatches.append(
                    f"{name}: sha256 {sha256_hex(blob)}, manifest says {entry['sha256']}"
                )
            members[name] = blob
        if mismatches:
            raise PackageIntegrityError(
                f"{label}: {len(mismatches)} member(s) differ from the manifest: "
                + "; ".join(mismatches)
            )
    return ModelPackage(path=label, manifest=manifest, members=members)


def _check_member_name(name: str, seen: set[str], label: str = "package") -> None:
    path = PurePosixPath(name)
    if not name or name.startswith("/") or "\\" in name or ":" in name:
        raise PackageError(f"{label}: member name {name!r} is not a relative POSIX path")
    if any(part in ("..", ".", "") for part in name.split("/")) or path.is_absolute():
        raise PackageError(f"{label}: member name {name!r} contains an empty, '.' or '..' part")
    if name in seen:
        raise PackageError(f"{label}: member name {name!r} appears more than once")
    seen.add(name)


def _require(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    if key not in raw:
        raise PackageError(f"{source}: manifest is missing the key {key!r}")
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        if isinstance(kind, type):
            expected = kind.__name__
        else:
            expected = " or ".join(k.__name__ for k in kind)
        raise PackageError(
            f"{source}: manifest key {key!r} is {type(value).__name__} {value!r:.60}; "
            f"expected {expected}"
        )
    return value


def _parse_manifest(raw: Any, source: str) -> Manifest:
    if not isinstance(raw, dict):
        raise PackageError(f"{source}: manifest is {type(raw).__name__}; expected a JSON object")
    schema = _require(raw, "schema_version", int, source)
    if schema != SCHEMA_VERSION:
        raise PackageError(
            f"{source}: schema_version {schema} is not supported by this reader "
            f"(supports {SCHEMA_VERSION}); upgrade edge-runtime"
        )
    members = _require(raw, "members", dict, source)
    for name, entry in members.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
            or any(c not in "0123456789abcdef" for c in entry["sha256"])
            or not isinstance(entry.get("size"), int)
        ):
            raise PackageError(
                f"{source}: manifest entry for member {name!r} needs 'sha256' (64 hex digits) "
                "and 'size' (integer bytes)"
            )

    labels = _require(raw, "labels", list, source)
    if not labels or not all(isinstance(label, str) and label for label in labels):
        raise PackageError(f"{source}: manifest 'labels' must be a non-empty list of strings")
    if len(set(labels)) != len(labels):
        raise PackageError(f"{source}: manifest 'labels' contains duplicates")

    model = _require(raw, "model", dict, source)
    tokenizer = _require(raw, "tokenizer", dict, source)
    model_member = _require(model, "member", str, source + " [model]")
    tokenizer_member = _require(tokenizer, "member", str, source + " [tokenizer]")
    for member in (model_member, tokenizer_member):
        if member not in members:
            raise PackageError(f"{source}: manifest names member {member!r} but does not list it")

    gate = None
    if raw.get("gate") is not None:
        gate_raw = _require(raw, "gate", dict, source)
        temperature = _require(gate_raw, "temperature", (int, float), source + " [gate]")
        threshold = _require(gate_raw, "threshold", (int, float), source + " [gate]")
        if not 0 < temperature < float("inf"):
            raise PackageError(f"{source}: gate temperature {temperature} must be positive")
        if not 0.0 <= threshold <= 1.0:
            raise PackageError(f"{source}: gate threshold {threshold} must be within [0, 1]")
        gate = GateSettings(
            temperature=float(temperature),
            threshold=float(threshold),
            fitted_on=dict(gate_raw.get("fitted_on") or {}),
        )

    max_length = _require(model, "max_length", int, source + " [model]")
    if max_length < 2:
        raise PackageError(f"{source}: model max_length {max_length} must be at least 2")
    return Manifest(
        name=_require(raw, "name", str, source),
        version=_require(raw, "version", int, source),
        task=_require(raw, "task", str, source),
        labels=tuple(labels),
        model_member=model_member,
        input_names=tuple(_require(model, "inputs", list, source + " [model]")),
        output_names=tuple(_require(model, "outputs", list, source + " [model]")),
        max_length=max_length,
        precision=_require(model, "precision", str, source + " [model]"),
        tokenizer_member=tokenizer_member,
        gate=gate,
        raw=raw,
    )
