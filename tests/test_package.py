"""Tests for edge_runtime.package: writing and reading model packages, and rejecting bad ones.

Packages that write_package cannot produce (unsafe names, duplicates, wrong digests) are built
by hand with zipfile. The model bytes are placeholders because no test here loads the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edge_runtime import archive
from edge_runtime.encryption import EncryptionError
from edge_runtime.errors import (
    ArchiveFormatError,
    InvalidMemberNameError,
    ManifestError,
    OversizeMemberError,
    PackageIntegrityError,
    PackageReadError,
    TooManyMembersError,
    UnsupportedSchemaVersionError,
)
from edge_runtime.package import (
    MANIFEST_NAME,
    MAX_MEMBERS,
    inspect_package,
    read_package,
    write_package,
)

MODEL_BYTES = b"placeholder ONNX bytes " * 8
TOKENIZER_BYTES = b'{"version": "1.0", "model": {"type": "WordPiece"}}'


def minimal_manifest() -> dict:
    """Return the smallest manifest that _parse_manifest accepts, without the entries that
    write_package fills in (schema_version and members)."""
    return {
        "name": "intent-test",
        "version": 3,
        "task": "intent-classification",
        "labels": ["balance", "oos", "timer"],
        "model": {
            "member": "model.onnx",
            "inputs": ["input_ids", "attention_mask"],
            "outputs": ["logits"],
            "precision": "int8",
            "max_length": 64,
        },
        "tokenizer": {"member": "tokenizer.json"},
        "gate": {
            "temperature": 1.5,
            "threshold": 0.8,
            "fitted_on": {"split": "validation", "n": 120},
        },
    }


def default_members() -> dict[str, bytes]:
    return {"model.onnx": MODEL_BYTES, "tokenizer.json": TOKENIZER_BYTES}


def complete_manifest(members: dict[str, bytes], **changes) -> dict:
    """Return a manifest with schema_version and digests of ``members``, as a reader expects."""
    manifest = minimal_manifest()
    manifest["schema_version"] = 2
    manifest["members"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in members.items()
    }
    manifest.update(changes)
    return manifest


@contextmanager
def raises_exactly(error: type[Exception], match: str | None = None) -> Iterator[Any]:
    """Expect exactly ``error``, not a subclass, because each check has its own class."""
    with pytest.raises(error, match=match) as excinfo:
        yield excinfo
    assert type(excinfo.value) is error, f"{type(excinfo.value).__name__}: {excinfo.value}"


def build_zip(entries: list[tuple[str, bytes]]) -> bytes:
    """Write ``entries`` in order into an in-memory ZIP, keeping duplicate names."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # zipfile warns about a duplicate name but writes the second entry anyway.
        warnings.simplefilter("ignore", UserWarning)
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in entries:
                archive.writestr(name, data)
    return buffer.getvalue()


def build_package(manifest: dict, members: dict[str, bytes]) -> bytes:
    """Write a package by hand: the given manifest and members, with no checks."""
    entries = [(MANIFEST_NAME, json.dumps(manifest).encode("utf-8"))]
    entries += list(members.items())
    return build_zip(entries)


@pytest.fixture
def package_path(tmp_path: Path) -> Path:
    return write_package(tmp_path / "intent.edgepkg", minimal_manifest(), default_members())


# Round trip


def test_round_trip_manifest_fields(package_path: Path):
    manifest = read_package(package_path).manifest

    assert manifest.name == "intent-test"
    assert manifest.version == 3
    assert manifest.task == "intent-classification"
    assert manifest.model_member == "model.onnx"
    assert manifest.tokenizer_member == "tokenizer.json"
    assert manifest.input_names == ("input_ids", "attention_mask")
    assert manifest.output_names == ("logits",)
    assert manifest.precision == "int8"
    assert manifest.max_length == 64


def test_round_trip_labels(package_path: Path):
    manifest = read_package(package_path).manifest

    assert manifest.labels == ("balance", "oos", "timer")


def test_round_trip_gate_settings(package_path: Path):
    gate = read_package(package_path).manifest.gate

    assert gate is not None
    assert gate.temperature == 1.5
    assert gate.threshold == 0.8
    assert gate.fitted_on == {"split": "validation", "n": 120}


def test_round_trip_member_bytes(package_path: Path):
    loaded = read_package(package_path)

    assert loaded.members == default_members()
    assert loaded.model_bytes == MODEL_BYTES
    assert loaded.tokenizer_json == TOKENIZER_BYTES.decode("utf-8")


def test_round_trip_member_digests(package_path: Path):
    raw = read_package(package_path).manifest.raw

    assert raw["schema_version"] == 2
    assert raw["members"]["model.onnx"]["sha256"] == hashlib.sha256(MODEL_BYTES).hexdigest()
    assert raw["members"]["model.onnx"]["size"] == len(MODEL_BYTES)
    assert raw["members"]["tokenizer.json"]["size"] == len(TOKENIZER_BYTES)


def test_write_package_archive_layout(package_path: Path):
    with zipfile.ZipFile(package_path) as archive:
        infos = archive.infolist()

    assert [info.filename for info in infos] == [MANIFEST_NAME, "model.onnx", "tokenizer.json"]
    assert all(info.compress_type == zipfile.ZIP_STORED for info in infos)


def test_write_package_leaves_no_temp_files(package_path: Path):
    assert sorted(p.name for p in package_path.parent.iterdir()) == ["intent.edgepkg"]


def test_write_package_creates_parent_folder(tmp_path: Path):
    target = tmp_path / "nested" / "deeper" / "intent.edgepkg"

    written = write_package(target, minimal_manifest(), default_members())

    assert written == target
    assert target.is_file()


def test_read_package_from_bytes(package_path: Path):
    loaded = read_package(package_path.read_bytes())

    assert loaded.path == "<bytes>"
    assert loaded.manifest.name == "intent-test"
    assert loaded.model_bytes == MODEL_BYTES


def test_read_package_from_bytearray(package_path: Path):
    loaded = read_package(bytearray(package_path.read_bytes()))

    assert loaded.model_bytes == MODEL_BYTES


def test_read_package_from_path_string(package_path: Path):
    loaded = read_package(str(package_path))

    assert loaded.path == str(package_path)
    assert loaded.manifest.version == 3


def test_teacher_package_has_no_gate(tmp_path: Path):
    manifest = minimal_manifest()
    del manifest["gate"]

    path = write_package(tmp_path / "teacher.edgepkg", manifest, default_members())

    assert read_package(path).manifest.gate is None


def test_gate_null_means_no_gate():
    members = default_members()
    data = build_package(complete_manifest(members, gate=None), members)

    assert read_package(data).manifest.gate is None


# Writer checks


def test_write_package_rejects_manifest_member(tmp_path: Path):
    members = {**default_members(), MANIFEST_NAME: b"{}"}

    with raises_exactly(InvalidMemberNameError, match="reserved"):
        write_package(tmp_path / "p.edgepkg", minimal_manifest(), members)


def test_write_package_rejects_parent_name(tmp_path: Path):
    members = {**default_members(), "../escape.bin": b"x"}

    with raises_exactly(InvalidMemberNameError, match=r"\.\./escape\.bin"):
        write_package(tmp_path / "p.edgepkg", minimal_manifest(), members)


def test_write_package_invalid_manifest_writes_nothing(tmp_path: Path):
    manifest = minimal_manifest()
    manifest["gate"]["threshold"] = 1.5

    with raises_exactly(ManifestError, match="threshold"):
        write_package(tmp_path / "p.edgepkg", manifest, default_members())
    assert list(tmp_path.iterdir()) == []


def test_write_package_encrypt_missing_member(tmp_path: Path):
    with raises_exactly(EncryptionError, match=r"do not exist: \['weights.bin'\]"):
        write_package(
            tmp_path / "p.edgepkg",
            minimal_manifest(),
            default_members(),
            passphrase="development only",
            encrypt_members=("model.onnx", "weights.bin"),
        )
    assert list(tmp_path.iterdir()) == []


def test_write_package_unlisted_model_member(tmp_path: Path):
    members = {"tokenizer.json": TOKENIZER_BYTES}

    with raises_exactly(ManifestError, match="model.onnx"):
        write_package(tmp_path / "p.edgepkg", minimal_manifest(), members)


# Integrity of members


def test_changed_member_raises_integrity_error():
    members = default_members()
    manifest = complete_manifest(members)
    tampered = bytearray(MODEL_BYTES)
    tampered[5] ^= 0x01
    # The ZIP entry is rewritten with its own CRC, so only the manifest digest can catch it.
    data = build_package(manifest, {**members, "model.onnx": bytes(tampered)})

    with pytest.raises(PackageIntegrityError) as excinfo:
        read_package(data)
    assert "model.onnx" in str(excinfo.value)
    assert "sha256" in str(excinfo.value)
    assert "tokenizer.json" not in str(excinfo.value)


def test_truncated_member_reports_size():
    members = default_members()
    manifest = complete_manifest(members)
    data = build_package(manifest, {**members, "tokenizer.json": TOKENIZER_BYTES[:-1]})

    with pytest.raises(PackageIntegrityError) as excinfo:
        read_package(data)
    assert "tokenizer.json" in str(excinfo.value)
    assert f"size {len(TOKENIZER_BYTES) - 1} bytes" in str(excinfo.value)


def test_flipped_file_byte_raises_integrity_error(package_path: Path):
    data = bytearray(package_path.read_bytes())
    offset = data.find(MODEL_BYTES)
    data[offset] ^= 0x01

    with pytest.raises(PackageIntegrityError, match="model.onnx"):
        read_package(bytes(data))


def test_missing_member_raises_integrity_error():
    members = default_members()
    manifest = complete_manifest(members)
    data = build_package(manifest, {"model.onnx": MODEL_BYTES})

    with pytest.raises(PackageIntegrityError) as excinfo:
        read_package(data)
    assert "tokenizer.json" in str(excinfo.value)
    assert "missing from the archive" in str(excinfo.value)


def test_unlisted_member_raises_integrity_error():
    members = default_members()
    manifest = complete_manifest(members)
    data = build_package(manifest, {**members, "extra.bin": b"not listed"})

    with pytest.raises(PackageIntegrityError) as excinfo:
        read_package(data)
    assert "extra.bin" in str(excinfo.value)
    assert "not listed" in str(excinfo.value)


# Member names


@pytest.mark.parametrize(
    "name",
    [
        "../model.onnx",
        "models/../../model.onnx",
        "/etc/model.onnx",
        "./model.onnx",
        "models//model.onnx",
        "models/",
        "models\\model.onnx",
        "C:model.onnx",
    ],
)
def test_unsafe_member_name_rejected(name: str):
    members = default_members()
    manifest = complete_manifest(members)
    data = build_package(manifest, {**members, name: b"payload"})

    with raises_exactly(InvalidMemberNameError) as excinfo:
        read_package(data)
    assert repr(name) in str(excinfo.value)


def test_duplicate_member_rejected():
    members = default_members()
    manifest = complete_manifest(members)
    entries = [(MANIFEST_NAME, json.dumps(manifest).encode("utf-8"))]
    entries += list(members.items())
    entries.append(("model.onnx", b"a second model"))
    data = build_zip(entries)

    with raises_exactly(InvalidMemberNameError) as excinfo:
        read_package(data)
    assert "'model.onnx'" in str(excinfo.value)
    assert "more than once" in str(excinfo.value)


def test_duplicate_manifest_rejected():
    members = default_members()
    manifest_bytes = json.dumps(complete_manifest(members)).encode("utf-8")
    entries = [(MANIFEST_NAME, manifest_bytes), (MANIFEST_NAME, manifest_bytes)]
    data = build_zip(entries + list(members.items()))

    with raises_exactly(InvalidMemberNameError, match="more than once"):
        read_package(data)


# Files that are not packages


def test_not_a_zip_rejected():
    with raises_exactly(ArchiveFormatError, match="not a ZIP archive"):
        read_package(b"this is plain text, not a package")


def test_empty_bytes_rejected():
    with raises_exactly(ArchiveFormatError, match="not a ZIP archive"):
        read_package(b"")


def test_missing_file_rejected(tmp_path: Path):
    missing = tmp_path / "absent.edgepkg"

    with raises_exactly(PackageReadError) as excinfo:
        read_package(missing)
    assert "not found" in str(excinfo.value)
    assert str(missing) in str(excinfo.value)


def test_folder_path_rejected(tmp_path: Path):
    with raises_exactly(PackageReadError, match="is a folder"):
        read_package(tmp_path)


def test_zip_without_manifest_rejected():
    data = build_zip(list(default_members().items()))

    with raises_exactly(ArchiveFormatError, match="has no manifest.json"):
        read_package(data)


def test_manifest_not_json_rejected():
    data = build_zip([(MANIFEST_NAME, b"{not json")] + list(default_members().items()))

    with raises_exactly(ManifestError, match="not valid UTF-8 JSON"):
        read_package(data)


def test_manifest_json_array_rejected():
    data = build_zip([(MANIFEST_NAME, b"[1, 2]")] + list(default_members().items()))

    with raises_exactly(ManifestError, match="expected a JSON object"):
        read_package(data)


def test_inspect_manifest_json_array_rejected():
    data = build_zip([(MANIFEST_NAME, b"[1, 2]")] + list(default_members().items()))

    with raises_exactly(ManifestError, match="manifest is list; expected a JSON object"):
        inspect_package(data)


# Manifest schema


def test_unsupported_schema_version_rejected():
    members = default_members()
    data = build_package(complete_manifest(members, schema_version=4), members)

    with raises_exactly(UnsupportedSchemaVersionError) as excinfo:
        read_package(data)
    assert "schema_version 4" in str(excinfo.value)
    assert "upgrade edge-runtime" in str(excinfo.value)


@pytest.mark.parametrize(
    ("score", "schema_version"),
    [(None, 2), ("max_probability", 2), ("logit_margin", 3)],
)
def test_write_package_lowest_schema_version(tmp_path: Path, score, schema_version):
    manifest = minimal_manifest()
    if score is not None:
        manifest["gate"]["score"] = score
    path = write_package(tmp_path / "intent.edgepkg", manifest, default_members())

    loaded = read_package(path).manifest

    assert loaded.raw["schema_version"] == schema_version
    assert loaded.gate.score == (score or "max_probability")


def test_schema_2_gate_score_text_means_top1():
    members = default_members()
    manifest = complete_manifest(members)
    manifest["gate"]["score"] = "max softmax(logits / temperature); local when score >= threshold"

    gate = read_package(build_package(manifest, members)).manifest.gate

    assert gate.score == "max_probability"


def test_schema_3_gate_score_required():
    members = default_members()
    manifest = complete_manifest(members, schema_version=3)

    with raises_exactly(ManifestError, match="missing the key 'score'"):
        read_package(build_package(manifest, members))


def test_schema_3_unknown_gate_score():
    members = default_members()
    manifest = complete_manifest(members, schema_version=3)
    manifest["gate"]["score"] = "entropy"

    with raises_exactly(ManifestError) as excinfo:
        read_package(build_package(manifest, members))
    assert "gate score 'entropy' is unknown" in str(excinfo.value)
    assert "max_probability, logit_margin" in str(excinfo.value)


@pytest.mark.parametrize("threshold", [-0.01, 1.01, 2])
def test_gate_threshold_out_of_range(threshold: float):
    members = default_members()
    manifest = complete_manifest(members)
    manifest["gate"]["threshold"] = threshold

    with raises_exactly(ManifestError, match=f"gate threshold {threshold} must be within"):
        read_package(build_package(manifest, members))


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_gate_threshold_bounds_accepted(threshold: float):
    members = default_members()
    manifest = complete_manifest(members)
    manifest["gate"]["threshold"] = threshold

    gate = read_package(build_package(manifest, members)).manifest.gate

    assert gate.threshold == threshold


@pytest.mark.parametrize("temperature", [0, 0.0, -1.5])
def test_gate_temperature_not_positive(temperature: float):
    members = default_members()
    manifest = complete_manifest(members)
    manifest["gate"]["temperature"] = temperature

    with raises_exactly(ManifestError, match=f"gate temperature {temperature} must be positive"):
        read_package(build_package(manifest, members))


def test_gate_threshold_bool_rejected():
    members = default_members()
    manifest = complete_manifest(members)
    manifest["gate"]["threshold"] = True

    with raises_exactly(ManifestError, match="'threshold' is bool"):
        read_package(build_package(manifest, members))


@pytest.mark.parametrize(
    "key", ["schema_version", "members", "labels", "model", "tokenizer", "name", "version", "task"]
)
def test_missing_manifest_key(key: str):
    members = default_members()
    manifest = complete_manifest(members)
    del manifest[key]

    with raises_exactly(ManifestError) as excinfo:
        read_package(build_package(manifest, members))
    assert f"missing the key {key!r}" in str(excinfo.value)


@pytest.mark.parametrize("key", ["member", "inputs", "outputs", "precision", "max_length"])
def test_missing_model_key(key: str):
    members = default_members()
    manifest = complete_manifest(members)
    del manifest["model"][key]

    with raises_exactly(ManifestError) as excinfo:
        read_package(build_package(manifest, members))
    assert f"missing the key {key!r}" in str(excinfo.value)
    assert "[model]" in str(excinfo.value)


def test_missing_tokenizer_member_key():
    members = default_members()
    manifest = complete_manifest(members, tokenizer={})

    with raises_exactly(
        ManifestError, match=r"\[tokenizer\]: manifest is missing the key 'member'"
    ):
        read_package(build_package(manifest, members))


def test_version_wrong_type_rejected():
    members = default_members()
    data = build_package(complete_manifest(members, version="3"), members)

    with raises_exactly(ManifestError) as excinfo:
        read_package(data)
    assert "'version' is str" in str(excinfo.value)
    assert "expected int" in str(excinfo.value)


def test_member_entry_without_digest():
    members = default_members()
    manifest = complete_manifest(members)
    manifest["members"]["model.onnx"] = {"size": len(MODEL_BYTES)}

    with raises_exactly(ManifestError, match="'model.onnx' needs 'sha256'"):
        read_package(build_package(manifest, members))


@pytest.mark.parametrize("labels", [[], ["oos", ""], ["oos", 7]])
def test_invalid_labels_rejected(labels: list):
    members = default_members()
    data = build_package(complete_manifest(members, labels=labels), members)

    with raises_exactly(ManifestError, match="non-empty list of strings"):
        read_package(data)


def test_duplicate_labels_rejected():
    members = default_members()
    data = build_package(complete_manifest(members, labels=["oos", "timer", "oos"]), members)

    with raises_exactly(ManifestError, match="'labels' contains duplicates"):
        read_package(data)


def test_max_length_below_two():
    members = default_members()
    manifest = complete_manifest(members)
    manifest["model"]["max_length"] = 1

    with raises_exactly(ManifestError, match="max_length 1 must be at least 2"):
        read_package(build_package(manifest, members))


# Archive limits


def test_too_many_members_rejected():
    members = default_members()
    for index in range(MAX_MEMBERS - len(members)):
        members[f"extra/{index}.bin"] = b"x"
    # With the manifest the archive has MAX_MEMBERS + 1 entries.
    data = build_package(complete_manifest(members), members)

    with raises_exactly(TooManyMembersError) as excinfo:
        read_package(data)
    assert f"has {MAX_MEMBERS + 1} members" in str(excinfo.value)
    assert f"the limit is {MAX_MEMBERS}" in str(excinfo.value)


def test_member_count_at_limit_accepted():
    members = default_members()
    for index in range(MAX_MEMBERS - 1 - len(members)):
        members[f"extra/{index}.bin"] = b"x"
    data = build_package(complete_manifest(members), members)

    assert len(read_package(data).members) == MAX_MEMBERS - 1


def test_member_over_size_limit(monkeypatch: pytest.MonkeyPatch):
    # The limit sits above the manifest's size, so only the model member exceeds it.
    monkeypatch.setattr(archive, "MAX_MEMBER_BYTES", 4096)
    members = {**default_members(), "model.onnx": bytes(4097)}

    with raises_exactly(OversizeMemberError) as excinfo:
        read_package(build_package(complete_manifest(members), members))
    assert "'model.onnx' is 4097 bytes" in str(excinfo.value)
    assert "the limit is 4096" in str(excinfo.value)


def test_manifest_over_size_limit(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(archive, "MAX_MANIFEST_BYTES", 64)
    members = default_members()

    with raises_exactly(OversizeMemberError, match="'manifest.json' is .* bytes; the limit is 64"):
        read_package(build_package(complete_manifest(members), members))
