"""The PEM and DER forms that keyformat reads and writes agree with cryptography's own."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from edge_runtime import encryption, keyformat, signing
from tests.conftest import DEVICE_PRIVATE, DEVICE_PUBLIC, SIGNER_PUBLIC

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
PKCS8 = serialization.PrivateFormat.PKCS8


def pem_of(label: str, der: bytes) -> bytes:
    return (f"-----BEGIN {label}-----\n".encode("ascii") + base64.encodebytes(der)
            + f"-----END {label}-----\n".encode("ascii"))


def private_keys() -> list:
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(5)] + \
        [x25519.X25519PrivateKey.generate() for _ in range(5)]


def test_public_der_and_pem_match_cryptography():
    for key in private_keys():
        public = key.public_key()

        assert keyformat.public_key_der(public) == public.public_bytes(DER, SPKI)
        assert keyformat.public_key_pem(public) == public.public_bytes(PEM, SPKI)


def test_public_pem_round_trip():
    for key in private_keys():
        pem = key.public_key().public_bytes(PEM, SPKI)

        loaded = keyformat.load_public_key_pem(pem)

        assert loaded is not None
        assert loaded.public_bytes(DER, SPKI) == key.public_key().public_bytes(DER, SPKI)


def test_private_pem_round_trip():
    for key in private_keys():
        pem = key.private_bytes(PEM, PKCS8, serialization.NoEncryption())

        loaded = keyformat.load_private_key_pem(pem)

        assert loaded is not None
        assert loaded.private_bytes(DER, PKCS8, serialization.NoEncryption()) == \
            key.private_bytes(DER, PKCS8, serialization.NoEncryption())


def test_p256_pkcs8_without_public_key():
    key = ec.generate_private_key(ec.SECP256R1())
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    # RFC 5915 ECPrivateKey with only version and scalar, inside PKCS #8.
    der = bytes.fromhex("3041020100301306072a8648ce3d020106082a8648ce3d030107042730250201010420")
    short_pem = pem_of("PRIVATE KEY", der + scalar)

    loaded = keyformat.load_private_key_pem(short_pem)

    assert loaded is not None
    assert loaded.private_numbers() == key.private_numbers()
    # cryptography reads the same bytes as the same key.
    assert serialization.load_pem_private_key(short_pem, None).private_numbers() == \
        key.private_numbers()


def test_demo_keys_load_through_fast_path():
    assert keyformat.load_public_key_pem(SIGNER_PUBLIC.read_bytes()) is not None
    assert keyformat.load_public_key_pem(DEVICE_PUBLIC.read_bytes()) is not None
    assert keyformat.load_private_key_pem(DEVICE_PRIVATE.read_bytes()) is not None


@pytest.mark.parametrize("make_pem", [
    # Another curve: left to cryptography.
    lambda: ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(PEM, SPKI),
    # An encrypted private key.
    lambda: ec.generate_private_key(ec.SECP256R1()).private_bytes(
        PEM, PKCS8, serialization.BestAvailableEncryption(b"secret")),
    # Traditional (SEC 1) EC key PEM.
    lambda: ec.generate_private_key(ec.SECP256R1()).private_bytes(
        PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()),
    lambda: b"-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----\n",
    lambda: b"",
    lambda: "text, not bytes",
])
def test_other_forms_left_to_cryptography(make_pem):
    data = make_pem()

    assert keyformat.load_public_key_pem(data) is None
    assert keyformat.load_private_key_pem(data) is None


def test_point_off_curve_left_to_cryptography():
    der = bytearray(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(DER, SPKI))
    der[-1] ^= 0x01  # the point is no longer on the curve
    pem = pem_of("PUBLIC KEY", bytes(der))

    assert keyformat.load_public_key_pem(pem) is None
    with pytest.raises(signing.SigningKeyError):
        signing.load_public_key_pem(pem)


def test_mismatched_embedded_public_key_left_to_cryptography():
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(DER, PKCS8, serialization.NoEncryption())
    other_point = other.public_key().public_bytes(DER, SPKI)[-65:]
    forged = der[:-65] + other_point
    pem = pem_of("PRIVATE KEY", forged)

    assert keyformat.load_private_key_pem(pem) is None


def test_loaders_fall_back_for_encrypted_device_key(tmp_path):
    key = encryption.generate_device_key()
    path = tmp_path / "device.key.pem"
    encryption.save_private_key(key, path, password=b"pass phrase")

    loaded = encryption.load_private_key(path, password=b"pass phrase")

    assert encryption.device_key_id(loaded) == encryption.device_key_id(key)
    with pytest.raises(encryption.DeviceKeyError):
        encryption.load_private_key(path)
