"""``edge-runtime keys`` and ``edge-runtime package`` commands, and the trust options that the
runtime commands share."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from edge_runtime import encryption, keys, signing
from edge_runtime.errors import ConfigError
from edge_runtime.package import (
    TrustPolicy,
    inspect_package,
    read_package,
    rebuild_package,
    sign_archive,
)
from edge_runtime.rollback import RollbackState

log = logging.getLogger(__name__)


def default_state_file() -> str:
    """Return the path of the rollback state under $XDG_STATE_HOME (default ~/.local/state)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "edge-runtime" / "accepted-versions.json")


def add_trust_options(parser: argparse.ArgumentParser, device: bool = True) -> None:
    group = parser.add_argument_group("package trust")
    group.add_argument(
        "--signer-key", action="append", default=[], metavar="PEM",
        help="trusted signer public key; repeat for several (default: $EDGE_RUNTIME_SIGNER_KEY, "
             "else the demo key models/keys/demo-signer.pub.pem)")
    if device:
        group.add_argument(
            "--device-key", metavar="PEM",
            help="this device's private key for encrypted packages (default: "
                 "$EDGE_RUNTIME_DEVICE_KEY, else the demo key models/keys/demo-device.key.pem)")
        group.add_argument(
            "--passphrase-env", metavar="VAR",
            help="environment variable holding a development passphrase, instead of a device key")
    group.add_argument(
        "--state-file", default=None, metavar="PATH",
        help="rollback state file recording accepted versions (default: "
             f"{default_state_file()}; pass '' to skip the rollback check)")
    group.add_argument("--allow-downgrade", action="store_true",
                       help="accept a version older than one already accepted")
    group.add_argument("--allow-unsigned", action="store_true",
                       help="accept unsigned packages (development only)")


def trust_from_args(args: argparse.Namespace) -> TrustPolicy:
    """Build the trust policy from command-line options, environment variables and defaults."""
    default_signer = str(keys.DEMO_SIGNER_PUBLIC) if keys.DEMO_SIGNER_PUBLIC.is_file() else None
    default_device = str(keys.DEMO_DEVICE_PRIVATE) if keys.DEMO_DEVICE_PRIVATE.is_file() else None
    provider = keys.from_environment(default_signer, default_device)
    if args.signer_key:
        provider = keys.FileKeyProvider(tuple(args.signer_key), provider.device_private_key,
                                        provider.device_key_password)
    device_key_path = getattr(args, "device_key", None)
    if device_key_path:
        provider = keys.FileKeyProvider(provider.signer_public_keys, device_key_path,
                                        provider.device_key_password)
    passphrase = None
    passphrase_env = getattr(args, "passphrase_env", None)
    if passphrase_env:
        passphrase = os.environ.get(passphrase_env)
        if passphrase is None:
            raise ConfigError(f"environment variable {passphrase_env} is not set")
    state_file = default_state_file() if args.state_file is None else args.state_file
    demo = {str(keys.DEMO_SIGNER_PUBLIC), str(keys.DEMO_DEVICE_PRIVATE)}
    in_use = set(provider.signer_public_keys) | {provider.device_private_key}
    if demo & in_use:
        log.warning("using the demo keys in %s, which are public and protect nothing; pass "
                    "--signer-key and --device-key for real packages", keys.DEMO_KEYS_DIR)
    return TrustPolicy(
        trusted_keys=tuple(provider.trusted_signer_keys()),
        device_key=None if passphrase is not None else provider.device_key(),
        passphrase=passphrase,
        rollback=RollbackState(state_file) if state_file else None,
        allow_downgrade=args.allow_downgrade,
        allow_unsigned=args.allow_unsigned,
    )


def add_commands(commands: argparse._SubParsersAction) -> None:
    keys_parser = commands.add_parser("keys", help="generate signer and device keys")
    keys_commands = keys_parser.add_subparsers(dest="keys_command", required=True)
    generate = keys_commands.add_parser("generate", help="write a new key pair as PEM files")
    generate.add_argument("--kind", choices=["signer", "device", "device-x25519"],
                          required=True, help="signer: signs packages; device: decrypts them")
    generate.add_argument("--name", required=True,
                          help="file name stem: writes NAME.key.pem and NAME.pub.pem")
    generate.add_argument("--out", default=".", help="folder (default: %(default)s)")

    package = commands.add_parser("package", help="sign, encrypt, verify or inspect packages")
    package_commands = package.add_subparsers(dest="package_command", required=True)

    inspect = package_commands.add_parser("inspect", help="print the manifest, unverified")
    inspect.add_argument("package")

    verify = package_commands.add_parser("verify", help="check signature, digests, version, "
                                                        "expiry and decryption")
    verify.add_argument("package")
    add_trust_options(verify)

    sign = package_commands.add_parser("sign", help="sign a package as it is")
    sign.add_argument("package")
    sign.add_argument("--out", required=True, help="signed package to write")
    sign.add_argument("--signer-private-key", required=True, metavar="PEM",
                      help="ECDSA P-256 private key of the signer")

    encrypt = package_commands.add_parser(
        "encrypt", help="encrypt the model for device public keys (and re-sign)")
    encrypt.add_argument("package")
    encrypt.add_argument("--out", required=True, help="encrypted package to write")
    encrypt.add_argument("--recipient", action="append", default=[], metavar="PEM",
                         help="device public key; repeat for each device")
    encrypt.add_argument("--recipient-passphrase-env", metavar="VAR",
                         help="also wrap for a passphrase read from VAR (development only)")
    encrypt.add_argument("--encrypt-tokenizer", action="store_true",
                         help="encrypt tokenizer.json as well as model.onnx")
    encrypt.add_argument("--signer-private-key", metavar="PEM",
                         help="sign the result with this key (unsigned without it)")
    add_trust_options(encrypt)


def run_keys(args: argparse.Namespace) -> int:
    private_path, public_path = keys.generate_keys(args.out, args.name, args.kind)
    print(f"wrote {private_path} (private, mode 0600) and {public_path}")
    return 0


def run_package(args: argparse.Namespace) -> int:
    command = args.package_command
    if command == "inspect":
        info = inspect_package(args.package)
        manifest = info["manifest"]
        encrypted = manifest.get("encryption") or {}
        summary = {
            "name": manifest.get("name"), "version": manifest.get("version"),
            "schema_version": manifest.get("schema_version"),
            "created_at": manifest.get("created_at"), "expires_at": manifest.get("expires_at"),
            "signed": info["signed"],
            "encrypted_members": sorted(encrypted.get("members") or {}),
            "recipients": len(encrypted.get("recipients") or []),
            "archive_members": info["archive_members"],
            "note": "inspect does not verify the signature or decrypt anything",
        }
        print(json.dumps({"summary": summary, "manifest": manifest}, indent=2))
        return 0
    if command == "verify":
        package = read_package(args.package, trust_from_args(args))
        for verdict in package.verdicts:
            print(f"ok  {verdict}")
        name = f"{package.manifest.name} version {package.manifest.version}"
        if package.signer_key_id is None:
            print(f"ok  {name} is readable, but unsigned or unchecked, so not trusted")
        else:
            print(f"ok  {name} is trusted")
        return 0
    if command == "sign":
        signer = signing.load_private_key_pem(Path(args.signer_private_key).read_bytes())
        target = sign_archive(args.package, args.out, signer)
        print(f"signed {target} with key {signing.key_id(signer.public_key())}")
        return 0
    if command == "encrypt":
        # Re-encrypting is a build step, so it records nothing in the rollback state.
        source = read_package(args.package, trust_from_args(args).replace(rollback=None))
        recipients = [encryption.load_public_key(path) for path in args.recipient]
        passphrase = None
        if args.recipient_passphrase_env:
            passphrase = os.environ.get(args.recipient_passphrase_env)
            if passphrase is None:
                raise ConfigError(
                    f"environment variable {args.recipient_passphrase_env} is not set"
                )
        if not recipients and passphrase is None:
            raise ConfigError("pass at least one --recipient device public key")
        signer = None
        if args.signer_private_key:
            signer = signing.load_private_key_pem(Path(args.signer_private_key).read_bytes())
        members = ["model.onnx"] + (["tokenizer.json"] if args.encrypt_tokenizer else [])
        target = rebuild_package(source, args.out, signer_key=signer, recipients=recipients,
                                 passphrase=passphrase, encrypt_members=members)
        state = "signed" if signer else "unsigned: sign it before shipping"
        print(f"encrypted {target} for {len(recipients)} device(s) ({state})")
        return 0
    raise ConfigError(f"unknown package command {command!r}")
