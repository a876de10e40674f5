"""Signatures over package members in the OpenSSF model-signing v1.0 format.

A signature file is a Sigstore bundle (JSON, media type
``application/vnd.dev.sigstore.bundle.v0.3+json``) as written by ``model_signing sign key``
(model_signing 1.1.1). The bundle contains a public-key hint and a DSSE envelope. The
envelope's payload is an in-toto Statement v1 whose predicate
(``https://model_signing/signature/v1.0``) lists every member with its SHA-256. The subject
digest is the SHA-256 of the concatenated raw member digests, taken in resource order. The
signature is ECDSA P-256 with SHA-256 over the DSSE pre-authentication encoding (PAE), stored
DER-encoded.

Verification needs only the ``cryptography`` library. It first checks the file size, the
bundle's JSON structure, the base64 fields and the payload type. Next it verifies the signature
over the raw payload bytes with the trusted keys. Only then does it parse the statement, and
last it compares the statement's resources with the members. Every failure raises a
``SignatureError`` subclass whose message names the check and the value.

Two key fingerprints appear, both SHA-256 in hex. ``key_id`` hashes the DER
SubjectPublicKeyInfo and is written as the DSSE ``keyid``. The bundle's public-key ``hint``
hashes the PEM SubjectPublicKeyInfo text, because that is the value ``model_signing verify key``
compares with its public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from edge_runtime import keyformat
from edge_runtime._log import get_logger
from edge_runtime._value import FrozenValue
from edge_runtime.errors import PackageError, PackageIntegrityError

if TYPE_CHECKING:
    from pathlib import Path

logger = get_logger(__name__)

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
DIGEST_ALGORITHM = "sha256"

# A verifier rejects a larger signature file before it parses anything. As an estimate, one
# resource takes about 110 bytes plus its name in the compact statement written here and about
# 200 in model_signing's indented one, and base64 adds a third, so 1 MiB fits a few thousand.
MAX_SIGNATURE_BYTES = 1024 * 1024

# The keys a bundle may contain. Unknown keys are rejected so that every byte of the file is
# either signed or checked, because a key that the verifier skipped would let an altered file
# pass.
# NOTE: bundles with certificates, transparency log entries or timestamps (Sigstore keyless
# signing) fail here; only the public-key form of ``model_signing sign key`` is accepted.
_BUNDLE_KEYS = frozenset({"mediaType", "verificationMaterial", "dsseEnvelope"})
_VERIFICATION_MATERIAL_KEYS = frozenset({"publicKey", "tlogEntries"})
_PUBLIC_KEY_KEYS = frozenset({"hint"})
_ENVELOPE_KEYS = frozenset({"payload", "payloadType", "signatures"})
_ENVELOPE_SIGNATURE_KEYS = frozenset({"sig", "keyid"})

_HEX_DIGITS = frozenset("0123456789abcdef")


class SignatureError(PackageError):
    """A signature file is invalid, or the signed members cannot be trusted."""


class SignatureFormatError(SignatureError):
    """The signature file is not a well-formed bundle: size, JSON, base64 or a missing field."""


class UnknownSignerError(SignatureError):
    """The signature was made by a key that is not among the trusted keys."""


class InvalidSignatureError(SignatureError):
    """The signature does not verify: the payload or the signature bytes were altered."""


class StatementError(SignatureError):
    """The signed statement does not have the model-signing v1.0 shape, or is inconsistent."""


class MemberMismatchError(SignatureError, PackageIntegrityError):
    """The members differ from the signed resources: extra, missing or altered members."""


class SigningKeyError(SignatureError):
    """A key cannot be loaded, or is not an ECDSA P-256 key."""


class VerifiedStatement(FrozenValue):
    """The content of a signature that verified against a trusted key and the members.

    ``model_digest`` is the statement's subject digest: SHA-256 over the concatenated raw
    member digests, in hex. ``resources`` maps each signed member's name to its SHA-256 in hex.
    ``serialization`` holds the statement's serialization parameters, for example
    ``{"method": "files", ...}``, and ``payload`` the signed statement bytes exactly as they
    were verified.
    """

    __slots__ = ("signer_key_id", "model_name", "model_digest", "resources", "serialization",
                 "payload")
    _hidden_in_repr = frozenset({"payload"})
    signer_key_id: str
    model_name: str
    model_digest: str
    resources: Mapping[str, str]
    serialization: Mapping[str, Any]
    payload: bytes

    def __init__(self, signer_key_id: str, model_name: str, model_digest: str,
                 resources: Mapping[str, str], serialization: Mapping[str, Any],
                 payload: bytes):
        self._init(signer_key_id=signer_key_id, model_name=model_name,
                   model_digest=model_digest, resources=resources,
                   serialization=serialization, payload=payload)


# Keys


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """Generate a new ECDSA P-256 signing key."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_to_pem(
    private_key: ec.EllipticCurvePrivateKey, password: bytes | None = None
) -> bytes:
    """Serialize a private key as PKCS #8 PEM, encrypted when ``password`` is given."""
    from cryptography.hazmat.primitives import serialization  # writers only; see keyformat

    _require_p256_private_key(private_key)
    if password:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
        )
    else:
        encryption = serialization.NoEncryption()
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def public_key_to_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """Serialize a public key as SubjectPublicKeyInfo PEM, the form ``model_signing`` reads."""
    _require_p256_public_key(public_key, "public key")
    return _public_pem(public_key)


def write_private_key(
    path: str | Path, private_key: ec.EllipticCurvePrivateKey, password: bytes | None = None
) -> Path:
    """Write a private key as PEM to a new file that only its owner can read (mode 0600).

    Raises SigningKeyError if the file already exists, so that a key is never overwritten.
    """
    from pathlib import Path  # imported here: only key generation writes files

    pem = private_key_to_pem(private_key, password)
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningKeyError(
            f"key file {path} already exists; remove it or choose another path"
        ) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return path


def load_private_key_pem(data: bytes, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load an ECDSA P-256 private key from PEM.

    The error message on failure does not contain the key material.
    """
    from cryptography.hazmat.primitives import serialization  # signers only; see keyformat

    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # The message of these exceptions describes the failure, not the key bytes.
        raise SigningKeyError(f"cannot load the private key PEM: {exc}") from None
    _require_p256_private_key(key)
    return key  # type: ignore[return-value]


def load_public_key_pem(data: bytes) -> ec.EllipticCurvePublicKey:
    """Load an ECDSA P-256 public key from SubjectPublicKeyInfo PEM."""
    key = keyformat.load_public_key_pem(data)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key
    from cryptography.hazmat.primitives import serialization  # forms keyformat does not read

    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"cannot load the public key PEM: {exc}") from None
    _require_p256_public_key(key, "public key")
    return key  # type: ignore[return-value]


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Return the SHA-256 of the DER SubjectPublicKeyInfo of ``public_key``, in hex."""
    der = keyformat.public_key_der(public_key)
    if der is None:  # another curve: only reached when reporting a wrong key
        from cryptography.hazmat.primitives import serialization

        der = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return hashlib.sha256(der).hexdigest()


def _public_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    pem = keyformat.public_key_pem(public_key)
    if pem is None:
        from cryptography.hazmat.primitives import serialization

        pem = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return pem


def _model_signing_key_hint(public_key: ec.EllipticCurvePublicKey) -> str:
    # model_signing 1.1.1 hashes the PEM text, not the DER bytes, for the bundle's key hint.
    return hashlib.sha256(_public_pem(public_key)).hexdigest()


def _require_p256_private_key(key: object) -> None:
    # The message names only the type, never the key, because a private key must not be logged.
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SigningKeyError(
            f"signing key has type {type(key).__name__}; expected an ECDSA P-256 private key"
        )
    if not isinstance(key.curve, ec.SECP256R1):
        raise SigningKeyError(
            f"signing key uses curve {key.curve.name}; expected secp256r1 (P-256)"
        )


def _require_p256_public_key(key: object, label: str) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SigningKeyError(f"{label} has type {type(key).__name__}; expected an ECDSA P-256 key")
    if not isinstance(key.curve, ec.SECP256R1):
        raise SigningKeyError(f"{label} uses curve {key.curve.name}; expected secp256r1 (P-256)")


# Signing


def sign_members(
    members: Mapping[str, bytes],
    private_key: ec.EllipticCurvePrivateKey,
    *,
    model_name: str = "model",
) -> bytes:
    """Sign the member names and contents, and return the signature file (bundle JSON).

    ``members`` maps relative POSIX paths to file contents, as in an unpacked package folder.
    ``model_name`` becomes the statement's subject name. model_signing puts the folder name
    there and does not check it on verification.
    """
    _require_p256_private_key(private_key)
    if not isinstance(model_name, str) or not model_name:
        raise SignatureError(f"model name {model_name!r} must be a non-empty string")
    if not members:
        raise SignatureError("no members to sign; pass the files of the package")
    digests = _member_digests(members)
    statement = build_statement(digests, model_name)
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return _sign_payload(payload, private_key)


def build_statement(member_digests: Mapping[str, str], model_name: str) -> dict[str, Any]:
    """Build the in-toto statement for members given as name to SHA-256 hex.

    Resources are sorted by path components, as model_signing sorts its paths, so the
    statement lists files in the same order as ``model_signing sign`` on the same folder.
    """
    names = sorted(member_digests, key=_path_sort_key)
    resources = [
        {"name": name, "algorithm": DIGEST_ALGORITHM, "digest": member_digests[name]}
        for name in names
    ]
    model_digest = _model_digest(member_digests[name] for name in names)
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {DIGEST_ALGORITHM: model_digest}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": DIGEST_ALGORITHM,
                "allow_symlinks": False,
            },
            "resources": resources,
        },
    }


def pae(payload_type: str, payload: bytes) -> bytes:
    """Return the DSSE v1 pre-authentication encoding of a payload.

    ``"DSSEv1" SP len(type) SP type SP len(payload) SP payload``, where each length is the
    byte count in ASCII decimal.
    """
    type_bytes = payload_type.encode("utf-8")
    header = b"DSSEv1 %d %s %d " % (len(type_bytes), type_bytes, len(payload))
    return header + payload


def _sign_payload(payload: bytes, private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Sign raw statement bytes and wrap them in a bundle, the last step of sign_members.

    Tests call this directly to sign statements that sign_members would never build.
    """
    public_key = private_key.public_key()
    signature = private_key.sign(pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": _model_signing_key_hint(public_key)},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [
                {"sig": base64.b64encode(signature).decode("ascii"), "keyid": key_id(public_key)}
            ],
        },
    }
    return json.dumps(bundle, separators=(",", ":")).encode("utf-8")


# Verification


def verify_members(
    signature: bytes,
    members: Mapping[str, bytes],
    trusted_keys: Sequence[ec.EllipticCurvePublicKey],
    digests: Mapping[str, str] | None = None,
) -> VerifiedStatement:
    """Verify a signature file against the members and return what it signed.

    The signature must verify with one of ``trusted_keys``, and the member names must equal
    the signed resource names with equal SHA-256 digests. Unlike model_signing, this ignores
    the statement's ``ignore_paths``, so every member must be signed. ``digests`` may hold the
    SHA-256 hex of members the caller has already hashed; the others are hashed here. Raises a
    SignatureError subclass on any failure, and TypeError for arguments of the wrong Python
    type.
    """
    if not isinstance(signature, (bytes, bytearray)):
        raise TypeError(f"signature must be bytes, not {type(signature).__name__}")
    if not trusted_keys:
        raise UnknownSignerError(
            "no trusted keys were given; pass the public keys of the package builders"
        )
    for index, key in enumerate(trusted_keys):
        _require_p256_public_key(key, f"trusted key #{index}")
    digests = _member_digests(members, digests or {})

    envelope = _parse_bundle(bytes(signature))
    signer = _verify_envelope(envelope, trusted_keys)
    verified = _parse_statement(envelope.payload, key_id(signer))
    _compare_members(verified.resources, digests)
    return verified


class _Envelope(FrozenValue):
    __slots__ = ("payload", "signature", "keyid", "hint")

    def __init__(self, payload: bytes, signature: bytes, keyid: str, hint: str):
        self._init(payload=payload, signature=signature, keyid=keyid, hint=hint)


def _parse_bundle(data: bytes) -> _Envelope:
    """Check the bundle's size and structure and decode the DSSE fields, without the statement."""
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureFormatError(
            f"signature file is {len(data)} bytes; the limit is {MAX_SIGNATURE_BYTES}"
        )
    bundle = _load_json(data, "signature file")
    _require_keys(bundle, "bundle", _BUNDLE_KEYS, required=_BUNDLE_KEYS)

    media_type = bundle["mediaType"]
    if media_type != BUNDLE_MEDIA_TYPE:
        raise SignatureFormatError(
            f"bundle mediaType is {media_type!r:.100}; expected {BUNDLE_MEDIA_TYPE!r}"
        )

    material = bundle["verificationMaterial"]
    _require_keys(material, "verificationMaterial", _VERIFICATION_MATERIAL_KEYS, required=())
    tlog_entries = material.get("tlogEntries", [])
    if tlog_entries != []:
        raise SignatureFormatError(
            "verificationMaterial.tlogEntries must be empty; transparency log entries are not "
            "supported by this verifier"
        )
    hint = ""
    if "publicKey" in material:
        public_key = material["publicKey"]
        _require_keys(public_key, "verificationMaterial.publicKey", _PUBLIC_KEY_KEYS, required=())
        hint = public_key.get("hint", "")
        if not isinstance(hint, str):
            raise SignatureFormatError(
                f"verificationMaterial.publicKey.hint has type {type(hint).__name__}; "
                "expected a string"
            )

    envelope = bundle["dsseEnvelope"]
    _require_keys(envelope, "dsseEnvelope", _ENVELOPE_KEYS, required=_ENVELOPE_KEYS)
    payload_type = envelope["payloadType"]
    if payload_type != PAYLOAD_TYPE:
        raise SignatureFormatError(
            f"dsseEnvelope.payloadType is {payload_type!r:.100}; expected {PAYLOAD_TYPE!r}"
        )
    payload = _decode_base64(envelope["payload"], "dsseEnvelope.payload")

    signatures = envelope["signatures"]
    if not isinstance(signatures, list) or len(signatures) != 1:
        count = len(signatures) if isinstance(signatures, list) else type(signatures).__name__
        raise SignatureFormatError(
            f"dsseEnvelope.signatures must be a list of exactly one signature; got {count}"
        )
    entry = signatures[0]
    _require_keys(entry, "dsseEnvelope.signatures[0]", _ENVELOPE_SIGNATURE_KEYS, required={"sig"})
    signature = _decode_base64(entry["sig"], "dsseEnvelope.signatures[0].sig")
    keyid = entry.get("keyid", "")
    if not isinstance(keyid, str):
        raise SignatureFormatError(
            f"dsseEnvelope.signatures[0].keyid has type {type(keyid).__name__}; expected a string"
        )
    return _Envelope(payload=payload, signature=signature, keyid=keyid, hint=hint)


class _VerifyingEcdsaSha256(ec.ECDSA):
    """ECDSA with SHA-256 for verification, built without ``ECDSA.__init__``.

    cryptography's constructor (version 50) imports its OpenSSL backend module to check
    deterministic signing, which only signing uses. That import took 3 to 5 ms of a device's
    cold start (2-vCPU x86-64 VM). This subclass sets the two attributes that the public
    ``algorithm`` and ``deterministic_signing`` properties read; ``_ecdsa_sha256`` checks that
    they do, and falls back to the constructor if a later version stores them differently.
    """

    def __init__(self) -> None:  # noqa: D107 - see the class docstring
        self._algorithm = hashes.SHA256()
        self._deterministic_signing = False


def _ecdsa_sha256() -> ec.ECDSA:
    try:
        algorithm = _VerifyingEcdsaSha256()
        if isinstance(algorithm.algorithm, hashes.SHA256) \
                and algorithm.deterministic_signing is False:
            return algorithm
    except AttributeError:
        pass
    return ec.ECDSA(hashes.SHA256())


def _verify_envelope(
    envelope: _Envelope, trusted_keys: Sequence[ec.EllipticCurvePublicKey]
) -> ec.EllipticCurvePublicKey:
    """Return the trusted key whose signature over the PAE of the raw payload verifies.

    The hint and keyid are not signed, so they only choose the error type when no key verifies.
    When a key verifies, a non-empty hint or keyid must name that same key.
    """
    message = pae(PAYLOAD_TYPE, envelope.payload)
    for key in trusted_keys:
        try:
            key.verify(envelope.signature, message, _ecdsa_sha256())
        except InvalidSignature:
            continue
        if envelope.hint and envelope.hint != _model_signing_key_hint(key):
            raise SignatureFormatError(
                f"verificationMaterial.publicKey.hint {envelope.hint!r:.80} does not name the "
                f"key that made the signature, trusted key {key_id(key)}"
            )
        if envelope.keyid and envelope.keyid != key_id(key):
            raise SignatureFormatError(
                f"dsseEnvelope.signatures[0].keyid {envelope.keyid!r:.80} does not name the "
                f"key that made the signature, trusted key {key_id(key)}"
            )
        return key

    trusted_ids = [key_id(key) for key in trusted_keys]
    named = [name for name in (envelope.hint, envelope.keyid) if name]
    if not named:
        raise InvalidSignatureError(
            f"signature does not verify with any of the {len(trusted_keys)} trusted keys "
            f"{trusted_ids}, and the file names no signer, so either the signer is not trusted "
            "or the file was altered"
        )
    for key in trusted_keys:
        if envelope.hint == _model_signing_key_hint(key) or envelope.keyid == key_id(key):
            raise InvalidSignatureError(
                f"signature does not verify with trusted key {key_id(key)}, which the file "
                "names as its signer, so the payload or the signature was altered"
            )
    raise UnknownSignerError(
        f"signature names signer key hint {envelope.hint!r:.80} and keyid "
        f"{envelope.keyid!r:.80}, which match none of the {len(trusted_keys)} trusted keys "
        f"{trusted_ids}; add the builder's public key to the trusted keys if it is trusted"
    )


def _parse_statement(payload: bytes, signer_key_id: str) -> VerifiedStatement:
    """Parse the verified payload as a model-signing v1.0 statement and check its subject digest."""
    statement = _load_json(payload, "signed statement", error=StatementError)
    if not isinstance(statement, dict):
        raise StatementError(
            f"signed statement has JSON type {type(statement).__name__}; expected an object"
        )
    statement_type = _require_field(statement, "_type", str, "statement")
    if statement_type != STATEMENT_TYPE:
        raise StatementError(
            f"statement _type is {statement_type!r:.100}; expected {STATEMENT_TYPE!r}"
        )
    predicate_type = _require_field(statement, "predicateType", str, "statement")
    if predicate_type != PREDICATE_TYPE:
        raise StatementError(
            f"statement predicateType is {predicate_type!r:.100}; expected {PREDICATE_TYPE!r}"
        )

    subjects = _require_field(statement, "subject", list, "statement")
    if len(subjects) != 1 or not isinstance(subjects[0], dict):
        raise StatementError(
            f"statement subject must be a list of one object; got {len(subjects)} entries "
            f"of types {sorted({type(entry).__name__ for entry in subjects})}"
        )
    model_name = _require_field(subjects[0], "name", str, "statement subject")
    subject_digests = _require_field(subjects[0], "digest", dict, "statement subject")
    model_digest = _require_field(
        subject_digests, DIGEST_ALGORITHM, str, "statement subject digest"
    )

    predicate = _require_field(statement, "predicate", dict, "statement")
    serialization_parameters = _require_field(
        predicate, "serialization", dict, "statement predicate"
    )
    _check_serialization(serialization_parameters)
    resource_list = _require_field(predicate, "resources", list, "statement predicate")
    resources: dict[str, str] = {}
    for index, resource in enumerate(resource_list):
        label = f"statement resource #{index}"
        if not isinstance(resource, dict):
            raise StatementError(f"{label} has type {type(resource).__name__}; expected an object")
        name = _require_field(resource, "name", str, label)
        algorithm = _require_field(resource, "algorithm", str, label)
        digest = _require_field(resource, "digest", str, label)
        problem = _member_name_problem(name)
        if problem:
            raise StatementError(f"{label} name {name!r:.200} {problem}")
        if algorithm != DIGEST_ALGORITHM:
            raise StatementError(
                f"{label} ({name!r:.200}) uses algorithm {algorithm!r:.40}; "
                f"only {DIGEST_ALGORITHM!r} is supported"
            )
        if not _is_sha256_hex(digest):
            raise StatementError(
                f"{label} ({name!r:.200}) digest {digest!r:.80} is not 64 lowercase hex digits"
            )
        if name in resources:
            raise StatementError(f"{label} name {name!r:.200} appears more than once")
        resources[name] = digest

    # Other documents cite the subject digest, so it must follow from the resources.
    computed = _model_digest(resources.values())
    if model_digest != computed:
        raise StatementError(
            f"statement subject digest {model_digest!r:.80} does not match the digest of its "
            f"resources, {computed}"
        )
    return VerifiedStatement(
        signer_key_id=signer_key_id,
        model_name=model_name,
        model_digest=model_digest,
        resources=MappingProxyType(resources),
        serialization=MappingProxyType(dict(serialization_parameters)),
        payload=payload,
    )


def _check_serialization(parameters: dict[str, Any]) -> None:
    method = _require_field(parameters, "method", str, "statement serialization")
    if method != "files":
        raise StatementError(
            f"statement serialization method is {method!r:.40}; only 'files' is supported "
            "(sign with model_signing's default file serialization, not shards)"
        )
    hash_type = _require_field(parameters, "hash_type", str, "statement serialization")
    if hash_type != DIGEST_ALGORITHM:
        raise StatementError(
            f"statement serialization hash_type is {hash_type!r:.40}; "
            f"only {DIGEST_ALGORITHM!r} is supported"
        )
    _require_field(parameters, "allow_symlinks", bool, "statement serialization")
    ignore_paths = parameters.get("ignore_paths", [])
    if not isinstance(ignore_paths, list) or not all(isinstance(p, str) for p in ignore_paths):
        raise StatementError("statement serialization ignore_paths must be a list of strings")


def _compare_members(signed: Mapping[str, str], actual: Mapping[str, str]) -> None:
    """Raise MemberMismatchError listing every extra, missing and altered member."""
    problems = []
    for name in sorted(actual.keys() - signed.keys(), key=_path_sort_key):
        problems.append(f"{name}: not signed (extra member)")
    for name in sorted(signed.keys() - actual.keys(), key=_path_sort_key):
        problems.append(f"{name}: signed but missing")
    for name in sorted(signed.keys() & actual.keys(), key=_path_sort_key):
        if signed[name] != actual[name]:
            problems.append(f"{name}: sha256 {actual[name]}, signed {signed[name]}")
    if problems:
        raise MemberMismatchError(
            f"{len(problems)} member(s) differ from the signed statement: " + "; ".join(problems)
        )


# Helpers


def _member_digests(members: Mapping[str, bytes],
                    known: Mapping[str, str] | None = None) -> dict[str, str]:
    if not isinstance(members, Mapping):
        raise TypeError(f"members must be a mapping of name to bytes, not {type(members).__name__}")
    digests = {}
    for name, data in members.items():
        if not isinstance(name, str):
            raise TypeError(f"member name {name!r:.80} must be a str")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"member {name!r} content must be bytes, not {type(data).__name__}")
        problem = _member_name_problem(name)
        if problem:
            raise SignatureError(f"member name {name!r:.200} {problem}")
        known_digest = (known or {}).get(name)
        digests[name] = known_digest or hashlib.sha256(data).hexdigest()
    return digests


def _member_name_problem(name: str) -> str | None:
    """Return why ``name`` is not a normalized relative POSIX path, or None if it is.

    A normalized name is its own ``PurePosixPath`` string, which is how model_signing writes
    resource names, so the same file gets the same name on both sides.
    """
    if not name:
        return "is empty"
    if name.startswith("/"):
        return "is an absolute path; expected a relative POSIX path"
    if "\\" in name or "\x00" in name:
        return "contains a backslash or NUL; expected a relative POSIX path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "contains an empty, '.' or '..' path component"
    return None


def _path_sort_key(name: str) -> tuple[str, ...]:
    # model_signing 1.1.1 sorts PurePosixPath objects, which compare by path components:
    # "a/b" sorts before "a.b", although "." sorts before "/" as a character.
    return tuple(name.split("/"))


def _model_digest(hex_digests: Iterable[str]) -> str:
    """Hash the concatenated raw member digests, in the order given."""
    hasher = hashlib.sha256()
    for digest in hex_digests:
        hasher.update(bytes.fromhex(digest))
    return hasher.hexdigest()


def _is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX_DIGITS


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # Two parsers could keep different copies of a repeated key, so reject it.
            raise ValueError(f"duplicate key {key!r:.80}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_json(
    data: bytes, label: str, error: type[SignatureError] = SignatureFormatError
) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{label} is not valid UTF-8: {exc}") from None
    try:
        return json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except RecursionError:
        raise error(f"{label} nests JSON too deeply to parse") from None
    except ValueError as exc:
        # json.JSONDecodeError is a ValueError, and so are the hooks' errors and Python's
        # limit on the digits of an integer.
        raise error(f"{label} is not valid JSON: {exc}") from None


def _require_keys(
    value: Any, label: str, allowed: frozenset[str], required: frozenset[str] | tuple[()]
) -> None:
    if not isinstance(value, dict):
        raise SignatureFormatError(
            f"{label} has JSON type {type(value).__name__}; expected an object"
        )
    missing = sorted(set(required) - value.keys())
    if missing:
        raise SignatureFormatError(f"{label} is missing the field(s) {missing}")
    unknown = sorted(value.keys() - allowed)
    if unknown:
        raise SignatureFormatError(
            f"{label} contains unknown field(s) {[name[:80] for name in unknown]}; "
            f"allowed: {sorted(allowed)}"
        )


def _require_field(value: dict[str, Any], key: str, kind: type, label: str) -> Any:
    if key not in value:
        raise StatementError(f"{label} is missing the field {key!r}")
    item = value[key]
    if not isinstance(item, kind):
        raise StatementError(
            f"{label} field {key!r} has type {type(item).__name__}; expected {kind.__name__}"
        )
    return item


def _decode_base64(value: Any, label: str) -> bytes:
    """Decode standard base64 with padding, rejecting any other form of the same bytes."""
    if not isinstance(value, str):
        raise SignatureFormatError(
            f"{label} has type {type(value).__name__}; expected a base64 string"
        )
    if not value:
        raise SignatureFormatError(f"{label} is empty")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureFormatError(f"{label} is not valid base64: {exc}") from None
    # b64decode accepts non-zero unused bits in the last character, so one value would have
    # several encodings. Re-encoding makes the check exact.
    # NOTE: DSSE also allows URL-safe base64, but model_signing writes the standard alphabet
    # and this verifier accepts only that.
    if base64.b64encode(decoded).decode("ascii") != value:
        raise SignatureFormatError(f"{label} is not canonical standard base64 with padding")
    return decoded
