"""PEM and DER forms of the two key types a device uses, without ``cryptography``'s
serialization module.

Importing ``cryptography.hazmat.primitives.serialization`` pulls in its SSH key support (RSA,
DSA, padding, ``random``), which costs a device about 4 ms of cold start (cryptography 50,
CPython 3.11, 2-vCPU x86-64 VM) to read two small key files. The keys a device reads have a
fixed DER layout, so this module encodes and decodes exactly these forms:

- SubjectPublicKeyInfo (RFC 5280) of an ECDSA/ECDH P-256 key, uncompressed point (91 bytes),
  and of an X25519 key (RFC 8410, 44 bytes);
- unencrypted PKCS #8 (RFC 5208) of a P-256 key (RFC 5915 ECPrivateKey, with or without the
  public key) and of an X25519 key (RFC 8410).

The ``load_*`` functions return None for anything else (another curve, an encrypted key, an
unusual but valid encoding), and callers then use ``cryptography``'s own loaders, so no valid
key is rejected here. The tests compare every form with ``cryptography``'s output.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, x25519

# DER prefixes: everything before the key bytes, for the one encoding of each form.
_P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
_X25519_SPKI_PREFIX = bytes.fromhex("302a300506032b656e032100")
_P256_PKCS8_PREFIX = bytes.fromhex(
    "308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420")
_P256_PKCS8_PUBLIC_TAG = bytes.fromhex("a144034200")  # [1] BIT STRING before the point
_P256_PKCS8_SHORT_PREFIX = bytes.fromhex(
    "3041020100301306072a8648ce3d020106082a8648ce3d030107042730250201010420")
_X25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b656e04220420")

_P256_POINT_BYTES = 65  # 0x04 || X || Y
_P256_SCALAR_BYTES = 32
_X25519_KEY_BYTES = 32
_PEM_LINE_CHARS = 64


def public_key_der(key: Any) -> bytes | None:
    """Return the DER SubjectPublicKeyInfo of a P-256 or X25519 public key, else None."""
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        numbers = key.public_numbers()
        return (_P256_SPKI_PREFIX + b"\x04" + numbers.x.to_bytes(32, "big")
                + numbers.y.to_bytes(32, "big"))
    if isinstance(key, x25519.X25519PublicKey):
        return _X25519_SPKI_PREFIX + key.public_bytes_raw()
    return None


def public_key_pem(key: Any) -> bytes | None:
    """Return the SubjectPublicKeyInfo PEM of a P-256 or X25519 public key, else None, in the
    layout OpenSSL writes: 64 base64 characters per line and a final newline."""
    der = public_key_der(key)
    if der is None:
        return None
    text = base64.b64encode(der).decode("ascii")
    lines = [text[start:start + _PEM_LINE_CHARS] for start in range(0, len(text), _PEM_LINE_CHARS)]
    return ("-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines)
            + "\n-----END PUBLIC KEY-----\n").encode("ascii")


def load_public_key_pem(data: bytes) -> Any | None:
    """Return the P-256 or X25519 public key in a SubjectPublicKeyInfo PEM, else None."""
    der = _pem_body(data, "PUBLIC KEY")
    if der is None:
        return None
    try:
        if len(der) == len(_P256_SPKI_PREFIX) + _P256_POINT_BYTES \
                and der.startswith(_P256_SPKI_PREFIX):
            return ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), der[len(_P256_SPKI_PREFIX):])
        if len(der) == len(_X25519_SPKI_PREFIX) + _X25519_KEY_BYTES \
                and der.startswith(_X25519_SPKI_PREFIX):
            return x25519.X25519PublicKey.from_public_bytes(der[len(_X25519_SPKI_PREFIX):])
    except ValueError:
        return None  # not a point on the curve: the full loader reports it
    return None


def load_private_key_pem(data: bytes) -> Any | None:
    """Return the P-256 or X25519 private key in an unencrypted PKCS #8 PEM, else None."""
    der = _pem_body(data, "PRIVATE KEY")
    if der is None:
        return None
    try:
        if der.startswith(_X25519_PKCS8_PREFIX) \
                and len(der) == len(_X25519_PKCS8_PREFIX) + _X25519_KEY_BYTES:
            return x25519.X25519PrivateKey.from_private_bytes(der[len(_X25519_PKCS8_PREFIX):])
        if der.startswith(_P256_PKCS8_SHORT_PREFIX) \
                and len(der) == len(_P256_PKCS8_SHORT_PREFIX) + _P256_SCALAR_BYTES:
            scalar = der[len(_P256_PKCS8_SHORT_PREFIX):]
            return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())
        public_start = len(_P256_PKCS8_PREFIX) + _P256_SCALAR_BYTES
        if der.startswith(_P256_PKCS8_PREFIX) \
                and len(der) == public_start + len(_P256_PKCS8_PUBLIC_TAG) + _P256_POINT_BYTES \
                and der[public_start:public_start + len(_P256_PKCS8_PUBLIC_TAG)] \
                == _P256_PKCS8_PUBLIC_TAG:
            scalar = der[len(_P256_PKCS8_PREFIX):public_start]
            key = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())
            # A stored public key that does not belong to the scalar is left to the full
            # loader, which decides how to treat it.
            embedded = der[public_start + len(_P256_PKCS8_PUBLIC_TAG):]
            if public_key_der(key.public_key()) != _P256_SPKI_PREFIX + embedded:
                return None
            return key
    except ValueError:
        return None  # a scalar out of range: the full loader reports it
    return None


def _pem_body(data: Any, label: str) -> bytes | None:
    """Return the DER inside one PEM block with ``label`` and nothing else but whitespace."""
    if not isinstance(data, (bytes, bytearray)):
        return None
    try:
        text = bytes(data).decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    if not text.startswith(begin) or not text.endswith(end):
        return None
    body = text[len(begin):-len(end)]
    if "-" in body or ":" in body:  # another block, or PEM headers such as Proc-Type
        return None
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        return None
