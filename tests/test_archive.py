"""The package archive reader: ZIP structure checks, reading from a file and from bytes, and
the per-member digests it computes while it reads."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edge_runtime import archive
from edge_runtime.archive import MANIFEST_NAME, Archive
from edge_runtime.errors import (
    ArchiveFormatError,
    InvalidMemberNameError,
    OversizeMemberError,
    OversizePackageError,
    PackageError,
    PackageIntegrityError,
    PackageLimitError,
    PackageReadError,
    TooManyMembersError,
)

MEMBERS = {
    MANIFEST_NAME: b'{"name": "archive-test"}',
    "model.onnx": bytes(range(256)) * 40,
    "tokenizer.json": b'{"model": {}}',
}


def stored_zip(members: dict[str, bytes], comment: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as target:
        for name, data in members.items():
            target.writestr(name, data)
        target.comment = comment
    return buffer.getvalue()


def end_record_offset(data: bytes) -> int:
    return data.rindex(b"PK\x05\x06")


def central_header_offset(data: bytes, name: str) -> int:
    """Return where the central directory entry of member ``name`` starts."""
    position = data.index(b"PK\x01\x02")
    while True:
        (name_length,) = struct.unpack_from("<H", data, position + 28)
        if data[position + 46:position + 46 + name_length] == name.encode("utf-8"):
            return position
        position = data.index(b"PK\x01\x02", position + 1)


@contextmanager
def raises_exactly(error: type[Exception], match: str | None = None) -> Iterator[Any]:
    """Expect exactly ``error``, not a subclass, because each check has its own class."""
    with pytest.raises(error, match=match) as excinfo:
        yield excinfo
    assert type(excinfo.value) is error, f"{type(excinfo.value).__name__}: {excinfo.value}"


def read_both(data: bytes, tmp_path: Path, hash_members: bool = True) -> list[Archive]:
    """Read the same archive from bytes and from a file."""
    path = tmp_path / "p.edgepkg"
    path.write_bytes(data)
    return [Archive.read(data, hash_members), Archive.read(path, hash_members)]


def test_members_and_digests_from_file_and_bytes(tmp_path: Path):
    for read in read_both(stored_zip(MEMBERS), tmp_path):
        assert {name: bytes(view) for name, view in read.members.items()} == MEMBERS
        assert read.digests == {name: hashlib.sha256(data).hexdigest()
                                for name, data in MEMBERS.items()}


def test_digests_span_read_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Chunks of 100 bytes make every member cross several reads of the background thread.
    monkeypatch.setattr(archive, "READ_CHUNK_BYTES", 100)
    members = {**MEMBERS, "model.onnx": bytes(range(251)) * 97}
    path = tmp_path / "p.edgepkg"
    path.write_bytes(stored_zip(members))

    read = Archive.read(path, hash_members=True)

    assert read.digests["model.onnx"] == hashlib.sha256(members["model.onnx"]).hexdigest()
    assert bytes(read.members["model.onnx"]) == members["model.onnx"]


def test_archive_comment_accepted(tmp_path: Path):
    for read in read_both(stored_zip(MEMBERS, comment=b"built by a test"), tmp_path):
        assert bytes(read.members["tokenizer.json"]) == MEMBERS["tokenizer.json"]


def test_end_record_must_end_file(tmp_path: Path):
    data = stored_zip(MEMBERS) + b"trailing bytes"

    for source in (data, tmp_path / "p.edgepkg"):
        if isinstance(source, Path):
            source.write_bytes(data)
        with raises_exactly(ArchiveFormatError, match="not a ZIP archive"):
            Archive.read(source, hash_members=True)


def test_prefixed_data_rejected():
    # A ZIP reader that tolerates self-extracting archives finds the members after a prefix;
    # a package has none, so the offsets no longer meet.
    data = b"#!/bin/sh\n" + stored_zip(MEMBERS)

    with pytest.raises(PackageIntegrityError, match="does not end where the end record"):
        Archive.read(data, hash_members=True)


def test_gap_between_members_rejected():
    data = bytearray(stored_zip(MEMBERS))
    # Move the second member's local header offset in the central directory one byte on.
    directory = data.index(b"PK\x01\x02")
    second = data.index(b"PK\x01\x02", directory + 1)
    offset_field = second + 42
    (value,) = struct.unpack_from("<I", data, offset_field)
    struct.pack_into("<I", data, offset_field, value + 1)

    with pytest.raises(PackageIntegrityError, match="without gaps or overlap"):
        Archive.read(bytes(data), hash_members=True)


def test_overlapping_members_rejected():
    data = bytearray(stored_zip(MEMBERS))
    directory = data.index(b"PK\x01\x02")
    second = data.index(b"PK\x01\x02", directory + 1)
    # Point the second member at the first member's local header.
    struct.pack_into("<I", data, second + 42, 0)

    with pytest.raises(PackageError):
        Archive.read(bytes(data), hash_members=True)


@pytest.mark.parametrize(("field", "offset"), [
    ("this disk", 4), ("directory disk", 6), ("entries on this disk", 8),
])
def test_split_archive_fields_rejected(field: str, offset: int):
    data = bytearray(stored_zip(MEMBERS))
    end = end_record_offset(bytes(data))
    struct.pack_into("<H", data, end + offset, 1 if field != "entries on this disk" else 2)

    with raises_exactly(ArchiveFormatError, match="multi-disk"):
        Archive.read(bytes(data), hash_members=True)


def test_zip64_marker_rejected():
    data = bytearray(stored_zip(MEMBERS))
    end = end_record_offset(bytes(data))
    struct.pack_into("<I", data, end + 16, 0xFFFFFFFF)  # directory offset

    with raises_exactly(ArchiveFormatError, match="ZIP64"):
        Archive.read(bytes(data), hash_members=True)


def test_member_zip64_field_rejected():
    data = bytearray(stored_zip(MEMBERS))
    struct.pack_into("<H", data, central_header_offset(bytes(data), "model.onnx") + 34, 1)

    with raises_exactly(ArchiveFormatError, match="'model.onnx' uses a split-archive or ZIP64"):
        Archive.read(bytes(data), hash_members=True)


def test_zip_encryption_flag_rejected():
    data = bytearray(stored_zip(MEMBERS))
    struct.pack_into("<H", data, central_header_offset(bytes(data), "model.onnx") + 8, 0x01)

    with raises_exactly(ArchiveFormatError, match="'model.onnx' uses ZIP flags 0x0001"):
        Archive.read(bytes(data), hash_members=True)


def test_newer_zip_version_rejected():
    data = bytearray(stored_zip(MEMBERS))
    struct.pack_into("<H", data, central_header_offset(bytes(data), "model.onnx") + 6, 64)

    with raises_exactly(ArchiveFormatError, match="needs ZIP version 6.4"):
        Archive.read(bytes(data), hash_members=True)


def test_entry_count_mismatch_rejected():
    data = bytearray(stored_zip(MEMBERS))
    end = end_record_offset(bytes(data))
    struct.pack_into("<HH", data, end + 8, 2, 2)  # 3 entries written, 2 declared

    with pytest.raises(PackageIntegrityError, match="bytes after its 2 entries"):
        Archive.read(bytes(data), hash_members=True)


def test_compressed_member_rejected():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        target.writestr(MANIFEST_NAME, b"{}")
        target.writestr("model.onnx", b"x" * 1000, compress_type=zipfile.ZIP_DEFLATED)

    with raises_exactly(ArchiveFormatError, match="is compressed"):
        Archive.read(buffer.getvalue(), hash_members=True)


def test_unequal_stored_sizes_rejected():
    data = bytearray(stored_zip(MEMBERS))
    directory = data.index(b"PK\x01\x02")
    (compressed,) = struct.unpack_from("<I", data, directory + 20)
    struct.pack_into("<I", data, directory + 20, compressed + 1)

    with pytest.raises(PackageIntegrityError, match="must be equal"):
        Archive.read(bytes(data), hash_members=True)


def test_manifest_crc_checked_when_hashing():
    data = bytearray(stored_zip(MEMBERS))
    manifest_start = data.index(MEMBERS[MANIFEST_NAME])
    data[manifest_start + 2] ^= 0x01

    with pytest.raises(PackageIntegrityError, match="CRC-32"):
        Archive.read(bytes(data), hash_members=True)


def test_pinned_member_crc_left_to_digest():
    # With hashing on, a model whose bytes changed reads without a CRC error: its SHA-256 goes
    # to the caller, which compares it with the signed manifest.
    data = bytearray(stored_zip(MEMBERS))
    model_start = data.index(MEMBERS["model.onnx"])
    data[model_start] ^= 0x01

    hashed = Archive.read(bytes(data), hash_members=True)

    assert hashed.digests["model.onnx"] != hashlib.sha256(MEMBERS["model.onnx"]).hexdigest()
    with pytest.raises(PackageIntegrityError, match="'model.onnx' has CRC-32"):
        Archive.read(bytes(data), hash_members=False)


def test_missing_manifest_rejected():
    with raises_exactly(ArchiveFormatError, match="has no manifest.json"):
        Archive.read(stored_zip({"model.onnx": b"x"}), hash_members=True)


def test_member_count_limit(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(archive, "MAX_MEMBERS", 2)

    with raises_exactly(TooManyMembersError, match="has 3 members; the limit is 2"):
        Archive.read(stored_zip(MEMBERS), hash_members=True)


def test_member_size_limit(monkeypatch: pytest.MonkeyPatch):
    size = len(MEMBERS["model.onnx"])
    monkeypatch.setattr(archive, "MAX_MEMBER_BYTES", size - 1)

    with raises_exactly(OversizeMemberError, match=f"'model.onnx' is {size} bytes; the limit is"):
        Archive.read(stored_zip(MEMBERS), hash_members=True)


def test_manifest_size_limit(monkeypatch: pytest.MonkeyPatch):
    size = len(MEMBERS[MANIFEST_NAME])
    monkeypatch.setattr(archive, "MAX_MANIFEST_BYTES", size - 1)

    with raises_exactly(OversizeMemberError, match=f"'manifest.json' is {size} bytes; the limit"):
        Archive.read(stored_zip(MEMBERS), hash_members=True)


def test_package_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = stored_zip(MEMBERS)
    monkeypatch.setattr(archive, "MAX_PACKAGE_BYTES", len(data) - 1)
    path = tmp_path / "p.edgepkg"
    path.write_bytes(data)

    for source in (data, path):
        with raises_exactly(OversizePackageError, match=f"is {len(data)} bytes; the limit is"):
            Archive.read(source, hash_members=True)


def test_total_member_size_limit(monkeypatch: pytest.MonkeyPatch):
    # Each member is under its own limit, but all of them together are one byte over.
    monkeypatch.setattr(archive, "MAX_TOTAL_BYTES", sum(map(len, MEMBERS.values())) - 1)

    with raises_exactly(OversizePackageError, match="members add up to more than"):
        Archive.read(stored_zip(MEMBERS), hash_members=True)


def test_central_directory_size_limit(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(archive, "MAX_DIRECTORY_BYTES", 100)

    with raises_exactly(OversizePackageError, match="central directory is .* bytes; the limit"):
        Archive.read(stored_zip(MEMBERS), hash_members=True)


def test_limit_errors_share_a_base():
    for error in (OversizePackageError, OversizeMemberError, TooManyMembersError):
        assert issubclass(error, PackageLimitError)
        assert issubclass(error, PackageError)


@pytest.mark.parametrize(("name", "problem"), [
    ("../escape.bin", "contains an empty, '.' or '..' part"),
    ("/etc/passwd", "is not a relative POSIX path"),
    ("models\\model.bin", "is not a relative POSIX path"),
])
def test_unsafe_member_name_rejected(name: str, problem: str):
    data = stored_zip({**MEMBERS, name: b"payload"})

    with raises_exactly(InvalidMemberNameError) as excinfo:
        Archive.read(data, hash_members=True)
    assert repr(name) in str(excinfo.value)
    assert problem in str(excinfo.value)


def test_repeated_member_name_rejected():
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as target:
            for name, data in MEMBERS.items():
                target.writestr(name, data)
            target.writestr("model.onnx", b"a second model")

    with raises_exactly(InvalidMemberNameError, match="appears more than once"):
        Archive.read(buffer.getvalue(), hash_members=True)


def test_member_name_not_utf8_rejected():
    data = bytearray(stored_zip(MEMBERS))
    position = central_header_offset(bytes(data), "tokenizer.json")
    flags_offset = position + 8
    (flags,) = struct.unpack_from("<H", data, flags_offset)
    struct.pack_into("<H", data, flags_offset, flags | 0x800)
    data[position + 46] = 0xFF  # never valid in UTF-8

    with raises_exactly(InvalidMemberNameError, match="name that is not valid UTF-8"):
        Archive.read(bytes(data), hash_members=True)


def test_large_directory_read_from_before_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A long archive comment pushes the central directory out of the tail read first.
    path = tmp_path / "p.edgepkg"
    path.write_bytes(stored_zip(MEMBERS, comment=b"c" * 65_000))
    monkeypatch.setattr(archive, "_MAX_COMMENT_BYTES", 65_000)

    read = Archive.read(path, hash_members=True)

    assert set(read.members) == set(MEMBERS)


def test_file_shorter_than_directory_says(tmp_path: Path):
    data = stored_zip(MEMBERS)
    # Cut bytes out of the middle of the model: the directory no longer matches the file.
    model_start = data.index(MEMBERS["model.onnx"])
    path = tmp_path / "p.edgepkg"
    path.write_bytes(data[:model_start + 10] + data[model_start + 110:])

    with pytest.raises(PackageIntegrityError, match="does not end where the end record"):
        Archive.read(path, hash_members=True)


def test_missing_file_is_read_error(tmp_path: Path):
    with raises_exactly(PackageReadError, match="package file not found"):
        Archive.read(tmp_path / "absent.edgepkg", hash_members=True)


def test_folder_is_read_error(tmp_path: Path):
    with raises_exactly(PackageReadError, match="is a folder"):
        Archive.read(tmp_path, hash_members=True)


def resize_after_stat(monkeypatch: pytest.MonkeyPatch, path: Path, change: int) -> None:
    """Make the file at ``path`` grow or shrink by ``change`` bytes right after the reader
    takes its size, as a copy or download in progress would."""
    real_fstat = os.fstat
    inode = path.stat().st_ino
    resized = []

    def fstat_then_resize(descriptor: int) -> os.stat_result:
        result = real_fstat(descriptor)
        if result.st_ino == inode and not resized:
            os.truncate(path, result.st_size + change)
            resized.append(change)
        return result

    monkeypatch.setattr(archive.os, "fstat", fstat_then_resize)


@pytest.mark.parametrize("change", [-100, 100])
def test_file_resized_while_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: int):
    path = tmp_path / "p.edgepkg"
    path.write_bytes(stored_zip(MEMBERS))
    resize_after_stat(monkeypatch, path, change)

    with raises_exactly(PackageReadError, match="changed size while it was read"):
        Archive.read(path, hash_members=True)


def test_take_prefix_returns_archive_bytes_without_copy(tmp_path: Path):
    path = tmp_path / "p.edgepkg"
    data = stored_zip(MEMBERS)
    path.write_bytes(data)
    read = Archive.read(path, hash_members=True)

    read.release_views()
    read.release_buffers()
    prefix = read.take_prefix(100)

    assert prefix == data[:100]
    assert isinstance(prefix, bytes)


def test_crc_of_every_member_without_hashing(tmp_path: Path):
    for read in read_both(stored_zip(MEMBERS), tmp_path, hash_members=False):
        assert read.digests == {}
        assert all(zlib.crc32(view) == zlib.crc32(MEMBERS[name])
                   for name, view in read.members.items())
