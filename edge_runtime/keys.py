"""Key sources of the runtime: trusted signer public keys and this device's private key.

``KeyProvider`` is the interface. ``FileKeyProvider`` reads PEM files, and ``from_environment``
reads the paths or PEM text from environment variables. A hardware keystore (PKCS#11, TPM 2.0,
Android Keystore, Apple Secure Enclave) plugs in as another provider. NOTE: the HPKE code in
``encryption`` needs an in-process private key object, so a keystore provider also needs an
HPKE backend that decrypts inside the keystore.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edge_runtime import encryption, signing
from edge_runtime.errors import ConfigError

SIGNER_KEY_ENV = "EDGE_RUNTIME_SIGNER_KEY"  # path or PEM text of a trusted signer public key
DEVICE_KEY_ENV = "EDGE_RUNTIME_DEVICE_KEY"  # path or PEM text of this device's private key
DEVICE_KEY_PASSWORD_ENV = "EDGE_RUNTIME_DEVICE_KEY_PASSWORD"

DEMO_KEYS_DIR = Path("models/keys")
DEMO_SIGNER_PUBLIC = DEMO_KEYS_DIR / "demo-signer.pub.pem"
DEMO_SIGNER_PRIVATE = DEMO_KEYS_DIR / "demo-signer.key.pem"
DEMO_DEVICE_PUBLIC = DEMO_KEYS_DIR / "demo-device.pub.pem"
DEMO_DEVICE_PRIVATE = DEMO_KEYS_DIR / "demo-device.key.pem"


class KeyProvider(Protocol):
    """Source of the keys a device uses to verify and decrypt packages."""

    def trusted_signer_keys(self) -> list[Any]:
        """Public keys (ECDSA P-256) of the builders whose packages this device accepts."""
        ...

    def device_key(self) -> Any | None:
        """This device's private key for unwrapping content keys, or None."""
        ...


@dataclass(frozen=True)
class FileKeyProvider:
    """Keys read from PEM files (or PEM text) on each call."""

    signer_public_keys: tuple[str, ...] = ()
    device_private_key: str | None = None
    device_key_password: bytes | None = field(default=None, repr=False)

    def trusted_signer_keys(self) -> list[Any]:
        return [signing.load_public_key_pem(_pem_bytes(item, "signer public key"))
                for item in self.signer_public_keys]

    def device_key(self) -> Any | None:
        if not self.device_private_key:
            return None
        source = self.device_private_key
        if _looks_like_pem(source):
            return encryption.load_private_key_pem(source.encode("ascii"),
                                                   self.device_key_password)
        return encryption.load_private_key(source, self.device_key_password)


def from_environment(default_signer: str | None = None,
                     default_device: str | None = None) -> FileKeyProvider:
    """Return a provider from EDGE_RUNTIME_SIGNER_KEY and EDGE_RUNTIME_DEVICE_KEY (each a path
    or PEM text), falling back to the given defaults."""
    signer = os.environ.get(SIGNER_KEY_ENV) or default_signer
    device = os.environ.get(DEVICE_KEY_ENV) or default_device
    password = os.environ.get(DEVICE_KEY_PASSWORD_ENV)
    return FileKeyProvider(
        signer_public_keys=(signer,) if signer else (),
        device_private_key=device,
        device_key_password=password.encode("utf-8") if password else None,
    )


def generate_keys(folder: str | Path, name: str, kind: str) -> tuple[Path, Path]:
    """Write a new key pair as ``<name>.key.pem`` (mode 0600) and ``<name>.pub.pem``.

    ``kind`` is ``signer`` (ECDSA P-256, signs packages), ``device`` (P-256, unwraps content
    keys; a hardware keystore can hold it) or ``device-x25519``. Existing files are not
    overwritten.
    """
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r} must be a plain file name stem, such as "
                          "'device-0001'")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; pass a folder for the key files")
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / f"{name}.key.pem", folder / f"{name}.pub.pem"
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; choose another name or remove it first")
    if kind == "signer":
        key = signing.generate_private_key()
        signing.write_private_key(private_path, key)
        public_path.write_bytes(signing.public_key_to_pem(key.public_key()))
    elif kind in ("device", "device-x25519"):
        key = encryption.generate_device_key("x25519" if kind == "device-x25519" else "p256")
        encryption.save_private_key(key, private_path)
        encryption.save_public_key(key.public_key(), public_path)
    else:
        raise ConfigError(f"key kind {kind!r} is not one of 'signer', 'device', 'device-x25519'")
    return private_path, public_path


def _looks_like_pem(value: str) -> bool:
    return value.lstrip().startswith("-----BEGIN ")


def _pem_bytes(value: str, what: str) -> bytes:
    if _looks_like_pem(value):
        return value.encode("ascii")
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {value}: {exc}") from None
