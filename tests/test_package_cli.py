"""The `edge-runtime keys` and `edge-runtime package` commands, run in a child process.

Packages are written here with write_package around placeholder model bytes, because inspect,
verify, sign and encrypt never load the model. Keys come from `keys generate`. Every command
that takes trust options gets --state-file, so no test touches the user's rollback state, and
every command's output is checked for the body of each private key the test can see.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_runtime import encryption, signing
from edge_runtime.package import write_package
from tests.conftest import DEVICE_PRIVATE, ROOT, SIGNER_PRIVATE

MODEL_BYTES = b"placeholder ONNX bytes, never loaded by these commands " * 16
TOKENIZER_BYTES = b'{"version": "1.0", "model": {"type": "WordPiece"}}'

# 37 child processes of about 0.5 s each, most of it spent importing edge_runtime.
pytestmark = pytest.mark.slow

KEY_ENV_VARS = ("EDGE_RUNTIME_SIGNER_KEY", "EDGE_RUNTIME_DEVICE_KEY",
                "EDGE_RUNTIME_DEVICE_KEY_PASSWORD")


@dataclass(frozen=True)
class KeySet:
    """Key pairs written by `keys generate`: two signers and three device keys."""

    dir: Path

    def private(self, name: str) -> Path:
        return self.dir / f"{name}.key.pem"

    def public(self, name: str) -> Path:
        return self.dir / f"{name}.pub.pem"


def pem_body(path: Path) -> str:
    """Return the base64 body of a PEM file as one string, without the BEGIN and END lines."""
    lines = path.read_text().strip().splitlines()
    return "".join(line for line in lines if not line.startswith("-----"))


def pem_body_lines(path: Path) -> list[str]:
    lines = path.read_text().strip().splitlines()
    return [line for line in lines if not line.startswith("-----")]


def run_cli_process(args: list[str], state_home: Path) -> subprocess.CompletedProcess:
    """Run `python -m edge_runtime ARGS` from the repository root, without key variables from
    the caller's environment and with XDG_STATE_HOME in a temporary folder."""
    env = {name: value for name, value in os.environ.items() if name not in KEY_ENV_VARS}
    env["XDG_STATE_HOME"] = str(state_home)
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )


def assert_no_private_key(result: subprocess.CompletedProcess, key_files: list[Path]) -> None:
    output = result.stdout + result.stderr
    assert "PRIVATE KEY-----" not in output, result.args
    for path in key_files:
        assert pem_body(path) not in output, (path, result.args)
        for line in pem_body_lines(path):
            assert line not in output, (path, result.args)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    folder = tmp_path_factory.mktemp("keys")
    state_home = tmp_path_factory.mktemp("xdg-state")
    for kind, name in [("signer", "signer-a"), ("signer", "signer-b"), ("device", "device-1"),
                       ("device-x25519", "device-2"), ("device", "device-3")]:
        result = run_cli_process(["keys", "generate", "--kind", kind, "--name", name,
                                  "--out", str(folder)], state_home)
        assert result.returncode == 0, result.stderr
    return KeySet(folder)


@pytest.fixture
def cli(keys: KeySet, tmp_path: Path):
    """Return a function that runs the CLI and checks that no private key reached its output:
    neither the generated keys, nor the demo keys, nor any key file the test wrote."""
    state_home = tmp_path / "xdg-state"

    def run(*args: str) -> subprocess.CompletedProcess:
        result = run_cli_process(list(args), state_home)
        key_files = [*keys.dir.glob("*.key.pem"), *tmp_path.rglob("*.key.pem")]
        key_files += [path for path in (SIGNER_PRIVATE, DEVICE_PRIVATE) if path.is_file()]
        assert_no_private_key(result, key_files)
        return result

    yield run
    # Every command got --state-file (or none of the trust options), so the default state
    # folder stays untouched.
    assert not state_home.exists()


def manifest(version: int = 3) -> dict:
    return {
        "name": "intent-cli-test",
        "version": version,
        "task": "intent-classification",
        "labels": ["balance", "oos", "timer"],
        "model": {
            "member": "model.onnx",
            "inputs": ["input_ids", "attention_mask"],
            "outputs": ["logits"],
            "precision": "int8",
            "max_length": 64,
        },
        "tokenizer": {"member": "tokenizer.json"},
        "gate": {"temperature": 1.5, "threshold": 0.8},
    }


def make_package(path: Path, *, version: int = 3, signer: Path | None = None,
                 recipients: tuple[Path, ...] = ()) -> Path:
    """Write a package with placeholder members. ``signer`` is a signer private key file and
    ``recipients`` are device public key files."""
    signer_key = signing.load_private_key_pem(signer.read_bytes()) if signer else None
    recipient_keys = [encryption.load_public_key(key) for key in recipients]
    return write_package(path, manifest(version),
                         {"model.onnx": MODEL_BYTES, "tokenizer.json": TOKENIZER_BYTES},
                         signer_key=signer_key, recipients=recipient_keys)


def signer_key_id(public_pem: Path) -> str:
    return signing.key_id(signing.load_public_key_pem(public_pem.read_bytes()))


def device_key_id(private_pem: Path) -> str:
    return encryption.device_key_id(encryption.load_private_key(private_pem))


def ok_checks(stdout: str) -> list[str]:
    """Return the check names of the `ok  <check>: ...` lines, in order."""
    lines = stdout.strip().splitlines()
    for line in lines:
        assert line.startswith("ok  "), line
    return [line[4:].split(":", 1)[0] for line in lines[:-1]]


def verify_args(package: Path, keys: KeySet, *, signer: str = "signer-a",
                device: str = "device-1", state_file: str = "") -> list[str]:
    return ["package", "verify", str(package), "--signer-key", str(keys.public(signer)),
            "--device-key", str(keys.private(device)), "--state-file", state_file]


# keys generate


@pytest.mark.parametrize("kind", ["signer", "device", "device-x25519"])
def test_keys_generate_writes_pem_pair(cli, tmp_path, kind):
    out = tmp_path / "new-keys"
    result = cli("keys", "generate", "--kind", kind, "--name", "unit", "--out", str(out))
    assert result.returncode == 0, result.stderr

    private_path, public_path = out / "unit.key.pem", out / "unit.pub.pem"
    assert private_path.is_file()
    assert public_path.is_file()
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public_path.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert str(private_path) in result.stdout
    assert str(public_path) in result.stdout


def test_keys_generate_rejects_overwrite(cli, tmp_path):
    args = ("keys", "generate", "--kind", "signer", "--name", "unit", "--out", str(tmp_path))
    assert cli(*args).returncode == 0
    private_path, public_path = tmp_path / "unit.key.pem", tmp_path / "unit.pub.pem"
    private_before, public_before = private_path.read_bytes(), public_path.read_bytes()

    result = cli(*args)
    assert result.returncode == 2
    assert str(private_path) in result.stderr
    assert "already exists" in result.stderr
    assert "Traceback" not in result.stderr
    assert private_path.read_bytes() == private_before
    assert public_path.read_bytes() == public_before


def test_keys_generate_rejects_existing_public(cli, tmp_path):
    public_path = tmp_path / "unit.pub.pem"
    public_path.write_text("an older public key\n")

    result = cli("keys", "generate", "--kind", "device", "--name", "unit", "--out", str(tmp_path))
    assert result.returncode == 2
    assert str(public_path) in result.stderr
    assert public_path.read_text() == "an older public key\n"
    assert not (tmp_path / "unit.key.pem").exists()


# package inspect


def test_inspect_unsigned_summary(cli, tmp_path):
    package = make_package(tmp_path / "plain.edgepkg")
    result = cli("package", "inspect", str(package))
    assert result.returncode == 0, result.stderr

    body = json.loads(result.stdout)
    summary = body["summary"]
    assert summary["name"] == "intent-cli-test"
    assert summary["version"] == 3
    assert summary["signed"] is False
    assert summary["encrypted_members"] == []
    assert summary["recipients"] == 0
    assert summary["archive_members"] == ["manifest.json", "model.onnx", "tokenizer.json"]
    assert body["manifest"]["labels"] == ["balance", "oos", "timer"]


def test_inspect_encrypted_without_keys(cli, keys, tmp_path):
    package = make_package(tmp_path / "sealed.edgepkg", signer=keys.private("signer-a"),
                           recipients=(keys.public("device-1"), keys.public("device-2")))
    # inspect takes no key options at all, because it reads the manifest as it is.
    result = cli("package", "inspect", str(package))
    assert result.returncode == 0, result.stderr

    summary = json.loads(result.stdout)["summary"]
    assert summary["signed"] is True
    assert summary["encrypted_members"] == ["model.onnx"]
    assert summary["recipients"] == 2
    assert "model.sig" in summary["archive_members"]
    assert "does not verify" in summary["note"]


def test_inspect_missing_file_exit_2(cli, tmp_path):
    missing = tmp_path / "absent.edgepkg"
    result = cli("package", "inspect", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


# package verify


def test_verify_signed_encrypted_ok(cli, keys, tmp_path):
    package = make_package(tmp_path / "sealed.edgepkg", signer=keys.private("signer-a"),
                           recipients=(keys.public("device-1"),))
    state_file = tmp_path / "state.json"
    result = cli(*verify_args(package, keys, state_file=str(state_file)))
    assert result.returncode == 0, result.stderr

    checks = ok_checks(result.stdout)
    assert checks == ["signature", "digests", "expiry", "rollback", "decryption"]
    assert f"signer key {signer_key_id(keys.public('signer-a'))}" in result.stdout
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line == "ok  intent-cli-test version 3 is trusted"
    assert state_file.is_file()


def test_verify_without_state_skips_rollback(cli, keys, tmp_path):
    package = make_package(tmp_path / "signed.edgepkg", signer=keys.private("signer-a"))
    result = cli(*verify_args(package, keys, state_file=""))
    assert result.returncode == 0, result.stderr
    assert ok_checks(result.stdout) == ["signature", "digests", "expiry"]


def test_verify_wrong_signer_exit_2(cli, keys, tmp_path):
    package = make_package(tmp_path / "signed.edgepkg", signer=keys.private("signer-a"))
    result = cli(*verify_args(package, keys, signer="signer-b"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("edge-runtime package: error: ")
    assert "match none of the 1 trusted keys" in result.stderr
    assert signer_key_id(keys.public("signer-b")) in result.stderr
    assert "Traceback" not in result.stderr


def test_verify_unsigned_exit_2(cli, keys, tmp_path):
    package = make_package(tmp_path / "plain.edgepkg")
    result = cli(*verify_args(package, keys))
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"{package} is not signed" in result.stderr
    assert "Traceback" not in result.stderr


def test_verify_unsigned_allowed(cli, keys, tmp_path):
    package = make_package(tmp_path / "plain.edgepkg")
    result = cli(*verify_args(package, keys), "--allow-unsigned")
    assert result.returncode == 0, result.stderr
    assert ok_checks(result.stdout) == ["signature", "digests", "expiry"]
    assert "ok  signature: absent" in result.stdout


def test_verify_rollback_and_downgrade(cli, keys, tmp_path):
    newer = make_package(tmp_path / "v2.edgepkg", version=2, signer=keys.private("signer-a"))
    older = make_package(tmp_path / "v1.edgepkg", version=1, signer=keys.private("signer-a"))
    state_file = str(tmp_path / "state.json")

    result = cli(*verify_args(newer, keys, state_file=state_file))
    assert result.returncode == 0, result.stderr
    assert "ok  rollback: version 2" in result.stdout

    result = cli(*verify_args(older, keys, state_file=state_file))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "version 1 is older than version 2" in result.stderr
    assert "Traceback" not in result.stderr

    result = cli(*verify_args(older, keys, state_file=state_file), "--allow-downgrade")
    assert result.returncode == 0, result.stderr
    assert "ok  intent-cli-test version 1 is trusted" in result.stdout

    # The downgrade is accepted once but not recorded, so version 2 stays the newest.
    accepted = json.loads(Path(state_file).read_text())["accepted"]
    assert list(accepted.values()) == [2]


# package sign


def test_sign_then_verify(cli, keys, tmp_path):
    unsigned = make_package(tmp_path / "plain.edgepkg")
    signed = tmp_path / "signed.edgepkg"
    result = cli("package", "sign", str(unsigned), "--out", str(signed),
                 "--signer-private-key", str(keys.private("signer-b")))
    assert result.returncode == 0, result.stderr
    assert f"with key {signer_key_id(keys.public('signer-b'))}" in result.stdout

    result = cli(*verify_args(signed, keys, signer="signer-b"))
    assert result.returncode == 0, result.stderr
    assert ok_checks(result.stdout)[0] == "signature"
    assert "ok  signature: valid" in result.stdout

    # The source is left unsigned.
    result = cli("package", "inspect", str(unsigned))
    assert json.loads(result.stdout)["summary"]["signed"] is False


def test_sign_with_device_x25519_key_exit_2(cli, keys, tmp_path):
    unsigned = make_package(tmp_path / "plain.edgepkg")
    signed = tmp_path / "signed.edgepkg"
    result = cli("package", "sign", str(unsigned), "--out", str(signed),
                 "--signer-private-key", str(keys.private("device-2")))
    assert result.returncode == 2
    assert "P-256" in result.stderr
    assert "Traceback" not in result.stderr
    assert not signed.exists()


def test_private_key_as_signer_key_exit_2(cli, keys, tmp_path):
    package = make_package(tmp_path / "signed.edgepkg", signer=keys.private("signer-a"))
    result = cli("package", "verify", str(package), "--signer-key",
                 str(keys.private("signer-a")), "--state-file", "")
    assert result.returncode == 2
    assert "public key" in result.stderr
    assert "Traceback" not in result.stderr


# package encrypt


def test_encrypt_two_devices_then_verify(cli, keys, tmp_path):
    source = make_package(tmp_path / "signed.edgepkg", signer=keys.private("signer-a"))
    sealed = tmp_path / "sealed.edgepkg"
    result = cli("package", "encrypt", str(source), "--out", str(sealed),
                 "--recipient", str(keys.public("device-1")),
                 "--recipient", str(keys.public("device-2")),
                 "--signer-private-key", str(keys.private("signer-a")),
                 "--signer-key", str(keys.public("signer-a")), "--state-file", "")
    assert result.returncode == 0, result.stderr
    assert "for 2 device(s) (signed)" in result.stdout

    summary = json.loads(cli("package", "inspect", str(sealed)).stdout)["summary"]
    assert summary["signed"] is True
    assert summary["encrypted_members"] == ["model.onnx"]
    assert summary["recipients"] == 2

    for device in ("device-1", "device-2"):
        result = cli(*verify_args(sealed, keys, device=device))
        assert result.returncode == 0, (device, result.stderr)
        assert ok_checks(result.stdout)[-1] == "decryption", device

    result = cli(*verify_args(sealed, keys, device="device-3"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"no wrap for device key {device_key_id(keys.private('device-3'))}" in result.stderr
    for device in ("device-1", "device-2"):
        assert device_key_id(keys.private(device))[:16] in result.stderr, device
    assert "Traceback" not in result.stderr


def test_encrypt_tokenizer_unsigned_result(cli, keys, tmp_path):
    source = make_package(tmp_path / "signed.edgepkg", signer=keys.private("signer-a"))
    sealed = tmp_path / "sealed.edgepkg"
    result = cli("package", "encrypt", str(source), "--out", str(sealed),
                 "--recipient", str(keys.public("device-1")), "--encrypt-tokenizer",
                 "--signer-key", str(keys.public("signer-a")), "--state-file", "")
    assert result.returncode == 0, result.stderr
    assert "unsigned" in result.stdout

    summary = json.loads(cli("package", "inspect", str(sealed)).stdout)["summary"]
    assert summary["signed"] is False
    assert summary["encrypted_members"] == ["model.onnx", "tokenizer.json"]

    result = cli(*verify_args(sealed, keys), "--allow-unsigned")
    assert result.returncode == 0, result.stderr
    assert "ok  decryption: 2 member(s) decrypted in memory" in result.stdout


def test_encrypt_without_recipient_exit_2(cli, keys, tmp_path):
    source = make_package(tmp_path / "signed.edgepkg", signer=keys.private("signer-a"))
    sealed = tmp_path / "sealed.edgepkg"
    result = cli("package", "encrypt", str(source), "--out", str(sealed),
                 "--signer-key", str(keys.public("signer-a")), "--state-file", "")
    assert result.returncode == 2
    assert "--recipient" in result.stderr
    assert not sealed.exists()


def test_encrypt_rejects_untrusted_source(cli, keys, tmp_path):
    source = make_package(tmp_path / "signed.edgepkg", signer=keys.private("signer-a"))
    sealed = tmp_path / "sealed.edgepkg"
    result = cli("package", "encrypt", str(source), "--out", str(sealed),
                 "--recipient", str(keys.public("device-1")),
                 "--signer-key", str(keys.public("signer-b")), "--state-file", "")
    assert result.returncode == 2
    assert signer_key_id(keys.public("signer-b")) in result.stderr
    assert not sealed.exists()
