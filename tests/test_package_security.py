"""Hostile-input and trust tests for the package reader (edge_runtime.package).

The reader promises that every failure raises a PackageError subclass and that a package it
returns contains exactly the signed members. These tests flip every byte of a signed and
encrypted package and feed the reader Hypothesis-generated archives and manifests. A child
process watches for file writes while it decrypts a model and loads it into ONNX Runtime. The
rest cover rollback, expiry, the trust policy and re-signing.

Packages here are a few kilobytes, so the byte flips and the property tests stay fast.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import json
import logging
import os
import struct
import subprocess
import sys
import traceback
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime import encryption, signing
from edge_runtime.encryption import DecryptionError, WrongRecipientError
from edge_runtime.errors import (
    ArchiveFormatError,
    ExpiredPackageError,
    ManifestError,
    PackageError,
    PackageIntegrityError,
    RollbackError,
)
from edge_runtime.package import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ModelPackage,
    TrustPolicy,
    inspect_package,
    read_archive,
    read_package,
    sign_archive,
    write_package,
)
from edge_runtime.rollback import RollbackState
from edge_runtime.signing import MemberMismatchError, SignatureError, UnknownSignerError
from tests.conftest import DEVICE_PRIVATE, DEVICE_PUBLIC, ROOT, SIGNER_PRIVATE, SIGNER_PUBLIC

# A stand-in for model.onnx: read_package never parses the model, so any bytes do.
FAKE_MODEL = bytes(range(256)) + b"fake ONNX graph " * 16
TOKENIZER = b'{"version": "1.0", "model": {"type": "WordPiece", "vocab": {"[UNK]": 0}}}'
MEMBERS = {"model.onnx": FAKE_MODEL, "tokenizer.json": TOKENIZER}
# The members of a second package, which differs in its tokenizer.
SECOND_MEMBERS = {**MEMBERS, "tokenizer.json": TOKENIZER.replace(b"WordPiece", b"BPE")}


def base_manifest(**changes: Any) -> dict[str, Any]:
    """Return a manifest that write_package accepts, before it adds digests and encryption."""
    manifest = {
        "name": "intent-test",
        "version": 3,
        "task": "intent-classification",
        "labels": ["balance", "oos", "timer"],
        "model": {
            "member": "model.onnx",
            "inputs": ["input_ids", "attention_mask"],
            "outputs": ["logits"],
            "precision": "int8",
            "max_length": 32,
        },
        "tokenizer": {"member": "tokenizer.json"},
        "gate": {"temperature": 1.5, "threshold": 0.8, "fitted_on": {"split": "validation"}},
    }
    manifest.update(changes)
    return manifest


@dataclass(frozen=True)
class Keys:
    signer: Any
    signer_public: Any
    device: Any
    device_public: Any
    other_signer: Any
    other_device: Any


@pytest.fixture(scope="module")
def keys() -> Keys:
    """The committed demo keys, plus a signer and a device key that nothing trusts."""
    signer = signing.load_private_key_pem(SIGNER_PRIVATE.read_bytes())
    return Keys(
        signer=signer,
        signer_public=signing.load_public_key_pem(SIGNER_PUBLIC.read_bytes()),
        device=encryption.load_private_key(DEVICE_PRIVATE),
        device_public=encryption.load_public_key(DEVICE_PUBLIC),
        other_signer=signing.generate_private_key(),
        other_device=encryption.generate_device_key(),
    )


@pytest.fixture(scope="module")
def strict(keys: Keys) -> TrustPolicy:
    """The policy of a device: the demo signer and device keys, unsigned packages rejected."""
    return TrustPolicy(trusted_keys=(keys.signer_public,), device_key=keys.device)


def write_sealed(path: Path, keys: Keys, members: dict[str, bytes] = MEMBERS,
                 **manifest_changes: Any) -> Path:
    """Write a package signed by the demo signer with model.onnx encrypted to the demo device."""
    return write_package(path, base_manifest(**manifest_changes), members,
                         signer_key=keys.signer, recipients=[keys.device_public])


def write_signed(path: Path, signer: Any, **manifest_changes: Any) -> Path:
    """Write a package that is signed but not encrypted."""
    return write_package(path, base_manifest(**manifest_changes), MEMBERS, signer_key=signer)


def zip_bytes(entries: Sequence[tuple[str, bytes]]) -> bytes:
    """Write stored ZIP entries in order, keeping duplicate names."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # zipfile warns about a duplicate name but writes it.
        warnings.simplefilter("ignore", UserWarning)
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in entries:
                archive.writestr(name, data)
    return buffer.getvalue()


def with_digests(manifest: dict[str, Any], members: dict[str, bytes]) -> dict[str, Any]:
    """Return a copy of ``manifest`` with schema_version 2 and the digests of ``members``."""
    manifest = dict(manifest, schema_version=2)
    manifest["members"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in members.items()
    }
    return manifest


def hand_built(manifest: dict[str, Any], members: dict[str, bytes], signer: Any = None) -> bytes:
    """Build a package without write_package's checks: add digests, sign if asked, and zip."""
    manifest = with_digests(manifest, members)
    archive = {MANIFEST_NAME: json.dumps(manifest).encode("utf-8"), **members}
    if signer is not None:
        archive[SIGNATURE_NAME] = signing.sign_members(archive, signer, model_name="hand-built")
    return zip_bytes(list(archive.items()))


# ---------------------------------------------------------------------------------------------
# Byte flips
# ---------------------------------------------------------------------------------------------

# The fields of the three ZIP records that the writer produces, in file order, as
# (name, bytes).
LOCAL_HEADER = (
    ("signature", 4), ("version needed", 2), ("flags", 2), ("compression method", 2),
    ("modification time", 2), ("modification date", 2), ("crc-32", 4), ("compressed size", 4),
    ("uncompressed size", 4), ("name length", 2), ("extra length", 2),
)
CENTRAL_HEADER = (
    ("signature", 4), ("version made by", 2), ("version needed", 2), ("flags", 2),
    ("compression method", 2), ("modification time", 2), ("modification date", 2),
    ("crc-32", 4), ("compressed size", 4), ("uncompressed size", 4), ("name length", 2),
    ("extra length", 2), ("comment length", 2), ("disk number start", 2),
    ("internal attributes", 2), ("external attributes", 4), ("local header offset", 4),
)
END_RECORD = (
    ("signature", 4), ("disk number", 2), ("central directory disk", 2),
    ("entries on this disk", 2), ("total entries", 2), ("central directory size", 4),
    ("central directory offset", 4), ("comment length", 2),
)
END_RECORD_BYTES = 22


def field_offset(layout: tuple, name: str) -> int:
    """Return the offset of a field from the start of its record."""
    offset = 0
    for field_name, size in layout:
        if field_name == name:
            return offset
        offset += size
    raise KeyError(name)


class ZipField(NamedTuple):
    record: str  # "local header", "central header", "member data" or "end of central directory"
    member: str  # member name, or "" for the end record
    name: str
    start: int  # offset of the field's first byte in the file
    size: int


def map_zip_fields(data: bytes) -> dict[int, ZipField]:
    """Label every byte offset of an archive without a comment with the ZIP field it is in."""
    fields: dict[int, ZipField] = {}

    def label(start: int, size: int, record: str, member: str, name: str) -> int:
        field = ZipField(record, member, name, start, size)
        for offset in range(start, start + size):
            fields[offset] = field
        return start + size

    def label_record(start: int, layout: tuple, record: str, member: str) -> int:
        for name, size in layout:
            start = label(start, size, record, member, name)
        return start

    def read(record_start: int, layout: tuple, name: str, size: int) -> int:
        offset = record_start + field_offset(layout, name)
        return int.from_bytes(data[offset : offset + size], "little")

    end = len(data) - END_RECORD_BYTES
    label_record(end, END_RECORD, "end of central directory", "")
    directory_size = read(end, END_RECORD, "central directory size", 4)
    directory_offset = read(end, END_RECORD, "central directory offset", 4)
    header_bytes = sum(size for _, size in CENTRAL_HEADER)
    position = directory_offset
    while position < directory_offset + directory_size:
        compressed_size = read(position, CENTRAL_HEADER, "compressed size", 4)
        name_length = read(position, CENTRAL_HEADER, "name length", 2)
        extra_length = read(position, CENTRAL_HEADER, "extra length", 2)
        comment_length = read(position, CENTRAL_HEADER, "comment length", 2)
        local_offset = read(position, CENTRAL_HEADER, "local header offset", 4)
        name_start = position + header_bytes
        member = data[name_start : name_start + name_length].decode("utf-8")

        after = label_record(position, CENTRAL_HEADER, "central header", member)
        after = label(after, name_length, "central header", member, "name")
        after = label(after, extra_length, "central header", member, "extra field")
        position = label(after, comment_length, "central header", member, "comment")

        local_name_length = read(local_offset, LOCAL_HEADER, "name length", 2)
        local_extra_length = read(local_offset, LOCAL_HEADER, "extra length", 2)
        after = label_record(local_offset, LOCAL_HEADER, "local header", member)
        after = label(after, local_name_length, "local header", member, "name")
        after = label(after, local_extra_length, "local header", member, "extra field")
        label(after, compressed_size, "member data", member, "data")
    return fields


# Why a flipped byte may leave a package loadable: the reader (edge_runtime/archive.py) does not
# use these fields to locate or check member bytes, so the signed members come out unchanged.
LOCAL_COPY = "local header field that the reader takes from the central directory instead"
CENTRAL_METADATA = "central header metadata that the reader does not use"
PINNED_CRC = "CRC-32 of a member that the manifest pins by SHA-256, which is checked instead"

LOCAL_UNREAD = {"version needed", "flags", "compression method", "modification time",
                "modification date", "crc-32", "compressed size", "uncompressed size"}
CENTRAL_UNREAD = {"version made by", "modification time", "modification date",
                  "internal attributes", "external attributes"}
# Flag bits that the reader rejects: encrypted, compressed patch, strong encryption.
READ_FLAG_BITS = 0x0001 | 0x0020 | 0x0040
MAX_ZIP_EXTRACT_VERSION = 63  # ZIP 6.3, the highest "version needed" the reader accepts
# Members without a manifest digest: their CRC-32 is the only check of their archive bytes.
CRC_CHECKED = {MANIFEST_NAME, SIGNATURE_NAME}


def explain_flip(field: ZipField, original: bytes, mutated: bytes) -> str | None:
    """Return why a flip in ``field`` may still load, or None if a load means a reader bug."""

    def value(data: bytes) -> int:
        return int.from_bytes(data[field.start : field.start + field.size], "little")

    if field.record == "local header" and field.name in LOCAL_UNREAD:
        return LOCAL_COPY
    if field.record != "central header":
        return None
    if field.name in CENTRAL_UNREAD:
        return CENTRAL_METADATA
    if field.name == "version needed" and mutated[field.start] <= MAX_ZIP_EXTRACT_VERSION:
        return CENTRAL_METADATA
    if field.name == "flags" and not value(mutated) & READ_FLAG_BITS:
        return CENTRAL_METADATA
    if field.name == "crc-32" and field.member not in CRC_CHECKED:
        return PINNED_CRC
    return None


@dataclass
class FlipSweep:
    loaded: dict[int, str | None]  # offset -> explain_flip's reason
    changed_members: list[int]  # offsets that loaded with members unlike the original
    escaped: dict[int, str]  # offset -> exception that is not a PackageError


def sweep_flips(data: bytes, mask: int, offsets: Sequence[int], trust: TrustPolicy,
                members: dict[str, bytes]) -> FlipSweep:
    """XOR ``mask`` into each offset in turn and read the result."""
    fields = map_zip_fields(data)
    sweep = FlipSweep(loaded={}, changed_members=[], escaped={})
    for offset in offsets:
        mutated = bytearray(data)
        mutated[offset] ^= mask
        try:
            loaded = read_package(bytes(mutated), trust)
        except PackageError:
            continue
        except Exception as exc:  # any other type is the failure that this sweep looks for
            sweep.escaped[offset] = f"{fields[offset]}: {exc!r}"
            continue
        sweep.loaded[offset] = explain_flip(fields[offset], data, bytes(mutated))
        if loaded.members != members:
            sweep.changed_members.append(offset)
    return sweep


@pytest.fixture(scope="module")
def sealed_bytes(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A signed package with model.onnx encrypted to the demo device, about 4 KB."""
    return write_sealed(tmp_path_factory.mktemp("sealed") / "p.edgepkg", keys).read_bytes()


def test_zip_field_map_covers_file(sealed_bytes: bytes):
    fields = map_zip_fields(sealed_bytes)

    assert sorted(fields) == list(range(len(sealed_bytes)))
    assert {f.member for f in fields.values() if f.record == "member data"} == {
        MANIFEST_NAME, "model.onnx", "tokenizer.json", SIGNATURE_NAME}


# Offsets where XOR 0x01 still loads the package, grouped by reason. Each of the 4 members has
# 8 unread local header fields (22 bytes) and 15 bytes of central metadata: version made by,
# version needed, the flags' high byte, time, date and attributes. The central CRC-32 of
# model.onnx and tokenizer.json is not read, because their digests are.
FLIP_LOADS_XOR_01 = {
    LOCAL_COPY: 4 * 22,
    CENTRAL_METADATA: 4 * 15,
    PINNED_CRC: 2 * 4,
}


# The same fields with XOR 0xFF. Version 20 becomes 235, above 63, so the low byte of each
# "version needed" is rejected and 14 bytes of central metadata per member remain.
FLIP_LOADS_XOR_FF = {
    LOCAL_COPY: 4 * 22,
    CENTRAL_METADATA: 4 * 14,
    PINNED_CRC: 2 * 4,
}


def test_flip_every_byte_xor_01(sealed_bytes: bytes, strict: TrustPolicy):
    sweep = sweep_flips(sealed_bytes, 0x01, range(len(sealed_bytes)), strict, MEMBERS)

    assert sweep.escaped == {}
    assert sweep.changed_members == []
    assert [offset for offset, reason in sweep.loaded.items() if reason is None] == []
    assert Counter(sweep.loaded.values()) == FLIP_LOADS_XOR_01
    # 156 of about 3,900 offsets load, all in the ZIP header fields that FLIP_LOADS_XOR_01 lists.
    assert len(sweep.loaded) == 156


def test_flip_every_byte_xor_ff(sealed_bytes: bytes, strict: TrustPolicy):
    sweep = sweep_flips(sealed_bytes, 0xFF, range(len(sealed_bytes)), strict, MEMBERS)

    assert sweep.escaped == {}
    assert sweep.changed_members == []
    assert [offset for offset, reason in sweep.loaded.items() if reason is None] == []
    assert Counter(sweep.loaded.values()) == FLIP_LOADS_XOR_FF
    assert len(sweep.loaded) == 152


def central_version_offsets(data: bytes) -> list[int]:
    """Offsets of the low byte of each central header's "version needed to extract"."""
    return sorted({field.start for field in map_zip_fields(data).values()
                   if field.record == "central header" and field.name == "version needed"})


def test_central_version_above_63_rejected(sealed_bytes: bytes, strict: TrustPolicy):
    data = bytearray(sealed_bytes)
    data[central_version_offsets(sealed_bytes)[0]] = MAX_ZIP_EXTRACT_VERSION + 1

    with pytest.raises(ArchiveFormatError) as excinfo:
        read_package(bytes(data), strict)
    assert type(excinfo.value) is ArchiveFormatError


# ---------------------------------------------------------------------------------------------
# Property tests over malformed inputs
# ---------------------------------------------------------------------------------------------

EXAMPLES_PER_PROPERTY = 300
PROPERTY_TESTS = 6
# Inputs that the property tests below generate in total. Each input is read under two or
# three trust policies and by inspect_package.
PROPERTY_INPUTS_TOTAL = EXAMPLES_PER_PROPERTY * PROPERTY_TESTS

PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES_PER_PROPERTY,
    derandomize=True,  # the same inputs on every run, so CI results repeat
    database=None,
    deadline=None,  # timing varies on a loaded machine, and no test here measures speed
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Exceptions that escape the reader, as (type, text of the edge_runtime/package.py line that
# raised it). Empty: every failure must be a PackageError. An entry may only document a bug
# that is being fixed, with an xfail test beside it.
KNOWN_ESCAPES: tuple[tuple[type[BaseException], str], ...] = ()


def is_known_escape(exc: BaseException) -> bool:
    package_file = str(Path("edge_runtime") / "package.py")
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if frame.filename.endswith(package_file)]
    if not frames:
        return False
    line = frames[-1].line
    return any(isinstance(exc, kind) and line == text for kind, text in KNOWN_ESCAPES)


@dataclass
class ReaderProbe:
    """Reads each input as a device and as a development tool would, and counts the results."""

    policies: Sequence[TrustPolicy]
    strict: TrustPolicy
    # The members that a read under ``strict`` may return; None skips the check.
    allowed_members: Sequence[dict[str, bytes]] | None
    inputs: int = 0
    known_escapes: int = 0

    def check(self, data: bytes) -> None:
        self.inputs += 1
        for policy in self.policies:
            self._call(lambda policy=policy: read_package(data, policy), policy is self.strict)
        self._call(lambda: inspect_package(data), False)

    def _call(self, reader: Callable[[], Any], strict: bool) -> None:
        try:
            result = reader()
        except PackageError:
            return
        except Exception as exc:
            if not is_known_escape(exc):
                raise
            self.known_escapes += 1
            return
        if strict and self.allowed_members is not None:
            assert isinstance(result, ModelPackage)
            assert result.members in self.allowed_members

    def report(self, label: str) -> None:
        print(f"\n{label}: {self.inputs} inputs, {self.known_escapes} reads hit a known bug "
              f"({PROPERTY_INPUTS_TOTAL} inputs across the {PROPERTY_TESTS} property tests)")


@pytest.fixture(scope="module")
def second_sealed_bytes(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Another package from the demo signer, with a different version and tokenizer."""
    path = tmp_path_factory.mktemp("second") / "p.edgepkg"
    return write_sealed(path, keys, SECOND_MEMBERS, version=4).read_bytes()


@pytest.fixture
def probe(keys: Keys, strict: TrustPolicy) -> ReaderProbe:
    unverified = TrustPolicy.unverified(device_key=keys.device)
    return ReaderProbe(policies=(strict, unverified), strict=strict,
                       allowed_members=(MEMBERS, SECOND_MEMBERS))


HOSTILE_NAMES = st.one_of(
    st.sampled_from([
        MANIFEST_NAME, "model.onnx", "tokenizer.json", SIGNATURE_NAME, "..", "../manifest.json",
        "/manifest.json", "/etc/passwd", "models\\model.onnx", "C:model.onnx", "./model.onnx",
        "models//model.onnx", "models/", ".", "model.onnx/..", "a/../../b", "manifest.json ",
    ]),
    st.text(alphabet="ab./\\:", min_size=1, max_size=12),
    st.text(min_size=1, max_size=30),
    st.integers(min_value=256, max_value=65535).map(lambda length: "n" * length),
)

EDGE_INTEGERS = [0, -1, 1, 2, 2**31, 2**32, 2**63, 2**64, -(2**64), 10**400, -(10**400)]


def iso_times() -> st.SearchStrategy[str]:
    """ISO 8601 times across the datetime range, with and without a UTC offset."""
    offsets = st.one_of(
        st.none(),
        st.timedeltas(min_value=dt.timedelta(hours=-23, minutes=-59),
                      max_value=dt.timedelta(hours=23, minutes=59)).map(dt.timezone),
    )
    times = st.builds(lambda moment, zone: moment.replace(tzinfo=zone).isoformat(),
                      st.datetimes(), offsets)
    extremes = st.sampled_from(["9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00+00:00",
                                "2030-01-01", "not a time", ""])
    return st.one_of(times, extremes)


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(EDGE_INTEGERS), st.floats(),
    st.text(max_size=20), iso_times(),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def manifest_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Return the path of every value inside a JSON document, the root excluded."""
    paths = []
    if isinstance(value, dict):
        for key, item in value.items():
            paths += [prefix + (key,), *manifest_paths(item, prefix + (key,))]
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += [prefix + (index,), *manifest_paths(item, prefix + (index,))]
    return paths


# Keys that the reader looks up in a manifest, its model, gate and encryption sections, so
# that an added key often means something to the reader.
MANIFEST_KEYS = [
    "schema_version", "name", "version", "task", "labels", "model", "tokenizer", "gate",
    "expires_at", "members", "encryption", "member", "inputs", "outputs", "precision",
    "max_length", "temperature", "threshold", "fitted_on", "sha256", "size", "plaintext_sha256",
    "recipients", "algorithm", "nonce_prefix", "segment_size", "plaintext_size", "type", "suite",
    "recipient_key_id", "enc", "ciphertext", "salt", "n", "r", "p", "nonce", "kdf",
]


@st.composite
def mutated_manifests(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    """Replace, delete or add one to three values anywhere below the root of ``base``."""
    document: Any = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = manifest_paths(document)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        new_value = draw(JSON_VALUES)
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        if action == "replace":
            parent[path[-1]] = new_value
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.one_of(st.sampled_from(MANIFEST_KEYS), st.text(max_size=12)))] = (
                new_value)
        else:
            parent.insert(path[-1], new_value)
    return document


@pytest.fixture(scope="module")
def sealed_members(sealed_bytes: bytes) -> dict[str, bytes]:
    """The raw archive members of the sealed package, signature included."""
    return read_archive(sealed_bytes)[1]


def test_random_bytes_rejected(probe: ReaderProbe):
    forged_tail = st.builds(lambda body, end: body + b"PK\x05\x06" + end,
                            st.binary(max_size=512), st.binary(min_size=18, max_size=18))
    inputs = st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=512).map(lambda body: b"PK\x03\x04" + body),
        forged_tail,
    )

    @PROPERTY_SETTINGS
    @given(data=inputs)
    def check(data: bytes) -> None:
        probe.check(data)

    check()
    probe.report("random bytes")
    assert probe.inputs >= EXAMPLES_PER_PROPERTY


def test_truncated_package_rejected(probe: ReaderProbe, sealed_bytes: bytes):
    @PROPERTY_SETTINGS
    @given(length=st.integers(min_value=0, max_value=len(sealed_bytes) - 1))
    def check(length: int) -> None:
        probe.check(sealed_bytes[:length])

    check()
    probe.report("truncations")
    assert probe.inputs >= EXAMPLES_PER_PROPERTY


def test_spliced_packages_rejected(probe: ReaderProbe, sealed_bytes: bytes,
                                   second_sealed_bytes: bytes):
    sources = [sealed_bytes, second_sealed_bytes]

    @st.composite
    def splices(draw: st.DrawFn) -> bytes:
        """Cut a package at two points and put bytes of either package, or random bytes,
        in between."""
        outer = draw(st.sampled_from(sources))
        inner = draw(st.sampled_from(sources))
        cut = draw(st.integers(min_value=0, max_value=len(outer)))
        resume = draw(st.integers(min_value=cut, max_value=len(outer)))
        start = draw(st.integers(min_value=0, max_value=len(inner)))
        stop = draw(st.integers(min_value=start, max_value=len(inner)))
        middle = draw(st.one_of(st.just(inner[start:stop]), st.binary(max_size=64)))
        return outer[:cut] + middle + outer[resume:]

    @PROPERTY_SETTINGS
    @given(data=splices())
    def check(data: bytes) -> None:
        probe.check(data)

    check()
    probe.report("splices")
    assert probe.inputs >= EXAMPLES_PER_PROPERTY


def test_forged_zip_headers_rejected(probe: ReaderProbe):
    @st.composite
    def forged(draw: st.DrawFn) -> bytes:
        """Build a one-member archive by hand with random header fields, so that zipfile
        parses header values that it never writes itself."""
        name = draw(st.one_of(HOSTILE_NAMES, st.just(""))).encode("utf-8")
        content = draw(st.binary(max_size=64))
        sizes = st.one_of(st.just(len(content)), st.integers(0, 2**32 - 1))
        fields = (
            draw(st.one_of(st.integers(0, MAX_ZIP_EXTRACT_VERSION), st.integers(0, 255))),
            draw(st.integers(0, 255)),  # the byte after version needed
            draw(st.integers(0, 0xFFFF)),  # flags
            draw(st.one_of(st.sampled_from([0, 8, 12, 14, 99]), st.integers(0, 0xFFFF))),
            draw(st.integers(0, 0xFFFF)),  # time
            draw(st.integers(0, 0xFFFF)),  # date
            draw(st.one_of(st.just(zlib.crc32(content)), st.integers(0, 2**32 - 1))),
            draw(sizes),
            draw(sizes),
        )
        local = (struct.pack("<4sBBHHHHIII", b"PK\x03\x04", *fields)
                 + struct.pack("<HH", len(name), 0) + name + content)
        local_offset = draw(st.one_of(st.just(0), st.integers(0, 2**32 - 1)))
        central = (struct.pack("<4sH", b"PK\x01\x02", 0x0314)
                   + struct.pack("<BBHHHHIII", *fields)
                   + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, local_offset) + name)
        end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local), 0)
        return local + central + end

    @PROPERTY_SETTINGS
    @given(data=forged())
    def check(data: bytes) -> None:
        probe.check(data)

    check()
    probe.report("forged ZIP headers")
    assert probe.inputs >= EXAMPLES_PER_PROPERTY


def test_random_zip_archives_rejected(probe: ReaderProbe, sealed_members: dict[str, bytes]):
    base = json.loads(sealed_members[MANIFEST_NAME])
    contents = st.one_of(
        st.binary(max_size=200),
        st.sampled_from(list(sealed_members.values())),
        mutated_manifests(base).map(lambda document: json.dumps(document).encode("utf-8")),
        JSON_VALUES.map(lambda document: json.dumps(document).encode("utf-8")),
    )
    # Package member names half of the time, so that more archives get past the name checks.
    # zipfile cuts a name at its first NUL and cannot write an empty name.
    names = st.one_of(
        st.sampled_from([MANIFEST_NAME, "model.onnx", "tokenizer.json", SIGNATURE_NAME]),
        HOSTILE_NAMES.filter(lambda name: not name.startswith("\x00")),
    )
    compressions = st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
    entries = st.lists(st.tuples(names, contents, compressions), max_size=18)

    @PROPERTY_SETTINGS
    @given(entries=entries)
    def check(entries: list[tuple[str, bytes, int]]) -> None:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # duplicate names
            with zipfile.ZipFile(buffer, "w") as archive:
                for name, data, compression in entries:
                    archive.writestr(name, data, compress_type=compression)
        probe.check(buffer.getvalue())

    check()
    probe.report("random ZIP archives")
    assert probe.inputs >= EXAMPLES_PER_PROPERTY


def test_random_manifests_rejected(probe: ReaderProbe, keys: Keys,
                                   sealed_members: dict[str, bytes], tmp_path: Path):
    # Every mutated manifest is signed again, so reads get past the signature check to the
    # manifest, digest, expiry, rollback and decryption checks.
    base = json.loads(sealed_members[MANIFEST_NAME])
    members = {name: data for name, data in sealed_members.items() if name != SIGNATURE_NAME}
    with_rollback = TrustPolicy(trusted_keys=(keys.signer_public,), device_key=keys.device,
                                rollback=RollbackState(tmp_path / "state.json"),
                                allow_downgrade=True)
    probe.policies = (*probe.policies, with_rollback)
    # The signer vouches for every mutated manifest, so a strict read may return anything,
    # ciphertext included when the mutation drops the encryption section.
    probe.allowed_members = None

    @PROPERTY_SETTINGS
    @given(document=mutated_manifests(base))
    def check(document: Any) -> None:
        archive = {**members, MANIFEST_NAME: json.dumps(document).encode("utf-8")}
        archive[SIGNATURE_NAME] = signing.sign_members(archive, keys.signer)
        probe.check(zip_bytes(list(archive.items())))

    check()
    probe.report("random manifests")
    assert probe.inputs >= EXAMPLES_PER_PROPERTY


# Manifest values that once escaped as non-package errors. Each input is signed by the
# trusted signer, so the reader gets past the signature check to the line under test.


def signed_with_gate(keys: Keys, gate: dict[str, Any]) -> bytes:
    return hand_built(base_manifest(gate=gate), MEMBERS, signer=keys.signer)


def test_gate_temperature_huge_integer(keys: Keys, strict: TrustPolicy):
    data = signed_with_gate(keys, {"temperature": 10**400, "threshold": 0.5})

    with pytest.raises(ManifestError) as excinfo:
        read_package(data, strict)
    assert type(excinfo.value) is ManifestError


@pytest.mark.parametrize("fitted_on", ["validation", [1, 2], 7])
def test_gate_fitted_on_not_object(keys: Keys, strict: TrustPolicy, fitted_on: Any):
    data = signed_with_gate(keys, {"temperature": 1.5, "threshold": 0.5, "fitted_on": fitted_on})

    with pytest.raises(ManifestError) as excinfo:
        read_package(data, strict)
    assert type(excinfo.value) is ManifestError


def manifest_with_long_integer() -> bytes:
    """Build an unsigned package whose manifest has a 5,000-digit integer, over Python's
    default limit of 4,300 digits for int() on a string."""
    manifest = with_digests(base_manifest(), MEMBERS)
    text = json.dumps(manifest).replace('"version": 3', '"version": ' + "7" * 5000)
    return zip_bytes([(MANIFEST_NAME, text.encode("utf-8")), *MEMBERS.items()])


@pytest.mark.parametrize("reader", [read_package, inspect_package])
def test_manifest_long_integer(reader: Callable[[bytes], Any]):
    with pytest.raises(ManifestError) as excinfo:
        reader(manifest_with_long_integer())
    assert type(excinfo.value) is ManifestError


# ---------------------------------------------------------------------------------------------
# The plaintext model stays in memory
# ---------------------------------------------------------------------------------------------

# Run in a child process whose working folder, TMPDIR and HOME are fresh folders. The child
# records every file write that Python's audit hooks see while it reads the package and creates
# an ONNX Runtime session, then makes one deliberate write to show that the hook works. It also
# hashes every file in the three folders before the read and after the session runs, because
# audit hooks do not see files that native code (ONNX Runtime's C++ core) opens itself.
CHILD_SCRIPT = r"""
import json, os, sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
FILE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.link",
               "os.symlink", "tempfile.mkstemp", "tempfile.mkdtemp"}
writes = []

def record_writes(event, args):
    if event == "open":
        path, mode, flags = args
        writing_mode = isinstance(mode, str) and any(c in mode for c in "wax+")
        if writing_mode or (isinstance(flags, int) and flags & WRITE_FLAGS):
            writes.append([event, repr(path), repr(mode), flags])
    elif event in FILE_EVENTS or event.startswith("shutil."):
        writes.append([event, repr(args)])

sys.addaudithook(record_writes)

import hashlib
import numpy as np
import onnxruntime
from edge_runtime import encryption, signing
from edge_runtime.package import TrustPolicy, read_package

def hash_files():
    hashes = {}
    for folder in (os.getcwd(), os.environ["TMPDIR"], os.environ["HOME"]):
        for root, _, names in os.walk(folder):
            for name in names:
                with open(os.path.join(root, name), "rb") as handle:
                    hashes[os.path.join(root, name)] = hashlib.sha256(handle.read()).hexdigest()
    return hashes

package_path, signer_path, device_path, control_path = sys.argv[1:5]
with open(signer_path, "rb") as handle:
    signer = signing.load_public_key_pem(handle.read())
device_key = encryption.load_private_key(device_path)
files_before = hash_files()
writes_before = list(writes)

package = read_package(package_path, TrustPolicy(trusted_keys=(signer,), device_key=device_key))
session = onnxruntime.InferenceSession(package.model_bytes, providers=["CPUExecutionProvider"])
output = session.run(None, {"x": np.arange(4, dtype=np.float32).reshape(1, 4)})[0]
checked_writes = writes[len(writes_before):]
files_after = hash_files()

with open(control_path, "wb") as handle:
    handle.write(b"control")
os.replace(control_path, control_path + ".moved")

print(json.dumps({
    "writes_at_import": writes_before,
    "writes": checked_writes,
    "control_writes": writes[len(writes_before) + len(checked_writes):],
    "files_before": files_before,
    "files_after": files_after,
    "model_sha256": hashlib.sha256(package.model_bytes).hexdigest(),
    "output": output.tolist(),
    "cwd": os.getcwd(),
}))
"""

MATMUL_WEIGHTS = [[float(row * 4 + column) for column in range(4)] for row in range(4)]


def tiny_onnx_model() -> bytes:
    """A real ONNX model, y = x @ W with a 4x4 weight, that ONNX Runtime can load."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weights = helper.make_tensor("W", TensorProto.FLOAT, [4, 4],
                                 [value for row in MATMUL_WEIGHTS for value in row])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny-matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # an IR version that every onnxruntime >= 1.20 reads
    onnx.checker.check_model(model)
    return model.SerializeToString()


def files_under(*folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.rglob("*") if path.is_file()]


def test_plaintext_model_not_written(keys: Keys, tmp_path: Path):
    model = tiny_onnx_model()
    weights = struct.pack("<16f", *(value for row in MATMUL_WEIGHTS for value in row))
    package_path = write_sealed(tmp_path / "packages" / "tiny.edgepkg", keys,
                                {"model.onnx": model, "tokenizer.json": TOKENIZER})
    folders = {name: tmp_path / name for name in ("work", "tmp", "home", "control")}
    for folder in folders.values():
        folder.mkdir()
    temp = str(folders["tmp"])
    env = {**os.environ, "TMPDIR": temp, "TMP": temp, "TEMP": temp,
           "HOME": str(folders["home"]), "PYTHONPATH": str(ROOT),
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}

    result = subprocess.run(
        [sys.executable, "-c", CHILD_SCRIPT, str(package_path), str(SIGNER_PUBLIC),
         str(DEVICE_PRIVATE), str(folders["control"] / "control.bin")],
        cwd=folders["work"], env=env, capture_output=True, text=True, timeout=180, check=False,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cwd"] == str(folders["work"])
    assert report["writes_at_import"] == []
    assert report["writes"] == []
    assert [event[0] for event in report["control_writes"]] == ["open", "os.rename"]
    # Nothing appeared or changed in the working folder, TMPDIR or HOME during the read and
    # the session. onnxruntime 1.32 writes telemetry files when it is imported (TMPDIR/.ses and
    # an SQLite database under HOME/.cache/Microsoft), so those two folders are not empty.
    assert report["files_after"] == report["files_before"]
    assert list(folders["work"].iterdir()) == []
    assert [path for path in files_under(folders["tmp"], folders["home"])
            if model in path.read_bytes() or weights in path.read_bytes()] == []
    assert report["model_sha256"] == hashlib.sha256(model).hexdigest()
    assert report["output"] == [[sum(x * MATMUL_WEIGHTS[row][column]
                                     for row, x in enumerate([0.0, 1.0, 2.0, 3.0]))
                                 for column in range(4)]]
    assert model not in package_path.read_bytes()
    assert [path.name for path in package_path.parent.iterdir()] == ["tiny.edgepkg"]


# ---------------------------------------------------------------------------------------------
# Rollback
# ---------------------------------------------------------------------------------------------


def accepted_versions(state_path: Path) -> dict[str, int]:
    """Parse the state file as JSON; the test fails here if it is not valid."""
    return json.loads(state_path.read_text(encoding="utf-8"))["accepted"]


class RollbackSetup(NamedTuple):
    state_path: Path
    trust: TrustPolicy  # trusts the demo signer and keys.other_signer
    packages: dict[int, Path]  # version -> package signed by the demo signer


@pytest.fixture
def rollback_setup(keys: Keys, tmp_path: Path) -> RollbackSetup:
    """A state file, a policy that uses it, and demo-signed packages at versions 1 to 3."""
    state_path = tmp_path / "state" / "rollback.json"
    trust = TrustPolicy(trusted_keys=(keys.signer_public, keys.other_signer.public_key()),
                        rollback=RollbackState(state_path))
    packages = {version: write_signed(tmp_path / f"v{version}.edgepkg", keys.signer,
                                      version=version) for version in (1, 2, 3)}
    return RollbackSetup(state_path, trust, packages)


def test_rollback_sequence(keys: Keys, rollback_setup: RollbackSetup):
    state_path, trust, packages = rollback_setup
    entry = f"{signing.key_id(keys.signer_public)}/intent-test"

    assert read_package(packages[2], trust).manifest.version == 2
    assert accepted_versions(state_path) == {entry: 2}

    with pytest.raises(RollbackError) as excinfo:
        read_package(packages[1], trust)
    assert "version 1" in str(excinfo.value)
    assert "version 2" in str(excinfo.value)
    assert accepted_versions(state_path) == {entry: 2}

    downgrade = TrustPolicy(trusted_keys=trust.trusted_keys, rollback=trust.rollback,
                            allow_downgrade=True)
    assert read_package(packages[1], downgrade).manifest.version == 1
    assert accepted_versions(state_path) == {entry: 2}

    assert read_package(packages[3], trust).manifest.version == 3
    assert accepted_versions(state_path) == {entry: 3}

    with pytest.raises(RollbackError, match="version 2 is older than version 3"):
        read_package(packages[2], trust)
    assert accepted_versions(state_path) == {entry: 3}


def test_rollback_per_package_name(keys: Keys, rollback_setup: RollbackSetup, tmp_path: Path):
    state_path, trust, packages = rollback_setup
    read_package(packages[2], trust)
    other_name = write_signed(tmp_path / "other-name.edgepkg", keys.signer,
                              name="intent-other", version=1)

    assert read_package(other_name, trust).manifest.name == "intent-other"
    signer_id = signing.key_id(keys.signer_public)
    assert accepted_versions(state_path) == {f"{signer_id}/intent-test": 2,
                                             f"{signer_id}/intent-other": 1}


def test_rollback_per_signer(keys: Keys, rollback_setup: RollbackSetup, tmp_path: Path):
    _, trust, packages = rollback_setup
    read_package(packages[2], trust)
    other_signer = write_signed(tmp_path / "other-signer.edgepkg", keys.other_signer, version=1)

    loaded = read_package(other_signer, trust)

    assert loaded.signer_key_id == signing.key_id(keys.other_signer.public_key())
    assert loaded.manifest.version == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"schema_version": 1, "accepted": {"k/intent-test": ', "is not valid JSON"),
        ("\udcff", "is not valid JSON"),
        ('{"schema_version": 1, "accepted": {"k/intent-test": "2"}}', "no valid 'accepted'"),
        ('["accepted"]', "no valid 'accepted'"),
    ],
)
def test_rollback_corrupt_state(rollback_setup: RollbackSetup, content: str, message: str):
    state_path, trust, packages = rollback_setup
    state_path.parent.mkdir(parents=True)
    state_path.write_bytes(content.encode("utf-8", "surrogateescape"))

    with pytest.raises(PackageError) as excinfo:
        read_package(packages[2], trust)
    assert message in str(excinfo.value)
    assert str(state_path) in str(excinfo.value)


@pytest.mark.parametrize("content", ["[" * 100_000, '{"accepted": {"k": ' + "7" * 5000 + "}}"])
def test_rollback_state_parser_limits(rollback_setup: RollbackSetup, content: str):
    state_path, trust, packages = rollback_setup
    state_path.parent.mkdir(parents=True)
    state_path.write_text(content, encoding="utf-8")

    with pytest.raises(PackageError):
        read_package(packages[2], trust)


# ---------------------------------------------------------------------------------------------
# Expiry
# ---------------------------------------------------------------------------------------------

EXPIRES_AT = "2030-01-01T00:00:00+00:00"
EXPIRY = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def policy_at(keys: Keys, moment: dt.datetime, **options: Any) -> TrustPolicy:
    return TrustPolicy(trusted_keys=(keys.signer_public,), now=lambda: moment, **options)


@pytest.fixture(scope="module")
def expiring(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("expiry") / "p.edgepkg"
    return write_signed(path, keys.signer, expires_at=EXPIRES_AT).read_bytes()


def test_expired_beyond_skew(keys: Keys, expiring: bytes):
    late = EXPIRY + dt.timedelta(seconds=301)

    with pytest.raises(ExpiredPackageError) as excinfo:
        read_package(expiring, policy_at(keys, late))
    assert f"expired at {EXPIRES_AT}" in str(excinfo.value)
    assert "clock skew tolerance 300 s" in str(excinfo.value)


@pytest.mark.parametrize("seconds_late", [-3600, 0, 299, 300])
def test_expiry_within_skew_loads(keys: Keys, expiring: bytes, seconds_late: int):
    moment = EXPIRY + dt.timedelta(seconds=seconds_late)

    loaded = read_package(expiring, policy_at(keys, moment))

    assert f"expiry: valid until {EXPIRES_AT}" in loaded.verdicts


def test_expiry_zero_skew(keys: Keys, expiring: bytes):
    late = EXPIRY + dt.timedelta(seconds=1)

    with pytest.raises(ExpiredPackageError):
        read_package(expiring, policy_at(keys, late, clock_skew=0))


def test_expiry_other_offset(keys: Keys, tmp_path: Path):
    # 02:00 at UTC+2 is the same instant as EXPIRY.
    path = write_signed(tmp_path / "p.edgepkg", keys.signer,
                        expires_at="2030-01-01T02:00:00+02:00")

    read_package(path, policy_at(keys, EXPIRY + dt.timedelta(seconds=300)))
    with pytest.raises(ExpiredPackageError):
        read_package(path, policy_at(keys, EXPIRY + dt.timedelta(seconds=301)))


def test_expiry_far_future_loads(keys: Keys, tmp_path: Path):
    path = write_signed(tmp_path / "p.edgepkg", keys.signer,
                        expires_at="9000-01-01T00:00:00+00:00")

    loaded = read_package(path, policy_at(keys, EXPIRY))

    assert loaded.manifest.expires_at == "9000-01-01T00:00:00+00:00"


def test_expiry_max_datetime_loads(keys: Keys, tmp_path: Path):
    path = write_signed(tmp_path / "p.edgepkg", keys.signer,
                        expires_at="9999-12-31T23:59:59+00:00")

    loaded = read_package(path, policy_at(keys, EXPIRY))

    assert loaded.manifest.version == 3


def test_expiry_without_offset_rejected(keys: Keys):
    data = hand_built(base_manifest(expires_at="2030-01-01T00:00:00"), MEMBERS,
                      signer=keys.signer)

    with pytest.raises(ManifestError) as excinfo:
        read_package(data, policy_at(keys, EXPIRY - dt.timedelta(days=1)))
    assert type(excinfo.value) is ManifestError
    assert "'2030-01-01T00:00:00'" in str(excinfo.value)
    assert "needs a UTC offset" in str(excinfo.value)


def test_writer_rejects_expiry_without_offset(keys: Keys, tmp_path: Path):
    with pytest.raises(ManifestError, match="needs a UTC offset") as excinfo:
        write_signed(tmp_path / "p.edgepkg", keys.signer, expires_at="2030-01-01T00:00:00")
    assert type(excinfo.value) is ManifestError
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Trust policy
# ---------------------------------------------------------------------------------------------


def test_unsigned_rejected_by_default(tmp_path: Path):
    path = write_package(tmp_path / "p.edgepkg", base_manifest(), MEMBERS)

    with pytest.raises(SignatureError, match="is not signed"):
        read_package(path, TrustPolicy())


def test_signed_without_trusted_keys(keys: Keys, tmp_path: Path):
    path = write_signed(tmp_path / "p.edgepkg", keys.signer)

    with pytest.raises(UnknownSignerError, match="no trusted signer keys"):
        read_package(path, TrustPolicy())


def test_other_signer_rejected(keys: Keys, strict: TrustPolicy, tmp_path: Path):
    path = write_package(tmp_path / "p.edgepkg", base_manifest(), MEMBERS,
                         signer_key=keys.other_signer, recipients=[keys.device_public])

    with pytest.raises(UnknownSignerError) as excinfo:
        read_package(path, strict)
    assert signing.key_id(keys.signer_public) in str(excinfo.value)


def test_other_device_rejected(keys: Keys, strict: TrustPolicy, tmp_path: Path):
    path = write_package(tmp_path / "p.edgepkg", base_manifest(), MEMBERS,
                         signer_key=keys.signer, recipients=[keys.other_device.public_key()])

    with pytest.raises(WrongRecipientError) as excinfo:
        read_package(path, strict)
    assert encryption.device_key_id(keys.device) in str(excinfo.value)


def test_encrypted_without_device_key(keys: Keys, sealed_bytes: bytes):
    trust = TrustPolicy(trusted_keys=(keys.signer_public,))

    with pytest.raises(DecryptionError, match="is encrypted; pass this device's private key"):
        read_package(sealed_bytes, trust)


def test_passphrase_recipient(keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = write_package(tmp_path / "p.edgepkg", base_manifest(), MEMBERS,
                         signer_key=keys.signer, passphrase="correct horse battery")
    trust = TrustPolicy(trusted_keys=(keys.signer_public,), passphrase="correct horse battery")
    caplog.clear()

    with caplog.at_level(logging.WARNING, logger="edge_runtime.encryption"):
        loaded = read_package(path, trust)

    assert loaded.members == MEMBERS
    warnings_logged = [record.getMessage() for record in caplog.records
                       if record.levelno == logging.WARNING]
    passphrase_warnings = [message for message in warnings_logged
                           if "unwrapping the content key with a passphrase" in message]
    assert len(passphrase_warnings) == 1
    assert "development only" in passphrase_warnings[0]


def test_wrong_passphrase(keys: Keys, tmp_path: Path):
    path = write_package(tmp_path / "p.edgepkg", base_manifest(), MEMBERS,
                         signer_key=keys.signer, passphrase="correct horse battery")
    trust = TrustPolicy(trusted_keys=(keys.signer_public,), passphrase="wrong horse")

    with pytest.raises(DecryptionError, match="passphrase is wrong"):
        read_package(path, trust)


def test_unverified_reads_signed(keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = write_signed(tmp_path / "p.edgepkg", keys.signer)

    with caplog.at_level(logging.WARNING, logger="edge_runtime.package"):
        loaded = read_package(path, TrustPolicy.unverified())

    assert loaded.members == MEMBERS
    assert loaded.signer_key_id is None
    assert "signature: present, not checked (no trusted keys)" in loaded.verdicts
    assert any("signature not checked" in record.getMessage() for record in caplog.records)


def test_strict_verdicts(strict: TrustPolicy, sealed_bytes: bytes):
    verdicts = read_package(sealed_bytes, strict).verdicts

    assert verdicts[0].startswith("signature: valid, signer key ")
    assert ("decryption: 1 member(s) decrypted in memory; the content key matches the signed "
            "key commitment") in verdicts


def resigned(sealed_bytes: bytes, keys: Keys, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Return the sealed package with its manifest edited and signed again by the trusted
    signer, as a builder with the signing key (or a bug in one) could."""
    members = read_archive(sealed_bytes)[1]
    manifest = json.loads(members.pop(MANIFEST_NAME))
    members.pop(SIGNATURE_NAME)
    edit(manifest)
    return hand_built(manifest, members, keys.signer)


def test_wrap_of_other_key_fails_commitment(keys: Keys, strict: TrustPolicy,
                                             sealed_bytes: bytes):
    # The signer wraps a second content key for this device. Without the commitment, GCM
    # would be the only check left on which key decrypts the model.
    def wrap_other_key(manifest: dict[str, Any]) -> None:
        other_key = encryption.generate_content_key()
        wrap = encryption.wrap_content_key(other_key, keys.device_public, manifest["name"],
                                           manifest["version"])
        manifest["encryption"]["recipients"] = [wrap.to_dict()]

    with pytest.raises(DecryptionError, match="does not match the key commitment"):
        read_package(resigned(sealed_bytes, keys, wrap_other_key), strict)


@pytest.mark.parametrize("commitment", ["not base64!", "AAAA", 42, None])
def test_malformed_commitment_rejected(keys: Keys, strict: TrustPolicy, sealed_bytes: bytes,
                                       commitment: Any):
    def set_commitment(manifest: dict[str, Any]) -> None:
        manifest["encryption"]["key_commitment"] = commitment

    with pytest.raises(DecryptionError, match="key_commitment"):
        read_package(resigned(sealed_bytes, keys, set_commitment), strict)


def test_without_commitment_plaintext_digest_checked(keys: Keys, strict: TrustPolicy,
                                                     sealed_bytes: bytes):
    # Packages written before the key commitment existed still load, and their plaintext
    # digest is what ties the decrypted model to the signature.
    def drop_commitment(manifest: dict[str, Any]) -> None:
        del manifest["encryption"]["key_commitment"]

    def drop_commitment_and_edit_digest(manifest: dict[str, Any]) -> None:
        drop_commitment(manifest)
        manifest["encryption"]["plaintext_sha256"]["model.onnx"] = "0" * 64

    loaded = read_package(resigned(sealed_bytes, keys, drop_commitment), strict)
    assert loaded.members == MEMBERS
    assert ("decryption: 1 member(s) decrypted in memory; plaintext digests match the "
            "manifest") in loaded.verdicts
    with pytest.raises(PackageIntegrityError, match="decrypted 'model.onnx' has sha256"):
        read_package(resigned(sealed_bytes, keys, drop_commitment_and_edit_digest), strict)


def test_swapped_member_rejected(strict: TrustPolicy, sealed_members: dict[str, bytes],
                                 second_sealed_bytes: bytes):
    # Both packages come from the trusted signer, but each signature covers its own members.
    other = read_archive(second_sealed_bytes)[1]
    mixed = {**sealed_members, "model.onnx": other["model.onnx"]}

    with pytest.raises(MemberMismatchError, match="model.onnx"):
        read_package(zip_bytes(list(mixed.items())), strict)


def test_swapped_signature_rejected(strict: TrustPolicy, sealed_members: dict[str, bytes],
                                    second_sealed_bytes: bytes):
    other = read_archive(second_sealed_bytes)[1]
    mixed = {**sealed_members, SIGNATURE_NAME: other[SIGNATURE_NAME]}

    with pytest.raises(MemberMismatchError, match=MANIFEST_NAME):
        read_package(zip_bytes(list(mixed.items())), strict)


# ---------------------------------------------------------------------------------------------
# Re-signing
# ---------------------------------------------------------------------------------------------


def test_sign_archive_new_signer(keys: Keys, sealed_bytes: bytes, tmp_path: Path):
    target = sign_archive(sealed_bytes, tmp_path / "resigned.edgepkg", keys.other_signer)
    other_public = keys.other_signer.public_key()

    loaded = read_package(target, TrustPolicy(trusted_keys=(other_public,),
                                              device_key=keys.device))

    assert loaded.members == MEMBERS
    assert loaded.signer_key_id == signing.key_id(other_public)


def test_sign_archive_keeps_members(keys: Keys, sealed_bytes: bytes, tmp_path: Path):
    target = sign_archive(sealed_bytes, tmp_path / "resigned.edgepkg", keys.other_signer)

    before = read_archive(sealed_bytes)[1]
    after = read_archive(target)[1]

    assert before.pop(SIGNATURE_NAME) != after.pop(SIGNATURE_NAME)
    assert after == before


def test_sign_archive_drops_old_signer(keys: Keys, strict: TrustPolicy, sealed_bytes: bytes,
                                       tmp_path: Path):
    target = sign_archive(sealed_bytes, tmp_path / "resigned.edgepkg", keys.other_signer)

    with pytest.raises(UnknownSignerError):
        read_package(target, strict)


def test_sign_archive_rejects_tampered(keys: Keys, tmp_path: Path):
    manifest = with_digests(base_manifest(), MEMBERS)
    data = zip_bytes([(MANIFEST_NAME, json.dumps(manifest).encode("utf-8")),
                      ("model.onnx", FAKE_MODEL[:-1] + b"!"), ("tokenizer.json", TOKENIZER)])

    with pytest.raises(PackageError, match="model.onnx"):
        sign_archive(data, tmp_path / "signed.edgepkg", keys.signer)
    assert not (tmp_path / "signed.edgepkg").exists()


# ---------------------------------------------------------------------------------------------
# Decryption in place: a package read from a file becomes the model's bytes without a copy
# ---------------------------------------------------------------------------------------------

# Three segments of 1 KiB and a partial one, so that moving plaintext segments down over the
# archive is exercised across segment boundaries.
IN_PLACE_MODEL = bytes((index * 7 + 3) % 251 for index in range(3 * 1024 + 100))


def write_segmented(path: Path, keys: Keys) -> Path:
    return write_package(path, base_manifest(), {**MEMBERS, "model.onnx": IN_PLACE_MODEL},
                         signer_key=keys.signer, recipients=[keys.device_public],
                         segment_size=1024)


def test_in_place_from_file_matches_bytes_read(keys: Keys, strict: TrustPolicy, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture):
    path = write_segmented(tmp_path / "p.edgepkg", keys)
    caplog.set_level(logging.DEBUG, logger="edge_runtime.package")

    from_file = read_package(path, strict)
    from_bytes = read_package(path.read_bytes(), strict)

    assert from_file.members == from_bytes.members
    assert from_file.model_bytes == IN_PLACE_MODEL
    assert from_file.members["tokenizer.json"] == TOKENIZER
    # No view of the archive outlived the decryption, so the model was not copied.
    assert "outlived" not in caplog.text


@pytest.mark.parametrize("segment", [0, 1, 2, 3])
def test_in_place_tampered_segment_rejected(keys: Keys, tmp_path: Path, segment: int):
    original = write_segmented(tmp_path / "p.edgepkg", keys).read_bytes()
    # The manifest's digest is rewritten and the signature dropped, so that only AES-GCM,
    # during the decryption over the archive, can notice the changed segment.
    tampered = tmp_path / "tampered.edgepkg"
    tampered.write_bytes(flip_in_member(original, "model.onnx", segment * (1024 + 16) + 5))
    unsigned = TrustPolicy(device_key=keys.device, allow_unsigned=True)

    with pytest.raises(DecryptionError, match=f"segment {segment} of 4"):
        read_package(tampered, unsigned)


def flip_in_member(data: bytes, name: str, offset: int) -> bytes:
    """Rebuild an archive with one bit of ``name`` flipped at ``offset``, its manifest digest
    and size updated, and no signature."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        contents = {info.filename: archive.read(info) for info in archive.infolist()}
    changed = bytearray(contents[name])
    changed[offset] ^= 0x40
    contents[name] = bytes(changed)
    manifest = json.loads(contents["manifest.json"])
    manifest["members"][name] = {"sha256": hashlib.sha256(contents[name]).hexdigest(),
                                 "size": len(contents[name])}
    contents["manifest.json"] = json.dumps(manifest).encode("utf-8")
    contents.pop("model.sig", None)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for member, blob in contents.items():
            archive.writestr(member, blob)
    return out.getvalue()


def test_flips_read_from_file_match_flips_read_from_bytes(sealed_bytes: bytes,
                                                          strict: TrustPolicy, tmp_path: Path):
    # A file is read into memory the reader owns and decrypted in place; bytes are not. Every
    # single-byte flip must get the same verdict either way.
    path = tmp_path / "flipped.edgepkg"
    differences = []
    for offset in range(len(sealed_bytes)):
        mutated = bytearray(sealed_bytes)
        mutated[offset] ^= 0x01
        path.write_bytes(mutated)
        verdicts = []
        for source in (bytes(mutated), path):
            try:
                verdicts.append(read_package(source, strict).members)
            except PackageError as exc:
                verdicts.append(type(exc).__name__)
        if verdicts[0] != verdicts[1]:
            differences.append((offset, verdicts))

    assert differences == []
