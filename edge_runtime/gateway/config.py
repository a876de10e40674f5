"""Configuration of the teacher gateway, read from one TOML file and validated at load.

The sections are ``[server]``, ``[teacher]``, ``[limits]``, ``[rate_limit]``, ``[defences]``,
``[tiers.NAME]`` and ``[[keys]]``; examples/gateway.toml documents every key and its default.
Every key has a default except the fields of a ``[[keys]]`` entry, and ``teacher.base_url``
and ``teacher.model`` when the teacher backend is "openai". A file without ``[tiers]`` gets
the built-in tier "default".

Unknown sections and keys, wrong types and invalid values raise ``ConfigError``. The message
names the file, the full key (for example ``rate_limit.redis_url``), the value and the expected
value. Values that may be secrets are masked or left out: the user name and password of
``rate_limit.redis_url``, an invalid ``teacher.api_key_env`` and an invalid ``keys[N].hash``.

Relative paths are kept as written and resolve against the working directory of the gateway
process. This module does not open them, so a missing file is reported when the server loads it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn
from urllib.parse import SplitResult, urlsplit

from edge_runtime.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "EDGE_GATEWAY__"
BUILT_IN_SOURCE = "<built-in defaults>"
DEFAULT_TEACHER_PACKAGE = "models/clinc150-teacher.edgepkg"
DEMO_SIGNER_KEY = "models/keys/demo-signer.pub.pem"
API_KEY_HASH_PREFIX = "sha256:"
MAX_TIMEOUT = 3600.0  # seconds
MAX_TENANT_CHARS = 128

# Key ids and tier names: they appear in logs, and tier names in Redis keys and RateLimit
# response headers, so they are limited to characters that need no quoting there.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASH_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")
_HEADER_NAME_PATTERN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (token)
_ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REDIS_DB_PATTERN = re.compile(r"/\d*")
_INTEGER_PATTERN = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``burst`` requests at once, refilled at ``rate`` requests per second."""

    rate: float
    burst: int


DEFAULT_TIERS = MappingProxyType({"default": RateLimit(rate=10.0, burst=20)})


@dataclass(frozen=True)
class ServerConfig:
    """Settings of ``[server]``: the listening socket, threads and logging."""

    host: str = "127.0.0.1"
    port: int = 8080  # 0 picks a free port
    threads: int = 1  # ONNX Runtime intra-op threads of the onnx teacher
    log_format: str = "json"  # "json" (one JSON object per line) or "text"
    request_id_header: str = "X-Request-Id"  # HTTP header that carries the request id
    body_timeout: float = 10.0  # seconds for a request body to arrive, then 408
    max_connections: int = 1000  # open connections and requests; more get 503
    shutdown_timeout: float = 10.0  # seconds that open requests get after SIGTERM


@dataclass(frozen=True)
class TeacherConfig:
    """Settings of ``[teacher]``: which model returns the labels, and how to reach it.

    ``package`` applies only to the "onnx" backend, and ``base_url`` through ``system_prompt``
    only to the "openai" backend. Setting a key of the other backend is an error.
    """

    backend: str = "onnx"  # "onnx" (a local teacher package) or "openai" (a remote server)
    package: str = DEFAULT_TEACHER_PACKAGE
    # Signer public keys (PEM files) that verify the onnx teacher package, and the package
    # named by labels_from.
    signer_keys: tuple[str, ...] = (DEMO_SIGNER_KEY,)
    allow_unsigned: bool = False  # accept unsigned packages; for development only
    base_url: str = ""  # OpenAI-compatible API, for example "http://127.0.0.1:8000/v1"
    model: str = ""
    # Name of the environment variable that contains the upstream API key. The key itself
    # never appears in the config. Empty sends no key.
    api_key_env: str = ""
    connect_timeout: float = 2.0  # seconds
    read_timeout: float = 20.0  # seconds
    labels_from: str | None = None  # package whose labels are the only labels allowed
    system_prompt: str | None = None

    def read_api_key(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """Read the upstream API key from the variable named by ``api_key_env``.

        Return None when ``api_key_env`` is empty. Raise ConfigError naming the variable when
        it is unset or empty. The key is read here, at server start, and not at config load,
        so that tools can load the config without the secret in their environment.
        """
        if not self.api_key_env:
            return None
        key = environ.get(self.api_key_env, "")
        if not key:
            raise ConfigError(
                f"teacher.api_key_env names the environment variable {self.api_key_env}, which "
                "is not set or empty; set it to the API key of the upstream server"
            )
        return key


@dataclass(frozen=True)
class LimitsConfig:
    """Settings of ``[limits]``: maximum sizes of requests and responses."""

    max_body_bytes: int = 65536  # bytes of the request body
    max_text_chars: int = 2000  # characters of the query text
    max_tools: int = 16  # tools in one request
    max_tool_bytes: int = 8192  # bytes of each tool's JSON
    max_output_chars: int = 2000  # characters of generated output
    max_list_items: int = 10  # items of each list in generated text


@dataclass(frozen=True)
class RateLimitConfig:
    """Settings of ``[rate_limit]``: where limiter state lives and the per-address limit.

    ``on_backend_error`` decides what happens to a request when the backend cannot be reached:
    "closed" rejects it, "open" admits it without a limit. ``enabled = false`` turns every
    limit off, for load tests and evaluation on loopback only. The repr masks the user name
    and password of ``redis_url``.
    """

    enabled: bool = True
    backend: str = "memory"  # "memory" (this process only) or "redis" (shared by processes)
    redis_url: str | None = None  # required when backend is "redis"
    on_backend_error: str = "closed"
    per_address: RateLimit = RateLimit(rate=20.0, burst=40)  # per client IP address

    def __repr__(self) -> str:
        redis_url = None if self.redis_url is None else mask_url_credentials(self.redis_url)
        return (
            f"RateLimitConfig(enabled={self.enabled!r}, backend={self.backend!r}, "
            f"redis_url={redis_url!r}, "
            f"on_backend_error={self.on_backend_error!r}, per_address={self.per_address!r})"
        )


@dataclass(frozen=True)
class DefencesConfig:
    """Settings of ``[defences]``: the defences against unauthorised distillation.

    Off by default, so that evaluation on loopback sees the teacher's own answers. The keyed
    defences read a secret of at least 32 characters from the environment variable that
    ``secret_env`` names; it never sits in the file. The monitor needs ``reference_data``, a
    data folder that ``edge_runtime.data.load_split`` reads (the teacher's training data), to
    tell in-domain queries from the rest. Its state lives in the ``[rate_limit]`` backend.
    The degrade limit and the block after ``degrade_block_after`` exhausted requests need
    both the monitor and the rate limiter.
    """

    enabled: bool = False
    secret_env: str = "EDGE_GATEWAY_DEFENCE_SECRET"
    audit_log: str = "gateway-audit.jsonl"  # JSON lines, one per tier change
    reference_data: str | None = None  # folder with train and val splits
    monitor: bool = True  # behavioural monitoring: allow, degrade, block
    randomize: bool = True  # keyed choice between near-tied top-two labels
    watermark: bool = True  # a keyed alternative answer for a small share of queries
    watermark_rate: float = 0.005  # share of queries marked, at most 0.005
    decoys: bool = True  # decoy tools mixed into the tools of requests that send tools
    decoys_per_request: int = 2
    decoy_rotation_seconds: int = 86400  # decoys change every period
    decoy_strategy_allow: str = "retry_masked"  # what a decoy choice leads to for honest
    decoy_strategy_degrade: str = "return_decoy"  # ... and for degraded clients
    # A client in the monitor's "degrade" tier gets this limit on top of its key's tier, in
    # the [rate_limit] backend. Honest devices send well below 1 request per second.
    degrade_rate: float = 1.0  # requests per second
    degrade_burst: int = 5  # requests
    # A degraded client whose degrade limit is exhausted on this many requests in a row is
    # blocked. 0 never blocks for that reason.
    degrade_block_after: int = 600  # requests


@dataclass(frozen=True)
class ApiKeyEntry:
    """A ``[[keys]]`` entry: one client API key, stored as its SHA-256 hash only."""

    id: str  # public identifier, written to logs
    hash: str  # "sha256:" followed by 64 lowercase hex digits
    tenant: str
    tier: str  # a name defined in [tiers]


@dataclass(frozen=True)
class GatewayConfig:
    """The whole gateway configuration. ``source`` is the file it was read from."""

    server: ServerConfig
    teacher: TeacherConfig
    limits: LimitsConfig
    rate_limit: RateLimitConfig
    defences: DefencesConfig
    tiers: Mapping[str, RateLimit]  # read-only, tier name -> limit per API key
    keys: tuple[ApiKeyEntry, ...]
    source: str

    @property
    def auth_required(self) -> bool:
        """Whether clients must present an API key, which is true when keys are configured.

        An empty key list turns authentication off, which is meant for local development only.
        A server built on this config must log a warning at startup in that case.
        """
        return bool(self.keys)

    @classmethod
    def default(cls) -> GatewayConfig:
        """Return the built-in defaults: onnx teacher, memory limiter, tier "default", no keys.

        Environment overrides do not apply.
        """
        return parse_gateway_config({}, source=BUILT_IN_SOURCE, environ={})


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "teacher": TeacherConfig,
    "limits": LimitsConfig,
    "rate_limit": RateLimitConfig,
    "defences": DefencesConfig,
}
_ALL_SECTIONS = (*_SECTIONS, "tiers", "keys")
_BACKEND_ONLY_KEYS = {
    "teacher": {
        "onnx": ("package",),
        "openai": ("base_url", "model", "api_key_env", "connect_timeout", "read_timeout",
                   "labels_from", "system_prompt"),
    },
    "rate_limit": {"memory": (), "redis": ("redis_url",)},
}
_RATE_LIMIT_KEYS = ("rate", "burst")
_API_KEY_FIELDS = ("id", "hash", "tenant", "tier")
_SECRET_URL_KEYS = {"rate_limit.redis_url"}

# Field annotation -> description of the expected type, for messages.
_EXPECTED_TYPES = {
    "str": "a string",
    "str | None": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "tuple[str, ...]": "a list of strings",
    "RateLimit": "a table { rate = <requests per second>, burst = <requests> }",
}
# Annotations that environment variables can set; lists and tables can only be set in the file.
_SCALAR_TYPES = ("str", "str | None", "int", "float", "bool")


def load_gateway_config(path: str | Path,
                        environ: Mapping[str, str] = os.environ) -> GatewayConfig:
    """Read and validate the gateway config in the TOML file ``path``.

    Environment variables named ``EDGE_GATEWAY__SECTION__KEY`` override single keys, for
    example ``EDGE_GATEWAY__SERVER__PORT=9000`` or ``EDGE_GATEWAY__RATE_LIMIT__REDIS_URL``.
    Section and key are separated by double underscores and matched case-insensitively. Only
    scalar keys (strings, numbers, booleans) of the fixed sections ``server``, ``teacher``,
    ``limits``, ``rate_limit`` and ``defences`` can be overridden, for example
    ``EDGE_GATEWAY__DEFENCES__DEGRADE_RATE=0.5``. Lists such as ``teacher.signer_keys``,
    the table ``rate_limit.per_address``, ``[tiers]`` and ``[[keys]]`` are set in the file
    only. A value is parsed to the key's type: integers in decimal, numbers as Python floats,
    booleans as true/false/1/0, and an empty value unsets an optional string
    (``redis_url``, ``labels_from``, ``system_prompt``). An override is validated like a
    value in the file, and its errors name the variable. An unknown section or key in such a
    variable is an error, to catch typos.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"gateway config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"gateway config path {path} is a folder; pass a TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc}); save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read gateway config {path}: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_gateway_config(raw, source=str(path), environ=environ)


def parse_gateway_config(raw: Mapping[str, Any], source: str = "<config>",
                         environ: Mapping[str, str] = os.environ) -> GatewayConfig:
    """Validate a parsed TOML document, after applying the environment overrides that
    ``load_gateway_config`` describes. ``source`` names the document in error messages."""
    return _ConfigParser(source, environ).parse(raw)


def mask_url_credentials(url: str) -> str:
    """Return ``url`` with its user name and password, and the value of any ``password``
    query parameter, replaced by ``***``, for error messages and logs."""
    start = url.find("://")
    start = 0 if start < 0 else start + 3
    at = url.rfind("@", start)
    if at >= 0:
        url = url[:start] + "***" + url[at:]
    return re.sub(r"(?i)([?&](?:password|pass|pwd)=)[^&#]*", r"\1***", url)


def is_valid_name(value: str) -> bool:
    """Return True if ``value`` is a valid key id or tier name: 1 to 64 letters, digits,
    '.', '_' or '-', starting with a letter or digit."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


def is_valid_tenant(value: str) -> bool:
    """Return True if ``value`` is a valid tenant: 1 to 128 printable characters, not all
    spaces."""
    return (isinstance(value, str) and bool(value.strip())
            and len(value) <= MAX_TENANT_CHARS and value.isprintable())


class _ConfigParser:
    """One validation pass over a document. Keys set by environment variables are recorded in
    ``variables`` so that errors about them name the variable."""

    def __init__(self, source: str, environ: Mapping[str, str]):
        self.source = source
        self.environ = environ
        self.variables: dict[str, str] = {}  # dotted key -> environment variable

    # Messages

    def describe(self, key: str, entry_id: str | None = None) -> str:
        text = f"key {key!r}"
        if entry_id is not None:
            text += f" (id {entry_id!r})"
        if key in self.variables:
            text += f" from environment variable {self.variables[key]}"
        return text

    def fail(self, key: str, value: Any, expected: str, *, entry_id: str | None = None,
             show_value: bool = True) -> NoReturn:
        if key in _SECRET_URL_KEYS and isinstance(value, str):
            value_text = f"is {mask_url_credentials(value)!r}"
        elif not show_value or key in _SECRET_URL_KEYS:
            value_text = "invalid (the value is not shown because it may contain a secret)"
        else:
            value_text = f"is {value!r}"
        raise ConfigError(
            f"{self.source}: {self.describe(key, entry_id)} {value_text}; expected {expected}"
        )

    def fail_missing(self, key: str, expected: str, entry_id: str | None = None) -> NoReturn:
        raise ConfigError(
            f"{self.source}: {self.describe(key, entry_id)} is missing; expected {expected}"
        )

    def fail_unknown(self, keys: list[str], allowed: list[str], where: str) -> NoReturn:
        noun = "key" if len(keys) == 1 else "keys"
        raise ConfigError(
            f"{self.source}: unknown {noun} {', '.join(repr(key) for key in keys)} in {where}; "
            f"allowed keys: {', '.join(allowed)}"
        )

    # Document structure

    def parse(self, raw: Mapping[str, Any]) -> GatewayConfig:
        unknown = sorted(set(raw) - set(_ALL_SECTIONS))
        if unknown:
            noun = "section" if len(unknown) == 1 else "sections"
            raise ConfigError(
                f"{self.source}: unknown {noun} {', '.join(repr(name) for name in unknown)}; "
                f"allowed sections: {', '.join(_ALL_SECTIONS)}"
            )
        tables: dict[str, dict[str, Any]] = {}
        for name in _SECTIONS:
            table = raw.get(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{self.source}: [{name}] is {table!r}; expected a table")
            tables[name] = dict(table)
        self.apply_environment(tables)

        sections = {name: self.build_section(name, tables[name]) for name in _SECTIONS}
        self.validate_server(sections["server"])
        self.validate_teacher(sections["teacher"], set(tables["teacher"]))
        self.validate_limits(sections["limits"])
        self.validate_rate_limit(sections["rate_limit"], set(tables["rate_limit"]))
        self.validate_defences(sections["defences"])
        tiers = self.parse_tiers(raw.get("tiers"))
        keys = self.parse_keys(raw.get("keys"), tiers)
        return GatewayConfig(**sections, tiers=tiers, keys=keys, source=self.source)

    def apply_environment(self, tables: dict[str, dict[str, Any]]) -> None:
        for variable in sorted(self.environ):
            if not variable.upper().startswith(ENV_PREFIX):
                continue
            parts = variable[len(ENV_PREFIX):].lower().split("__")
            if len(parts) != 2 or not all(parts):
                raise ConfigError(
                    f"{self.source}: environment variable {variable} does not have the form "
                    f"{ENV_PREFIX}SECTION__KEY, for example {ENV_PREFIX}SERVER__PORT"
                )
            section, name = parts
            if section not in _SECTIONS:
                raise ConfigError(
                    f"{self.source}: environment variable {variable} names the section "
                    f"{section!r}, which cannot be overridden; allowed sections: "
                    f"{', '.join(_SECTIONS)} ([tiers] and [[keys]] are set in the file only)"
                )
            annotations = _field_types(_SECTIONS[section])
            if name not in annotations:
                raise ConfigError(
                    f"{self.source}: environment variable {variable} names the unknown key "
                    f"'{section}.{name}'; allowed keys in [{section}]: "
                    f"{', '.join(annotations)}"
                )
            annotation = annotations[name]
            if annotation not in _SCALAR_TYPES:
                raise ConfigError(
                    f"{self.source}: environment variable {variable} cannot set "
                    f"'{section}.{name}', which is {_EXPECTED_TYPES[annotation]}; set it in "
                    "the file"
                )
            text = self.environ[variable]
            value = _parse_environment_value(annotation, text)
            if value is _INVALID:
                key = f"{section}.{name}"
                value_text = mask_url_credentials(text) if key in _SECRET_URL_KEYS else text
                raise ConfigError(
                    f"{self.source}: environment variable {variable} is {value_text!r}; expected "
                    f"{_environment_syntax(annotation)} for key {key!r}"
                )
            if value is None:
                tables[section].pop(name, None)  # an empty optional string unsets the key
            else:
                tables[section][name] = value
            self.variables[f"{section}.{name}"] = variable

    def build_section(self, section: str, table: dict[str, Any]) -> Any:
        cls = _SECTIONS[section]
        annotations = _field_types(cls)
        unknown = sorted(set(table) - set(annotations))
        if unknown:
            self.fail_unknown([f"{section}.{name}" for name in unknown], list(annotations),
                              f"[{section}]")
        values = {}
        for name, value in table.items():
            values[name] = self.check_type(f"{section}.{name}", annotations[name], value)
        return cls(**values)

    def check_type(self, key: str, annotation: str, value: Any) -> Any:
        if annotation == "RateLimit":
            return self.parse_rate_limit(key, value)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if annotation in ("str", "str | None"):
            valid = isinstance(value, str)
        elif annotation == "int":
            valid = isinstance(value, int) and not isinstance(value, bool)
        elif annotation == "float":
            valid = is_number
            value = float(value) if is_number else value
        elif annotation == "bool":
            valid = isinstance(value, bool)
        elif annotation == "tuple[str, ...]":
            valid = isinstance(value, list) and all(isinstance(item, str) for item in value)
            value = tuple(value) if valid else value
        else:
            raise TypeError(f"no type check for the annotation {annotation!r} of {key}")
        if not valid:
            self.fail(key, value, _EXPECTED_TYPES[annotation])
        return value

    def parse_rate_limit(self, key: str, value: Any) -> RateLimit:
        if not isinstance(value, dict):
            self.fail(key, value, _EXPECTED_TYPES["RateLimit"])
        unknown = sorted(set(value) - set(_RATE_LIMIT_KEYS))
        if unknown:
            self.fail_unknown([f"{key}.{name}" for name in unknown], list(_RATE_LIMIT_KEYS),
                              key)
        if "rate" not in value:
            self.fail_missing(f"{key}.rate", "a number of requests per second above 0")
        if "burst" not in value:
            self.fail_missing(f"{key}.burst", "an integer number of requests of at least 1")
        rate = self.check_type(f"{key}.rate", "float", value["rate"])
        burst = self.check_type(f"{key}.burst", "int", value["burst"])
        if not 0 < rate < math.inf:
            self.fail(f"{key}.rate", rate, "a number of requests per second above 0")
        if burst < 1:
            self.fail(f"{key}.burst", burst, "an integer number of requests of at least 1")
        return RateLimit(rate=rate, burst=burst)

    # Value checks of the fixed sections

    def validate_server(self, server: ServerConfig) -> None:
        if not server.host or any(char.isspace() for char in server.host):
            self.fail("server.host", server.host,
                      "a host name or IP address to bind, for example '127.0.0.1'")
        if not 0 <= server.port <= 65535:
            self.fail("server.port", server.port, "a TCP port 0 to 65535 (0 picks a free port)")
        if server.threads < 1:
            self.fail("server.threads", server.threads, "an integer of at least 1")
        if server.log_format not in ("json", "text"):
            self.fail("server.log_format", server.log_format, "'json' or 'text'")
        if not _HEADER_NAME_PATTERN.fullmatch(server.request_id_header):
            self.fail("server.request_id_header", server.request_id_header,
                      "an HTTP header name, for example 'X-Request-Id'")
        for name in ("body_timeout", "shutdown_timeout"):
            value = getattr(server, name)
            if not 0 < value <= MAX_TIMEOUT:
                self.fail(f"server.{name}", value, f"seconds above 0 and at most {MAX_TIMEOUT:g}")
        if server.max_connections < 1:
            self.fail("server.max_connections", server.max_connections, "an integer of at least 1")

    def validate_teacher(self, teacher: TeacherConfig, explicit_keys: set[str]) -> None:
        self.check_backend("teacher", teacher.backend, explicit_keys)
        for index, path in enumerate(teacher.signer_keys):
            if not path.strip():
                self.fail(f"teacher.signer_keys[{index}]", path, "the path of a PEM public key")
        loads_package = teacher.backend == "onnx" or teacher.labels_from is not None
        if loads_package and not teacher.signer_keys and not teacher.allow_unsigned:
            self.fail("teacher.signer_keys", [],
                      "at least one signer public key (PEM path), or "
                      "teacher.allow_unsigned = true for development")
        if teacher.backend == "onnx":
            if not teacher.package.strip():
                self.fail("teacher.package", teacher.package, "the path of a teacher package")
            return

        if "base_url" not in explicit_keys:
            self.fail_missing("teacher.base_url",
                              "the URL of an OpenAI-compatible API for backend 'openai', "
                              "for example 'http://127.0.0.1:8000/v1'")
        self.validate_base_url(teacher.base_url)
        if "model" not in explicit_keys:
            self.fail_missing("teacher.model", "the model name to request for backend 'openai'")
        if not teacher.model.strip():
            self.fail("teacher.model", teacher.model, "a non-empty model name")
        if teacher.api_key_env and not _ENV_NAME_PATTERN.fullmatch(teacher.api_key_env):
            self.fail("teacher.api_key_env", teacher.api_key_env,
                      "the name of an environment variable (letters, digits and '_'), not "
                      "the key itself", show_value=False)
        for name in ("connect_timeout", "read_timeout"):
            seconds = getattr(teacher, name)
            if not 0 < seconds <= MAX_TIMEOUT:
                self.fail(f"teacher.{name}", seconds,
                          f"a number of seconds above 0 and at most {MAX_TIMEOUT:g}")
        if teacher.labels_from is not None and not teacher.labels_from.strip():
            self.fail("teacher.labels_from", teacher.labels_from,
                      "the path of a package, or no key to allow any answer")
        if teacher.system_prompt is not None and not teacher.system_prompt.strip():
            self.fail("teacher.system_prompt", teacher.system_prompt,
                      "a non-empty string, or no key")

    def validate_base_url(self, url: str) -> None:
        key = "teacher.base_url"
        expected = "an http:// or https:// URL, for example 'http://127.0.0.1:8000/v1'"
        parts = urlsplit(url)
        if "@" in parts.netloc:
            raise ConfigError(
                f"{self.source}: {self.describe(key)} contains a user name or password "
                f"({mask_url_credentials(url)!r}); put the API key in the environment variable "
                "named by teacher.api_key_env"
            )
        if not _has_valid_port(parts):
            self.fail(key, url, expected + " with a valid port")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(key, url, expected)
        if parts.query or parts.fragment:
            self.fail(key, url, expected + " without a query or fragment")

    def validate_limits(self, limits: LimitsConfig) -> None:
        for name in _field_types(LimitsConfig):
            value = getattr(limits, name)
            if value < 1:
                self.fail(f"limits.{name}", value, "an integer of at least 1")

    def validate_defences(self, defences: DefencesConfig) -> None:
        if not _ENV_NAME_PATTERN.fullmatch(defences.secret_env):
            self.fail("defences.secret_env", defences.secret_env,
                      "the name of an environment variable, for example "
                      "'EDGE_GATEWAY_DEFENCE_SECRET'")
        if not defences.audit_log:
            self.fail("defences.audit_log", defences.audit_log,
                      "the path of the audit log file, for example 'gateway-audit.jsonl'")
        if not 0.0 < defences.watermark_rate <= 0.005:
            self.fail("defences.watermark_rate", defences.watermark_rate,
                      "a share above 0 and at most 0.005: each marked query is a wrong "
                      "answer to an honest client")
        strategies = ("retry_masked", "simulate", "force_real", "return_decoy")
        for name in ("decoy_strategy_allow", "decoy_strategy_degrade"):
            value = getattr(defences, name)
            allowed = strategies[:3] if name == "decoy_strategy_allow" else strategies
            if value not in allowed:
                self.fail(f"defences.{name}", value, " or ".join(repr(item) for item in allowed)
                          + (" (honest clients never receive a decoy)"
                             if name == "decoy_strategy_allow" else ""))
        if not 0 <= defences.decoys_per_request <= 8:
            self.fail("defences.decoys_per_request", defences.decoys_per_request,
                      "an integer from 0 to 8")
        if defences.decoy_rotation_seconds < 60:
            self.fail("defences.decoy_rotation_seconds", defences.decoy_rotation_seconds,
                      "at least 60 seconds")
        if not 0 < defences.degrade_rate < math.inf:
            self.fail("defences.degrade_rate", defences.degrade_rate,
                      "a number of requests per second above 0, for example 1.0")
        if defences.degrade_burst < 1:
            self.fail("defences.degrade_burst", defences.degrade_burst,
                      "an integer number of requests of at least 1")
        if defences.degrade_block_after < 0:
            self.fail("defences.degrade_block_after", defences.degrade_block_after,
                      "an integer number of requests of at least 0 (0 never blocks)")
        if defences.degrade_block_after > 0 and defences.degrade_burst < 2:
            # With a burst of 1, every admitted request leaves no quota, so an exhausted
            # limit cannot tell a client at the limit from a slower one.
            self.fail("defences.degrade_burst", defences.degrade_burst,
                      "at least 2 while defences.degrade_block_after is above 0, or set "
                      "degrade_block_after = 0")
        if defences.enabled and defences.monitor and not defences.reference_data:
            self.fail_missing("defences.reference_data",
                              "the folder of the teacher's training data (train and val "
                              "splits), for example '../shared/data/clinc150', for the monitor")

    def validate_rate_limit(self, rate_limit: RateLimitConfig, explicit_keys: set[str]) -> None:
        self.check_backend("rate_limit", rate_limit.backend, explicit_keys)
        if rate_limit.on_backend_error not in ("closed", "open"):
            self.fail("rate_limit.on_backend_error", rate_limit.on_backend_error,
                      "'closed' (reject requests while the backend is unreachable) or 'open' "
                      "(admit them)")
        if rate_limit.backend != "redis":
            return
        expected = ("a Redis URL: redis://[[user]:password@]host[:port][/db], rediss:// for "
                    "TLS, or unix:///path/to/socket")
        url = rate_limit.redis_url
        if url is None:
            self.fail_missing("rate_limit.redis_url", expected + ", for backend 'redis'")
        parts = urlsplit(url)
        if not _has_valid_port(parts):
            self.fail("rate_limit.redis_url", url, expected)
        scheme = parts.scheme.lower()
        if scheme in ("redis", "rediss"):
            valid = (bool(parts.hostname)
                     and _REDIS_DB_PATTERN.fullmatch(parts.path or "/") is not None)
        else:
            valid = scheme == "unix" and bool(parts.path)
        if not valid:
            self.fail("rate_limit.redis_url", url, expected)

    def check_backend(self, section: str, backend: str, explicit_keys: set[str]) -> None:
        """Check the section's backend name, and that no key of another backend is set."""
        backends = _BACKEND_ONLY_KEYS[section]
        if backend not in backends:
            self.fail(f"{section}.backend", backend,
                      " or ".join(repr(name) for name in backends))
        for other, keys in backends.items():
            for name in keys:
                if other != backend and name in explicit_keys:
                    key = f"{section}.{name}"
                    raise ConfigError(
                        f"{self.source}: {self.describe(key)} applies only to backend "
                        f"{other!r}, but {section}.backend is {backend!r}; remove the key or "
                        "change the backend"
                    )

    # [tiers] and [[keys]]

    def parse_tiers(self, raw: Any) -> Mapping[str, RateLimit]:
        if raw is None:
            return DEFAULT_TIERS
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{self.source}: 'tiers' is {raw!r}; expected tables [tiers.NAME] with rate "
                "and burst"
            )
        if not raw:
            raise ConfigError(
                f"{self.source}: [tiers] defines no tier; add at least one [tiers.NAME] with "
                "rate and burst, or remove [tiers] to use the built-in tier 'default'"
            )
        tiers = {}
        for name, table in raw.items():
            if not is_valid_name(name):
                raise ConfigError(
                    f"{self.source}: invalid tier name {name!r} in [tiers]; use 1 to 64 "
                    "letters, digits, '.', '_' or '-', starting with a letter or digit"
                )
            tiers[name] = self.parse_rate_limit(f"tiers.{name}", table)
        return MappingProxyType(tiers)

    def parse_keys(self, raw: Any, tiers: Mapping[str, RateLimit]) -> tuple[ApiKeyEntry, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            raise ConfigError(
                f"{self.source}: 'keys' is a {type(raw).__name__}; expected an array of "
                "tables, each written as [[keys]]"
            )
        entries: list[ApiKeyEntry] = []
        ids_by_hash: dict[str, str] = {}
        for index, table in enumerate(raw):
            entry = self.parse_key_entry(index, table, tiers)
            if entry.id in ids_by_hash.values():
                self.fail(f"keys[{index}].id", entry.id, "an id that no other [[keys]] entry uses")
            if entry.hash in ids_by_hash:
                raise ConfigError(
                    f"{self.source}: [[keys]] entries {ids_by_hash[entry.hash]!r} and "
                    f"{entry.id!r} have the same hash; give each client its own key"
                )
            ids_by_hash[entry.hash] = entry.id
            entries.append(entry)
        return tuple(entries)

    def parse_key_entry(self, index: int, table: Any,
                        tiers: Mapping[str, RateLimit]) -> ApiKeyEntry:
        where = f"keys[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{self.source}: {where} is {table!r}; expected a [[keys]] table")
        unknown = sorted(set(table) - set(_API_KEY_FIELDS))
        if unknown:
            self.fail_unknown([f"{where}.{name}" for name in unknown], list(_API_KEY_FIELDS),
                              "[[keys]]")
        name_rule = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        if "id" not in table:
            self.fail_missing(f"{where}.id", f"a public key id: {name_rule}")
        entry_id = table["id"]
        if not is_valid_name(entry_id):
            self.fail(f"{where}.id", entry_id, f"a public key id: {name_rule}")

        expected = {
            "hash": "'sha256:' followed by 64 hex digits, as printed by "
                    "'edge-runtime api-key create'",
            "tenant": f"a tenant name of 1 to {MAX_TENANT_CHARS} printable characters",
            "tier": "one of the tiers defined in [tiers]: "
                    + ", ".join(repr(name) for name in tiers),
        }
        for name, description in expected.items():
            if name not in table:
                self.fail_missing(f"{where}.{name}", description, entry_id)
        key_hash = table["hash"]
        if not isinstance(key_hash, str) or not _HASH_PATTERN.fullmatch(key_hash.lower()):
            # A raw API key pasted here by mistake must not end up in a log.
            self.fail(f"{where}.hash", key_hash, expected["hash"], entry_id=entry_id,
                      show_value=False)
        if not is_valid_tenant(table["tenant"]):
            self.fail(f"{where}.tenant", table["tenant"], expected["tenant"], entry_id=entry_id)
        if not isinstance(table["tier"], str) or table["tier"] not in tiers:
            self.fail(f"{where}.tier", table["tier"], expected["tier"], entry_id=entry_id)
        return ApiKeyEntry(id=entry_id, hash=key_hash.lower(), tenant=table["tenant"],
                           tier=table["tier"])


_INVALID = object()  # result of _parse_environment_value for a value of the wrong syntax


def _parse_environment_value(annotation: str, text: str) -> Any:
    """Convert the text of an environment variable to the type of its key, or return
    ``_INVALID``."""
    if annotation == "str":
        return text
    if annotation == "str | None":
        return text or None
    stripped = text.strip()
    if annotation == "int":
        return int(stripped) if _INTEGER_PATTERN.fullmatch(stripped) else _INVALID
    if annotation == "float":
        try:
            return float(stripped)
        except ValueError:
            return _INVALID
    if annotation == "bool":
        words = {"true": True, "1": True, "false": False, "0": False}
        return words.get(stripped.lower(), _INVALID)
    raise TypeError(f"no environment syntax for the annotation {annotation!r}")


def _environment_syntax(annotation: str) -> str:
    return {
        "int": "a decimal integer",
        "float": "a number",
        "bool": "true, false, 1 or 0",
    }[annotation]


def _has_valid_port(parts: SplitResult) -> bool:
    """Return True if the port of a split URL is absent or a number 0 to 65535.

    Callers raise their ConfigError after this returns, outside the ``except`` block, so that
    the ValueError, whose text may quote part of the URL, is not chained to it.
    """
    try:
        parts.port  # noqa: B018 - the property raises ValueError on an invalid port
    except ValueError:
        return False
    return True


def _field_types(cls: type) -> dict[str, str]:
    """Map each field of a section dataclass to its annotation, as a string."""
    return {field.name: str(field.type) for field in dataclasses.fields(cls)}
