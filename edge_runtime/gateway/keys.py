"""API keys that clients present to the teacher gateway, and the store that checks them.

A key is ``egw_`` followed by 32 random bytes in URL-safe base64 (43 characters). The gateway
config stores only the key's hash, ``sha256:<hex>``. To create a key and its config entry::

    edge-runtime api-key create --id ID --tenant TENANT --tier TIER

This prints the key once, and the ``[[keys]]`` entry to paste into the config.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import re
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from edge_runtime.errors import ConfigError, EdgeRuntimeError
from edge_runtime.gateway.config import (
    API_KEY_HASH_PREFIX,
    MAX_TENANT_CHARS,
    ApiKeyEntry,
    GatewayConfig,
    is_valid_name,
    is_valid_tenant,
    load_gateway_config,
)

API_KEY_PREFIX = "egw_"
API_KEY_RANDOM_BYTES = 32

# "Bearer", one or more spaces, then the credentials in the token68 syntax of HTTP
# authentication: letters, digits and -._~+/ with optional trailing '=' padding.
_AUTHORIZATION_PATTERN = re.compile(r"([A-Za-z]+) +([A-Za-z0-9._~+/-]+=*)")


def generate_api_key() -> str:
    """Return a new random API key: ``egw_`` and 32 bytes from ``secrets`` in URL-safe base64."""
    return API_KEY_PREFIX + secrets.token_urlsafe(API_KEY_RANDOM_BYTES)


def hash_api_key(key: str) -> str:
    """Return the hash that the config stores for ``key``: ``"sha256:"`` and 64 hex digits.

    One fast SHA-256 is the right hash here, unlike for passwords. A generated key carries 256
    random bits, so finding it from a leaked hash means searching those 2**256 values, and no
    practical preimage attack on SHA-256 is known. Slow password hashes (bcrypt, scrypt,
    Argon2) exist because people choose passwords from a small, guessable set. For random keys
    they would only add latency to every request. This holds for keys from
    ``generate_api_key``, but a short hand-written key is as weak as a password.
    """
    return API_KEY_HASH_PREFIX + _digest(key).hex()


def _digest(key: str) -> bytes:
    # "surrogatepass" lets any Python string be hashed. A string with lone surrogates is never
    # a generated key, so its digest matches nothing.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class ApiKeyRecord:
    """The client behind a valid API key. It contains no key material, so its repr shows
    none."""

    id: str  # public key id from the config, for logs
    tenant: str
    tier: str  # rate-limit tier


class ApiKeyStore:
    """The configured API keys, as SHA-256 digests, for checking presented keys."""

    def __init__(self, entries: Iterable[ApiKeyEntry]):
        self._entries: list[tuple[bytes, ApiKeyRecord]] = []
        for entry in entries:
            hex_digest = entry.hash.removeprefix(API_KEY_HASH_PREFIX)
            try:
                digest = bytes.fromhex(hex_digest)
            except ValueError:
                digest = b""
            if not entry.hash.startswith(API_KEY_HASH_PREFIX) or len(digest) != 32:
                raise ConfigError(
                    f"API key {entry.id!r}: the hash is not 'sha256:' followed by 64 hex digits"
                )
            record = ApiKeyRecord(id=entry.id, tenant=entry.tenant, tier=entry.tier)
            self._entries.append((digest, record))

    @classmethod
    def from_config(cls, config: GatewayConfig) -> ApiKeyStore:
        return cls(config.keys)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ApiKeyStore({len(self._entries)} keys)"

    def lookup(self, presented: str) -> ApiKeyRecord | None:
        """Return the record of the presented key, or None if no configured key matches.

        The presented key is hashed, and its digest is compared with every stored digest by
        ``hmac.compare_digest``, without stopping at a match. So the time taken depends on the
        number of keys, not on which key matched or how many leading bytes agreed. A dict keyed
        by digest would also be safe, because timing could only reveal digest bytes, and a
        digest does not lead back to a random key. The scan is chosen because it needs no such
        argument, and a hand-edited config contains few keys, so it costs microseconds.
        """
        digest = _digest(presented)
        found = None
        for stored, record in self._entries:
            if hmac.compare_digest(stored, digest):
                found = record
        return found


def parse_authorization(header_value: str | None) -> str | None:
    """Return the key of an ``Authorization: Bearer <key>`` header value, or None.

    The scheme name is matched case-insensitively, because HTTP authentication (RFC 7235, now
    part of RFC 9110) defines scheme names as case-insensitive tokens. Other schemes, a missing
    or empty key, and a key with characters outside the token68 syntax return None.
    """
    if not header_value:
        return None
    match = _AUTHORIZATION_PATTERN.fullmatch(header_value.strip())
    if match is None or match.group(1).lower() != "bearer":
        return None
    return match.group(2)


def format_key_entry(entry: ApiKeyEntry) -> str:
    """Format ``entry`` as a ``[[keys]]`` block of TOML for the gateway config."""
    lines = [
        "[[keys]]",
        f"id = {_toml_string(entry.id)}",
        f"hash = {_toml_string(entry.hash)}",
        f"tenant = {_toml_string(entry.tenant)}",
        f"tier = {_toml_string(entry.tier)}",
    ]
    return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    # Key ids, hashes, tiers and tenants are validated as printable, so only the backslash and
    # the quote need escapes in a TOML basic string.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edge_runtime.gateway.keys",
        description="Create API keys for the teacher gateway.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser(
        "create", help="generate a key and print the [[keys]] entry for the gateway config")
    create.add_argument("--id", required=True,
                        help="public id of the key, written to logs: 1 to 64 letters, digits, "
                             "'.', '_' or '-'")
    create.add_argument("--tenant", required=True,
                        help=f"tenant the key belongs to, 1 to {MAX_TENANT_CHARS} characters")
    create.add_argument("--tier", required=True,
                        help="rate-limit tier of the key, a name defined in [tiers]")
    create.add_argument("--config", metavar="TOML",
                        help="gateway config to check against: the tier must be defined there "
                             "and the id not yet used (default: no check)")
    return parser


def run_create(args: argparse.Namespace) -> int:
    if not is_valid_name(args.id):
        raise ConfigError(f"invalid --id {args.id!r}; use 1 to 64 letters, digits, '.', '_' "
                          "or '-', starting with a letter or digit")
    if not is_valid_tenant(args.tenant):
        raise ConfigError(f"invalid --tenant {args.tenant!r}; use 1 to {MAX_TENANT_CHARS} "
                          "printable characters")
    if not is_valid_name(args.tier):
        raise ConfigError(f"invalid --tier {args.tier!r}; use the name of a tier in [tiers]")
    if args.config:
        config = load_gateway_config(args.config)
        if args.tier not in config.tiers:
            raise ConfigError(f"tier {args.tier!r} is not defined in {args.config}; defined "
                              f"tiers: {', '.join(config.tiers)}")
        if any(entry.id == args.id for entry in config.keys):
            raise ConfigError(f"{args.config} already has a key with id {args.id!r}; choose "
                              "another --id")

    key = generate_api_key()
    entry = ApiKeyEntry(id=args.id, hash=hash_api_key(key), tenant=args.tenant, tier=args.tier)
    print(f"New API key {args.id!r} for tenant {args.tenant!r}, tier {args.tier!r}.")
    print("It is shown only once, and the gateway stores only its hash, so save it now:")
    print()
    print(key)
    print()
    print("Add this entry to the gateway config:")
    print()
    print(format_key_entry(entry), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_create(args)
    except EdgeRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
