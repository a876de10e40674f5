"""Interoperability of edge_runtime.signing with the reference tool, model_signing.

Runs only where model_signing is installed (tested with 1.1.1, which also needs pyopenssl):
signatures made here must pass ``model_signing verify key``, and signatures made by
``model_signing sign key`` must pass verify_members. Each test runs the command-line tool in a
subprocess, which takes about a second to start.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime import signing
from edge_runtime.signing import MemberMismatchError, UnknownSignerError, verify_members


def find_model_signing_command() -> list[str] | None:
    if importlib.util.find_spec("model_signing") is not None:
        return [sys.executable, "-m", "model_signing"]
    executable = shutil.which("model_signing")
    if executable:
        return [executable]
    return None


MODEL_SIGNING = find_model_signing_command()

pytestmark = pytest.mark.skipif(
    MODEL_SIGNING is None,
    reason="model_signing is neither importable nor on PATH; install model-signing==1.1.1 "
    "and pyopenssl in a separate environment and run these tests with its python",
)

# Names chosen so that component order ("a/b" first) and character order ("a.b" first)
# disagree, which changes the model digest if an implementation sorts the wrong way.
FILES = {
    "a/b": b"nested file",
    "a.b": b"dotted file",
    "config.json": b'{"labels": ["balance", "timer"]}',
    "weights/layer0.bin": bytes(range(256)) * 4,
    "weights/layer1.bin": b"\x00" * 100,
    "empty.txt": b"",
}


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_folder(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def run_model_signing(*arguments: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MODEL_SIGNING, *map(str, arguments)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def decode_statement(signature_file: bytes) -> dict:
    payload = json.loads(signature_file)["dsseEnvelope"]["payload"]
    return json.loads(base64.b64decode(payload))


class KeyPair:
    def __init__(self, directory: Path, name: str):
        self.private_key = signing.generate_private_key()
        self.public_key = self.private_key.public_key()
        self.private_path = signing.write_private_key(directory / f"{name}.pem", self.private_key)
        self.public_path = directory / f"{name}.pub.pem"
        self.public_path.write_bytes(signing.public_key_to_pem(self.public_key))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("signing-interop")


@pytest.fixture(scope="module")
def builder(workspace: Path) -> KeyPair:
    return KeyPair(workspace, "builder")


@pytest.fixture(scope="module")
def stranger(workspace: Path) -> KeyPair:
    return KeyPair(workspace, "stranger")


@pytest.fixture(scope="module")
def reference_signature(workspace: Path, builder: KeyPair) -> bytes:
    """A signature made by ``model_signing sign key`` over a folder of FILES."""
    model = write_folder(workspace / "reference-model", FILES)
    signature_path = workspace / "reference.sig"
    result = run_model_signing(
        "sign", "key", "--private_key", builder.private_path, "--signature", signature_path,
        model, cwd=workspace,
    )
    assert result.returncode == 0, result.stderr
    return signature_path.read_bytes()


# Our signatures, checked by model_signing verify key


def test_reference_accepts_our_signature(tmp_path: Path, builder: KeyPair):
    model = write_folder(tmp_path / "model", FILES)
    signature_path = tmp_path / "model.sig"
    signature_path.write_bytes(signing.sign_members(read_folder(model), builder.private_key))

    result = run_model_signing(
        "verify", "key", "--signature", signature_path, "--public_key", builder.public_path,
        model, cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert "Verification succeeded" in result.stdout


def test_reference_rejects_altered_file(tmp_path: Path, builder: KeyPair):
    model = write_folder(tmp_path / "model", FILES)
    signature_path = tmp_path / "model.sig"
    signature_path.write_bytes(signing.sign_members(read_folder(model), builder.private_key))
    (model / "weights" / "layer1.bin").write_bytes(b"\x00" * 99 + b"\x01")

    result = run_model_signing(
        "verify", "key", "--signature", signature_path, "--public_key", builder.public_path,
        model, cwd=tmp_path,
    )

    assert result.returncode != 0
    assert "Hash mismatch for 'weights/layer1.bin'" in result.stderr


def test_reference_rejects_other_public_key(tmp_path: Path, builder: KeyPair, stranger: KeyPair):
    model = write_folder(tmp_path / "model", FILES)
    signature_path = tmp_path / "model.sig"
    signature_path.write_bytes(signing.sign_members(read_folder(model), builder.private_key))

    result = run_model_signing(
        "verify", "key", "--signature", signature_path, "--public_key", stranger.public_path,
        model, cwd=tmp_path,
    )

    assert result.returncode != 0
    assert "Key mismatch" in result.stderr


# model_signing signatures, checked by verify_members


def test_reference_signature_accepted(reference_signature: bytes, builder: KeyPair):
    verified = verify_members(reference_signature, FILES, [builder.public_key])

    assert verified.signer_key_id == signing.key_id(builder.public_key)
    assert verified.model_name == "reference-model"
    assert set(verified.resources) == set(FILES)


def test_reference_signature_altered_file(reference_signature: bytes, builder: KeyPair):
    files = dict(FILES, **{"config.json": b'{"labels": ["balance", "timer", "oos"]}'})

    with pytest.raises(MemberMismatchError, match=r"config\.json: sha256"):
        verify_members(reference_signature, files, [builder.public_key])


def test_reference_signature_extra_file(reference_signature: bytes, builder: KeyPair):
    files = dict(FILES, **{"weights/layer2.bin": b"added"})

    with pytest.raises(MemberMismatchError, match=r"weights/layer2\.bin: not signed"):
        verify_members(reference_signature, files, [builder.public_key])


def test_reference_signature_untrusted_key(reference_signature: bytes, stranger: KeyPair):
    with pytest.raises(UnknownSignerError):
        verify_members(reference_signature, FILES, [stranger.public_key])


def test_statements_agree_with_reference(reference_signature: bytes, builder: KeyPair):
    ours = decode_statement(signing.sign_members(FILES, builder.private_key))
    reference = decode_statement(reference_signature)

    assert ours["_type"] == reference["_type"]
    assert ours["predicateType"] == reference["predicateType"]
    assert ours["subject"][0]["digest"] == reference["subject"][0]["digest"]
    assert ours["predicate"]["resources"] == reference["predicate"]["resources"]
    reference_serialization = dict(reference["predicate"]["serialization"])
    reference_serialization.pop("ignore_paths", None)
    assert ours["predicate"]["serialization"] == reference_serialization


def test_reference_ignored_file_is_extra_member(tmp_path: Path, builder: KeyPair):
    # model_signing leaves .gitignore out of the signature by default. verify_members checks
    # every member it is given, so a caller must not pass files that were not signed.
    model = write_folder(tmp_path / "model", dict(FILES, **{".gitignore": b"*.tmp\n"}))
    signature_path = tmp_path / "model.sig"
    result = run_model_signing(
        "sign", "key", "--private_key", builder.private_path, "--signature", signature_path,
        model, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    signature_file = signature_path.read_bytes()

    with pytest.raises(MemberMismatchError, match=r"\.gitignore: not signed"):
        verify_members(signature_file, read_folder(model), [builder.public_key])
    verified = verify_members(signature_file, FILES, [builder.public_key])
    assert ".git" in verified.serialization["ignore_paths"]


def test_reference_verifies_unpacked_package(tmp_path: Path):
    from edge_runtime import encryption
    from edge_runtime.package import SIGNATURE_NAME, write_package
    from tests.conftest import DEVICE_PUBLIC, SIGNER_PRIVATE, SIGNER_PUBLIC

    manifest = {
        "name": "interop", "version": 3, "task": "text-classification",
        "labels": ["alarm", "timer"],
        "model": {"member": "model.onnx", "inputs": ["input_ids", "attention_mask"],
                  "outputs": ["logits"], "max_length": 16, "precision": "int8"},
        "tokenizer": {"member": "tokenizer.json"},
    }
    package_path = write_package(
        tmp_path / "interop.edgepkg", manifest,
        {"model.onnx": bytes(range(256)) * 8, "tokenizer.json": b'{"model": {}}'},
        signer_key=signing.load_private_key_pem(SIGNER_PRIVATE.read_bytes()),
        recipients=[encryption.load_public_key(DEVICE_PUBLIC)],
    )
    unpacked = tmp_path / "unpacked"
    import zipfile

    with zipfile.ZipFile(package_path) as archive:
        archive.extractall(unpacked)
    signature = tmp_path / "package.sig"
    (unpacked / SIGNATURE_NAME).rename(signature)

    accepted = run_model_signing("verify", "key", "--signature", signature,
                                 "--public_key", SIGNER_PUBLIC, unpacked, cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr

    manifest_file = unpacked / "manifest.json"
    manifest_file.write_bytes(manifest_file.read_bytes().replace(b'"version": 3', b'"version": 9'))
    rejected = run_model_signing("verify", "key", "--signature", signature,
                                 "--public_key", SIGNER_PUBLIC, unpacked, cwd=tmp_path)
    assert rejected.returncode != 0
