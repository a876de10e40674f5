"""Encryption of package members, and wrapping of the content key for each recipient.

A package is protected by one random 32-byte content key. Each member is encrypted separately with
segmented AES-256-GCM, and the content key is wrapped once per recipient: with HPKE (RFC 9180) for
a device key pair, or with a passphrase for development builds. A device unwraps the content key
with its private key and decrypts members into memory. Nothing in this module writes member
plaintext or content keys to disk.

Segmented member encryption (algorithm ``aes-256-gcm-segmented-v1``) follows the STREAM
construction from Hoang, Reyhanitabar, Rogaway and Vizár, "Online Authenticated-Encryption and its
Nonce-Reuse Misuse-Resistance" (CRYPTO 2015). The plaintext is cut into segments of
``segment_size`` bytes. The last segment contains the remainder: between 1 and ``segment_size``
bytes, or 0 bytes for an empty member, which still has one segment. Segment ``i`` of ``n`` is
sealed with AES-256-GCM under the content key with

- nonce (12 bytes) = ``nonce_prefix`` (7 random bytes per member)
  || ``i`` (4 bytes, big-endian) || last-segment flag (1 byte: 0x01 for ``i == n - 1``, else 0x00)
- associated data = ``_encode_fields(b"edge-runtime member aes-256-gcm-segmented-v1",
  package name (UTF-8), version (8 bytes, big-endian), member name (UTF-8),
  segment_size (8 bytes, big-endian), plaintext_size (8 bytes, big-endian))``, where every field
  is prefixed with its length as 4 bytes, big-endian.

The ciphertext of a member is the concatenation of ``segment ciphertext || 16-byte tag`` for every
segment in order, so it is ``plaintext_size + 16 * n`` bytes long. The index and the flag in the
nonce reject reordered, dropped, duplicated or truncated segments. The associated data rejects a
member that is moved to another member name, package or version, and a header whose sizes were
edited. The nonce prefix, segment size and plaintext size travel in the member header
(``EncryptedMember.to_dict``).

Nonces are unique under one content key as long as no two members draw the same 7-byte prefix.
With a fresh content key per package, the chance of a collision among m members is about
m**2 / 2**57. A caller must therefore never reuse a content key for another package or build.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from edge_runtime import keyformat
from edge_runtime._log import get_logger
from edge_runtime._value import FrozenValue
from edge_runtime.errors import PackageError

if TYPE_CHECKING:
    from pathlib import Path

log = get_logger(__name__)

CONTENT_KEY_BYTES = 32
GCM_TAG_BYTES = 16
NONCE_PREFIX_BYTES = 7

MEMBER_ALGORITHM = "aes-256-gcm-segmented-v1"
# 1 MiB segments decrypt a 16 MB model about 3 times faster than 64 KiB ones (measured with
# cryptography 50 on a 2-vCPU x86-64 VM), at 16 bytes of tag per segment.
DEFAULT_SEGMENT_SIZE = 1024 * 1024  # bytes
MIN_SEGMENT_SIZE = 1  # bytes
# A segment is decrypted in one call, so this bounds the memory of one AES-GCM call.
MAX_SEGMENT_SIZE = 16 * 1024 * 1024  # bytes
# The segment index is a 4-byte counter in the nonce.
MAX_SEGMENTS = 2**32

# Suite names recorded in an HPKE wrap. Each maps to the KEM, KDF and AEAD of RFC 9180.
SUITE_P256 = "DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM"
SUITE_X25519 = "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM"
_HPKE_SUITES = {
    SUITE_P256: hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    SUITE_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}
# Length in bytes of the encapsulated key (enc) that each suite's KEM produces.
_HPKE_ENC_BYTES = {
    SUITE_P256: hpke.KEM.P256.enc_length(),
    SUITE_X25519: hpke.KEM.X25519.enc_length(),
}

KEY_TYPE_P256 = "p256"
KEY_TYPE_X25519 = "x25519"

# scrypt parameters of a new passphrase wrap (RFC 7914); memory use is 128 * n * r bytes (32 MiB).
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_BYTES = 16
GCM_NONCE_BYTES = 12
# Upper bounds for parameters read from a wrap, so that a crafted wrap cannot demand unbounded
# memory or time. The memory bound applies to 128 * n * r.
MAX_SCRYPT_N = 2**20
MAX_SCRYPT_R = 32
MAX_SCRYPT_P = 16
MAX_SCRYPT_MEMORY_BYTES = 1024**3

_MEMBER_AAD_LABEL = b"edge-runtime member " + MEMBER_ALGORITHM.encode("ascii")
_HPKE_INFO_LABEL = b"edge-runtime content key wrap hpke-v1"
_PASSPHRASE_AAD_LABEL = b"edge-runtime content key wrap scrypt-aes-256-gcm-v1"
_KEY_COMMITMENT_LABEL = b"edge-runtime content key commitment hmac-sha256-v1"
KEY_COMMITMENT_BYTES = 32

WRAP_TYPE_HPKE = "hpke"
WRAP_TYPE_PASSPHRASE = "passphrase"

DevicePrivateKey = ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey
DevicePublicKey = ec.EllipticCurvePublicKey | x25519.X25519PublicKey


class EncryptionError(PackageError):
    """Encryption or key wrapping failed, most often because an argument is invalid."""


class DecryptionError(PackageError):
    """An encrypted member, a wrap or its header is malformed or fails authentication."""


class WrongRecipientError(DecryptionError):
    """The package contains no wrap of the content key for this device's key."""


class DeviceKeyError(PackageError):
    """A device key cannot be generated, read or written."""


# ---------------------------------------------------------------------------------------------
# Segmented member encryption
# ---------------------------------------------------------------------------------------------


class EncryptedMember(FrozenValue):
    """One member encrypted with segmented AES-256-GCM.

    ``ciphertext`` is the member's body in the package. The other fields form its header, which
    ``to_dict`` returns for the manifest.
    """

    __slots__ = ("nonce_prefix", "segment_size", "plaintext_size", "ciphertext")
    _hidden_in_repr = frozenset({"ciphertext"})
    nonce_prefix: bytes
    segment_size: int
    plaintext_size: int
    ciphertext: bytes

    def __init__(self, nonce_prefix: bytes, segment_size: int, plaintext_size: int,
                 ciphertext: bytes):
        self._init(nonce_prefix=nonce_prefix, segment_size=segment_size,
                   plaintext_size=plaintext_size, ciphertext=ciphertext)

    @property
    def segment_count(self) -> int:
        return segment_count(self.plaintext_size, self.segment_size)

    def to_dict(self) -> dict[str, Any]:
        """Return the header as a JSON-compatible dict, without the ciphertext."""
        return {
            "algorithm": MEMBER_ALGORITHM,
            "nonce_prefix": _b64encode(self.nonce_prefix),
            "segment_size": self.segment_size,
            "plaintext_size": self.plaintext_size,
        }

    @classmethod
    def from_dict(cls, header: Any, ciphertext: bytes) -> EncryptedMember:
        """Parse a header written by ``to_dict`` and attach the member's ciphertext.

        Raises DecryptionError on a missing or unknown field, a wrong type, invalid base64 or a
        wrong length. The ciphertext is checked against the header only when it is decrypted.
        """
        source = "encrypted member header"
        fields = _check_fields(
            header, source, required={"algorithm", "nonce_prefix", "segment_size", "plaintext_size"}
        )
        algorithm = _require_str(fields, "algorithm", source)
        if algorithm != MEMBER_ALGORITHM:
            raise DecryptionError(
                f"{source}: algorithm {algorithm!r} is not supported; expected {MEMBER_ALGORITHM!r}"
            )
        member = cls(
            nonce_prefix=_require_b64(fields, "nonce_prefix", source, NONCE_PREFIX_BYTES),
            segment_size=_require_int(fields, "segment_size", source),
            plaintext_size=_require_int(fields, "plaintext_size", source),
            ciphertext=_require_bytes_like(ciphertext, "ciphertext", DecryptionError),
        )
        _check_member_header(member, source, DecryptionError)
        return member


def segment_count(plaintext_size: int, segment_size: int) -> int:
    """Return the number of segments for a plaintext. An empty plaintext has one segment."""
    if plaintext_size == 0:
        return 1
    return -(-plaintext_size // segment_size)


def generate_content_key() -> bytes:
    """Return a new random 32-byte content key. Use a fresh one for every package build."""
    return os.urandom(CONTENT_KEY_BYTES)


def encrypt_member(
    plaintext: bytes,
    content_key: bytes,
    package_name: str,
    version: int,
    member: str,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> EncryptedMember:
    """Encrypt one member with segmented AES-256-GCM under a fresh random nonce prefix.

    Raises EncryptionError if the key is not 32 bytes, a name is empty or not valid UTF-8, the
    version is not an integer in [0, 2**64), or the segment size or count is out of range.
    """
    plaintext = _require_bytes_like(plaintext, "plaintext", EncryptionError)
    aead = AESGCM(_check_content_key(content_key, EncryptionError))
    if not _is_int(segment_size) or not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise EncryptionError(
            f"segment_size {segment_size!r} is invalid; expected an integer from "
            f"{MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} bytes"
        )
    count = segment_count(len(plaintext), segment_size)
    if count > MAX_SEGMENTS:
        raise EncryptionError(
            f"member {member!r}: {len(plaintext)} bytes need {count} segments of {segment_size} "
            f"bytes, more than the {MAX_SEGMENTS} that the 4-byte segment index allows; "
            "use a larger segment_size"
        )
    aad = _member_aad(package_name, version, member, segment_size, len(plaintext), EncryptionError)

    nonce_prefix = os.urandom(NONCE_PREFIX_BYTES)
    view = memoryview(plaintext)
    segments = []
    for index in range(count):
        chunk = view[index * segment_size : (index + 1) * segment_size]
        nonce = _segment_nonce(nonce_prefix, index, last=index == count - 1)
        segments.append(aead.encrypt(nonce, chunk, aad))
    return EncryptedMember(
        nonce_prefix=nonce_prefix,
        segment_size=segment_size,
        plaintext_size=len(plaintext),
        ciphertext=b"".join(segments),
    )


def decrypt_member(
    encrypted: EncryptedMember,
    content_key: bytes,
    package_name: str,
    version: int,
    member: str,
    digest: Any = None,
) -> bytes:
    """Decrypt and authenticate every segment of a member, and return the plaintext.

    Checks, in order: the key length, the header (nonce prefix length, segment size, plaintext
    size), and the ciphertext length against the segment count implied by the plaintext size.
    Then it checks the GCM tag of each segment, whose nonce carries its index and the
    last-segment flag. Raises DecryptionError naming the first failed check. No plaintext is
    returned unless every segment authenticates.

    ``digest``, a ``hashlib`` object such as ``hashlib.sha256()``, is updated with the
    plaintext in a worker thread while the next segment decrypts: both release the GIL, so
    hashing a large model adds little time on a multi-core CPU.
    """
    aead, aad = _open_member(encrypted, content_key, package_name, version, member)
    source = memoryview(_require_bytes_like(encrypted.ciphertext, "ciphertext",
                                            DecryptionError))
    # The plaintext is decrypted straight into the bytes object that is returned. A BytesIO
    # that is the only owner of its initial bytes lends their memory through getbuffer(), and
    # getvalue() returns the same object once no view is left. A 16 MB model then costs one
    # allocation instead of a chunk per segment plus a joined copy. Where an interpreter
    # copies in getvalue() instead, the result is the same.
    output = io.BytesIO(bytes(encrypted.plaintext_size))
    target = output.getbuffer()
    try:
        _decrypt_segments(encrypted, aead, aad, member, source, 0, target, None, digest)
    finally:
        target.release()
        source.release()
    # NOTE: plaintext in Python bytes cannot be wiped, so it stays in memory until the garbage
    # collector frees it.
    return output.getvalue()


def decrypt_member_in_place(
    encrypted: EncryptedMember,
    content_key: bytes,
    package_name: str,
    version: int,
    member: str,
    buffer: memoryview,
    offset: int,
    digest: Any = None,
) -> None:
    """Decrypt a member whose ciphertext lies in ``buffer`` at ``offset``, writing the
    plaintext over ``buffer[:encrypted.plaintext_size]``.

    Same checks and errors as ``decrypt_member``. Each segment is decrypted into a scratch
    segment and then moved down; a plaintext segment ends before the next ciphertext segment
    starts, so nothing is overwritten before it is read. A package reader uses this to turn
    the archive it read into the model's bytes without a second model-sized allocation. When
    this raises, the start of ``buffer`` holds partial plaintext and the ciphertext is lost.
    """
    aead, aad = _open_member(encrypted, content_key, package_name, version, member)
    size = len(encrypted.ciphertext)
    if not isinstance(buffer, memoryview) or buffer.readonly or offset < 0 \
            or offset + size > len(buffer):
        raise DecryptionError(
            f"member {member!r}: the ciphertext must lie inside a writable buffer; got offset "
            f"{offset} and {size} bytes for a buffer of "
            f"{len(buffer) if isinstance(buffer, memoryview) else type(buffer).__name__}"
        )
    scratch = memoryview(bytearray(encrypted.segment_size))
    try:
        _decrypt_segments(encrypted, aead, aad, member, buffer, offset, buffer, scratch, digest)
    finally:
        scratch.release()


def _open_member(encrypted: EncryptedMember, content_key: bytes, package_name: str,
                 version: int, member: str) -> tuple[AESGCM, bytes]:
    """Check the key, the header and the ciphertext length; return the cipher and the AAD."""
    source = f"member {member!r}"
    aead = AESGCM(_check_content_key(content_key, DecryptionError))
    _check_member_header(encrypted, source, DecryptionError)
    ciphertext = _require_bytes_like(encrypted.ciphertext, "ciphertext", DecryptionError)
    count = encrypted.segment_count
    expected_size = encrypted.plaintext_size + GCM_TAG_BYTES * count
    if len(ciphertext) != expected_size:
        raise DecryptionError(
            f"{source}: ciphertext is {len(ciphertext)} bytes, but plaintext_size "
            f"{encrypted.plaintext_size} in segments of {encrypted.segment_size} bytes needs "
            f"{count} segments and {expected_size} bytes; the member is truncated, extended or "
            "does not belong to this header"
        )
    aad = _member_aad(
        package_name,
        version,
        member,
        encrypted.segment_size,
        encrypted.plaintext_size,
        DecryptionError,
    )
    return aead, aad


def _decrypt_segments(encrypted: EncryptedMember, aead: AESGCM, aad: bytes, member: str,
                      source: memoryview, offset: int, target: memoryview,
                      scratch: memoryview | None, digest: Any) -> None:
    """Decrypt segment by segment from ``source[offset:]`` into ``target[:plaintext_size]``.

    Without ``scratch``, each segment decrypts straight into ``target``; with it, into
    ``scratch`` first and is then copied, which lets ``target`` and ``source`` share memory.
    """
    count = encrypted.segment_count
    stride = encrypted.segment_size + GCM_TAG_BYTES
    size = encrypted.segment_size
    end = offset + encrypted.plaintext_size + GCM_TAG_BYTES * count
    hashing = _DigestWorker(digest) if digest is not None else None
    views: list[memoryview] = []
    try:
        for index in range(count):
            nonce = _segment_nonce(encrypted.nonce_prefix, index, last=index == count - 1)
            segment = source[offset + index * stride : min(offset + (index + 1) * stride, end)]
            length = len(segment) - GCM_TAG_BYTES
            plain = target[index * size : index * size + length]
            views += (segment, plain)
            into = plain if scratch is None else scratch[:length]
            try:
                aead.decrypt_into(nonce, segment, aad, into)
            except InvalidTag:
                raise DecryptionError(
                    f"member {member!r}: segment {index} of {count} failed AES-256-GCM "
                    "authentication; the ciphertext or header was modified, segments were "
                    "reordered or truncated, or the content key, package name, version or "
                    "member name differs from encryption"
                ) from None
            if scratch is not None:
                plain[:] = into
                into.release()
            if hashing is not None:
                hashing.feed(plain)
    finally:
        if hashing is not None:
            hashing.finish()
        # No view of the buffers may outlive this call: getvalue() and truncate() of a
        # BytesIO copy or fail while one exists.
        for view in views:
            view.release()


class _DigestWorker:
    """Feed chunks to a hashlib object in a background thread, in order."""

    def __init__(self, digest: Any):
        import queue  # imported here: packages with a key commitment skip plaintext hashing

        self._digest = digest
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="segment-digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._pending.get()) is not None:
            self._digest.update(chunk)

    def feed(self, chunk: bytes) -> None:
        self._pending.put(chunk)

    def finish(self) -> None:
        """Wait until every chunk fed so far is hashed."""
        self._pending.put(None)
        self._thread.join()


def _segment_nonce(nonce_prefix: bytes, index: int, last: bool) -> bytes:
    return nonce_prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _member_aad(
    package_name: str,
    version: int,
    member: str,
    segment_size: int,
    plaintext_size: int,
    error: type[PackageError],
) -> bytes:
    return _encode_fields(
        _MEMBER_AAD_LABEL,
        _encode_text(package_name, "package_name", error),
        _encode_version(version, error),
        _encode_text(member, "member", error),
        segment_size.to_bytes(8, "big"),
        plaintext_size.to_bytes(8, "big"),
    )


def _check_member_header(
    encrypted: EncryptedMember, source: str, error: type[PackageError]
) -> None:
    prefix = encrypted.nonce_prefix
    if not isinstance(prefix, bytes) or len(prefix) != NONCE_PREFIX_BYTES:
        actual = f"{len(prefix)} bytes" if isinstance(prefix, bytes) else type(prefix).__name__
        raise error(f"{source}: nonce_prefix is {actual}; expected {NONCE_PREFIX_BYTES} bytes")
    size = encrypted.segment_size
    if not _is_int(size) or not MIN_SEGMENT_SIZE <= size <= MAX_SEGMENT_SIZE:
        raise error(
            f"{source}: segment_size {size!r} is invalid; expected an integer from "
            f"{MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} bytes"
        )
    plaintext_size = encrypted.plaintext_size
    if not _is_int(plaintext_size) or plaintext_size < 0:
        raise error(
            f"{source}: plaintext_size {plaintext_size!r} is invalid; expected an integer >= 0"
        )
    if segment_count(plaintext_size, size) > MAX_SEGMENTS:
        raise error(
            f"{source}: plaintext_size {plaintext_size} in segments of {size} bytes needs more "
            f"than {MAX_SEGMENTS} segments"
        )


# ---------------------------------------------------------------------------------------------
# Content-key wraps
# ---------------------------------------------------------------------------------------------


class HpkeWrap(FrozenValue):
    """The content key encrypted to one device public key with HPKE (RFC 9180, base mode).

    ``enc`` is the encapsulated ephemeral key and ``ciphertext`` the sealed content key with
    its 16-byte tag. The HPKE info binds the suite, package name, version and recipient key id.
    """

    __slots__ = ("suite", "recipient_key_id", "enc", "ciphertext")
    _hidden_in_repr = frozenset({"enc", "ciphertext"})
    suite: str
    recipient_key_id: str
    enc: bytes
    ciphertext: bytes

    def __init__(self, suite: str, recipient_key_id: str, enc: bytes, ciphertext: bytes):
        self._init(suite=suite, recipient_key_id=recipient_key_id, enc=enc,
                   ciphertext=ciphertext)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": WRAP_TYPE_HPKE,
            "suite": self.suite,
            "recipient_key_id": self.recipient_key_id,
            "enc": _b64encode(self.enc),
            "ciphertext": _b64encode(self.ciphertext),
        }

    @classmethod
    def from_dict(cls, data: Any) -> HpkeWrap:
        """Parse a dict written by ``to_dict``. Raises DecryptionError if it is malformed."""
        source = "HPKE wrap"
        fields = _check_fields(
            data, source, required={"type", "suite", "recipient_key_id", "enc", "ciphertext"}
        )
        _check_wrap_type(fields, WRAP_TYPE_HPKE, source)
        suite = _require_str(fields, "suite", source)
        if suite not in _HPKE_SUITES:
            raise DecryptionError(
                f"{source}: suite {suite!r} is not supported; expected one of "
                f"{sorted(_HPKE_SUITES)}"
            )
        key_id = _require_str(fields, "recipient_key_id", source)
        if len(key_id) != 64 or any(c not in "0123456789abcdef" for c in key_id):
            raise DecryptionError(
                f"{source}: recipient_key_id {key_id!r:.80} is invalid; expected 64 lowercase "
                "hex digits (SHA-256 of the public key's DER SubjectPublicKeyInfo)"
            )
        return cls(
            suite=suite,
            recipient_key_id=key_id,
            enc=_require_b64(fields, "enc", source, _HPKE_ENC_BYTES[suite]),
            ciphertext=_require_b64(
                fields, "ciphertext", source, CONTENT_KEY_BYTES + GCM_TAG_BYTES
            ),
        )


class PassphraseWrap(FrozenValue):
    """The content key encrypted with AES-256-GCM under a key derived from a passphrase by scrypt.

    For development only: a passphrase shipped with a device is as good as no encryption. The
    GCM associated data binds the package name and version.
    """

    __slots__ = ("salt", "n", "r", "p", "nonce", "ciphertext")
    _hidden_in_repr = frozenset({"salt", "nonce", "ciphertext"})
    salt: bytes
    n: int
    r: int
    p: int
    nonce: bytes
    ciphertext: bytes

    def __init__(self, salt: bytes, n: int, r: int, p: int, nonce: bytes, ciphertext: bytes):
        self._init(salt=salt, n=n, r=r, p=p, nonce=nonce, ciphertext=ciphertext)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": WRAP_TYPE_PASSPHRASE,
            "development_only": True,
            "kdf": "scrypt",
            "salt": _b64encode(self.salt),
            "n": self.n,
            "r": self.r,
            "p": self.p,
            "nonce": _b64encode(self.nonce),
            "ciphertext": _b64encode(self.ciphertext),
        }

    @classmethod
    def from_dict(cls, data: Any) -> PassphraseWrap:
        """Parse a dict written by ``to_dict``. Raises DecryptionError if it is malformed."""
        source = "passphrase wrap"
        fields = _check_fields(
            data,
            source,
            required={
                "type",
                "development_only",
                "kdf",
                "salt",
                "n",
                "r",
                "p",
                "nonce",
                "ciphertext",
            },
        )
        _check_wrap_type(fields, WRAP_TYPE_PASSPHRASE, source)
        if fields["development_only"] is not True:
            raise DecryptionError(
                f"{source}: development_only is {fields['development_only']!r:.40}; "
                "a passphrase wrap must be marked true"
            )
        kdf = _require_str(fields, "kdf", source)
        if kdf != "scrypt":
            raise DecryptionError(f"{source}: kdf {kdf!r:.40} is not supported; expected 'scrypt'")
        wrap = cls(
            salt=_require_b64(fields, "salt", source, SCRYPT_SALT_BYTES),
            n=_require_int(fields, "n", source),
            r=_require_int(fields, "r", source),
            p=_require_int(fields, "p", source),
            nonce=_require_b64(fields, "nonce", source, GCM_NONCE_BYTES),
            ciphertext=_require_b64(
                fields, "ciphertext", source, CONTENT_KEY_BYTES + GCM_TAG_BYTES
            ),
        )
        _check_scrypt_parameters(wrap.n, wrap.r, wrap.p, source, DecryptionError)
        return wrap


Wrap = HpkeWrap | PassphraseWrap


def wrap_from_dict(data: Any) -> Wrap:
    """Parse an HPKE or passphrase wrap, chosen by its ``type`` field."""
    if not isinstance(data, Mapping):
        raise DecryptionError(f"wrap is {type(data).__name__}; expected a JSON object")
    wrap_type = data.get("type")
    if wrap_type == WRAP_TYPE_HPKE:
        return HpkeWrap.from_dict(data)
    if wrap_type == WRAP_TYPE_PASSPHRASE:
        return PassphraseWrap.from_dict(data)
    raise DecryptionError(
        f"wrap type {wrap_type!r:.40} is not supported; expected "
        f"{WRAP_TYPE_HPKE!r} or {WRAP_TYPE_PASSPHRASE!r}"
    )


def key_commitment(content_key: bytes, package_name: str, version: int) -> str:
    """Return the commitment to a content key that a signed manifest carries (base64).

    The commitment is HMAC-SHA256 keyed with the content key over a label, the package name
    and the version. AES-GCM alone does not commit to its key: whoever builds a package could
    wrap two different keys under which the same ciphertext authenticates and decrypts to two
    different plaintexts, for two groups of devices. A reader that finds the unwrapped key
    matching the signed commitment knows every device holds the same key, so the signed
    ciphertext decrypts to the same plaintext everywhere, and need not hash the plaintext.
    """
    key = _check_content_key(content_key, EncryptionError)
    message = _encode_fields(_KEY_COMMITMENT_LABEL,
                             _encode_text(package_name, "package name", EncryptionError),
                             _encode_version(version, EncryptionError))
    return _b64encode(hmac.digest(key, message, "sha256"))


def check_key_commitment(content_key: bytes, package_name: str, version: int,
                         expected: Any) -> None:
    """Raise DecryptionError unless ``content_key`` matches the manifest's commitment."""
    expected_bytes = _require_b64({"key_commitment": expected}, "key_commitment",
                                  "manifest 'encryption'", KEY_COMMITMENT_BYTES)
    actual = base64.b64decode(key_commitment(content_key, package_name, version))
    if not hmac.compare_digest(actual, expected_bytes):
        raise DecryptionError(
            f"package {package_name!r} version {version}: the unwrapped content key does not "
            "match the key commitment in the signed manifest; the key wrap was made for "
            "another build of this package"
        )


def wrap_content_key(
    content_key: bytes,
    recipient_public_key: DevicePublicKey,
    package_name: str,
    version: int,
) -> HpkeWrap:
    """Encrypt the content key to one device public key with HPKE.

    The suite follows the key type: SUITE_P256 for a P-256 key, SUITE_X25519 for an X25519 key.
    Raises EncryptionError for any other key type or an invalid argument.
    """
    content_key = _check_content_key(content_key, EncryptionError)
    suite = _suite_for_key(recipient_public_key, EncryptionError)
    key_id = device_key_id(recipient_public_key)
    info = _hpke_info(suite, package_name, version, key_id, EncryptionError)
    sealed = _HPKE_SUITES[suite].encrypt(content_key, recipient_public_key, info=info)
    # Suite.encrypt returns enc || ciphertext, and enc has a fixed length per KEM.
    enc_size = _HPKE_ENC_BYTES[suite]
    return HpkeWrap(
        suite=suite, recipient_key_id=key_id, enc=sealed[:enc_size], ciphertext=sealed[enc_size:]
    )


def unwrap_content_key(
    wraps: Sequence[Wrap],
    device_private_key: DevicePrivateKey,
    package_name: str,
    version: int,
) -> bytes:
    """Find the HPKE wrap for this device's key, decrypt it and return the content key.

    Raises WrongRecipientError naming the device key id when no wrap is addressed to it, and
    DecryptionError when the wrap fails to decrypt (modified, or made for another package name
    or version). Passphrase wraps in ``wraps`` are skipped.

    NOTE: cryptography 50's HPKE API decrypts only with an in-process private key object, so a
    device key held in a hardware keystore cannot be used here without another HPKE backend.
    """
    suite = _suite_for_key(device_private_key, DecryptionError)
    key_id = device_key_id(device_private_key)
    _check_wrap_list(wraps)
    hpke_wraps = [wrap for wrap in wraps if isinstance(wrap, HpkeWrap)]
    matching = [wrap for wrap in hpke_wraps if wrap.recipient_key_id == key_id]
    if not matching:
        listed = ", ".join(wrap.recipient_key_id[:16] for wrap in hpke_wraps) or "none"
        raise WrongRecipientError(
            f"package {package_name!r} version {version}: no wrap for device key {key_id}; "
            f"the package has wraps for keys {listed} (first 16 hex digits); "
            "rebuild the package with this device's public key"
        )

    info = _hpke_info(suite, package_name, version, key_id, DecryptionError)
    for wrap in matching:
        if wrap.suite != suite:
            raise DecryptionError(
                f"wrap for device key {key_id}: suite {wrap.suite!r} does not match the "
                f"device key, which needs {suite!r}"
            )
        try:
            content_key = _HPKE_SUITES[suite].decrypt(
                wrap.enc + wrap.ciphertext, device_private_key, info=info
            )
        except (InvalidTag, ValueError, TypeError):
            # ValueError and TypeError come from a wrap built without from_dict, with fields of
            # the wrong length or type. cryptography 50 reports an invalid enc point as InvalidTag.
            continue
        if len(content_key) == CONTENT_KEY_BYTES:
            return content_key
    raise DecryptionError(
        f"package {package_name!r} version {version}: the wrap for device key {key_id} failed "
        "HPKE decryption; it was modified or made for another package name or version"
    )


def wrap_content_key_with_passphrase(
    content_key: bytes,
    passphrase: str | bytes,
    package_name: str,
    version: int,
    *,
    n: int = SCRYPT_N,
    r: int = SCRYPT_R,
    p: int = SCRYPT_P,
) -> PassphraseWrap:
    """Encrypt the content key under a passphrase, for development builds only.

    A str passphrase is encoded as UTF-8 without Unicode normalization.
    """
    content_key = _check_content_key(content_key, EncryptionError)
    secret = _encode_passphrase(passphrase, EncryptionError)
    if not secret:
        raise EncryptionError("passphrase is empty; give a non-empty passphrase")
    _check_scrypt_parameters(n, r, p, "scrypt parameters", EncryptionError)
    aad = _passphrase_aad(package_name, version, EncryptionError)
    log.warning(
        "package %r version %s: wrapping the content key with a passphrase, which is for "
        "development only; use device keys (HPKE) for packages that leave the workstation",
        package_name,
        version,
    )

    salt = os.urandom(SCRYPT_SALT_BYTES)
    nonce = os.urandom(GCM_NONCE_BYTES)
    kek = _derive_passphrase_key(secret, salt, n, r, p, EncryptionError)
    ciphertext = AESGCM(kek).encrypt(nonce, content_key, aad)
    return PassphraseWrap(salt=salt, n=n, r=r, p=p, nonce=nonce, ciphertext=ciphertext)


def unwrap_content_key_with_passphrase(
    wraps: Sequence[Wrap],
    passphrase: str | bytes,
    package_name: str,
    version: int,
) -> bytes:
    """Decrypt the content key from a passphrase wrap, for development builds only.

    Tries every passphrase wrap in ``wraps``. Raises WrongRecipientError if there is none, and
    DecryptionError if none opens with this passphrase, package name and version.
    """
    _check_wrap_list(wraps)
    candidates = [wrap for wrap in wraps if isinstance(wrap, PassphraseWrap)]
    if not candidates:
        raise WrongRecipientError(
            f"package {package_name!r} version {version}: no passphrase wrap; the package can "
            "only be opened with a device key"
        )
    secret = _encode_passphrase(passphrase, DecryptionError)
    aad = _passphrase_aad(package_name, version, DecryptionError)
    log.warning(
        "package %r version %s: unwrapping the content key with a passphrase, which is for "
        "development only",
        package_name,
        version,
    )

    for wrap in candidates:
        _check_scrypt_parameters(wrap.n, wrap.r, wrap.p, "passphrase wrap", DecryptionError)
        kek = _derive_passphrase_key(secret, wrap.salt, wrap.n, wrap.r, wrap.p, DecryptionError)
        try:
            content_key = AESGCM(kek).decrypt(wrap.nonce, wrap.ciphertext, aad)
        except (InvalidTag, ValueError, TypeError):
            # ValueError and TypeError come from a wrap built without from_dict, with a nonce
            # or ciphertext of the wrong length or type.
            continue
        if len(content_key) == CONTENT_KEY_BYTES:
            return content_key
    raise DecryptionError(
        f"package {package_name!r} version {version}: {len(candidates)} passphrase wrap(s) "
        "failed to decrypt; the passphrase is wrong, or the wrap was modified or made for "
        "another package name or version"
    )


def _check_wrap_list(wraps: Any) -> None:
    if isinstance(wraps, (str, bytes, Mapping)) or not isinstance(wraps, Sequence):
        raise DecryptionError(f"wraps is {type(wraps).__name__}; expected a list of wraps")
    for position, wrap in enumerate(wraps):
        if not isinstance(wrap, (HpkeWrap, PassphraseWrap)):
            raise DecryptionError(
                f"wraps[{position}] is {type(wrap).__name__}; expected HpkeWrap or "
                "PassphraseWrap (parse a dict with wrap_from_dict)"
            )


def _suite_for_key(key: Any, error: type[PackageError]) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if isinstance(key.curve, ec.SECP256R1):
            return SUITE_P256
        raise error(f"EC key on curve {key.curve.name} is not supported; expected P-256")
    if isinstance(key, (x25519.X25519PrivateKey, x25519.X25519PublicKey)):
        return SUITE_X25519
    raise error(
        f"device key of type {type(key).__name__} is not supported; expected P-256 or X25519"
    )


def _hpke_info(
    suite: str, package_name: str, version: int, key_id: str, error: type[PackageError]
) -> bytes:
    return _encode_fields(
        _HPKE_INFO_LABEL,
        suite.encode("ascii"),
        _encode_text(package_name, "package_name", error),
        _encode_version(version, error),
        key_id.encode("ascii"),
    )


def _passphrase_aad(package_name: str, version: int, error: type[PackageError]) -> bytes:
    return _encode_fields(
        _PASSPHRASE_AAD_LABEL,
        _encode_text(package_name, "package_name", error),
        _encode_version(version, error),
    )


def _encode_passphrase(passphrase: Any, error: type[PackageError]) -> bytes:
    if isinstance(passphrase, str):
        try:
            return passphrase.encode("utf-8")
        except UnicodeEncodeError:
            raise error("passphrase is not valid Unicode (contains a lone surrogate)") from None
    if isinstance(passphrase, (bytes, bytearray)):
        return bytes(passphrase)
    raise error(f"passphrase is {type(passphrase).__name__}; expected str or bytes")


def _check_scrypt_parameters(
    n: Any, r: Any, p: Any, source: str, error: type[PackageError]
) -> None:
    if not _is_int(n) or n < 2 or n & (n - 1) or n > MAX_SCRYPT_N:
        raise error(f"{source}: scrypt n {n!r} is invalid; expected a power of 2 from 2 to 2**20")
    if not _is_int(r) or not 1 <= r <= MAX_SCRYPT_R:
        raise error(f"{source}: scrypt r {r!r} is invalid; expected 1 to {MAX_SCRYPT_R}")
    if not _is_int(p) or not 1 <= p <= MAX_SCRYPT_P:
        raise error(f"{source}: scrypt p {p!r} is invalid; expected 1 to {MAX_SCRYPT_P}")
    if 128 * n * r > MAX_SCRYPT_MEMORY_BYTES:
        raise error(
            f"{source}: scrypt n={n}, r={r} needs {128 * n * r} bytes of memory, more than "
            f"{MAX_SCRYPT_MEMORY_BYTES}"
        )


def _derive_passphrase_key(
    secret: bytes, salt: bytes, n: int, r: int, p: int, error: type[PackageError]
) -> bytes:
    try:
        return Scrypt(salt=salt, length=CONTENT_KEY_BYTES, n=n, r=r, p=p).derive(secret)
    except (ValueError, TypeError, MemoryError, UnsupportedAlgorithm) as exc:
        raise error(f"scrypt key derivation failed with n={n}, r={r}, p={p}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Device keys
# ---------------------------------------------------------------------------------------------


def generate_device_key(key_type: str = KEY_TYPE_P256) -> DevicePrivateKey:
    """Generate a device key pair: P-256 by default or X25519.

    P-256 is the default because hardware keystores such as TPM 2.0 and the Apple Secure Enclave
    support it, and many of them do not support X25519.
    """
    if key_type == KEY_TYPE_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == KEY_TYPE_X25519:
        return x25519.X25519PrivateKey.generate()
    raise DeviceKeyError(
        f"key type {key_type!r} is not supported; expected {KEY_TYPE_P256!r} or {KEY_TYPE_X25519!r}"
    )


def device_key_id(key: DevicePrivateKey | DevicePublicKey) -> str:
    """Return the key id of a device key: SHA-256 of its public key's DER SubjectPublicKeyInfo,
    as 64 lowercase hex digits."""
    _suite_for_key(key, DeviceKeyError)
    if isinstance(key, (ec.EllipticCurvePrivateKey, x25519.X25519PrivateKey)):
        public_key = key.public_key()
    else:
        public_key = key
    der = keyformat.public_key_der(public_key)
    if der is None:  # unreachable for the two suites _suite_for_key accepts
        raise DeviceKeyError(f"cannot encode {type(public_key).__name__} as SubjectPublicKeyInfo")
    return hashlib.sha256(der).hexdigest()


def save_private_key(
    key: DevicePrivateKey, path: str | Path, password: bytes | None = None
) -> None:
    """Write a device private key as PKCS #8 PEM, readable only by the owner (mode 0600).

    With a password, the PEM is encrypted with the best algorithm that ``cryptography`` offers.
    The file is replaced atomically.
    """
    from cryptography.hazmat.primitives import serialization  # writers only; see keyformat

    _suite_for_key(key, DeviceKeyError)
    if password is None:
        encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    elif isinstance(password, bytes) and password:
        encryption = serialization.BestAvailableEncryption(password)
    else:
        raise DeviceKeyError("password must be non-empty bytes, or None for an unencrypted key")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    _write_atomically(path, pem, mode=0o600)


def load_private_key(path: str | Path, password: bytes | None = None) -> DevicePrivateKey:
    """Read a P-256 or X25519 device private key from a PEM file."""
    return load_private_key_pem(_read_key_file(path), password, source=os.fsdecode(path))


def load_private_key_pem(
    pem: bytes, password: bytes | None = None, source: str = "PEM text"
) -> DevicePrivateKey:
    """Load a P-256 or X25519 device private key from PEM bytes."""
    key = keyformat.load_private_key_pem(pem) if password is None else None
    if key is not None:
        return key
    from cryptography.hazmat.primitives import serialization  # forms keyformat does not read

    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # The library's message names the problem (bad PEM, wrong or missing password) and
        # contains no key material.
        raise DeviceKeyError(f"{source}: failed to load the private key: {exc}") from None
    _suite_for_key(key, DeviceKeyError)
    return key


def save_public_key(key: DevicePublicKey, path: str | Path) -> None:
    """Write a device public key as SubjectPublicKeyInfo PEM."""
    _suite_for_key(key, DeviceKeyError)
    pem = keyformat.public_key_pem(key)
    _write_atomically(path, pem, mode=0o644)


def load_public_key(path: str | Path) -> DevicePublicKey:
    """Read a P-256 or X25519 device public key from a PEM file."""
    pem = _read_key_file(path)
    key = keyformat.load_public_key_pem(pem)
    if key is not None:
        return key
    from cryptography.hazmat.primitives import serialization  # forms keyformat does not read

    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DeviceKeyError(f"{path}: failed to load the public key: {exc}") from None
    _suite_for_key(key, DeviceKeyError)
    return key


def _read_key_file(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise DeviceKeyError(f"{path}: failed to read the key file: {exc.strerror}") from None


def _write_atomically(target: str | os.PathLike, data: bytes, mode: int) -> None:
    # Imported here: devices read keys, only key generation writes them.
    import tempfile
    from pathlib import Path

    path = Path(target)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DeviceKeyError(f"{path}: failed to write the key file: {exc.strerror}") from None
    try:
        # mkstemp creates the file with mode 0600, so no other user can read a private key even
        # before this chmod.
        os.chmod(tmp_name, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    except OSError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise DeviceKeyError(f"{path}: failed to write the key file: {exc.strerror}") from None


# ---------------------------------------------------------------------------------------------
# Encoding and validation helpers
# ---------------------------------------------------------------------------------------------


def _encode_fields(*fields: bytes) -> bytes:
    """Concatenate fields, each prefixed with its length (4 bytes, big-endian), so that no two
    different field lists encode to the same bytes."""
    return b"".join(len(item).to_bytes(4, "big") + item for item in fields)


def _encode_text(value: Any, name: str, error: type[PackageError]) -> bytes:
    if not isinstance(value, str) or not value:
        raise error(f"{name} {value!r:.80} is invalid; expected a non-empty string")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise error(
            f"{name} {value!r:.80} is not valid UTF-8 (contains a lone surrogate)"
        ) from None


def _encode_version(version: Any, error: type[PackageError]) -> bytes:
    if not _is_int(version) or not 0 <= version < 2**64:
        raise error(f"version {version!r:.40} is invalid; expected an integer from 0 to 2**64 - 1")
    return version.to_bytes(8, "big")


def _check_content_key(content_key: Any, error: type[PackageError]) -> bytes:
    if not isinstance(content_key, (bytes, bytearray)):
        raise error(f"content key is {type(content_key).__name__}; expected bytes")
    if len(content_key) != CONTENT_KEY_BYTES:
        raise error(f"content key is {len(content_key)} bytes; expected {CONTENT_KEY_BYTES}")
    return bytes(content_key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_bytes_like(value: Any, name: str, error: type[PackageError]) -> bytes | memoryview:
    """Return ``value`` as immutable bytes. A read-only byte view (a slice of a package read
    into memory) is kept as it is, without copying; a writable buffer is copied, so that no
    one can change it between its checks and its use."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, memoryview) and value.readonly and value.format == "B" \
            and value.ndim == 1 and value.contiguous:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise error(f"{name} is {type(value).__name__}; expected bytes")


def _check_fields(data: Any, source: str, required: set[str]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise DecryptionError(f"{source} is {type(data).__name__}; expected a JSON object")
    missing = sorted(required - set(data))
    if missing:
        raise DecryptionError(f"{source}: missing field(s) {', '.join(missing)}")
    unknown = sorted(str(key) for key in set(data) - required)
    if unknown:
        raise DecryptionError(f"{source}: unknown field(s) {', '.join(unknown)}")
    return data


def _check_wrap_type(fields: Mapping[str, Any], expected: str, source: str) -> None:
    if fields["type"] != expected:
        raise DecryptionError(f"{source}: type {fields['type']!r:.40} is not {expected!r}")


def _require_str(fields: Mapping[str, Any], key: str, source: str) -> str:
    value = fields[key]
    if not isinstance(value, str):
        raise DecryptionError(f"{source}: field {key!r} is {type(value).__name__}; expected string")
    return value


def _require_int(fields: Mapping[str, Any], key: str, source: str) -> int:
    value = fields[key]
    if not _is_int(value):
        raise DecryptionError(
            f"{source}: field {key!r} is {type(value).__name__}; expected integer"
        )
    return value


def _require_b64(fields: Mapping[str, Any], key: str, source: str, size: int) -> bytes:
    text = _require_str(fields, key, source)
    try:
        value = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise DecryptionError(
            f"{source}: field {key!r} is not valid base64 (RFC 4648, with padding)"
        ) from None
    # Reject non-canonical encodings (nonzero padding bits), so one value has one text form.
    if _b64encode(value) != text:
        raise DecryptionError(f"{source}: field {key!r} is not canonical base64")
    if len(value) != size:
        raise DecryptionError(
            f"{source}: field {key!r} decodes to {len(value)} bytes; expected {size}"
        )
    return value


def _b64encode(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")
