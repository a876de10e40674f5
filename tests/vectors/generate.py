"""Generate the package conformance vectors in ``tests/vectors/``.

Run from the repository root::

    python -m tests.vectors.generate                 # rewrite tests/vectors with the committed keys
    python -m tests.vectors.generate --out DIR       # write a copy elsewhere
    python -m tests.vectors.generate --new-keys      # replace the test keys as well

Every package contains the same tiny classifier: a word-level tokenizer and an ONNX model of one
embedding table (each keyword votes for its label) summed over the tokens. The plaintexts, the
manifests and ``vectors.json`` come out byte for byte the same on every run with the same keys.
The packages do not: the content key, the nonce prefixes, the HPKE ephemeral keys and the
ECDSA signatures are random, so a rerun writes new package files that verify the same way.

Each invalid vector starts from a valid package and changes one thing. Where the change would
otherwise be caught by an earlier check (every member is signed and listed with its digest),
the package is signed again over the changed members, as a dishonest or broken builder would.
The keys are test keys and are named ``test-only-*``: they are public and protect nothing.

Needs the ``onnx`` package (the ``export`` extra) to build the model; the runner
(``python -m edge_runtime.conformance``) needs only the base install.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import io
import json
import math
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime import conformance, encryption, signing
from edge_runtime.archive import MANIFEST_NAME, MAX_MEMBER_BYTES, MAX_MEMBERS, SIGNATURE_NAME
from edge_runtime.errors import (
    ExpiredPackageError,
    InvalidMemberNameError,
    ManifestError,
    OversizeMemberError,
    PackageError,
    PackageIntegrityError,
    RollbackError,
    TooManyMembersError,
)
from edge_runtime.package import read_archive, write_package

VECTORS_DIR = Path(__file__).resolve().parent
KEYS_FOLDER = "keys"

PACKAGE_NAME = "conformance-test"
VERSION = 3
# Small segments, so that the model (about 900 bytes) spans several of them and the segment
# vectors can drop and swap whole segments.
SEGMENT_SIZE = 256  # bytes
MAX_LENGTH = 16  # tokens

# The reader's clock for every vector, and the times written into the manifests.
NOW = "2026-06-01T00:00:00+00:00"
CREATED_AT = "2026-05-01T00:00:00+00:00"
EXPIRES_AT = "2027-06-01T00:00:00+00:00"
EXPIRED_AT = "2026-05-31T23:00:00+00:00"  # an hour before NOW, beyond the 300 s of skew
CLOCK_SKEW_SECONDS = 300
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest ZIP time, so that archives do not carry the date

# Key names as vectors.json lists them; the files are <name>.pub.pem and <name>.key.pem.
SIGNER = "test-only-signer"
UNKNOWN_SIGNER = "test-only-unknown-signer"
DEVICE_P256 = "test-only-device-p256"
DEVICE_X25519 = "test-only-device-x25519"
OTHER_DEVICE = "test-only-other-device"
KEY_NOTICE = (
    "test-only key, committed in public: never use it for real packages, "
    "because it protects nothing"
)

# The classifier: each keyword adds KEYWORD_WEIGHT to its label's logit, other tokens add 0.
LABELS = ("alarm", "balance", "weather")
KEYWORDS = {
    "alarm": ("alarm", "wake", "remind", "timer"),
    "balance": ("balance", "account", "money", "savings"),
    "weather": ("weather", "rain", "sunny", "forecast"),
}
OTHER_WORDS = (
    "set",
    "an",
    "for",
    "7",
    "am",
    "what",
    "is",
    "my",
    "will",
    "it",
    "tomorrow",
    "me",
    "up",
    "at",
    "the",
    "how",
    "much",
    "in",
)
SPECIAL_TOKENS = ("[PAD]", "[UNK]")
KEYWORD_WEIGHT = 2.0
BIAS = (0.25, 0.0, -0.25)
GOLDEN = (
    ("wake me up at 7", "alarm"),
    ("how much money is in my savings", "balance"),
    ("what is the forecast", "weather"),
)
# The whitespace pre-tokenizer of Hugging Face tokenizers splits text this way.
WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")

# The reader's checks in the order that docs/package-format.md numbers them.
CHECK_STEPS = {
    "archive": 1,
    "member-names": 2,
    "signature": 3,
    "manifest": 4,
    "digests": 5,
    "expiry": 6,
    "rollback": 7,
    "decryption": 8,
    "model": 9,
}


# ---------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------


def vocabulary() -> dict[str, int]:
    words = [*SPECIAL_TOKENS, *(word for label in LABELS for word in KEYWORDS[label]), *OTHER_WORDS]
    return {word: index for index, word in enumerate(words)}


def embedding_rows() -> list[list[float]]:
    """Return the embedding table: one row of label weights per vocabulary entry."""
    rows = []
    for word in vocabulary():
        row = [0.0] * len(LABELS)
        for column, label in enumerate(LABELS):
            if word in KEYWORDS[label]:
                row[column] = KEYWORD_WEIGHT
        rows.append(row)
    return rows


def tokenizer_json() -> bytes:
    """Return a Hugging Face tokenizers file: lowercase, split words, look them up."""
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocabulary(), "unk_token": "[UNK]"},
    }
    return json.dumps(tokenizer, indent=2).encode("utf-8")


@functools.cache
def onnx_model() -> bytes:
    """Return the classifier as ONNX: logits = sum over unmasked tokens of table[id] + bias."""
    import onnx
    from onnx import TensorProto, helper

    rows = embedding_rows()
    initializers = [
        helper.make_tensor(
            "table",
            TensorProto.FLOAT,
            [len(rows), len(LABELS)],
            [value for row in rows for value in row],
        ),
        helper.make_tensor("bias", TensorProto.FLOAT, [len(LABELS)], list(BIAS)),
        helper.make_tensor("last_axis", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("sequence_axis", TensorProto.INT64, [1], [1]),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),  # (batch, seq, labels)
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "last_axis"], ["token_mask"]),  # (batch, seq, 1)
        helper.make_node("Mul", ["embedded", "token_mask"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "sequence_axis"], ["summed"], keepdims=0),
        helper.make_node("Add", ["summed", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conformance-keyword-classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="edge-runtime conformance vectors",
    )
    model.ir_version = 8  # an IR version that every onnxruntime >= 1.20 reads
    onnx.checker.check_model(model)
    return model.SerializeToString()


def expected_logits(text: str) -> list[float]:
    """Return the classifier's logits for ``text``, computed without ONNX Runtime or
    tokenizers, so that the expectation does not come from the code under test."""
    ids = vocabulary()
    rows = embedding_rows()
    logits = list(BIAS)
    for word in WORD_PATTERN.findall(text.lower())[:MAX_LENGTH]:
        row = rows[ids.get(word, ids["[UNK]"])]
        logits = [total + weight for total, weight in zip(logits, row, strict=True)]
    return logits


def expected_label(text: str) -> str:
    logits = expected_logits(text)
    return LABELS[logits.index(max(logits))]


def top_probability(logits: list[float]) -> float:
    exponentials = [math.exp(value - max(logits)) for value in logits]
    return max(exponentials) / sum(exponentials)


def logit_margin(logits: list[float]) -> float:
    """Return sigmoid(z1 - z2) of the two largest logits at temperature 1."""
    second, first = sorted(logits)[-2:]
    return 1.0 / (1.0 + math.exp(second - first))


def base_manifest() -> dict[str, Any]:
    return {
        "name": PACKAGE_NAME,
        "version": VERSION,
        "created_at": CREATED_AT,
        "expires_at": EXPIRES_AT,
        "task": "text-classification",
        "labels": list(LABELS),
        "model": {
            "member": "model.onnx",
            "inputs": ["input_ids", "attention_mask"],
            "outputs": ["logits"],
            "max_length": MAX_LENGTH,
            "precision": "fp32",
            "quantization": None,
            "role": "student",
        },
        "tokenizer": {
            "member": "tokenizer.json",
            "padding": "none for single queries",
            "truncation": MAX_LENGTH,
        },
        "gate": {
            "temperature": 1.0,
            "threshold": 0.5,
            "score": "max softmax(logits / temperature); local when score >= threshold",
            "fitted_on": {"note": "fixed values for conformance vectors, not fitted on data"},
        },
        "golden": [{"text": text, "label": label} for text, label in GOLDEN],
        "provenance": {"builder": "tests/vectors/generate.py", "test_only": True},
    }


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorKeys:
    signer: Any
    unknown_signer: Any
    device_p256: Any
    device_x25519: Any
    other_device_public: Any


def write_new_keys(folder: Path) -> None:
    """Write a new set of test keys into ``folder``, replacing any there."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (SIGNER, UNKNOWN_SIGNER):
        key = signing.generate_private_key()
        (folder / f"{name}.key.pem").write_bytes(signing.private_key_to_pem(key))
        (folder / f"{name}.pub.pem").write_bytes(signing.public_key_to_pem(key.public_key()))
    for name, key_type in (
        (DEVICE_P256, encryption.KEY_TYPE_P256),
        (DEVICE_X25519, encryption.KEY_TYPE_X25519),
    ):
        key = encryption.generate_device_key(key_type)
        encryption.save_private_key(key, folder / f"{name}.key.pem")
        encryption.save_public_key(key.public_key(), folder / f"{name}.pub.pem")
    # Only the public half of the other device is kept: no vector needs to decrypt with it.
    other = encryption.generate_device_key()
    encryption.save_public_key(other.public_key(), folder / f"{OTHER_DEVICE}.pub.pem")


def load_keys(folder: Path) -> VectorKeys:
    def read(name: str) -> bytes:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"test key {path} not found; run with --new-keys to create a new set of test keys"
            )
        return path.read_bytes()

    return VectorKeys(
        signer=signing.load_private_key_pem(read(f"{SIGNER}.key.pem")),
        unknown_signer=signing.load_private_key_pem(read(f"{UNKNOWN_SIGNER}.key.pem")),
        device_p256=encryption.load_private_key_pem(read(f"{DEVICE_P256}.key.pem")),
        device_x25519=encryption.load_private_key_pem(read(f"{DEVICE_X25519}.key.pem")),
        other_device_public=encryption.load_public_key(folder / f"{OTHER_DEVICE}.pub.pem"),
    )


def key_table(keys: VectorKeys) -> dict[str, dict[str, Any]]:
    """Return the keys a reader needs, as vectors.json lists them."""
    signer_public = keys.signer.public_key()
    return {
        SIGNER: {
            "file": f"{KEYS_FOLDER}/{SIGNER}.pub.pem",
            "kind": "signer-public-key",
            "algorithm": "ecdsa-p256-sha256",
            "key_id": signing.key_id(signer_public),
            "test_only": True,
            "notice": KEY_NOTICE,
        },
        DEVICE_P256: {
            "file": f"{KEYS_FOLDER}/{DEVICE_P256}.key.pem",
            "kind": "device-private-key",
            "algorithm": "p256",
            "key_id": encryption.device_key_id(keys.device_p256),
            "test_only": True,
            "notice": KEY_NOTICE,
        },
        DEVICE_X25519: {
            "file": f"{KEYS_FOLDER}/{DEVICE_X25519}.key.pem",
            "kind": "device-private-key",
            "algorithm": "x25519",
            "key_id": encryption.device_key_id(keys.device_x25519),
            "test_only": True,
            "notice": KEY_NOTICE,
        },
    }


# ---------------------------------------------------------------------------------------------
# Package surgery
# ---------------------------------------------------------------------------------------------


@dataclass
class Unpacked:
    """A package taken apart: its manifest as a dict and its stored member bytes."""

    manifest: dict[str, Any]
    members: dict[str, bytes]


def sealed(
    keys: VectorKeys,
    recipients: list[Any],
    encrypt: tuple[str, ...] = ("model.onnx",),
    **manifest_changes: Any,
) -> Unpacked:
    """Write an encrypted, unsigned package with write_package and take it apart."""
    manifest = {**base_manifest(), **manifest_changes}
    plaintexts = {"model.onnx": onnx_model(), "tokenizer.json": tokenizer_json()}
    with tempfile.TemporaryDirectory(prefix="conformance-") as folder:
        path = write_package(
            Path(folder) / "p.edgepkg",
            manifest,
            plaintexts,
            recipients=recipients,
            encrypt_members=encrypt,
            segment_size=SEGMENT_SIZE,
        )
        _, members = read_archive(path)
    stored = {name: data for name, data in members.items() if name != MANIFEST_NAME}
    return Unpacked(json.loads(members[MANIFEST_NAME]), stored)


def list_digests(unpacked: Unpacked) -> None:
    """Set the manifest's member list to the sizes and digests of the stored members."""
    unpacked.manifest["members"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in sorted(unpacked.members.items())
    }


def sign_any_names(members: dict[str, bytes], signer: Any) -> bytes:
    """Sign members as sign_members does, but without its member-name check, so that a
    package with an unsafe name can carry a valid signature."""
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}
    statement = signing.build_statement(digests, f"{PACKAGE_NAME}@{VERSION}")
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return signing._sign_payload(payload, signer)


def pack(unpacked: Unpacked, signer: Any = None, *, refresh_digests: bool = True) -> bytes:
    """Return the package archive: the manifest as write_package formats it, the members and,
    with ``signer``, a signature over all of them."""
    if refresh_digests:
        list_digests(unpacked)
    manifest_bytes = json.dumps(unpacked.manifest, indent=2, sort_keys=True).encode("utf-8")
    archive = {MANIFEST_NAME: manifest_bytes, **unpacked.members}
    if signer is not None:
        archive[SIGNATURE_NAME] = sign_any_names(archive, signer)
    return zip_archive(archive)


def zip_archive(members: dict[str, bytes]) -> bytes:
    """Write stored ZIP members, the manifest first, as the package writer orders them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(members, key=lambda item: (item != MANIFEST_NAME, item)):
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_STORED
            archive.writestr(info, members[name])
    return buffer.getvalue()


def unzip_archive(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def segments(ciphertext: bytes) -> list[bytes]:
    """Split a member's ciphertext into its sealed segments (ciphertext and tag)."""
    step = SEGMENT_SIZE + encryption.GCM_TAG_BYTES
    return [ciphertext[start : start + step] for start in range(0, len(ciphertext), step)]


def flip_signature_bit(data: bytes) -> bytes:
    """Flip the lowest bit of the ECDSA signature's last byte (part of the integer s), which
    keeps the DER encoding valid, and return the archive with that signature."""
    members = unzip_archive(data)
    bundle = json.loads(members[SIGNATURE_NAME])
    entry = bundle["dsseEnvelope"]["signatures"][0]
    signature = bytearray(base64.b64decode(entry["sig"]))
    signature[-1] ^= 0x01
    entry["sig"] = base64.b64encode(bytes(signature)).decode("ascii")
    members[SIGNATURE_NAME] = json.dumps(bundle, separators=(",", ":")).encode("utf-8")
    return zip_archive(members)


# Offsets inside ZIP records (APPNOTE.TXT 4.3.7, 4.3.12, 4.3.16).
_END_RECORD_BYTES = 22
_CENTRAL_HEADER_BYTES = 46


def declare_member_size(data: bytes, member: str, size: int) -> bytes:
    """Return the archive with ``member``'s compressed and uncompressed sizes set to ``size``
    in its central directory entry and its local header. The member's bytes stay the same."""
    patched = bytearray(data)
    end = len(data) - _END_RECORD_BYTES
    count = int.from_bytes(data[end + 10 : end + 12], "little")
    position = int.from_bytes(data[end + 16 : end + 20], "little")
    for _ in range(count):
        name_length = int.from_bytes(data[position + 28 : position + 30], "little")
        other_lengths = int.from_bytes(
            data[position + 30 : position + 32], "little"
        ) + int.from_bytes(data[position + 32 : position + 34], "little")
        name = data[
            position + _CENTRAL_HEADER_BYTES : position + _CENTRAL_HEADER_BYTES + name_length
        ].decode("utf-8")
        if name == member:
            local = int.from_bytes(data[position + 42 : position + 46], "little")
            for offset in (position + 20, position + 24, local + 18, local + 22):
                patched[offset : offset + 4] = size.to_bytes(4, "little")
            return bytes(patched)
        position += _CENTRAL_HEADER_BYTES + name_length + other_lengths
    raise KeyError(f"member {member!r} is not in the archive")


# ---------------------------------------------------------------------------------------------
# Vectors
# ---------------------------------------------------------------------------------------------


@dataclass
class Vector:
    name: str
    description: str
    data: bytes
    verdict: str  # "accept" or "reject"
    error: str | None = None  # exception class name, for a rejected vector
    check: str | None = None  # the reader check that rejects it, a key of CHECK_STEPS
    trusted_keys: tuple[str, ...] = (SIGNER,)
    device_key: str = DEVICE_P256
    rollback_state: dict[str, int] = field(default_factory=dict)
    expected: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "file": f"{self.name}.edgepkg",
            "description": self.description,
            "trusted_keys": list(self.trusted_keys),
            "device_key": self.device_key,
            "now": NOW,
            "rollback_state": dict(self.rollback_state),
            "verdict": self.verdict,
        }
        if self.verdict == "reject":
            entry["error"] = self.error
            entry["check"] = self.check
            entry["step"] = CHECK_STEPS[self.check]
        else:
            entry["expected"] = self.expected
        return entry


def rollback_key(keys: VectorKeys) -> str:
    return f"{signing.key_id(keys.signer.public_key())}/{PACKAGE_NAME}"


def accepted(
    name: str,
    description: str,
    data: bytes,
    keys: VectorKeys,
    text: str,
    rollback_state: dict[str, int],
    device_key: str = DEVICE_P256,
    gate: dict[str, Any] | None = None,
) -> Vector:
    """Return a valid vector; the expectations come from the generator's own plaintexts.
    ``gate`` is the expected gate score and decision for ``text``, when the vector tests it."""
    after = dict(rollback_state)
    key = rollback_key(keys)
    after[key] = max(after.get(key, VERSION), VERSION)
    return Vector(
        name=name,
        description=description,
        data=data,
        verdict="accept",
        device_key=device_key,
        rollback_state=rollback_state,
        expected={
            "name": PACKAGE_NAME,
            "version": VERSION,
            "signer_key_id": signing.key_id(keys.signer.public_key()),
            "plaintext_sha256": {
                "model.onnx": hashlib.sha256(onnx_model()).hexdigest(),
                "tokenizer.json": hashlib.sha256(tokenizer_json()).hexdigest(),
            },
            "input": text,
            "label": expected_label(text),
            "rollback_state": after,
            **({"gate": gate} if gate is not None else {}),
        },
    )


def rejected(
    name: str, description: str, data: bytes, error: type[Exception], check: str, **options: Any
) -> Vector:
    return Vector(
        name=name,
        description=description,
        data=data,
        verdict="reject",
        error=error.__name__,
        check=check,
        **options,
    )


def build_vectors(keys: VectorKeys) -> list[Vector]:
    device_public = keys.device_p256.public_key()
    vectors = [
        accepted(
            "valid",
            "signed; model.onnx encrypted to the P-256 device key, with a key commitment; "
            "the rollback state already holds this version, which is accepted again",
            pack(sealed(keys, [device_public]), keys.signer),
            keys,
            "Set an alarm for 7 am",
            {rollback_key(keys): VERSION},
        ),
        accepted(
            "valid-x25519",
            "signed; model.onnx and tokenizer.json encrypted, wrapped for another device and "
            "for the X25519 device key; the reader must pick its own wrap",
            pack(
                sealed(
                    keys,
                    [keys.other_device_public, keys.device_x25519.public_key()],
                    encrypt=("model.onnx", "tokenizer.json"),
                ),
                keys.signer,
            ),
            keys,
            "What is my account balance?",
            {},
            device_key=DEVICE_X25519,
        ),
    ]

    legacy = sealed(keys, [device_public])
    del legacy.manifest["encryption"]["key_commitment"]
    vectors.append(
        accepted(
            "valid-without-key-commitment",
            "signed and encrypted, written before key commitments existed, so the reader checks "
            "the plaintext digests; the rollback state holds an older version",
            pack(legacy, keys.signer),
            keys,
            "Will it rain tomorrow",
            {rollback_key(keys): 2},
        )
    )

    # The logit-margin score of this input is above the threshold and its top-1 probability
    # below, so a reader that computes the wrong score reaches the wrong decision.
    margin_text = "wake me up at 7"
    margin_logits = expected_logits(margin_text)
    margin_threshold = round(
        (logit_margin(margin_logits) + top_probability(margin_logits)) / 2.0, 4
    )
    margin_gate = {**base_manifest()["gate"], "threshold": margin_threshold,
                   "score": "logit_margin"}
    vectors.append(
        accepted(
            "valid-logit-margin",
            "package schema 3: the gate scores p1 / (p1 + p2) of the two most probable labels; "
            "the input's top-1 probability is below the threshold and this score above it",
            pack(sealed(keys, [device_public], gate=margin_gate), keys.signer),
            keys,
            margin_text,
            {},
            gate={
                "score": "logit_margin",
                "value": round(logit_margin(margin_logits), 6),
                "local": True,
            },
        )
    )
    unknown_score = sealed(keys, [device_public], gate={**margin_gate, "score": "entropy"})
    unknown_score.manifest["schema_version"] = 3
    vectors.append(
        rejected(
            "unknown-gate-score",
            "package schema 3 with a gate score that no reader computes ('entropy')",
            pack(unknown_score, keys.signer),
            ManifestError,
            "manifest",
        )
    )

    valid = pack(sealed(keys, [device_public]), keys.signer)
    vectors += [
        rejected(
            "bad-signature",
            "one bit of the ECDSA signature flipped; the envelope names the trusted key",
            flip_signature_bit(valid),
            signing.InvalidSignatureError,
            "signature",
        ),
        rejected(
            "unknown-signer",
            "signed correctly by a key that is not among the trusted keys",
            pack(sealed(keys, [device_public]), keys.unknown_signer),
            signing.UnknownSignerError,
            "signature",
        ),
        rejected(
            "unsigned",
            "no model.sig; unsigned packages are not allowed",
            pack(sealed(keys, [device_public])),
            signing.SignatureError,
            "signature",
        ),
    ]

    wrong_digest = sealed(keys, [device_public])
    list_digests(wrong_digest)
    other_digest = hashlib.sha256(b"not the tokenizer").hexdigest()
    wrong_digest.manifest["members"]["tokenizer.json"]["sha256"] = other_digest
    vectors.append(
        rejected(
            "digest-mismatch",
            "the manifest lists another SHA-256 for tokenizer.json (right size); the signature "
            "covers the members as they are, so only the manifest's digest check catches it",
            pack(wrong_digest, keys.signer, refresh_digests=False),
            PackageIntegrityError,
            "digests",
        )
    )

    wrong_plaintext = sealed(keys, [device_public])
    del wrong_plaintext.manifest["encryption"]["key_commitment"]
    wrong_plaintext.manifest["encryption"]["plaintext_sha256"]["model.onnx"] = other_digest
    vectors.append(
        rejected(
            "plaintext-digest-mismatch",
            "no key commitment, and the signed plaintext_sha256 of model.onnx does not match "
            "what the member decrypts to",
            pack(wrong_plaintext, keys.signer),
            PackageIntegrityError,
            "decryption",
        )
    )

    truncated = sealed(keys, [device_public])
    truncated.members["model.onnx"] = truncated.members["model.onnx"][:-8]
    vectors.append(
        rejected(
            "truncated-segment",
            "the last segment of model.onnx lost 8 bytes of its tag; the manifest digests and the "
            "signature are over the truncated member",
            pack(truncated, keys.signer),
            encryption.DecryptionError,
            "decryption",
        )
    )

    dropped = sealed(keys, [device_public])
    remaining = segments(dropped.members["model.onnx"])[:-1]
    dropped.members["model.onnx"] = b"".join(remaining)
    header = dropped.manifest["encryption"]["members"]["model.onnx"]
    header["plaintext_size"] = SEGMENT_SIZE * len(remaining)
    vectors.append(
        rejected(
            "truncated-at-segment-boundary",
            "the last segment of model.onnx dropped and plaintext_size shortened to match, so "
            "only authentication (last-segment flag, associated data) catches it; re-signed",
            pack(dropped, keys.signer),
            encryption.DecryptionError,
            "decryption",
        )
    )

    reordered = sealed(keys, [device_public])
    parts = segments(reordered.members["model.onnx"])
    reordered.members["model.onnx"] = b"".join([parts[1], parts[0], *parts[2:]])
    vectors.append(
        rejected(
            "reordered-segments",
            "segments 0 and 1 of model.onnx swapped (both full size); re-signed",
            pack(reordered, keys.signer),
            encryption.DecryptionError,
            "decryption",
        )
    )

    vectors.append(
        rejected(
            "wrong-recipient",
            "the content key is wrapped only for another device",
            pack(sealed(keys, [keys.other_device_public]), keys.signer),
            encryption.WrongRecipientError,
            "decryption",
        )
    )

    swapped_key = sealed(keys, [device_public])
    swapped_key.manifest["encryption"]["recipients"] = [
        encryption.wrap_content_key(
            encryption.generate_content_key(), device_public, PACKAGE_NAME, VERSION
        ).to_dict()
    ]
    vectors.append(
        rejected(
            "key-commitment-mismatch",
            "the device's wrap holds a different content key from the one the signed "
            "key_commitment names",
            pack(swapped_key, keys.signer),
            encryption.DecryptionError,
            "decryption",
        )
    )

    vectors.append(
        rejected(
            "rollback",
            f"version {VERSION}, while the rollback state holds version {VERSION + 2} from the "
            "same signer and package name",
            pack(sealed(keys, [device_public]), keys.signer),
            RollbackError,
            "rollback",
            rollback_state={rollback_key(keys): VERSION + 2},
        )
    )

    vectors.append(
        rejected(
            "expired",
            f"expires_at {EXPIRED_AT}, an hour before the reader's clock and beyond the "
            f"{CLOCK_SKEW_SECONDS} s of tolerated clock skew",
            pack(sealed(keys, [device_public], expires_at=EXPIRED_AT), keys.signer),
            ExpiredPackageError,
            "expiry",
        )
    )

    traversal = sealed(keys, [device_public])
    traversal.members["../tokenizer.json"] = traversal.members.pop("tokenizer.json")
    traversal.manifest["tokenizer"]["member"] = "../tokenizer.json"
    vectors.append(
        rejected(
            "path-traversal",
            "the tokenizer is stored as ../tokenizer.json, listed and signed under that name",
            pack(traversal, keys.signer),
            InvalidMemberNameError,
            "member-names",
        )
    )

    vectors.append(
        rejected(
            "oversize-member",
            f"the ZIP records declare tokenizer.json as {MAX_MEMBER_BYTES + 1} bytes, one over the "
            "512 MiB member limit, which the reader checks before it reads any member",
            declare_member_size(valid, "tokenizer.json", MAX_MEMBER_BYTES + 1),
            OversizeMemberError,
            "archive",
        )
    )

    crowded = sealed(keys, [device_public])
    extra = MAX_MEMBERS + 1 - (len(crowded.members) + 2)  # the manifest and model.sig count too
    for index in range(extra):
        crowded.members[f"extra/{index:02d}.txt"] = b"extra member %d\n" % index
    vectors.append(
        rejected(
            "too-many-members",
            f"{MAX_MEMBERS + 1} members, one over the limit of {MAX_MEMBERS}; all listed and "
            "signed",
            pack(crowded, keys.signer),
            TooManyMembersError,
            "archive",
        )
    )
    return vectors


def error_table(vectors: list[Vector]) -> dict[str, list[str]]:
    """Return each expected error class with its bases up to PackageError, most specific
    first, so that a reader with coarser error types can map them."""
    classes = {
        cls.__name__: cls
        for cls in (
            PackageError,
            PackageIntegrityError,
            RollbackError,
            ExpiredPackageError,
            InvalidMemberNameError,
            ManifestError,
            OversizeMemberError,
            TooManyMembersError,
            signing.SignatureError,
            signing.InvalidSignatureError,
            signing.UnknownSignerError,
            encryption.DecryptionError,
            encryption.WrongRecipientError,
        )
    }
    table = {}
    for name in sorted({vector.error for vector in vectors if vector.error}):
        bases = [
            base.__name__ for base in classes[name].__mro__[1:] if issubclass(base, PackageError)
        ]
        table[name] = bases
    return table


def vector_set(keys: VectorKeys, vectors: list[Vector]) -> dict[str, Any]:
    return {
        "format": conformance.FORMAT,
        "schema_version": conformance.SCHEMA_VERSION,
        "package_schema_version": 3,
        "test_only": True,
        "notice": "Every key listed here is a test-only key, committed in public: never use "
        "these keys for real packages.",
        "generator": "python -m tests.vectors.generate",
        "reader": {
            "clock_skew_seconds": CLOCK_SKEW_SECONDS,
            "allow_unsigned": False,
            "allow_downgrade": False,
        },
        "keys": key_table(keys),
        "errors": error_table(vectors),
        "vectors": [vector.to_json() for vector in vectors],
    }


def generate(out_dir: Path, keys_dir: Path | None = None, new_keys: bool = False) -> Path:
    """Write the vectors and vectors.json into ``out_dir`` and return the JSON's path.

    Keys come from ``keys_dir`` (default ``out_dir/keys``) and are copied into
    ``out_dir/keys`` when they live elsewhere; ``new_keys`` writes a new set first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    target_keys = out_dir / KEYS_FOLDER
    keys_dir = target_keys if keys_dir is None else keys_dir
    if new_keys:
        write_new_keys(keys_dir)
    if keys_dir.resolve() != target_keys.resolve():
        shutil.copytree(keys_dir, target_keys, dirs_exist_ok=True)
    keys = load_keys(target_keys)

    vectors = build_vectors(keys)
    for stale in out_dir.glob("*.edgepkg"):
        stale.unlink()
    for vector in vectors:
        (out_dir / f"{vector.name}.edgepkg").write_bytes(vector.data)
    path = out_dir / conformance.VECTORS_FILE
    text = json.dumps(vector_set(keys, vectors), indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.vectors.generate",
        description="Write the package conformance vectors.",
    )
    parser.add_argument(
        "--out", type=Path, default=VECTORS_DIR, help="folder to write into (default: %(default)s)"
    )
    parser.add_argument(
        "--keys",
        type=Path,
        default=None,
        help="folder of the test keys (default: the keys folder inside --out, "
        f"else {VECTORS_DIR / KEYS_FOLDER})",
    )
    parser.add_argument(
        "--new-keys", action="store_true", help="write a new set of test keys before the vectors"
    )
    args = parser.parse_args(argv)
    keys_dir = args.keys
    if keys_dir is None and not args.new_keys and not (args.out / KEYS_FOLDER).is_dir():
        keys_dir = VECTORS_DIR / KEYS_FOLDER
    path = generate(args.out, keys_dir, args.new_keys)
    print(f"wrote {path}")
    # The generated set must pass our own reader, or the expectations are wrong.
    return conformance.main([str(path)])


if __name__ == "__main__":
    sys.exit(main())
