"""Model packages: one file holding a manifest, an ONNX model and its tokenizer, optionally
signed and encrypted.

Format, schema versions 2 and 3 (``docs/package-format.md`` has the full description): a ZIP
archive of stored (uncompressed) members:

- ``manifest.json``: UTF-8 JSON with the package name and integer version, labels, model and
  tokenizer entries, the calibrated gate, golden inputs, provenance, an optional ``expires_at``,
  the ``encryption`` section (member headers and content-key wraps) and ``members``: every
  other member except the signature, with the SHA-256 and size of its bytes in the archive.
- the members named there, for example ``model.onnx`` (ciphertext when encrypted) and
  ``tokenizer.json``.
- ``model.sig``: a DSSE envelope holding an in-toto statement in the OpenSSF model-signing v1.0
  shape, signed with ECDSA P-256 over every other member, ``manifest.json`` included.

``read_package`` checks, in order: archive limits and member names; the signature over the raw
member bytes (before the manifest is parsed); the manifest's schema; every member's size and
digest; expiry; rollback; then it unwraps the content key and decrypts into memory. Every
failure is a ``PackageError`` subclass naming the check and the value.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from edge_runtime import encryption, signing
from edge_runtime._log import get_logger
from edge_runtime._value import FrozenValue
from edge_runtime.archive import (  # noqa: F401 (limits and names re-exported for callers)
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_MEMBER_BYTES,
    MAX_MEMBERS,
    MAX_PACKAGE_BYTES,
    MAX_TOTAL_BYTES,
    PACKAGE_SUFFIX,
    SIGNATURE_NAME,
    Archive,
    check_member_name,
)
from edge_runtime.errors import (
    ExpiredPackageError,
    InvalidMemberNameError,
    ManifestError,
    PackageIntegrityError,
    UnsupportedSchemaVersionError,
)
from edge_runtime.rollback import RollbackState

if TYPE_CHECKING:
    from pathlib import Path

log = get_logger(__name__)

# Version 3 adds gate scores other than the top-1 probability. A writer stamps the lowest
# version that can express the manifest, so a version-2 reader still opens every package whose
# gate uses the top-1 probability, and rejects one whose gate it would misread.
SCHEMA_VERSION = 3
# The newest version whose gate score is always the top-1 probability.
MAX_PROBABILITY_SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (2, 3)

# Names of the gate scores, computed by edge_runtime.gate.gate_scores.
MAX_PROBABILITY = "max_probability"
LOGIT_MARGIN = "logit_margin"
SCORE_KINDS = (MAX_PROBABILITY, LOGIT_MARGIN)
DEFAULT_CLOCK_SKEW = 300.0  # seconds of tolerance on the expiry time


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class TrustPolicy(FrozenValue):
    """What a reader requires of a package, and the keys it uses.

    ``trusted_keys``: signer public keys (ECDSA P-256) whose signatures are accepted.
    ``device_key``: this device's private key, which unwraps the content key of encrypted
    packages. ``passphrase``: a development-only alternative to the device key.
    ``rollback``: where accepted versions are recorded; None skips the rollback check.
    ``allow_unsigned``: accept a package without a signature, or skip checking one when no
    trusted keys are given. For development and inspection only. ``now`` returns the current
    UTC time for the expiry check. ``replace(**changes)`` returns a changed copy.
    """

    __slots__ = ("trusted_keys", "device_key", "passphrase", "rollback", "allow_downgrade",
                 "allow_unsigned", "clock_skew", "now")
    _hidden_in_repr = frozenset({"device_key", "passphrase", "now"})
    trusted_keys: Sequence[Any]
    device_key: Any
    passphrase: str | bytes | None
    rollback: RollbackState | None
    allow_downgrade: bool
    allow_unsigned: bool
    clock_skew: float
    now: Callable[[], dt.datetime]

    def __init__(self, trusted_keys: Sequence[Any] = (), device_key: Any = None,
                 passphrase: str | bytes | None = None, rollback: RollbackState | None = None,
                 allow_downgrade: bool = False, allow_unsigned: bool = False,
                 clock_skew: float = DEFAULT_CLOCK_SKEW,
                 now: Callable[[], dt.datetime] = _utc_now):
        self._init(trusted_keys=trusted_keys, device_key=device_key, passphrase=passphrase,
                   rollback=rollback, allow_downgrade=allow_downgrade,
                   allow_unsigned=allow_unsigned, clock_skew=clock_skew, now=now)

    @classmethod
    def unverified(cls, **kwargs: Any) -> TrustPolicy:
        """A policy that accepts unsigned packages, for development and inspection."""
        return cls(allow_unsigned=True, **kwargs)


class GateSettings(FrozenValue):
    """Calibrated confidence gate: answer locally when the score of the logits divided by
    ``temperature`` is at least ``threshold``. ``score`` names the score, one of
    ``edge_runtime.gate.SCORE_KINDS``: "max_probability" (the top-1 probability) or
    "logit_margin" (``p1 / (p1 + p2)``).

    ``fitted_on`` records how the numbers were chosen: target, split, and the figures
    measured there.
    """

    __slots__ = ("temperature", "threshold", "score", "fitted_on")
    temperature: float
    threshold: float
    score: str
    fitted_on: dict[str, Any]

    def __init__(self, temperature: float, threshold: float,
                 fitted_on: dict[str, Any] | None = None, score: str = MAX_PROBABILITY):
        self._init(temperature=temperature, threshold=threshold, score=score,
                   fitted_on={} if fitted_on is None else fitted_on)


class Manifest(FrozenValue):
    """The parsed ``manifest.json`` of a package; ``raw`` is the whole JSON object."""

    __slots__ = ("name", "version", "task", "labels", "model_member", "input_names",
                 "output_names", "max_length", "precision", "tokenizer_member", "gate", "raw",
                 "expires_at")
    _hidden_in_repr = frozenset({"raw"})
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
    expires_at: str | None

    def __init__(self, name: str, version: int, task: str, labels: tuple[str, ...],
                 model_member: str, input_names: tuple[str, ...],
                 output_names: tuple[str, ...], max_length: int, precision: str,
                 tokenizer_member: str, gate: GateSettings | None, raw: dict[str, Any],
                 expires_at: str | None = None):
        self._init(name=name, version=version, task=task, labels=labels,
                   model_member=model_member, input_names=input_names,
                   output_names=output_names, max_length=max_length, precision=precision,
                   tokenizer_member=tokenizer_member, gate=gate, raw=raw,
                   expires_at=expires_at)


class ModelPackage(FrozenValue):
    """A package read and checked in memory: the manifest, the plaintext bytes of each member,
    the signer's key id (None when unsigned or not checked) and one line per check passed."""

    __slots__ = ("path", "manifest", "members", "signer_key_id", "verdicts")
    _hidden_in_repr = frozenset({"members"})
    path: str
    manifest: Manifest
    members: dict[str, bytes]
    signer_key_id: str | None
    verdicts: tuple[str, ...]

    def __init__(self, path: str, manifest: Manifest, members: dict[str, bytes],
                 signer_key_id: str | None = None, verdicts: tuple[str, ...] = ()):
        self._init(path=path, manifest=manifest, members=members,
                   signer_key_id=signer_key_id, verdicts=verdicts)

    @property
    def model_bytes(self) -> bytes:
        return self.members[self.manifest.model_member]

    @property
    def tokenizer_json(self) -> str:
        return self.members[self.manifest.tokenizer_member].decode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_package(
    path: str | Path,
    manifest: dict[str, Any],
    members: dict[str, bytes],
    *,
    signer_key: Any = None,
    recipients: Sequence[Any] = (),
    passphrase: str | bytes | None = None,
    encrypt_members: Sequence[str] = ("model.onnx",),
    segment_size: int = encryption.DEFAULT_SEGMENT_SIZE,
) -> Path:
    """Write a package file atomically and return its path.

    ``manifest`` gets its ``schema_version``, ``members`` and ``encryption`` entries filled in
    here. With ``recipients`` (device public keys) or a development ``passphrase``, the members
    in ``encrypt_members`` are encrypted under a fresh content key. With ``signer_key`` (an
    ECDSA P-256 private key) the package is signed over every member and the manifest.
    """
    seen: set[str] = set()
    for name in members:
        check_member_name(name, seen)
    for reserved in (MANIFEST_NAME, SIGNATURE_NAME):
        if reserved in members:
            raise InvalidMemberNameError(f"member name {reserved!r} is reserved")
    manifest = dict(manifest)
    manifest["schema_version"] = _schema_version_for(manifest)
    name, version = manifest.get("name"), manifest.get("version")
    stored = dict(members)

    manifest["encryption"] = None
    if recipients or passphrase is not None:
        missing = [m for m in encrypt_members if m not in members]
        if missing:
            raise encryption.EncryptionError(
                f"cannot encrypt members that do not exist: {missing}")
        content_key = encryption.generate_content_key()
        headers, plaintext_digests = {}, {}
        for member in encrypt_members:
            sealed = encryption.encrypt_member(members[member], content_key, name, version,
                                               member, segment_size=segment_size)
            headers[member] = sealed.to_dict()
            plaintext_digests[member] = sha256_hex(members[member])
            stored[member] = sealed.ciphertext
        wraps = [encryption.wrap_content_key(content_key, key, name, version).to_dict()
                 for key in recipients]
        if passphrase is not None:
            wraps.append(encryption.wrap_content_key_with_passphrase(
                content_key, passphrase, name, version).to_dict())
        manifest["encryption"] = {
            "key_commitment": encryption.key_commitment(content_key, name, version),
            "members": headers,
            "plaintext_sha256": plaintext_digests,
            "recipients": wraps,
        }

    manifest["members"] = {
        member: {"sha256": sha256_hex(data), "size": len(data)}
        for member, data in sorted(stored.items())
    }
    _parse_manifest(manifest, source=str(path))  # a writer never produces what a reader rejects
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    archive_members = {MANIFEST_NAME: manifest_bytes, **stored}
    if signer_key is not None:
        archive_members[SIGNATURE_NAME] = signing.sign_members(
            archive_members, signer_key, model_name=f"{name}@{version}"
        )
    return _write_archive(path, archive_members)


def _write_archive(target: str | os.PathLike, archive_members: dict[str, bytes]) -> Path:
    # Imported here: only writers need them, and a device only reads.
    import tempfile
    import zipfile
    from pathlib import Path

    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
                # The manifest first, so that a streaming reader meets it before the model.
                for name in sorted(archive_members, key=lambda n: (n != MANIFEST_NAME, n)):
                    archive.writestr(name, archive_members[name])
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file with mode 0600, but a package contains no plaintext secret.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def read_archive(source: str | Path | bytes) -> tuple[str, dict[str, bytes]]:
    """Read every member of a package archive into memory after the size, name and CRC checks.

    Returns a label for messages (the path, or ``<bytes>``) and the raw member bytes. Nothing
    is parsed, verified or decrypted here.
    """
    archive = Archive.read(source, hash_members=False)
    return archive.label, {name: bytes(view) for name, view in archive.members.items()}


def read_package(source: str | Path | bytes, trust: TrustPolicy | None = None, *,
                 on_stage: Callable[[str], None] | None = None) -> ModelPackage:
    """Read, verify and decrypt a package in memory.

    ``trust`` sets the keys and checks; without it, the reader accepts unsigned packages and
    does not check signatures (``TrustPolicy.unverified()``), which suits development tools
    but not a device. ``on_stage``, if given, is called with ``"verified"`` once every check
    before decryption has passed and with ``"decrypted"`` at the end, so that a benchmark can
    time the two parts.
    """
    trust = trust if trust is not None else TrustPolicy.unverified()
    # Every member is hashed once here; the signature and manifest checks reuse the digests.
    archive = Archive.read(source, hash_members=True)
    label, digests = archive.label, archive.digests
    raw_members = dict(archive.members)
    verdicts: list[str] = []

    # The signature is checked over raw bytes before the manifest is parsed.
    signer_key_id = None
    signature = raw_members.pop(SIGNATURE_NAME, None)
    if signature is not None and trust.trusted_keys:
        verified = signing.verify_members(bytes(signature), raw_members,
                                          list(trust.trusted_keys), digests=digests)
        signer_key_id = verified.signer_key_id
        verdicts.append(f"signature: valid, signer key {signer_key_id}")
    elif not trust.allow_unsigned:
        if signature is None:
            raise signing.SignatureError(
                f"{label} is not signed; sign it with `edge-runtime package sign`, or, for "
                "development only, allow unsigned packages (--allow-unsigned)"
            )
        raise signing.UnknownSignerError(
            f"{label} is signed but no trusted signer keys were given; pass the builder's "
            "public key"
        )
    else:
        state = "absent" if signature is None else "present, not checked (no trusted keys)"
        verdicts.append(f"signature: {state}")
        if signature is not None:
            log.warning("%s: signature not checked because no trusted keys were given", label)

    raw = _load_manifest_json(label, raw_members)
    manifest = _parse_manifest(raw, label)
    _check_digests(label, raw, raw_members, digests)
    verdicts.append(f"digests: {len(raw['members'])} member(s) match the manifest")

    _check_expiry(label, manifest, trust)
    verdicts.append("expiry: " + (f"valid until {manifest.expires_at}" if manifest.expires_at
                                  else "none set"))
    if trust.rollback is not None and signer_key_id is not None:
        highest = trust.rollback.check(signer_key_id, manifest.name, manifest.version,
                                       trust.allow_downgrade)
        if highest is not None and manifest.version < highest:
            verdicts.append(f"rollback: version {manifest.version} is older than accepted "
                            f"version {highest}, accepted because a downgrade was allowed")
        else:
            verdicts.append(f"rollback: version {manifest.version} is not older than accepted "
                            "ones")
    elif trust.rollback is not None:
        # Versions are recorded per signer, so an unsigned package has nothing to compare with.
        verdicts.append("rollback: not checked, because the package has no verified signer")

    members = {name: blob for name, blob in raw_members.items() if name != MANIFEST_NAME}
    del raw_members, signature
    if on_stage is not None:
        on_stage("verified")
    if raw.get("encryption"):
        members, verdict = _decrypt(archive, manifest, raw["encryption"], members, trust)
        verdicts.append(verdict)
    # Members that were not encrypted are still views into the archive; callers get bytes.
    members = {name: blob if isinstance(blob, bytes) else bytes(blob)
               for name, blob in members.items()}

    if trust.rollback is not None and signer_key_id is not None:
        trust.rollback.record(signer_key_id, manifest.name, manifest.version)
    if on_stage is not None:
        on_stage("decrypted")
    return ModelPackage(path=label, manifest=manifest, members=members,
                        signer_key_id=signer_key_id, verdicts=tuple(verdicts))


def sign_archive(source: str | Path | bytes, target: str | Path, signer_key: Any) -> Path:
    """Sign (or re-sign) a package as it is, encrypted members included, and write it to
    ``target``. The manifest is parsed only to check it; nothing is decrypted."""
    label, raw_members = read_archive(source)
    raw_members.pop(SIGNATURE_NAME, None)
    raw = _load_manifest_json(label, raw_members)
    manifest = _parse_manifest(raw, label)
    _check_digests(label, raw, raw_members)
    raw_members[SIGNATURE_NAME] = signing.sign_members(
        raw_members, signer_key, model_name=f"{manifest.name}@{manifest.version}"
    )
    return _write_archive(target, raw_members)


def rebuild_package(package: ModelPackage, target: str | Path, **options: Any) -> Path:
    """Write a read package again with new ``write_package`` options (signer, recipients,
    passphrase, encrypted members), keeping its manifest and plaintext members."""
    manifest = {key: value for key, value in package.manifest.raw.items()
                if key not in ("schema_version", "members", "encryption")}
    return write_package(target, manifest, package.members, **options)


def inspect_package(source: str | Path | bytes) -> dict[str, Any]:
    """Return the manifest without verifying the signature or decrypting anything."""
    label, raw_members = read_archive(source)
    raw = _load_manifest_json(label, raw_members)
    if not isinstance(raw, dict):
        raise ManifestError(f"{label}: manifest is {type(raw).__name__}; expected a JSON object")
    return {"manifest": raw, "signed": SIGNATURE_NAME in raw_members,
            "archive_members": sorted(raw_members)}


def _load_manifest_json(label: str, raw_members: dict[str, bytes] | dict[str, memoryview]
                        ) -> Any:
    try:
        return json.loads(bytes(raw_members[MANIFEST_NAME]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{label}: {MANIFEST_NAME} is not valid UTF-8 JSON: {exc}") from None


def _check_digests(label: str, raw: dict[str, Any], raw_members: dict[str, bytes],
                   known_digests: dict[str, str] | None = None) -> None:
    """Compare members with the manifest's sizes and digests. ``known_digests`` holds SHA-256
    values already computed over the same bytes, which are then not hashed again."""
    known_digests = known_digests or {}
    listed = set(raw["members"])
    present = set(raw_members) - {MANIFEST_NAME}
    unlisted = sorted(present - listed)
    if unlisted:
        raise PackageIntegrityError(f"{label}: members not listed in the manifest: {unlisted}")
    mismatches = []
    for name, entry in sorted(raw["members"].items()):
        blob = raw_members.get(name)
        if blob is None:
            mismatches.append(f"{name}: missing from the archive")
        elif len(blob) != entry["size"]:
            mismatches.append(f"{name}: size {len(blob)} bytes, manifest says {entry['size']}")
        else:
            digest = known_digests.get(name) or sha256_hex(blob)
            if digest != entry["sha256"]:
                mismatches.append(f"{name}: sha256 {digest}, manifest says {entry['sha256']}")
    if mismatches:
        raise PackageIntegrityError(
            f"{label}: {len(mismatches)} member(s) differ from the manifest: "
            + "; ".join(mismatches)
        )


def _check_expiry(label: str, manifest: Manifest, trust: TrustPolicy) -> None:
    if manifest.expires_at is None:
        return
    expires = _parse_time(manifest.expires_at, "expires_at", label)
    now = trust.now()
    try:
        deadline = expires + dt.timedelta(seconds=trust.clock_skew)
    except OverflowError:
        return  # within the skew of the largest time Python represents: not expired
    if now > deadline:
        raise ExpiredPackageError(
            f"{label}: package {manifest.name!r} version {manifest.version} expired at "
            f"{manifest.expires_at} (now {now.isoformat(timespec='seconds')}, clock skew "
            f"tolerance {trust.clock_skew:.0f} s); install a newer package"
        )


def _parse_time(value: str, key: str, label: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{label}: manifest {key!r} is {value!r}; expected an ISO 8601 "
                            "time with a UTC offset") from None
    if parsed.tzinfo is None:
        raise ManifestError(f"{label}: manifest {key!r} is {value!r}; it needs a UTC offset")
    return parsed


def _decrypt(archive: Archive, manifest: Manifest, section: Any,
             members: dict[str, memoryview], trust: TrustPolicy) -> tuple[dict[str, bytes], str]:
    """Unwrap the content key, decrypt the encrypted members, and return the members and a
    verdict line.

    The model, when it is encrypted and the archive was read from a file, is decrypted last
    and in place over the archive (``_decrypt_in_place``); every other member is copied out or
    decrypted before that. With a key commitment in the manifest, the unwrapped key is checked
    against it and the plaintext is not hashed (see ``encryption.key_commitment``); without
    one, each plaintext must match its ``plaintext_sha256``.
    """
    label = archive.label
    if not isinstance(section, dict) or not all(
        isinstance(section.get(key), kind) for key, kind in
        (("members", dict), ("plaintext_sha256", dict), ("recipients", list))
    ):
        raise encryption.DecryptionError(
            f"{label}: manifest 'encryption' needs 'members' (object), 'plaintext_sha256' "
            "(object) and 'recipients' (list)"
        )
    wraps = [encryption.wrap_from_dict(item) for item in section["recipients"]]
    if trust.device_key is not None:
        content_key = encryption.unwrap_content_key(wraps, trust.device_key, manifest.name,
                                                    manifest.version)
    elif trust.passphrase is not None:
        content_key = encryption.unwrap_content_key_with_passphrase(
            wraps, trust.passphrase, manifest.name, manifest.version)
    else:
        raise encryption.DecryptionError(
            f"{label} is encrypted; pass this device's private key (or, for development, the "
            "package passphrase)"
        )
    committed = "key_commitment" in section
    if committed:
        encryption.check_key_commitment(content_key, manifest.name, manifest.version,
                                        section["key_commitment"])

    encrypted = section["members"]
    missing = sorted(name for name in encrypted if name not in members)
    if missing:
        raise encryption.DecryptionError(f"{label}: encrypted member {missing[0]!r} is missing")
    in_place = manifest.model_member if archive.owned and manifest.model_member in encrypted \
        else None
    decrypted: dict[str, bytes] = {}
    for name in sorted(encrypted, key=lambda item: (item == in_place, item)):
        sealed = encryption.EncryptedMember.from_dict(encrypted[name], members[name])
        digest = None if committed else hashlib.sha256()
        if name == in_place:
            # Copy out what is left before the archive's memory becomes the model.
            decrypted.update((other, bytes(blob)) for other, blob in members.items()
                             if other not in decrypted and other != name)
            members.clear()
            plaintext = _decrypt_in_place(archive, name, sealed, content_key, manifest, digest)
        else:
            plaintext = encryption.decrypt_member(sealed, content_key, manifest.name,
                                                  manifest.version, name, digest=digest)
        del sealed
        expected = section["plaintext_sha256"].get(name)
        if digest is not None and digest.hexdigest() != expected:
            raise PackageIntegrityError(
                f"{label}: decrypted {name!r} has sha256 {digest.hexdigest()}, the manifest "
                f"says {expected}"
            )
        decrypted[name] = plaintext
    for name, blob in members.items():
        decrypted.setdefault(name, blob)
    check = ("the content key matches the signed key commitment" if committed
             else "plaintext digests match the manifest")
    return decrypted, (f"decryption: {len(encrypted)} member(s) decrypted in memory; {check}")


def _decrypt_in_place(archive: Archive, name: str, sealed: encryption.EncryptedMember,
                      content_key: bytes, manifest: Manifest, digest: Any) -> bytes:
    """Decrypt member ``name`` over the start of the archive and return its plaintext.

    Every member view is released first: the archive cannot be used afterwards, so members
    still needed must have been copied out.
    """
    offset = archive.offsets[name]
    size = len(sealed.ciphertext)
    archive.release_views()
    ciphertext = archive.readonly[offset:offset + size]
    try:
        encryption.decrypt_member_in_place(
            encryption.EncryptedMember(sealed.nonce_prefix, sealed.segment_size,
                                       sealed.plaintext_size, ciphertext),
            content_key, manifest.name, manifest.version, name, archive.buffer, offset,
            digest=digest)
    finally:
        ciphertext.release()
        archive.release_buffers()
    return archive.take_prefix(sealed.plaintext_size)


def _require(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    if key not in raw:
        raise ManifestError(f"{source}: manifest is missing the key {key!r}")
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        if isinstance(kind, type):
            expected = kind.__name__
        else:
            expected = " or ".join(k.__name__ for k in kind)
        raise ManifestError(
            f"{source}: manifest key {key!r} is {type(value).__name__} {value!r:.60}; "
            f"expected {expected}"
        )
    return value


def _schema_version_for(manifest: dict[str, Any]) -> int:
    """Return the lowest schema version that expresses ``manifest``'s gate: 3 for a score
    other than the top-1 probability, else 2 (whose readers ignore the gate's 'score')."""
    gate = manifest.get("gate")
    score = gate.get("score") if isinstance(gate, dict) else None
    if score in SCORE_KINDS and score != MAX_PROBABILITY:
        return SCHEMA_VERSION
    return MAX_PROBABILITY_SCHEMA_VERSION


def _parse_manifest(raw: Any, source: str) -> Manifest:
    if not isinstance(raw, dict):
        raise ManifestError(f"{source}: manifest is {type(raw).__name__}; expected a JSON object")
    schema = _require(raw, "schema_version", int, source)
    if schema not in SUPPORTED_SCHEMA_VERSIONS:
        raise UnsupportedSchemaVersionError(
            f"{source}: schema_version {schema} is not supported by this reader "
            f"(supports {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); upgrade edge-runtime"
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
            raise ManifestError(
                f"{source}: manifest entry for member {name!r} needs 'sha256' (64 hex digits) "
                "and 'size' (integer bytes)"
            )

    labels = _require(raw, "labels", list, source)
    if not labels or not all(isinstance(label, str) and label for label in labels):
        raise ManifestError(f"{source}: manifest 'labels' must be a non-empty list of strings")
    if len(set(labels)) != len(labels):
        raise ManifestError(f"{source}: manifest 'labels' contains duplicates")

    model = _require(raw, "model", dict, source)
    tokenizer = _require(raw, "tokenizer", dict, source)
    model_member = _require(model, "member", str, source + " [model]")
    tokenizer_member = _require(tokenizer, "member", str, source + " [tokenizer]")
    for member in (model_member, tokenizer_member):
        if member not in members:
            raise ManifestError(
                f"{source}: manifest names member {member!r} but does not list it")

    gate = None
    if raw.get("gate") is not None:
        gate_raw = _require(raw, "gate", dict, source)
        temperature = _require(gate_raw, "temperature", (int, float), source + " [gate]")
        threshold = _require(gate_raw, "threshold", (int, float), source + " [gate]")
        try:
            finite = 0 < float(temperature) < float("inf")
        except OverflowError:
            finite = False
        if not finite:
            raise ManifestError(f"{source}: gate temperature {temperature!r:.40} must be "
                                "positive and finite")
        temperature = float(temperature)
        if not 0.0 <= threshold <= 1.0:
            raise ManifestError(f"{source}: gate threshold {threshold} must be within [0, 1]")
        fitted_on = gate_raw.get("fitted_on")
        if fitted_on is not None and not isinstance(fitted_on, dict):
            raise ManifestError(f"{source}: gate 'fitted_on' must be an object or null, got "
                                f"{type(fitted_on).__name__}")
        score = MAX_PROBABILITY
        if schema > MAX_PROBABILITY_SCHEMA_VERSION:
            # Version 2 stores a free description in 'score'; version 3 stores the score's name.
            score = _require(gate_raw, "score", str, source + " [gate]")
            if score not in SCORE_KINDS:
                raise ManifestError(
                    f"{source}: gate score {score!r:.40} is unknown; this reader computes "
                    f"{', '.join(SCORE_KINDS)} (upgrade edge-runtime for others)"
                )
        gate = GateSettings(
            temperature=temperature,
            threshold=float(threshold),
            fitted_on=dict(fitted_on or {}),
            score=score,
        )

    expires_at = raw.get("expires_at")
    if expires_at is not None:
        if not isinstance(expires_at, str):
            raise ManifestError(f"{source}: manifest 'expires_at' must be a string or null")
        _parse_time(expires_at, "expires_at", source)
    version = _require(raw, "version", int, source)
    if version < 0:
        raise ManifestError(f"{source}: manifest 'version' is {version}; expected 0 or more")

    max_length = _require(model, "max_length", int, source + " [model]")
    if max_length < 2:
        raise ManifestError(f"{source}: model max_length {max_length} must be at least 2")
    return Manifest(
        name=_require(raw, "name", str, source),
        version=version,
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
        expires_at=expires_at,
    )
