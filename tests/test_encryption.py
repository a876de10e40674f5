"""Tests for edge_runtime.encryption: segmented member encryption, content-key wraps and keys."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge_runtime import encryption as enc
from edge_runtime.encryption import (
    DecryptionError,
    DeviceKeyError,
    EncryptedMember,
    EncryptionError,
    HpkeWrap,
    PassphraseWrap,
    WrongRecipientError,
)
from edge_runtime.errors import PackageError

NAME = "clinc150-student"
VERSION = 7
MEMBER = "model.onnx"
SEGMENT = 64  # bytes; small, so that a few hundred bytes span several segments
TAG = enc.GCM_TAG_BYTES
FAST_SCRYPT = {"n": 2**10, "r": 8, "p": 1}  # keeps passphrase tests fast


@pytest.fixture(scope="module")
def key() -> bytes:
    return enc.generate_content_key()


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def encrypt(data: bytes, key: bytes, segment_size: int = SEGMENT) -> EncryptedMember:
    return enc.encrypt_member(data, key, NAME, VERSION, MEMBER, segment_size=segment_size)


def decrypt(encrypted: EncryptedMember, key: bytes) -> bytes:
    return enc.decrypt_member(encrypted, key, NAME, VERSION, MEMBER)


def split_segments(encrypted: EncryptedMember) -> list[bytes]:
    stride = encrypted.segment_size + TAG
    data = encrypted.ciphertext
    return [data[i : i + stride] for i in range(0, len(data), stride)]


def with_segments(encrypted: EncryptedMember, segments: list[bytes], **changes) -> EncryptedMember:
    return encrypted.replace(ciphertext=b"".join(segments), **changes)


def flip_byte(data: bytes, position: int) -> bytes:
    flipped = bytearray(data)
    flipped[position] ^= 0x01
    return bytes(flipped)


# ---------------------------------------------------------------------------------------------
# Segmented member encryption
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT + 5], ids=lambda s: f"{s}B"
)
def test_member_round_trip(key, size):
    data = payload(size, seed=size)
    encrypted = encrypt(data, key)
    expected_segments = max(1, -(-size // SEGMENT))

    assert encrypted.plaintext_size == size
    assert encrypted.segment_size == SEGMENT
    assert encrypted.segment_count == expected_segments
    assert len(encrypted.ciphertext) == size + TAG * expected_segments
    assert decrypt(encrypted, key) == data


def test_member_round_trip_default_segment_size(key):
    data = payload(3 * 1024 * 1024 + 7, seed=1)  # 3 MiB and a partial segment
    encrypted = enc.encrypt_member(data, key, NAME, VERSION, MEMBER)

    assert encrypted.segment_size == 1024 * 1024
    assert encrypted.segment_count == 4
    assert decrypt(encrypted, key) == data


def test_member_digest_matches_plaintext(key):
    data = payload(3 * SEGMENT + 5, seed=7)
    digest = hashlib.sha256()

    plaintext = enc.decrypt_member(encrypt(data, key), key, NAME, VERSION, MEMBER, digest=digest)

    assert plaintext == data
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_member_digest_stops_on_failed_segment(key):
    encrypted = encrypt(payload(3 * SEGMENT, seed=8), key)
    tampered = encrypted.replace(ciphertext=flip_byte(encrypted.ciphertext, 1))
    digest = hashlib.sha256()

    with pytest.raises(DecryptionError, match="segment 0 of 3"):
        enc.decrypt_member(tampered, key, NAME, VERSION, MEMBER, digest=digest)
    # The worker thread has finished and hashed nothing from the failed segment on.
    assert digest.hexdigest() == hashlib.sha256(b"").hexdigest()


def test_member_read_only_view_not_copied(key):
    header, ciphertext = header_of(key)
    view = memoryview(ciphertext)

    member = EncryptedMember.from_dict(header, view)

    assert member.ciphertext is view


def test_member_writable_buffer_copied(key):
    header, ciphertext = header_of(key)
    buffer = bytearray(ciphertext)

    member = EncryptedMember.from_dict(header, memoryview(buffer))
    buffer[0] ^= 0x01  # a change after the check must not reach the decrypted member

    assert member.ciphertext == ciphertext
    assert enc.decrypt_member(member, key, NAME, VERSION, MEMBER) == payload(3 * SEGMENT + 5)


def test_member_ciphertext_hides_plaintext(key):
    data = b"A" * (4 * SEGMENT)
    encrypted = encrypt(data, key)

    assert b"A" * 16 not in encrypted.ciphertext


def test_member_nonce_prefix_is_fresh(key):
    first = encrypt(b"same", key)
    second = encrypt(b"same", key)

    assert len(first.nonce_prefix) == enc.NONCE_PREFIX_BYTES
    assert first.nonce_prefix != second.nonce_prefix
    assert first.ciphertext != second.ciphertext


def test_member_empty_is_last_segment(key):
    encrypted = encrypt(b"", key)
    aad = enc._member_aad(NAME, VERSION, MEMBER, SEGMENT, 0, DecryptionError)
    final_nonce = encrypted.nonce_prefix + bytes(4) + b"\x01"

    assert AESGCM(key).decrypt(final_nonce, encrypted.ciphertext, aad) == b""


def test_member_reordered_segments(key):
    encrypted = encrypt(payload(3 * SEGMENT + 5), key)
    segments = split_segments(encrypted)
    segments[0], segments[1] = segments[1], segments[0]

    with pytest.raises(DecryptionError, match="segment 0 of 4"):
        decrypt(with_segments(encrypted, segments), key)


def test_member_truncated(key):
    encrypted = encrypt(payload(3 * SEGMENT + 5), key)
    segments = split_segments(encrypted)[:-1]

    with pytest.raises(DecryptionError, match="ciphertext is 240 bytes"):
        decrypt(with_segments(encrypted, segments), key)


def test_member_truncated_with_matching_header(key):
    # Drop whole segments and shrink the declared size to match, so the length check passes.
    encrypted = encrypt(payload(3 * SEGMENT), key)
    segments = split_segments(encrypted)[:-1]
    truncated = with_segments(encrypted, segments, plaintext_size=2 * SEGMENT)

    with pytest.raises(DecryptionError, match="failed AES-256-GCM authentication"):
        decrypt(truncated, key)


def test_member_extended(key):
    encrypted = encrypt(payload(3 * SEGMENT), key)
    segments = split_segments(encrypted)
    segments.append(segments[1])

    with pytest.raises(DecryptionError, match="ciphertext is"):
        decrypt(with_segments(encrypted, segments), key)


def test_member_extended_with_matching_header(key):
    encrypted = encrypt(payload(3 * SEGMENT), key)
    segments = split_segments(encrypted)
    segments.insert(2, segments[1])
    extended = with_segments(encrypted, segments, plaintext_size=4 * SEGMENT)

    with pytest.raises(DecryptionError, match="failed AES-256-GCM authentication"):
        decrypt(extended, key)


def seal_with_flags(key: bytes, data: bytes, flags: list[bool]) -> EncryptedMember:
    """Encrypt like encrypt_member, but with the given last-segment flag for each segment."""
    prefix = b"\x42" * enc.NONCE_PREFIX_BYTES
    aad = enc._member_aad(NAME, VERSION, MEMBER, SEGMENT, len(data), EncryptionError)
    segments = [
        AESGCM(key).encrypt(
            enc._segment_nonce(prefix, index, last),
            data[index * SEGMENT : (index + 1) * SEGMENT],
            aad,
        )
        for index, last in enumerate(flags)
    ]
    return EncryptedMember(prefix, SEGMENT, len(data), b"".join(segments))


def test_member_flags_control_round_trip(key):
    # The helper itself must produce a valid member when the flags are right.
    data = payload(2 * SEGMENT)

    assert decrypt(seal_with_flags(key, data, [False, True]), key) == data


def test_member_last_segment_without_flag(key):
    crafted = seal_with_flags(key, payload(2 * SEGMENT), [False, False])

    with pytest.raises(DecryptionError, match="segment 1 of 2"):
        decrypt(crafted, key)


def test_member_early_last_flag(key):
    crafted = seal_with_flags(key, payload(2 * SEGMENT), [True, True])

    with pytest.raises(DecryptionError, match="segment 0 of 2"):
        decrypt(crafted, key)


def test_member_flipped_byte_each_segment(key):
    encrypted = encrypt(payload(3 * SEGMENT + 5), key)
    stride = SEGMENT + TAG
    for index in range(encrypted.segment_count):
        segment_start = index * stride
        segment_end = min(segment_start + stride, len(encrypted.ciphertext))
        # One byte of the encrypted data and one byte of the tag.
        for position in (segment_start, segment_end - 1):
            damaged = encrypted.replace(ciphertext=flip_byte(encrypted.ciphertext, position)
            )
            with pytest.raises(DecryptionError, match=f"segment {index} of 4"):
                decrypt(damaged, key)


def test_member_flipped_nonce_prefix(key):
    encrypted = encrypt(payload(SEGMENT), key)
    damaged = encrypted.replace(nonce_prefix=flip_byte(encrypted.nonce_prefix, 0))

    with pytest.raises(DecryptionError):
        decrypt(damaged, key)


def test_member_edited_segment_size(key):
    # Same segment count and ciphertext length, so only the associated data catches it.
    encrypted = encrypt(payload(SEGMENT // 2), key)
    edited = encrypted.replace(segment_size=SEGMENT * 2)

    with pytest.raises(DecryptionError, match="failed AES-256-GCM authentication"):
        decrypt(edited, key)


def test_member_moved_to_other_member(key):
    encrypted = encrypt(payload(100), key)

    with pytest.raises(DecryptionError):
        enc.decrypt_member(encrypted, key, NAME, VERSION, "tokenizer.json")


def test_member_moved_to_other_package(key):
    encrypted = encrypt(payload(100), key)

    with pytest.raises(DecryptionError):
        enc.decrypt_member(encrypted, key, "clinc150-teacher", VERSION, MEMBER)


def test_member_moved_to_other_version(key):
    encrypted = encrypt(payload(100), key)

    with pytest.raises(DecryptionError):
        enc.decrypt_member(encrypted, key, NAME, VERSION + 1, MEMBER)


def test_encode_fields_unambiguous():
    # Moving a byte across a field boundary must change the encoding.
    assert enc._encode_fields(b"ab", b"c") != enc._encode_fields(b"a", b"bc")
    assert enc._encode_fields(b"a", b"") != enc._encode_fields(b"", b"a")
    assert enc._encode_fields(b"ab") == b"\x00\x00\x00\x02ab"


def test_member_wrong_key(key):
    encrypted = encrypt(payload(100), key)

    with pytest.raises(DecryptionError):
        decrypt(encrypted, enc.generate_content_key())


@pytest.mark.parametrize("bad_key", [b"", bytes(16), bytes(33), "0" * 32], ids=repr)
def test_member_encrypt_bad_key(bad_key):
    with pytest.raises(EncryptionError, match="content key"):
        encrypt(b"data", bad_key)


def test_member_decrypt_bad_key(key):
    encrypted = encrypt(b"data", key)

    with pytest.raises(DecryptionError, match="content key is 16 bytes"):
        decrypt(encrypted, bytes(16))


@pytest.mark.parametrize("segment_size", [0, -1, enc.MAX_SEGMENT_SIZE + 1, True, 64.0])
def test_member_bad_segment_size(key, segment_size):
    with pytest.raises(EncryptionError, match="segment_size"):
        encrypt(b"data", key, segment_size=segment_size)


@pytest.mark.parametrize(
    "name, version, member",
    [
        ("", 1, MEMBER),
        (NAME, -1, MEMBER),
        (NAME, 2**64, MEMBER),
        (NAME, "1", MEMBER),
        (NAME, 1, ""),
        (NAME, 1, "\udc80"),
    ],
    ids=[
        "empty-name",
        "negative-version",
        "huge-version",
        "str-version",
        "empty-member",
        "surrogate-member",
    ],
)
def test_member_bad_context(key, name, version, member):
    with pytest.raises(EncryptionError):
        enc.encrypt_member(b"data", key, name, version, member)


def test_member_errors_are_package_errors():
    assert issubclass(DecryptionError, PackageError)
    assert issubclass(WrongRecipientError, DecryptionError)
    assert issubclass(EncryptionError, PackageError)


def test_member_random_property(key):
    """Check seeded random sizes and segment sizes: every member round-trips, and any flipped
    byte is rejected. A seeded loop replaces hypothesis, which is not a dev dependency."""
    rng = random.Random(20240611)
    for _ in range(150):
        segment_size = rng.randint(1, 300)
        data = rng.randbytes(rng.randint(0, 1500))
        encrypted = encrypt(data, key, segment_size=segment_size)
        assert decrypt(encrypted, key) == data

        position = rng.randrange(len(encrypted.ciphertext))
        damaged = encrypted.replace(ciphertext=flip_byte(encrypted.ciphertext, position)
        )
        with pytest.raises(DecryptionError):
            decrypt(damaged, key)


# ---------------------------------------------------------------------------------------------
# Member header dicts
# ---------------------------------------------------------------------------------------------


def header_of(key: bytes) -> tuple[dict, bytes]:
    encrypted = encrypt(payload(3 * SEGMENT + 5), key)
    return encrypted.to_dict(), encrypted.ciphertext


def test_header_json_round_trip(key):
    data = payload(3 * SEGMENT + 5)
    encrypted = encrypt(data, key)
    header = json.loads(json.dumps(encrypted.to_dict()))
    parsed = EncryptedMember.from_dict(header, encrypted.ciphertext)

    assert parsed == encrypted
    assert decrypt(parsed, key) == data


def test_header_fields(key):
    header, _ = header_of(key)

    assert header["algorithm"] == "aes-256-gcm-segmented-v1"
    assert header["segment_size"] == SEGMENT
    assert header["plaintext_size"] == 3 * SEGMENT + 5
    assert len(base64.b64decode(header["nonce_prefix"])) == 7
    assert "ciphertext" not in header


@pytest.mark.parametrize("field", ["algorithm", "nonce_prefix", "segment_size", "plaintext_size"])
def test_header_missing_field(key, field):
    header, ciphertext = header_of(key)
    del header[field]

    with pytest.raises(DecryptionError, match=f"missing field.*{field}"):
        EncryptedMember.from_dict(header, ciphertext)


def test_header_unknown_field(key):
    header, ciphertext = header_of(key)
    header["compression"] = "zstd"

    with pytest.raises(DecryptionError, match="unknown field.*compression"):
        EncryptedMember.from_dict(header, ciphertext)


@pytest.mark.parametrize(
    "value",
    ["!!!!!!!!!!!!", "QUJDREVGRw", "QUJDREVGRx==", "QUJD REVGRw==", "ÄÄÄÄ"],
    ids=["bad-alphabet", "missing-padding", "non-canonical", "space", "non-ascii"],
)
def test_header_bad_base64(key, value):
    header, ciphertext = header_of(key)
    header["nonce_prefix"] = value

    with pytest.raises(DecryptionError, match="nonce_prefix"):
        EncryptedMember.from_dict(header, ciphertext)


@pytest.mark.parametrize("size", [0, 6, 8, 12])
def test_header_wrong_prefix_length(key, size):
    header, ciphertext = header_of(key)
    header["nonce_prefix"] = base64.b64encode(bytes(size)).decode()

    with pytest.raises(DecryptionError, match=f"decodes to {size} bytes; expected 7"):
        EncryptedMember.from_dict(header, ciphertext)


@pytest.mark.parametrize(
    "field, value",
    [
        ("segment_size", "64"),
        ("segment_size", True),
        ("segment_size", 0),
        ("segment_size", enc.MAX_SEGMENT_SIZE + 1),
        ("plaintext_size", -1),
        ("plaintext_size", 1.5),
        ("plaintext_size", None),
        ("nonce_prefix", 7),
        ("algorithm", "aes-128-gcm"),
    ],
)
def test_header_bad_value(key, field, value):
    header, ciphertext = header_of(key)
    header[field] = value

    with pytest.raises(DecryptionError, match=field):
        EncryptedMember.from_dict(header, ciphertext)


def test_header_too_many_segments(key):
    header, ciphertext = header_of(key)
    header["segment_size"] = 1
    header["plaintext_size"] = 2**32 + 1

    with pytest.raises(DecryptionError, match="segments"):
        EncryptedMember.from_dict(header, ciphertext)


@pytest.mark.parametrize("header", [None, [], "header", 3])
def test_header_not_a_dict(key, header):
    with pytest.raises(DecryptionError, match="expected a JSON object"):
        EncryptedMember.from_dict(header, b"")


def test_header_ciphertext_not_bytes(key):
    header, _ = header_of(key)

    with pytest.raises(DecryptionError, match="ciphertext is str"):
        EncryptedMember.from_dict(header, "text")


# ---------------------------------------------------------------------------------------------
# HPKE wraps
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def p256_device():
    return enc.generate_device_key()


@pytest.fixture(scope="module")
def x25519_device():
    return enc.generate_device_key("x25519")


def test_hpke_p256_round_trip(key, p256_device):
    wrap = enc.wrap_content_key(key, p256_device.public_key(), NAME, VERSION)

    assert wrap.suite == enc.SUITE_P256
    assert len(wrap.enc) == 65
    assert len(wrap.ciphertext) == 32 + TAG
    assert enc.unwrap_content_key([wrap], p256_device, NAME, VERSION) == key


def test_hpke_x25519_round_trip(key, x25519_device):
    wrap = enc.wrap_content_key(key, x25519_device.public_key(), NAME, VERSION)

    assert wrap.suite == enc.SUITE_X25519
    assert len(wrap.enc) == 32
    assert enc.unwrap_content_key([wrap], x25519_device, NAME, VERSION) == key


def test_hpke_fresh_encapsulation(key, p256_device):
    first = enc.wrap_content_key(key, p256_device.public_key(), NAME, VERSION)
    second = enc.wrap_content_key(key, p256_device.public_key(), NAME, VERSION)

    assert first.enc != second.enc


def test_hpke_key_id_is_spki_sha256(p256_device):
    der = p256_device.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = hashlib.sha256(der).hexdigest()

    assert enc.device_key_id(p256_device) == expected
    assert enc.device_key_id(p256_device.public_key()) == expected


def test_hpke_wrap_names_recipient(key, p256_device):
    wrap = enc.wrap_content_key(key, p256_device.public_key(), NAME, VERSION)

    assert wrap.recipient_key_id == enc.device_key_id(p256_device)


def test_hpke_wrong_device(key, p256_device):
    wrap = enc.wrap_content_key(key, p256_device.public_key(), NAME, VERSION)
    stranger = enc.generate_device_key()
    stranger_id = enc.device_key_id(stranger)

    with pytest.raises(WrongRecipientError, match=stranger_id):
        enc.unwrap_content_key([wrap], stranger, NAME, VERSION)


def test_hpke_no_wraps(p256_device):
    with pytest.raises(WrongRecipientError, match="wraps for keys none"):
        enc.unwrap_content_key([], p256_device, NAME, VERSION)


def test_hpke_multiple_recipients(key):
    devices = [enc.generate_device_key() for _ in range(3)]
    wraps = [enc.wrap_content_key(key, d.public_key(), NAME, VERSION) for d in devices]
    outsider = enc.generate_device_key()

    for device in devices:
        assert enc.unwrap_content_key(wraps, device, NAME, VERSION) == key
    with pytest.raises(WrongRecipientError):
        enc.unwrap_content_key(wraps, outsider, NAME, VERSION)


def test_hpke_mixed_suites(key, p256_device, x25519_device):
    wraps = [
        enc.wrap_content_key(key, p256_device.public_key(), NAME, VERSION),
        enc.wrap_content_key(key, x25519_device.public_key(), NAME, VERSION),
    ]

    assert enc.unwrap_content_key(wraps, p256_device, NAME, VERSION) == key
    assert enc.unwrap_content_key(wraps, x25519_device, NAME, VERSION) == key


def test_hpke_other_package_name(key, p256_device):
    wrap = enc.wrap_content_key(key, p256_device.public_key(), NAME, VERSION)

    with pytest.raises(DecryptionError, match="failed HPKE decryption") as caught:
        enc.unwrap_content_key([wrap], p256_device, "clinc150-teacher", VERSION)
    assert not isinstance(caught.value, WrongRecipientError)


def test_hpke_other_version(key, p256_device):
    wrap = enc.wrap_content_key(key, p256_device.public_key(), NAME, VERSION)

    with pytest.raises(DecryptionError, match="failed HPKE decryption"):
        enc.unwrap_content_key([wrap], p256_device, NAME, VERSION + 1)


@pytest.mark.parametrize("field", ["enc", "ciphertext"])
def test_hpke_tampered_wrap(key, p256_device, field):
    wrap = enc.wrap_content_key(key, p256_device.public_key(), NAME, VERSION)
    damaged = wrap.replace(**{field: flip_byte(getattr(wrap, field), 10)})

    with pytest.raises(DecryptionError, match="failed HPKE decryption"):
        enc.unwrap_content_key([damaged], p256_device, NAME, VERSION)


def test_hpke_relabelled_wrap(key, p256_device):
    # A wrap for another device, relabelled with this device's key id, must not open.
    other = enc.generate_device_key()
    wrap = enc.wrap_content_key(key, other.public_key(), NAME, VERSION)
    relabelled = wrap.replace(recipient_key_id=enc.device_key_id(p256_device))

    with pytest.raises(DecryptionError, match="failed HPKE decryption"):
        enc.unwrap_content_key([relabelled], p256_device, NAME, VERSION)


def test_hpke_suite_mismatch(key, p256_device, x25519_device):
    wrap = enc.wrap_content_key(key, x25519_device.public_key(), NAME, VERSION)
    relabelled = wrap.replace(recipient_key_id=enc.device_key_id(p256_device))

    with pytest.raises(DecryptionError, match="does not match the device key"):
        enc.unwrap_content_key([relabelled], p256_device, NAME, VERSION)


def test_hpke_unsupported_curve(key):
    p384 = ec.generate_private_key(ec.SECP384R1())

    with pytest.raises(EncryptionError, match="secp384r1"):
        enc.wrap_content_key(key, p384.public_key(), NAME, VERSION)
    with pytest.raises(DecryptionError, match="secp384r1"):
        enc.unwrap_content_key([], p384, NAME, VERSION)


def test_hpke_wrap_bad_key(p256_device):
    with pytest.raises(EncryptionError, match="content key is 31 bytes"):
        enc.wrap_content_key(bytes(31), p256_device.public_key(), NAME, VERSION)


def test_hpke_skips_passphrase_wraps(key, p256_device):
    wraps = [
        enc.wrap_content_key_with_passphrase(key, "dev", NAME, VERSION, **FAST_SCRYPT),
        enc.wrap_content_key(key, p256_device.public_key(), NAME, VERSION),
    ]

    assert enc.unwrap_content_key(wraps, p256_device, NAME, VERSION) == key


def test_hpke_unparsed_wrap_dicts(key, p256_device):
    data = enc.wrap_content_key(key, p256_device.public_key(), NAME, VERSION).to_dict()

    with pytest.raises(DecryptionError, match=r"wraps\[0\] is dict"):
        enc.unwrap_content_key([data], p256_device, NAME, VERSION)


# ---------------------------------------------------------------------------------------------
# HPKE wrap dicts
# ---------------------------------------------------------------------------------------------


def hpke_dict(key: bytes, device) -> dict:
    return enc.wrap_content_key(key, device.public_key(), NAME, VERSION).to_dict()


@pytest.mark.parametrize("device_fixture", ["p256_device", "x25519_device"])
def test_hpke_dict_round_trip(key, request, device_fixture):
    device = request.getfixturevalue(device_fixture)
    data = json.loads(json.dumps(hpke_dict(key, device)))
    wrap = enc.wrap_from_dict(data)

    assert isinstance(wrap, HpkeWrap)
    assert enc.unwrap_content_key([wrap], device, NAME, VERSION) == key


@pytest.mark.parametrize("field", ["type", "suite", "recipient_key_id", "enc", "ciphertext"])
def test_hpke_dict_missing_field(key, p256_device, field):
    data = hpke_dict(key, p256_device)
    del data[field]

    with pytest.raises(DecryptionError, match=field):
        HpkeWrap.from_dict(data)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("enc", "not base64!", "not valid base64"),
        ("enc", base64.b64encode(bytes(32)).decode(), "decodes to 32 bytes; expected 65"),
        ("ciphertext", base64.b64encode(bytes(32)).decode(), "decodes to 32 bytes; expected 48"),
        ("ciphertext", 48, "expected string"),
        ("recipient_key_id", "AB" * 32, "64 lowercase hex digits"),
        ("recipient_key_id", "ab" * 31, "64 lowercase hex digits"),
        ("suite", "DHKEM(P-384, HKDF-SHA384), HKDF-SHA384, AES-256-GCM", "not supported"),
        ("type", "passphrase", "is not 'hpke'"),
    ],
    ids=[
        "enc-base64",
        "enc-length",
        "ciphertext-length",
        "ciphertext-int",
        "key-id-upper",
        "key-id-short",
        "suite",
        "type",
    ],
)
def test_hpke_dict_bad_value(key, p256_device, field, value, message):
    data = hpke_dict(key, p256_device)
    data[field] = value

    with pytest.raises(DecryptionError, match=message):
        HpkeWrap.from_dict(data)


@pytest.mark.parametrize("data", [None, [], {"type": "rsa"}, {}], ids=repr)
def test_wrap_from_dict_unknown(data):
    with pytest.raises(DecryptionError):
        enc.wrap_from_dict(data)


# ---------------------------------------------------------------------------------------------
# Passphrase wraps
# ---------------------------------------------------------------------------------------------


def test_passphrase_round_trip(key):
    wrap = enc.wrap_content_key_with_passphrase(key, "correct horse", NAME, VERSION, **FAST_SCRYPT)

    assert enc.unwrap_content_key_with_passphrase([wrap], "correct horse", NAME, VERSION) == key


def test_passphrase_bytes_round_trip(key):
    wrap = enc.wrap_content_key_with_passphrase(key, b"\xffbytes", NAME, VERSION, **FAST_SCRYPT)

    assert enc.unwrap_content_key_with_passphrase([wrap], b"\xffbytes", NAME, VERSION) == key


def test_passphrase_default_parameters(key):
    wrap = enc.wrap_content_key_with_passphrase(key, "pw", NAME, VERSION)
    data = wrap.to_dict()

    assert data["development_only"] is True
    assert data["kdf"] == "scrypt"
    assert (data["n"], data["r"], data["p"]) == (2**15, 8, 1)
    assert len(base64.b64decode(data["salt"])) == 16


def test_passphrase_wrong(key):
    wrap = enc.wrap_content_key_with_passphrase(key, "right", NAME, VERSION, **FAST_SCRYPT)

    with pytest.raises(DecryptionError, match="passphrase is wrong"):
        enc.unwrap_content_key_with_passphrase([wrap], "wrong", NAME, VERSION)


def test_passphrase_other_version(key):
    wrap = enc.wrap_content_key_with_passphrase(key, "pw", NAME, VERSION, **FAST_SCRYPT)

    with pytest.raises(DecryptionError):
        enc.unwrap_content_key_with_passphrase([wrap], "pw", NAME, VERSION + 1)


def test_passphrase_other_package(key):
    wrap = enc.wrap_content_key_with_passphrase(key, "pw", NAME, VERSION, **FAST_SCRYPT)

    with pytest.raises(DecryptionError):
        enc.unwrap_content_key_with_passphrase([wrap], "pw", "clinc150-teacher", VERSION)


def test_passphrase_edited_parameters(key):
    wrap = enc.wrap_content_key_with_passphrase(key, "pw", NAME, VERSION, **FAST_SCRYPT)
    edited = wrap.replace(n=2**11)

    with pytest.raises(DecryptionError):
        enc.unwrap_content_key_with_passphrase([edited], "pw", NAME, VERSION)


def test_passphrase_missing(key, p256_device):
    wrap = enc.wrap_content_key(key, p256_device.public_key(), NAME, VERSION)

    with pytest.raises(WrongRecipientError, match="no passphrase wrap"):
        enc.unwrap_content_key_with_passphrase([wrap], "pw", NAME, VERSION)


def test_passphrase_empty_rejected(key):
    with pytest.raises(EncryptionError, match="passphrase is empty"):
        enc.wrap_content_key_with_passphrase(key, "", NAME, VERSION, **FAST_SCRYPT)


@pytest.mark.parametrize(
    "params", [{"n": 1000}, {"n": 2**21}, {"r": 0}, {"p": 17}, {"n": 2**20, "r": 16}], ids=repr
)
def test_passphrase_bad_scrypt_parameters(key, params):
    with pytest.raises(EncryptionError, match="scrypt"):
        enc.wrap_content_key_with_passphrase(key, "pw", NAME, VERSION, **(FAST_SCRYPT | params))


def test_passphrase_logs_warning(key, caplog):
    wrap = enc.wrap_content_key_with_passphrase(key, "s3cret-pw", NAME, VERSION, **FAST_SCRYPT)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge_runtime.encryption"):
        enc.unwrap_content_key_with_passphrase([wrap], "s3cret-pw", NAME, VERSION)

    assert len(caplog.records) == 1
    assert "development only" in caplog.text
    assert "s3cret-pw" not in caplog.text
    assert key.hex() not in caplog.text


def test_passphrase_dict_round_trip(key):
    wrap = enc.wrap_content_key_with_passphrase(key, "pw", NAME, VERSION, **FAST_SCRYPT)
    parsed = enc.wrap_from_dict(json.loads(json.dumps(wrap.to_dict())))

    assert isinstance(parsed, PassphraseWrap)
    assert enc.unwrap_content_key_with_passphrase([parsed], "pw", NAME, VERSION) == key


def passphrase_dict(key: bytes) -> dict:
    wrap = enc.wrap_content_key_with_passphrase(key, "pw", NAME, VERSION, **FAST_SCRYPT)
    return wrap.to_dict()


@pytest.mark.parametrize(
    "field", ["type", "development_only", "kdf", "salt", "n", "r", "p", "nonce", "ciphertext"]
)
def test_passphrase_dict_missing_field(key, field):
    data = passphrase_dict(key)
    del data[field]

    with pytest.raises(DecryptionError, match=field):
        PassphraseWrap.from_dict(data)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("development_only", False, "must be marked true"),
        ("development_only", "true", "must be marked true"),
        ("kdf", "argon2id", "not supported"),
        ("salt", base64.b64encode(bytes(8)).decode(), "decodes to 8 bytes; expected 16"),
        ("nonce", base64.b64encode(bytes(16)).decode(), "decodes to 16 bytes; expected 12"),
        ("ciphertext", "%%%%", "not valid base64"),
        ("n", 3, "power of 2"),
        ("n", 2**30, "power of 2"),
        ("n", "32768", "expected integer"),
        ("r", 0, "scrypt r"),
        ("p", 1000, "scrypt p"),
    ],
    ids=[
        "dev-false",
        "dev-str",
        "kdf",
        "salt-length",
        "nonce-length",
        "ciphertext-base64",
        "n-not-power",
        "n-huge",
        "n-str",
        "r-zero",
        "p-huge",
    ],
)
def test_passphrase_dict_bad_value(key, field, value, message):
    data = passphrase_dict(key)
    data[field] = value

    with pytest.raises(DecryptionError, match=message):
        PassphraseWrap.from_dict(data)


# ---------------------------------------------------------------------------------------------
# Device keys
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["p256", "x25519"])
def test_private_key_pem_round_trip(tmp_path, key_type):
    device = enc.generate_device_key(key_type)
    path = tmp_path / "device.pem"
    enc.save_private_key(device, path)
    loaded = enc.load_private_key(path)

    assert enc.device_key_id(loaded) == enc.device_key_id(device)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_private_key_file_mode(tmp_path):
    path = tmp_path / "device.pem"
    enc.save_private_key(enc.generate_device_key(), path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_private_key_with_password(tmp_path, p256_device):
    path = tmp_path / "device.pem"
    enc.save_private_key(p256_device, path, password=b"hunter2")

    assert b"ENCRYPTED" in path.read_bytes()
    loaded = enc.load_private_key(path, password=b"hunter2")
    assert enc.device_key_id(loaded) == enc.device_key_id(p256_device)


@pytest.mark.parametrize("password", [None, b"wrong"], ids=["missing", "wrong"])
def test_private_key_bad_password(tmp_path, p256_device, password):
    path = tmp_path / "device.pem"
    enc.save_private_key(p256_device, path, password=b"hunter2")

    with pytest.raises(DeviceKeyError, match="failed to load the private key"):
        enc.load_private_key(path, password=password)


def test_private_key_garbage(tmp_path):
    path = tmp_path / "device.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")

    with pytest.raises(DeviceKeyError, match="failed to load the private key"):
        enc.load_private_key(path)


def test_private_key_missing_file(tmp_path):
    with pytest.raises(DeviceKeyError, match="failed to read the key file"):
        enc.load_private_key(tmp_path / "absent.pem")


def test_private_key_unsupported_curve(tmp_path):
    path = tmp_path / "p384.pem"
    p384 = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        p384.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    with pytest.raises(DeviceKeyError, match="secp384r1"):
        enc.load_private_key(path)


@pytest.mark.parametrize("key_type", ["p256", "x25519"])
def test_public_key_pem_round_trip(tmp_path, key_type):
    device = enc.generate_device_key(key_type)
    path = tmp_path / "device.pub.pem"
    enc.save_public_key(device.public_key(), path)
    loaded = enc.load_public_key(path)

    assert enc.device_key_id(loaded) == enc.device_key_id(device)


def test_public_key_wrap_after_load(tmp_path, key, p256_device):
    path = tmp_path / "device.pub.pem"
    enc.save_public_key(p256_device.public_key(), path)
    wrap = enc.wrap_content_key(key, enc.load_public_key(path), NAME, VERSION)

    assert enc.unwrap_content_key([wrap], p256_device, NAME, VERSION) == key


def test_device_key_unknown_type():
    with pytest.raises(DeviceKeyError, match="'rsa' is not supported"):
        enc.generate_device_key("rsa")


def test_reprs_hide_secrets(key, x25519_device):
    encrypted = encrypt(payload(SEGMENT), key)
    wrap = enc.wrap_content_key(key, x25519_device.public_key(), NAME, VERSION)
    private_hex = x25519_device.private_bytes_raw().hex()

    assert "ciphertext" not in repr(encrypted)
    assert "enc=" not in repr(wrap)
    assert private_hex not in repr(x25519_device)
    assert private_hex not in repr(wrap)
