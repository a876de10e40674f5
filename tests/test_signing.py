"""Tests for edge_runtime.signing: signing members, verifying them, and rejecting bad files.

Statements that sign_members never builds are signed with the module's ``_sign_payload`` so
that the statement checks behind the signature check are reached.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edge_runtime import signing
from edge_runtime.errors import PackageError, PackageIntegrityError
from edge_runtime.signing import (
    InvalidSignatureError,
    MemberMismatchError,
    SignatureError,
    SignatureFormatError,
    SigningKeyError,
    StatementError,
    UnknownSignerError,
    sign_members,
    verify_members,
)
from tests.conftest import ROOT

MEMBERS = {
    "manifest.json": b'{"name": "tiny", "schema_version": 2}',
    "model.onnx": b"placeholder ONNX bytes",
    "tokenizer.json": b'{"version": "1.0"}',
}


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return signing.generate_private_key()


@pytest.fixture(scope="module")
def other_key() -> ec.EllipticCurvePrivateKey:
    return signing.generate_private_key()


@pytest.fixture(scope="module")
def signature(key) -> bytes:
    return sign_members(MEMBERS, key)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_bundle(signature_file: bytes) -> dict:
    return json.loads(signature_file)


def encode_bundle(bundle: dict) -> bytes:
    return json.dumps(bundle, separators=(",", ":")).encode("utf-8")


def decode_statement(signature_file: bytes) -> dict:
    payload = decode_bundle(signature_file)["dsseEnvelope"]["payload"]
    return json.loads(base64.b64decode(payload))


def statement_for(members: dict[str, bytes]) -> dict:
    digests = {name: sha256_hex(data) for name, data in members.items()}
    return signing.build_statement(digests, "tiny")


def sign_statement(statement, private_key) -> bytes:
    """Sign any JSON value as the payload, bypassing sign_members's checks."""
    return signing._sign_payload(json.dumps(statement).encode("utf-8"), private_key)


def model_digest_of(digests: list[str]) -> str:
    return hashlib.sha256(b"".join(bytes.fromhex(digest) for digest in digests)).hexdigest()


# Round trip and format


def test_round_trip(key, signature):
    verified = verify_members(signature, MEMBERS, [key.public_key()])

    assert verified.signer_key_id == signing.key_id(key.public_key())
    assert verified.model_name == "model"
    assert dict(verified.resources) == {name: sha256_hex(data) for name, data in MEMBERS.items()}
    assert verified.payload == base64.b64decode(
        decode_bundle(signature)["dsseEnvelope"]["payload"]
    )


def test_round_trip_second_trusted_key(key, other_key, signature):
    verified = verify_members(signature, MEMBERS, [other_key.public_key(), key.public_key()])

    assert verified.signer_key_id == signing.key_id(key.public_key())


def test_round_trip_nested_and_empty_members(key):
    members = {"a/b": b"nested", "a.b": b"dotted", "empty": b"", "d/e/f.bin": b"\x00\xff"}

    verified = verify_members(sign_members(members, key), members, [key.public_key()])

    assert set(verified.resources) == set(members)


def test_bundle_layout(key, signature):
    bundle = decode_bundle(signature)
    public_pem = signing.public_key_to_pem(key.public_key())

    assert set(bundle) == {"mediaType", "verificationMaterial", "dsseEnvelope"}
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["verificationMaterial"] == {
        "publicKey": {"hint": sha256_hex(public_pem)},
        "tlogEntries": [],
    }
    envelope = bundle["dsseEnvelope"]
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert len(envelope["signatures"]) == 1
    assert envelope["signatures"][0]["keyid"] == signing.key_id(key.public_key())


def test_statement_layout(signature):
    statement = decode_statement(signature)
    resources = statement["predicate"]["resources"]

    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    assert statement["predicate"]["serialization"] == {
        "method": "files",
        "hash_type": "sha256",
        "allow_symlinks": False,
    }
    assert [resource["name"] for resource in resources] == sorted(MEMBERS)
    for resource in resources:
        assert resource["algorithm"] == "sha256"
        assert resource["digest"] == sha256_hex(MEMBERS[resource["name"]])
    assert statement["subject"] == [
        {
            "name": "model",
            "digest": {"sha256": model_digest_of([r["digest"] for r in resources])},
        }
    ]


def test_statement_sorts_by_path_components():
    digests = {name: sha256_hex(name.encode()) for name in ["a.b", "a/b", "a-c", "a/a/z", "b"]}

    statement = signing.build_statement(digests, "m")

    names = [resource["name"] for resource in statement["predicate"]["resources"]]
    # As PurePosixPath objects compare: by component, so "a" (of "a/...") precedes "a-c".
    assert names == ["a/a/z", "a/b", "a-c", "a.b", "b"]


def test_signature_verifies_raw_payload(key, signature):
    envelope = decode_bundle(signature)["dsseEnvelope"]
    payload = base64.b64decode(envelope["payload"])
    raw_signature = base64.b64decode(envelope["signatures"][0]["sig"])
    message = b"DSSEv1 28 application/vnd.in-toto+json %d " % len(payload) + payload

    key.public_key().verify(raw_signature, message, ec.ECDSA(hashes.SHA256()))


def test_pae_spec_example():
    # The example from the DSSE v1 protocol description.
    encoded = signing.pae("http://example.com/HelloWorld", b"hello world")

    assert encoded == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_pae_counts_bytes_not_characters():
    encoded = signing.pae("t\u00e9", "\u00e9".encode())

    assert encoded == b"DSSEv1 3 t\xc3\xa9 2 \xc3\xa9"


# Member checks


def test_tampered_member_content(key, signature):
    members = dict(MEMBERS, **{"model.onnx": b"placeholder ONNX bytez"})

    with pytest.raises(MemberMismatchError) as caught:
        verify_members(signature, members, [key.public_key()])

    message = str(caught.value)
    assert "model.onnx: sha256 " + sha256_hex(members["model.onnx"]) in message
    assert "signed " + sha256_hex(MEMBERS["model.onnx"]) in message


def test_extra_member(key, signature):
    members = dict(MEMBERS, **{"extra.bin": b"x"})

    with pytest.raises(MemberMismatchError, match=r"extra\.bin: not signed"):
        verify_members(signature, members, [key.public_key()])


def test_missing_member(key, signature):
    members = {name: data for name, data in MEMBERS.items() if name != "tokenizer.json"}

    with pytest.raises(MemberMismatchError, match=r"tokenizer\.json: signed but missing"):
        verify_members(signature, members, [key.public_key()])


def test_renamed_member(key, signature):
    members = dict(MEMBERS)
    members["model2.onnx"] = members.pop("model.onnx")

    with pytest.raises(MemberMismatchError) as caught:
        verify_members(signature, members, [key.public_key()])

    message = str(caught.value)
    assert "2 member(s) differ" in message
    assert "model2.onnx: not signed" in message
    assert "model.onnx: signed but missing" in message


def test_every_difference_in_one_error(key, signature):
    members = dict(MEMBERS)
    del members["tokenizer.json"]
    members["manifest.json"] = b"{}"
    members["new.txt"] = b"new"

    with pytest.raises(MemberMismatchError) as caught:
        verify_members(signature, members, [key.public_key()])

    message = str(caught.value)
    assert "3 member(s) differ" in message
    assert "new.txt: not signed" in message
    assert "tokenizer.json: signed but missing" in message
    assert "manifest.json: sha256" in message


def test_mismatch_is_integrity_error(key, signature):
    with pytest.raises(PackageIntegrityError):
        verify_members(signature, {}, [key.public_key()])


def test_signature_error_is_package_error():
    assert issubclass(SignatureError, PackageError)


@pytest.mark.parametrize(
    "name", ["", "/abs", "a//b", "./a", "a/./b", "../a", "a/..", "a\\b", "a/", "nul\x00"]
)
def test_sign_rejects_unsafe_member_name(key, name):
    with pytest.raises(SignatureError, match="member name"):
        sign_members({name: b"x"}, key)


def test_sign_rejects_no_members(key):
    with pytest.raises(SignatureError, match="no members"):
        sign_members({}, key)


def test_sign_rejects_non_bytes_member(key):
    with pytest.raises(TypeError, match="content must be bytes"):
        sign_members({"a": "text"}, key)


# Signer checks


def test_wrong_key(other_key, signature):
    with pytest.raises(UnknownSignerError) as caught:
        verify_members(signature, MEMBERS, [other_key.public_key()])

    assert signing.key_id(other_key.public_key()) in str(caught.value)


def test_no_trusted_keys(signature):
    with pytest.raises(UnknownSignerError, match="no trusted keys"):
        verify_members(signature, MEMBERS, [])


def test_unnamed_signer_wrong_key(other_key, signature):
    bundle = decode_bundle(signature)
    del bundle["verificationMaterial"]["publicKey"]
    del bundle["dsseEnvelope"]["signatures"][0]["keyid"]

    with pytest.raises(InvalidSignatureError, match="names no signer"):
        verify_members(encode_bundle(bundle), MEMBERS, [other_key.public_key()])


def test_unnamed_signer_right_key(key, signature):
    bundle = decode_bundle(signature)
    bundle["verificationMaterial"] = {}
    bundle["dsseEnvelope"]["signatures"][0]["keyid"] = ""

    verified = verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])

    assert verified.signer_key_id == signing.key_id(key.public_key())


def test_hint_of_other_trusted_key(key, other_key, signature):
    bundle = decode_bundle(signature)
    other_pem = signing.public_key_to_pem(other_key.public_key())
    bundle["verificationMaterial"]["publicKey"]["hint"] = sha256_hex(other_pem)
    trusted = [key.public_key(), other_key.public_key()]

    with pytest.raises(SignatureFormatError, match="hint .* does not name the key"):
        verify_members(encode_bundle(bundle), MEMBERS, trusted)


def test_keyid_of_other_key(key, other_key, signature):
    bundle = decode_bundle(signature)
    bundle["dsseEnvelope"]["signatures"][0]["keyid"] = signing.key_id(other_key.public_key())

    with pytest.raises(SignatureFormatError, match="keyid .* does not name the key"):
        verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])


def test_trusted_key_wrong_type(signature):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()

    with pytest.raises(SigningKeyError, match="trusted key #0 has type"):
        verify_members(signature, MEMBERS, [rsa_key])


def test_trusted_key_wrong_curve(signature):
    p384_key = ec.generate_private_key(ec.SECP384R1()).public_key()

    with pytest.raises(SigningKeyError, match="secp384r1"):
        verify_members(signature, MEMBERS, [p384_key])


def test_sign_rejects_p384_key():
    with pytest.raises(SigningKeyError, match="secp384r1"):
        sign_members(MEMBERS, ec.generate_private_key(ec.SECP384R1()))


# Altered and malformed signature files


def test_every_flipped_byte_rejected(key):
    tiny = {"a.txt": b"a", "b/c.bin": b"\x00"}
    original = sign_members(tiny, key)
    trusted = [key.public_key()]
    accepted = []
    wrong_type = []

    for offset in range(len(original)):
        for mask in (0x01, 0x80):
            altered = bytearray(original)
            altered[offset] ^= mask
            try:
                verify_members(bytes(altered), tiny, trusted)
            except SignatureError:
                continue
            except Exception as exc:  # any other exception type is the failure under test
                wrong_type.append((offset, mask, type(exc).__name__))
            else:
                accepted.append((offset, mask))

    assert accepted == []
    assert wrong_type == []


def test_payload_altered_signature_kept(key, signature):
    altered_members = dict(MEMBERS, **{"model.onnx": b"attacker model"})
    payload = json.dumps(statement_for(altered_members)).encode("utf-8")
    bundle = decode_bundle(signature)
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(payload).decode("ascii")

    with pytest.raises(InvalidSignatureError, match="payload or the signature was altered"):
        verify_members(encode_bundle(bundle), altered_members, [key.public_key()])


def test_signature_of_other_payload(key, signature):
    other = decode_bundle(sign_members({"x": b"x"}, key))
    bundle = decode_bundle(signature)
    bundle["dsseEnvelope"]["signatures"] = other["dsseEnvelope"]["signatures"]

    with pytest.raises(InvalidSignatureError):
        verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])


def test_every_truncation_rejected(key, signature):
    for length in range(len(signature)):
        with pytest.raises(SignatureFormatError):
            verify_members(signature[:length], MEMBERS, [key.public_key()])


@pytest.mark.parametrize(
    "data, message",
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[]", "bundle has JSON type list"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
        (b'{"mediaType": NaN}', "NaN is not valid JSON"),
        (b'{"mediaType": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_malformed_json(key, data, message):
    with pytest.raises(SignatureFormatError, match=message):
        verify_members(data, MEMBERS, [key.public_key()])


def test_duplicate_json_key(key, signature):
    text = signature.decode("utf-8")
    duplicated = text.replace('"mediaType":', '"mediaType":"x","mediaType":', 1)

    with pytest.raises(SignatureFormatError, match="duplicate key 'mediaType'"):
        verify_members(duplicated.encode("utf-8"), MEMBERS, [key.public_key()])


def test_oversized_file(key, signature):
    padded = signature + b" " * (signing.MAX_SIGNATURE_BYTES + 1 - len(signature))

    with pytest.raises(SignatureFormatError, match="the limit is"):
        verify_members(padded, MEMBERS, [key.public_key()])


def test_non_bytes_signature(key, signature):
    with pytest.raises(TypeError, match="signature must be bytes"):
        verify_members(signature.decode("utf-8"), MEMBERS, [key.public_key()])


def test_wrong_payload_type(key, signature):
    bundle = decode_bundle(signature)
    bundle["dsseEnvelope"]["payloadType"] = "application/json"

    with pytest.raises(SignatureFormatError, match="payloadType is 'application/json'"):
        verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])


def test_wrong_media_type(key, signature):
    bundle = decode_bundle(signature)
    bundle["mediaType"] = "application/vnd.dev.sigstore.bundle+json;version=0.2"

    with pytest.raises(SignatureFormatError, match="mediaType"):
        verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])


@pytest.mark.parametrize(
    "path",
    [
        ("mediaType",),
        ("verificationMaterial",),
        ("dsseEnvelope",),
        ("dsseEnvelope", "payload"),
        ("dsseEnvelope", "payloadType"),
        ("dsseEnvelope", "signatures"),
    ],
)
def test_missing_bundle_field(key, signature, path):
    bundle = decode_bundle(signature)
    parent = bundle
    for part in path[:-1]:
        parent = parent[part]
    del parent[path[-1]]

    with pytest.raises(SignatureFormatError, match="missing the field"):
        verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])


def test_missing_sig_field(key, signature):
    bundle = decode_bundle(signature)
    del bundle["dsseEnvelope"]["signatures"][0]["sig"]

    with pytest.raises(SignatureFormatError, match=r"signatures\[0\] is missing the field"):
        verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])


@pytest.mark.parametrize(
    "path",
    [
        (),
        ("verificationMaterial",),
        ("verificationMaterial", "publicKey"),
        ("dsseEnvelope",),
        ("dsseEnvelope", "signatures", 0),
    ],
)
def test_unknown_bundle_field(key, signature, path):
    bundle = decode_bundle(signature)
    parent = bundle
    for part in path:
        parent = parent[part]
    parent["unexpected"] = "value"

    with pytest.raises(SignatureFormatError, match="unknown field"):
        verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])


def test_transparency_log_entries_rejected(key, signature):
    bundle = decode_bundle(signature)
    bundle["verificationMaterial"]["tlogEntries"] = [{"logIndex": "1"}]

    with pytest.raises(SignatureFormatError, match="tlogEntries must be empty"):
        verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])


@pytest.mark.parametrize("count", [0, 2])
def test_signature_count(key, signature, count):
    bundle = decode_bundle(signature)
    bundle["dsseEnvelope"]["signatures"] = bundle["dsseEnvelope"]["signatures"][:1] * count

    with pytest.raises(SignatureFormatError, match="exactly one signature"):
        verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])


# Bytes whose standard base64, "+/+/+/8=", contains both characters that URL-safe base64
# replaces, and padding. The base64 check comes before the signature check, so the bytes
# need not be a statement.
BASE64_PROBE = b"\xfb\xff\xbf\xfb\xff"


@pytest.mark.parametrize(
    "encoded",
    [
        "-_-_-_8=",  # URL-safe alphabet
        "+/+/+/8",  # padding missing
        "+/+/\n+/8=",  # line break
        "+/+/+/8==",  # extra padding
        "",
    ],
)
def test_non_canonical_payload_base64(key, signature, encoded):
    assert base64.b64encode(BASE64_PROBE).decode("ascii") == "+/+/+/8="
    bundle = decode_bundle(signature)
    bundle["dsseEnvelope"]["payload"] = encoded

    with pytest.raises(SignatureFormatError, match="payload is"):
        verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])


def test_non_zero_unused_base64_bits(key, signature):
    bundle = decode_bundle(signature)
    raw_signature = base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"])
    # A 2-byte tail leaves 2 unused bits in the last character before "=".
    tail = base64.b64encode(raw_signature[:2]).decode("ascii")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    altered_tail = tail[:2] + alphabet[alphabet.index(tail[2]) ^ 1] + "="
    assert base64.b64decode(altered_tail) == raw_signature[:2]
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = altered_tail

    with pytest.raises(SignatureFormatError, match="not canonical"):
        verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])


@pytest.mark.parametrize(
    "field, value", [("payload", 5), ("payload", None), ("payloadType", ["x"])]
)
def test_envelope_field_wrong_type(key, signature, field, value):
    bundle = decode_bundle(signature)
    bundle["dsseEnvelope"][field] = value

    with pytest.raises(SignatureFormatError):
        verify_members(encode_bundle(bundle), MEMBERS, [key.public_key()])


# Statement checks, reached only behind a valid signature


def altered_statement(change) -> dict:
    statement = statement_for(MEMBERS)
    change(statement)
    return statement


def set_resource_field(field: str, value):
    def change(statement):
        statement["predicate"]["resources"][0][field] = value

    return change


def set_serialization_field(field: str, value):
    def change(statement):
        statement["predicate"]["serialization"][field] = value

    return change


def duplicate_first_resource(statement):
    resources = statement["predicate"]["resources"]
    resources.append(dict(resources[0]))
    digests = [resource["digest"] for resource in resources]
    statement["subject"][0]["digest"]["sha256"] = model_digest_of(digests)


STATEMENT_CASES = {
    "wrong _type": (
        lambda s: s.update({"_type": "https://in-toto.io/Statement/v0.1"}),
        "_type is",
    ),
    "compat predicate": (
        lambda s: s.update({"predicateType": "https://model_signing/Digests/v0.1"}),
        "predicateType is",
    ),
    "missing predicate": (lambda s: s.pop("predicate"), "missing the field 'predicate'"),
    "missing subject": (lambda s: s.pop("subject"), "missing the field 'subject'"),
    "two subjects": (lambda s: s["subject"].append(s["subject"][0]), "list of one object"),
    "subject not object": (lambda s: s.update({"subject": ["x"]}), "list of one object"),
    "subject digest": (
        lambda s: s["subject"][0]["digest"].update({"sha256": "0" * 64}),
        "does not match the digest of its resources",
    ),
    "shards": (set_serialization_field("method", "shards"), "only 'files'"),
    "blake2": (set_serialization_field("hash_type", "blake2b"), "hash_type is 'blake2b'"),
    "allow_symlinks string": (
        set_serialization_field("allow_symlinks", "false"),
        "'allow_symlinks' has type str",
    ),
    "ignore_paths string": (
        set_serialization_field("ignore_paths", ".git"),
        "ignore_paths must be a list",
    ),
    "resource algorithm": (set_resource_field("algorithm", "sha512"), "uses algorithm"),
    "uppercase digest": (
        set_resource_field("digest", sha256_hex(MEMBERS["manifest.json"]).upper()),
        "not 64 lowercase hex",
    ),
    "short digest": (set_resource_field("digest", "abc"), "not 64 lowercase hex"),
    "unsafe name": (set_resource_field("name", "../manifest.json"), "'..' path component"),
    "name not string": (set_resource_field("name", 7), "'name' has type int"),
    "missing digest": (
        lambda s: s["predicate"]["resources"][0].pop("digest"),
        "missing the field 'digest'",
    ),
    "duplicate resource": (duplicate_first_resource, "appears more than once"),
}


@pytest.mark.parametrize("case", sorted(STATEMENT_CASES))
def test_signed_statement_rejected(key, case):
    change, message = STATEMENT_CASES[case]
    signature_file = sign_statement(altered_statement(change), key)

    with pytest.raises(StatementError, match=message):
        verify_members(signature_file, MEMBERS, [key.public_key()])


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b"\xff"])
def test_signed_payload_not_statement(key, payload):
    signature_file = signing._sign_payload(payload, key)

    with pytest.raises(StatementError, match="signed statement"):
        verify_members(signature_file, MEMBERS, [key.public_key()])


def test_statement_extra_fields_ignored(key):
    # model_signing 1.1.1 documents that v1.0 verifiers ignore predicate fields they do not know.
    statement = statement_for(MEMBERS)
    statement["predicate"]["model_card"] = {"license": "apache-2.0"}
    statement["predicate"]["serialization"]["ignore_paths"] = [".git"]

    verified = verify_members(sign_statement(statement, key), MEMBERS, [key.public_key()])

    assert verified.serialization["ignore_paths"] == [".git"]


def test_statement_resources_in_any_order(key):
    statement = statement_for(MEMBERS)
    resources = statement["predicate"]["resources"]
    resources.reverse()
    digests = [resource["digest"] for resource in resources]
    statement["subject"][0]["digest"]["sha256"] = model_digest_of(digests)

    verified = verify_members(sign_statement(statement, key), MEMBERS, [key.public_key()])

    assert verified.model_digest == model_digest_of(digests)


# Keys


def test_private_key_pem_round_trip(key):
    loaded = signing.load_private_key_pem(signing.private_key_to_pem(key))

    assert loaded.private_numbers() == key.private_numbers()


def test_encrypted_private_key_pem(key):
    pem = signing.private_key_to_pem(key, password=b"correct horse")

    assert b"ENCRYPTED" in pem
    loaded = signing.load_private_key_pem(pem, password=b"correct horse")
    assert loaded.private_numbers() == key.private_numbers()


def test_wrong_password_hides_key(key):
    pem = signing.private_key_to_pem(key, password=b"correct horse")

    with pytest.raises(SigningKeyError, match="cannot load the private key") as caught:
        signing.load_private_key_pem(pem, password=b"wrong")

    assert pem.decode("ascii").splitlines()[1] not in str(caught.value)


def test_load_private_key_rejects_rsa():
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

    with pytest.raises(SigningKeyError, match="RSAPrivateKey"):
        signing.load_private_key_pem(pem)


def test_public_key_pem_round_trip(key):
    pem = signing.public_key_to_pem(key.public_key())

    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert signing.load_public_key_pem(pem) == key.public_key()


def test_load_public_key_rejects_garbage():
    with pytest.raises(SigningKeyError, match="cannot load the public key"):
        signing.load_public_key_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----")


def test_key_id_is_sha256_of_der(key):
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    assert signing.key_id(key.public_key()) == sha256_hex(der)


def test_write_private_key_owner_only(key, tmp_path):
    path = signing.write_private_key(tmp_path / "builder.pem", key)

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert signing.load_private_key_pem(path.read_bytes()).private_numbers() == (
        key.private_numbers()
    )


def test_write_private_key_keeps_existing(key, tmp_path):
    path = tmp_path / "builder.pem"
    path.write_bytes(b"existing")

    with pytest.raises(SigningKeyError, match="already exists"):
        signing.write_private_key(path, key)

    assert path.read_bytes() == b"existing"


def test_private_key_absent_from_logs_and_errors(key, other_key, caplog):
    secret_hex = format(key.private_numbers().private_value, "x")
    pem_lines = signing.private_key_to_pem(key).decode("ascii").splitlines()[1:-1]
    texts = []

    with caplog.at_level(logging.DEBUG):
        signature_file = sign_members(MEMBERS, key)
        verified = verify_members(signature_file, MEMBERS, [key.public_key()])
        texts.append(repr(verified))
        for call in (
            lambda: verify_members(signature_file, MEMBERS, [other_key.public_key()]),
            lambda: sign_members({"../x": b""}, key),
            lambda: sign_members(MEMBERS, key, model_name=""),
        ):
            with pytest.raises(SignatureError) as caught:
                call()
            texts.append(str(caught.value))
    texts.append(caplog.text)

    for text in texts:
        assert secret_hex not in text
        for line in pem_lines:
            assert line not in text


def test_verification_algorithm_matches_constructor(key):
    algorithm = signing._ecdsa_sha256()
    message = b"payload"
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))

    assert isinstance(algorithm, ec.ECDSA)
    assert isinstance(algorithm.algorithm, hashes.SHA256)
    assert algorithm.deterministic_signing is False
    key.public_key().verify(signature, message, algorithm)
    with pytest.raises(InvalidSignature):
        key.public_key().verify(signature, b"other payload", algorithm)


def test_verify_skips_openssl_backend_import(key, tmp_path):
    # A device that only verifies never imports cryptography's OpenSSL backend module.
    members = {"manifest.json": b"{}"}
    (tmp_path / "model.sig").write_bytes(sign_members(members, key))
    (tmp_path / "signer.pub.pem").write_bytes(signing.public_key_to_pem(key.public_key()))
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from edge_runtime import signing\n"
        f"folder = Path({str(tmp_path)!r})\n"
        "public = signing.load_public_key_pem((folder / 'signer.pub.pem').read_bytes())\n"
        "signing.verify_members((folder / 'model.sig').read_bytes(),\n"
        "                       {'manifest.json': b'{}'}, [public])\n"
        "print('cryptography.hazmat.backends.openssl.backend' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
