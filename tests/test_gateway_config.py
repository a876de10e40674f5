"""Tests for the gateway config (edge_runtime.gateway.config) and API keys (gateway.keys).

Every rejection must be a ConfigError whose message names the file and the full key, and no
message or repr may contain a raw API key or the Redis password.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.gateway import keys as keys_module
from edge_runtime.gateway.config import (
    ApiKeyEntry,
    DefencesConfig,
    GatewayConfig,
    LimitsConfig,
    RateLimit,
    RateLimitConfig,
    ServerConfig,
    TeacherConfig,
    load_gateway_config,
    mask_url_credentials,
)
from edge_runtime.gateway.keys import (
    ApiKeyRecord,
    ApiKeyStore,
    format_key_entry,
    generate_api_key,
    hash_api_key,
    parse_authorization,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = ROOT / "examples" / "gateway.toml"
EXAMPLE_KEY = "egw_example-key-for-local-testing-only"
TEST_KEY = "egw_test-key-one"
TEST_HASH = hash_api_key(TEST_KEY)
REDIS_PASSWORD = "hunter2-redis-secret"
TIERS = '[tiers.free]\nrate = 1.0\nburst = 5\n\n[tiers.standard]\nrate = 10.0\nburst = 20\n'
OPENAI_TEACHER = (
    '[teacher]\nbackend = "openai"\nbase_url = "http://127.0.0.1:8000/v1"\nmodel = "m"\n'
)


def write_config(folder: Path, text: str) -> Path:
    path = folder / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_text(folder: Path, text: str, environ: dict[str, str] | None = None) -> GatewayConfig:
    return load_gateway_config(write_config(folder, text), environ=environ or {})


def error_of(folder: Path, text: str, environ: dict[str, str] | None = None) -> str:
    """Load a config that must be rejected, and return the error message."""
    with pytest.raises(ConfigError) as caught:
        load_text(folder, text, environ)
    return str(caught.value)


def key_entry(id: str = "alice", hash: str = TEST_HASH, tenant: str = "acme",
              tier: str = "free") -> str:
    return (f'[[keys]]\nid = "{id}"\nhash = "{hash}"\ntenant = "{tenant}"\n'
            f'tier = "{tier}"\n')


# The example file and the defaults


def test_example_file_loads():
    config = load_gateway_config(EXAMPLE_CONFIG, environ={})

    assert config.source == str(EXAMPLE_CONFIG)
    assert config.teacher.backend == "onnx"
    assert config.rate_limit.backend == "memory"
    assert dict(config.tiers) == {"free": RateLimit(1.0, 5), "standard": RateLimit(10.0, 20)}
    assert len(config.keys) == 1
    assert config.keys[0].id == "example-local"
    assert config.keys[0].tier == "free"
    assert config.auth_required is True


def test_example_documents_defaults():
    config = load_gateway_config(EXAMPLE_CONFIG, environ={})

    assert config.server == ServerConfig()
    assert config.teacher == TeacherConfig()
    assert config.limits == LimitsConfig()
    assert config.rate_limit == RateLimitConfig()
    assert config.defences == DefencesConfig()


def test_example_key_matches_entry():
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    config = load_gateway_config(EXAMPLE_CONFIG, environ={})

    assert f"#   {EXAMPLE_KEY}\n" in text
    assert config.keys[0].hash == hash_api_key(EXAMPLE_KEY)
    record = ApiKeyStore.from_config(config).lookup(EXAMPLE_KEY)
    assert record == ApiKeyRecord(id="example-local", tenant="example", tier="free")


def test_default_config():
    config = GatewayConfig.default()

    assert config.server == ServerConfig()
    assert config.server.port == 8080
    assert config.server.log_format == "json"
    assert config.teacher.backend == "onnx"
    assert config.teacher.package == "models/clinc150-teacher.edgepkg"
    assert config.teacher.signer_keys == ("models/keys/demo-signer.pub.pem",)
    assert config.teacher.allow_unsigned is False
    assert config.limits.max_body_bytes == 65536
    assert config.rate_limit.backend == "memory"
    assert config.rate_limit.on_backend_error == "closed"
    assert config.rate_limit.per_address == RateLimit(rate=20.0, burst=40)
    assert list(config.tiers) == ["default"]
    assert config.keys == ()
    assert config.auth_required is False


def test_empty_file_gives_defaults(tmp_path: Path):
    config = load_text(tmp_path, "")
    default = GatewayConfig.default()

    assert config.server == default.server
    assert config.teacher == default.teacher
    assert config.limits == default.limits
    assert config.rate_limit == default.rate_limit
    assert dict(config.tiers) == dict(default.tiers)
    assert config.keys == ()


def test_config_is_read_only(tmp_path: Path):
    config = load_text(tmp_path, TIERS)

    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.tiers["gold"] = RateLimit(1.0, 1)  # type: ignore[index]


def test_integer_accepted_for_number(tmp_path: Path):
    config = load_text(tmp_path, OPENAI_TEACHER + "connect_timeout = 3\n")

    assert config.teacher.connect_timeout == 3.0
    assert type(config.teacher.connect_timeout) is float


# Reading the file


def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_gateway_config(tmp_path / "absent.toml", environ={})


def test_folder_instead_of_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_gateway_config(tmp_path, environ={})


def test_invalid_toml(tmp_path: Path):
    message = error_of(tmp_path, "[server\nport = 1\n")

    assert "invalid TOML" in message
    assert "gateway.toml" in message


def test_non_utf8_file(tmp_path: Path):
    path = tmp_path / "gateway.toml"
    path.write_bytes(b'[server]\nhost = "\xff"\n')

    with pytest.raises(ConfigError, match="not UTF-8"):
        load_gateway_config(path, environ={})


# [server]


@pytest.mark.parametrize(("line", "key", "shown"), [
    ('port = "8080"', "server.port", "'8080'"),
    ("port = 70000", "server.port", "70000"),
    ("port = -1", "server.port", "-1"),
    ("port = true", "server.port", "True"),
    ("threads = 0", "server.threads", "0"),
    ("threads = 1.5", "server.threads", "1.5"),
    ('host = ""', "server.host", "''"),
    ('host = "local host"', "server.host", "'local host'"),
    ("host = 5", "server.host", "5"),
    ('log_format = "xml"', "server.log_format", "'xml'"),
    ('request_id_header = "X Request Id"', "server.request_id_header", "'X Request Id'"),
])
def test_server_invalid_value(tmp_path: Path, line: str, key: str, shown: str):
    message = error_of(tmp_path, f"[server]\n{line}\n")

    assert str(tmp_path / "gateway.toml") in message
    assert f"key {key!r} is {shown};" in message
    assert "expected" in message


def test_server_port_zero_allowed(tmp_path: Path):
    config = load_text(tmp_path, "[server]\nport = 0\n")

    assert config.server.port == 0


def test_unknown_key_lists_allowed(tmp_path: Path):
    message = error_of(tmp_path, "[server]\nprot = 9000\n")

    assert "unknown key 'server.prot'" in message
    assert "host, port, threads, log_format, request_id_header" in message


def test_unknown_section(tmp_path: Path):
    message = error_of(tmp_path, "[sever]\nport = 9000\n")

    assert "unknown section 'sever'" in message
    assert "server, teacher, limits, rate_limit, defences, tiers, keys" in message


def test_section_not_table(tmp_path: Path):
    message = error_of(tmp_path, "server = 5\n")

    assert "[server] is 5; expected a table" in message


# [teacher]


def test_teacher_unknown_backend(tmp_path: Path):
    message = error_of(tmp_path, '[teacher]\nbackend = "torch"\n')

    assert "key 'teacher.backend' is 'torch'; expected 'onnx' or 'openai'" in message


def test_openai_teacher_loads(tmp_path: Path):
    text = (OPENAI_TEACHER + 'api_key_env = "TEACHER_KEY"\nread_timeout = 5.5\n'
            'labels_from = "models/clinc150-teacher.edgepkg"\nsystem_prompt = "Classify."\n')

    teacher = load_text(tmp_path, text).teacher

    assert teacher.backend == "openai"
    assert teacher.base_url == "http://127.0.0.1:8000/v1"
    assert teacher.model == "m"
    assert teacher.api_key_env == "TEACHER_KEY"
    assert teacher.read_timeout == 5.5
    assert teacher.connect_timeout == 2.0
    assert teacher.labels_from == "models/clinc150-teacher.edgepkg"
    assert teacher.system_prompt == "Classify."


def test_onnx_rejects_openai_key(tmp_path: Path):
    message = error_of(tmp_path, '[teacher]\nbase_url = "http://127.0.0.1:8000/v1"\n')

    assert "key 'teacher.base_url' applies only to backend 'openai'" in message
    assert "teacher.backend is 'onnx'" in message


def test_openai_rejects_package(tmp_path: Path):
    message = error_of(tmp_path, OPENAI_TEACHER + 'package = "teacher.edgepkg"\n')

    assert "key 'teacher.package' applies only to backend 'onnx'" in message


@pytest.mark.parametrize("missing", ["base_url", "model"])
def test_openai_requires_key(tmp_path: Path, missing: str):
    lines = ['[teacher]', 'backend = "openai"', 'base_url = "http://127.0.0.1:8000/v1"',
             'model = "m"']
    text = "\n".join(line for line in lines if not line.startswith(missing)) + "\n"

    message = error_of(tmp_path, text)

    assert f"key 'teacher.{missing}' is missing" in message


@pytest.mark.parametrize("url", [
    "ftp://example.com/v1", "127.0.0.1:8000/v1", "http://", "http://host:99999/v1",
    "http://host/v1?x=1",
])
def test_openai_invalid_base_url(tmp_path: Path, url: str):
    text = f'[teacher]\nbackend = "openai"\nbase_url = "{url}"\nmodel = "m"\n'

    message = error_of(tmp_path, text)

    assert f"key 'teacher.base_url' is {url!r}" in message


def test_openai_base_url_credentials_masked(tmp_path: Path):
    text = ('[teacher]\nbackend = "openai"\nbase_url = "https://user:sk-upstream@api.test/v1"\n'
            'model = "m"\n')

    message = error_of(tmp_path, text)

    assert "key 'teacher.base_url' contains a user name or password" in message
    assert "https://***@api.test/v1" in message
    assert "sk-upstream" not in message


def test_api_key_env_value_not_shown(tmp_path: Path):
    message = error_of(tmp_path, OPENAI_TEACHER + 'api_key_env = "sk-live-0123456789"\n')

    assert "key 'teacher.api_key_env' invalid" in message
    assert "not the key itself" in message
    assert "sk-live" not in message


@pytest.mark.parametrize(("line", "key"), [
    ("connect_timeout = 0", "teacher.connect_timeout"),
    ("connect_timeout = -1.0", "teacher.connect_timeout"),
    ("read_timeout = 4000", "teacher.read_timeout"),
    ("read_timeout = nan", "teacher.read_timeout"),
    ('read_timeout = "20"', "teacher.read_timeout"),
    ('labels_from = ""', "teacher.labels_from"),
    ('system_prompt = "   "', "teacher.system_prompt"),
])
def test_openai_invalid_value(tmp_path: Path, line: str, key: str):
    message = error_of(tmp_path, OPENAI_TEACHER + line + "\n")

    assert f"key {key!r} is" in message
    assert "expected" in message


def test_openai_empty_model(tmp_path: Path):
    text = OPENAI_TEACHER.replace('model = "m"', 'model = " "')

    message = error_of(tmp_path, text)

    assert "key 'teacher.model' is ' '; expected a non-empty model name" in message


def test_signer_keys_not_list(tmp_path: Path):
    message = error_of(tmp_path, '[teacher]\nsigner_keys = "signer.pub.pem"\n')

    assert "key 'teacher.signer_keys' is 'signer.pub.pem'; expected a list of strings" in message


def test_signer_keys_empty_needs_allow_unsigned(tmp_path: Path):
    message = error_of(tmp_path, "[teacher]\nsigner_keys = []\n")
    config = load_text(tmp_path, "[teacher]\nsigner_keys = []\nallow_unsigned = true\n")

    assert "key 'teacher.signer_keys' is []" in message
    assert "allow_unsigned" in message
    assert config.teacher.signer_keys == ()
    assert config.teacher.allow_unsigned is True


def test_openai_without_labels_needs_no_signer(tmp_path: Path):
    config = load_text(tmp_path, OPENAI_TEACHER + "signer_keys = []\n")

    assert config.teacher.signer_keys == ()


def test_read_api_key():
    teacher = TeacherConfig(backend="openai", api_key_env="TEACHER_KEY")

    assert teacher.read_api_key({"TEACHER_KEY": "sk-value"}) == "sk-value"
    assert TeacherConfig().read_api_key({"TEACHER_KEY": "sk-value"}) is None
    with pytest.raises(ConfigError, match="TEACHER_KEY, which is not set"):
        teacher.read_api_key({})
    with pytest.raises(ConfigError, match="TEACHER_KEY, which is not set or empty"):
        teacher.read_api_key({"TEACHER_KEY": ""})


# [limits]


@pytest.mark.parametrize("name", [
    "max_body_bytes", "max_text_chars", "max_tools", "max_tool_bytes", "max_output_chars",
    "max_list_items",
])
def test_limits_out_of_range(tmp_path: Path, name: str):
    zero = error_of(tmp_path, f"[limits]\n{name} = 0\n")
    text = error_of(tmp_path, f'[limits]\n{name} = "10"\n')

    assert f"key 'limits.{name}' is 0; expected an integer of at least 1" in zero
    assert f"key 'limits.{name}' is '10'; expected an integer" in text


def test_limits_values(tmp_path: Path):
    config = load_text(tmp_path, "[limits]\nmax_body_bytes = 1024\nmax_tools = 1\n")

    assert config.limits.max_body_bytes == 1024
    assert config.limits.max_tools == 1
    assert config.limits.max_text_chars == 2000


# [rate_limit]


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "redis://:pw@cache.internal", "rediss://user:pw@cache:6380/2",
    "unix:///run/redis.sock",
])
def test_redis_backend_loads(tmp_path: Path, url: str):
    config = load_text(tmp_path, f'[rate_limit]\nbackend = "redis"\nredis_url = "{url}"\n')

    assert config.rate_limit.backend == "redis"
    assert config.rate_limit.redis_url == url


def test_redis_backend_without_url(tmp_path: Path):
    message = error_of(tmp_path, '[rate_limit]\nbackend = "redis"\n')

    assert "key 'rate_limit.redis_url' is missing" in message
    assert "backend 'redis'" in message


def test_memory_backend_rejects_redis_url(tmp_path: Path):
    text = f'[rate_limit]\nredis_url = "redis://:{REDIS_PASSWORD}@cache:6379/0"\n'

    message = error_of(tmp_path, text)

    assert "key 'rate_limit.redis_url' applies only to backend 'redis'" in message
    assert REDIS_PASSWORD not in message


@pytest.mark.parametrize(("line", "key", "shown"), [
    ('backend = "postgres"', "rate_limit.backend", "'postgres'"),
    ('on_backend_error = "maybe"', "rate_limit.on_backend_error", "'maybe'"),
    ("per_address = 5", "rate_limit.per_address", "5"),
    ("per_address = { rate = 0, burst = 4 }", "rate_limit.per_address.rate", "0.0"),
    ("per_address = { rate = 1, burst = 0 }", "rate_limit.per_address.burst", "0"),
    ('per_address = { rate = 1, burst = "4" }', "rate_limit.per_address.burst", "'4'"),
])
def test_rate_limit_invalid_value(tmp_path: Path, line: str, key: str, shown: str):
    message = error_of(tmp_path, f"[rate_limit]\n{line}\n")

    assert f"key {key!r} is {shown};" in message


def test_per_address_missing_burst(tmp_path: Path):
    message = error_of(tmp_path, "[rate_limit]\nper_address = { rate = 1.0 }\n")

    assert "key 'rate_limit.per_address.burst' is missing" in message


def test_per_address_unknown_key(tmp_path: Path):
    message = error_of(tmp_path, "[rate_limit]\nper_address = { rate = 1, burst = 2, max = 3 }\n")

    assert "unknown key 'rate_limit.per_address.max'" in message
    assert "allowed keys: rate, burst" in message


@pytest.mark.parametrize("url", [
    f"http://:{REDIS_PASSWORD}@cache:6379/0",
    f"redis://:{REDIS_PASSWORD}@cache:99999/0",
    f"redis://:{REDIS_PASSWORD}@cache:port/0",
    f"redis://user:{REDIS_PASSWORD}@cache:6379/zero",
    f"redis://:{REDIS_PASSWORD}@",
    f"redis://:{REDIS_PASSWORD}/slash@cache:6379/x",
    f"redis://cache:6379/x?password={REDIS_PASSWORD}",
])
def test_redis_password_never_shown(tmp_path: Path, url: str):
    text = f'[rate_limit]\nbackend = "redis"\nredis_url = "{url}"\n'
    environ = {"EDGE_GATEWAY__RATE_LIMIT__BACKEND": "redis",
               "EDGE_GATEWAY__RATE_LIMIT__REDIS_URL": url}

    with pytest.raises(ConfigError) as from_file:
        load_text(tmp_path, text)
    with pytest.raises(ConfigError) as from_environment:
        load_text(tmp_path, "", environ)

    for caught in (from_file, from_environment):
        message = str(caught.value)
        assert "key 'rate_limit.redis_url'" in message
        assert "***" in message
        assert REDIS_PASSWORD not in message
        assert caught.value.__context__ is None
        assert caught.value.__cause__ is None


def test_redis_url_wrong_type_not_shown(tmp_path: Path):
    text = f'[rate_limit]\nbackend = "redis"\nredis_url = ["redis://:{REDIS_PASSWORD}@c"]\n'

    message = error_of(tmp_path, text)

    assert "key 'rate_limit.redis_url' invalid" in message
    assert REDIS_PASSWORD not in message


def test_mask_url_credentials():
    assert mask_url_credentials("redis://:pw@cache:6379/0") == "redis://***@cache:6379/0"
    assert mask_url_credentials("redis://user:pw@cache") == "redis://***@cache"
    assert mask_url_credentials("redis://cache:6379/0") == "redis://cache:6379/0"
    assert mask_url_credentials("redis://c/0?password=pw&db=1") == "redis://c/0?password=***&db=1"
    assert mask_url_credentials("user:pw@cache") == "***@cache"


# [tiers]


def test_tiers_loaded(tmp_path: Path):
    config = load_text(tmp_path, TIERS)

    assert list(config.tiers) == ["free", "standard"]
    assert config.tiers["free"] == RateLimit(rate=1.0, burst=5)
    assert config.tiers["standard"].rate == 10.0


def test_tiers_empty_table(tmp_path: Path):
    message = error_of(tmp_path, "[tiers]\n")

    assert "[tiers] defines no tier" in message


@pytest.mark.parametrize(("text", "fragment"), [
    ("tiers = 5\n", "'tiers' is 5"),
    ('[tiers."two words"]\nrate = 1\nburst = 1\n', "invalid tier name 'two words'"),
    ("[tiers.free]\nrate = -1\nburst = 1\n", "key 'tiers.free.rate' is -1.0"),
    ("[tiers.free]\nrate = inf\nburst = 1\n", "key 'tiers.free.rate' is inf"),
    ("[tiers.free]\nrate = 1\nburst = 0\n", "key 'tiers.free.burst' is 0"),
    ("[tiers.free]\nrate = 1\nburst = 1.5\n", "key 'tiers.free.burst' is 1.5"),
    ("[tiers.free]\nrate = 1\n", "key 'tiers.free.burst' is missing"),
    ("[tiers.free]\nrat = 1\nrate = 1\nburst = 1\n", "unknown key 'tiers.free.rat'"),
])
def test_tiers_invalid(tmp_path: Path, text: str, fragment: str):
    message = error_of(tmp_path, text)

    assert fragment in message


# [[keys]]


def test_keys_loaded(tmp_path: Path):
    text = TIERS + key_entry() + key_entry(id="bob", hash=hash_api_key("k2"), tier="standard")

    config = load_text(tmp_path, text)

    assert config.keys == (
        ApiKeyEntry(id="alice", hash=TEST_HASH, tenant="acme", tier="free"),
        ApiKeyEntry(id="bob", hash=hash_api_key("k2"), tenant="acme", tier="standard"),
    )
    assert config.auth_required is True


def test_key_unknown_tier(tmp_path: Path):
    message = error_of(tmp_path, TIERS + key_entry(tier="gold"))

    assert "key 'keys[0].tier' (id 'alice') is 'gold'" in message
    assert "'free', 'standard'" in message


def test_key_without_tiers_uses_default_tier(tmp_path: Path):
    config = load_text(tmp_path, key_entry(tier="default"))
    message = error_of(tmp_path, key_entry(tier="free"))

    assert config.keys[0].tier == "default"
    assert "key 'keys[0].tier' (id 'alice') is 'free'" in message


@pytest.mark.parametrize("bad_hash", [
    "sha256:" + "ab" * 31,
    "md5:" + "ab" * 32,
    "ab" * 32,
    "sha256:" + "zz" * 32,
    TEST_KEY,
])
def test_key_bad_hash_format(tmp_path: Path, bad_hash: str):
    message = error_of(tmp_path, TIERS + key_entry(hash=bad_hash))

    assert "key 'keys[0].hash' (id 'alice') invalid" in message
    assert "'sha256:' followed by 64 hex digits" in message
    assert bad_hash not in message


def test_key_hash_uppercase_normalized(tmp_path: Path):
    config = load_text(tmp_path, TIERS + key_entry(hash=TEST_HASH.upper().replace("SHA", "sha")))

    assert config.keys[0].hash == TEST_HASH


@pytest.mark.parametrize(("text", "fragment"), [
    ('[[keys]]\nid = "alice"\nhash = "' + TEST_HASH + '"\ntier = "free"\n',
     "key 'keys[0].tenant' (id 'alice') is missing"),
    ('[[keys]]\nhash = "' + TEST_HASH + '"\ntenant = "a"\ntier = "free"\n',
     "key 'keys[0].id' is missing"),
    (key_entry(id="has space"), "key 'keys[0].id' is 'has space'"),
    (key_entry(tenant=""), "key 'keys[0].tenant' (id 'alice') is ''"),
    (key_entry() + 'secret = "x"\n', "unknown key 'keys[0].secret'"),
    ('[keys]\nid = "alice"\n', "'keys' is a dict; expected an array of tables"),
    (key_entry() + key_entry(hash=hash_api_key("other")), "key 'keys[1].id' is 'alice'"),
    (key_entry() + key_entry(id="bob"), "entries 'alice' and 'bob' have the same hash"),
])
def test_key_entry_invalid(tmp_path: Path, text: str, fragment: str):
    message = error_of(tmp_path, TIERS + text)

    assert fragment in message


def test_key_entry_unknown_lists_fields(tmp_path: Path):
    message = error_of(tmp_path, TIERS + key_entry() + 'key = "egw_raw"\n')

    assert "allowed keys: id, hash, tenant, tier" in message


# Environment overrides


def test_env_overrides_convert_types(tmp_path: Path):
    environ = {
        "EDGE_GATEWAY__SERVER__PORT": "9000",
        "EDGE_GATEWAY__SERVER__LOG_FORMAT": "text",
        "EDGE_GATEWAY__TEACHER__ALLOW_UNSIGNED": "TRUE",
        "EDGE_GATEWAY__LIMITS__MAX_TOOLS": " 4 ",
        "EDGE_GATEWAY__RATE_LIMIT__ON_BACKEND_ERROR": "open",
    }

    config = load_text(tmp_path, "[server]\nport = 8081\n", environ)

    assert config.server.port == 9000
    assert config.server.log_format == "text"
    assert config.teacher.allow_unsigned is True
    assert config.limits.max_tools == 4
    assert config.rate_limit.on_backend_error == "open"


def test_env_overrides_number_and_optional(tmp_path: Path):
    environ = {
        "EDGE_GATEWAY__TEACHER__READ_TIMEOUT": "7.5",
        "EDGE_GATEWAY__TEACHER__CONNECT_TIMEOUT": "1",
        "EDGE_GATEWAY__TEACHER__SYSTEM_PROMPT": "",
    }
    text = OPENAI_TEACHER + 'system_prompt = "Classify."\n'

    teacher = load_text(tmp_path, text, environ).teacher

    assert teacher.read_timeout == 7.5
    assert teacher.connect_timeout == 1.0
    assert type(teacher.connect_timeout) is float
    assert teacher.system_prompt is None


def test_env_redis_url(tmp_path: Path):
    url = f"redis://:{REDIS_PASSWORD}@cache:6379/0"
    environ = {"EDGE_GATEWAY__RATE_LIMIT__BACKEND": "redis",
               "EDGE_GATEWAY__RATE_LIMIT__REDIS_URL": url}

    config = load_text(tmp_path, "", environ)

    assert config.rate_limit.backend == "redis"
    assert config.rate_limit.redis_url == url


def test_env_empty_unsets_redis_url(tmp_path: Path):
    text = '[rate_limit]\nbackend = "redis"\nredis_url = "redis://cache:6379/0"\n'
    environ = {"EDGE_GATEWAY__RATE_LIMIT__REDIS_URL": ""}

    message = error_of(tmp_path, text, environ)

    assert ("key 'rate_limit.redis_url' from environment variable "
            "EDGE_GATEWAY__RATE_LIMIT__REDIS_URL is missing") in message


def test_env_name_case_insensitive(tmp_path: Path):
    config = load_text(tmp_path, "", {"EDGE_GATEWAY__server__port": "9001"})

    assert config.server.port == 9001


def test_env_unrelated_variables_ignored(tmp_path: Path):
    environ = {"EDGE_GATEWAY_PORT": "x", "EDGE_RUNTIME_SIGNER_KEY": "y", "PATH": "/bin"}

    config = load_text(tmp_path, "", environ)

    assert config.server.port == 8080


def test_env_read_from_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EDGE_GATEWAY__SERVER__THREADS", "3")

    config = load_gateway_config(write_config(tmp_path, ""))

    assert config.server.threads == 3


@pytest.mark.parametrize(("variable", "value", "fragments"), [
    ("EDGE_GATEWAY__SERVER__PORT", "abc",
     ["EDGE_GATEWAY__SERVER__PORT is 'abc'", "a decimal integer", "'server.port'"]),
    ("EDGE_GATEWAY__SERVER__PORT", "9000.0", ["EDGE_GATEWAY__SERVER__PORT is '9000.0'"]),
    ("EDGE_GATEWAY__SERVER__PORT", "70000",
     ["key 'server.port' from environment variable EDGE_GATEWAY__SERVER__PORT is 70000"]),
    ("EDGE_GATEWAY__TEACHER__ALLOW_UNSIGNED", "maybe",
     ["EDGE_GATEWAY__TEACHER__ALLOW_UNSIGNED is 'maybe'", "true, false, 1 or 0"]),
    ("EDGE_GATEWAY__TEACHER__BASE_URL", "http://127.0.0.1:8000/v1",
     ["key 'teacher.base_url' from environment variable EDGE_GATEWAY__TEACHER__BASE_URL "
      "applies only to backend 'openai'"]),
    ("EDGE_GATEWAY__SERVER__PROT", "9000",
     ["EDGE_GATEWAY__SERVER__PROT names the unknown key 'server.prot'", "host, port"]),
    ("EDGE_GATEWAY__SEVER__PORT", "9000", ["EDGE_GATEWAY__SEVER__PORT names the section"]),
    ("EDGE_GATEWAY__TIERS__FREE", "1", ["set in the file only"]),
    ("EDGE_GATEWAY__TEACHER__SIGNER_KEYS", "a.pem",
     ["cannot set 'teacher.signer_keys'", "a list of strings"]),
    ("EDGE_GATEWAY__RATE_LIMIT__PER_ADDRESS", "5", ["cannot set 'rate_limit.per_address'"]),
    ("EDGE_GATEWAY__PORT", "9000", ["does not have the form EDGE_GATEWAY__SECTION__KEY"]),
    ("EDGE_GATEWAY__SERVER__PORT__X", "9000", ["does not have the form"]),
])
def test_env_invalid_names_variable(tmp_path: Path, variable: str, value: str,
                                    fragments: list[str]):
    message = error_of(tmp_path, "", {variable: value})

    assert str(tmp_path / "gateway.toml") in message
    for fragment in fragments:
        assert fragment in message


# API keys


def test_generate_api_key_format():
    generated = [generate_api_key() for _ in range(100)]

    assert len(set(generated)) == 100
    for key in generated:
        assert re.fullmatch(r"egw_[A-Za-z0-9_-]{43}", key)


def test_hash_api_key_format():
    assert hash_api_key("abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert hash_api_key(TEST_KEY) == "sha256:" + hashlib.sha256(TEST_KEY.encode()).hexdigest()


def test_store_lookup_round_trip():
    generated = [generate_api_key() for _ in range(3)]
    entries = [ApiKeyEntry(id=f"client-{index}", hash=hash_api_key(key), tenant=f"t{index}",
                           tier="free") for index, key in enumerate(generated)]
    store = ApiKeyStore(entries)

    assert len(store) == 3
    for index, key in enumerate(generated):
        assert store.lookup(key) == ApiKeyRecord(id=f"client-{index}", tenant=f"t{index}",
                                                 tier="free")


@pytest.mark.parametrize("presented", [
    "egw_unknown", "", TEST_KEY + " ", TEST_KEY[:-1], TEST_HASH, "egw_\ud800", "ключ",
])
def test_store_unknown_key(presented: str):
    store = ApiKeyStore([ApiKeyEntry(id="alice", hash=TEST_HASH, tenant="acme", tier="free")])

    assert store.lookup(presented) is None


def test_store_compares_every_hash(monkeypatch: pytest.MonkeyPatch):
    generated = [generate_api_key() for _ in range(5)]
    store = ApiKeyStore([ApiKeyEntry(id=f"k{index}", hash=hash_api_key(key), tenant="t",
                                     tier="free") for index, key in enumerate(generated)])
    calls: list[tuple[bytes, bytes]] = []
    compare = keys_module.hmac.compare_digest

    def counting_compare(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting_compare)

    for presented in (generated[0], generated[-1], "egw_unknown"):
        calls.clear()
        store.lookup(presented)
        assert len(calls) == 5
        assert all(isinstance(a, bytes) and len(a) == 32 for a, _ in calls)
        assert all(b == hashlib.sha256(presented.encode()).digest() for _, b in calls)


def test_store_rejects_malformed_hash():
    entry = ApiKeyEntry(id="alice", hash="sha256:xyz", tenant="acme", tier="free")

    with pytest.raises(ConfigError, match="API key 'alice'"):
        ApiKeyStore([entry])


def test_repr_hides_secrets(tmp_path: Path):
    key = generate_api_key()
    url = f"redis://:{REDIS_PASSWORD}@cache:6379/0"
    text = (TIERS + key_entry(hash=hash_api_key(key))
            + f'[rate_limit]\nbackend = "redis"\nredis_url = "{url}"\n')
    config = load_text(tmp_path, text)
    store = ApiKeyStore.from_config(config)
    record = store.lookup(key)

    assert config.rate_limit.redis_url == url
    for shown in (repr(config), str(config), repr(config.rate_limit), repr(store), repr(record)):
        assert key not in shown
        assert REDIS_PASSWORD not in shown
    assert "redis://***@cache:6379/0" in repr(config)
    assert repr(record) == "ApiKeyRecord(id='alice', tenant='acme', tier='free')"


@pytest.mark.parametrize(("header", "expected"), [
    ("Bearer abc123", "abc123"),
    ("bearer abc123", "abc123"),
    ("BEARER abc123", "abc123"),
    ("  Bearer   egw_a-b_c.d~e+f/g==  ", "egw_a-b_c.d~e+f/g=="),
    ("Bearer", None),
    ("Bearer ", None),
    ("Bearer    ", None),
    ("Basic dXNlcjpwYXNz", None),
    ("Token abc123", None),
    ("Bearerabc123", None),
    ("Bearer abc 123", None),
    ("Bearer abc,123", None),
    ("Bearer =abc", None),
    ("", None),
    (None, None),
])
def test_parse_authorization(header: str | None, expected: str | None):
    assert parse_authorization(header) == expected


def test_format_key_entry_escapes():
    entry = ApiKeyEntry(id="alice", hash=TEST_HASH, tenant='Acme "North" \\ Co', tier="free")

    parsed = tomllib.loads(format_key_entry(entry))

    assert parsed == {"keys": [{"id": "alice", "hash": TEST_HASH,
                                "tenant": 'Acme "North" \\ Co', "tier": "free"}]}


# python -m edge_runtime.gateway.keys


def test_keys_command_prints_loadable_entry(tmp_path: Path):
    environ = {name: value for name, value in os.environ.items()
               if not name.upper().startswith("EDGE_GATEWAY__")}
    result = subprocess.run(
        [sys.executable, "-m", "edge_runtime.gateway.keys", "create", "--id", "ci-client",
         "--tenant", "acme", "--tier", "standard"],
        capture_output=True, text=True, cwd=ROOT, env=environ, timeout=120,
    )

    assert result.returncode == 0, result.stderr
    keys_printed = re.findall(r"^egw_[A-Za-z0-9_-]{43}$", result.stdout, flags=re.MULTILINE)
    assert len(keys_printed) == 1
    key = keys_printed[0]
    assert result.stdout.count(key) == 1
    assert "shown only once" in result.stdout
    block = result.stdout[result.stdout.index("[[keys]]"):]
    assert key not in block
    assert tomllib.loads(block)["keys"][0]["hash"] == hash_api_key(key)

    config = load_text(tmp_path, TIERS + block)
    record = ApiKeyStore.from_config(config).lookup(key)
    assert record == ApiKeyRecord(id="ci-client", tenant="acme", tier="standard")


@pytest.mark.parametrize(("arguments", "fragment"), [
    (["--id", "two words", "--tenant", "acme", "--tier", "free"], "invalid --id 'two words'"),
    (["--id", "ok", "--tenant", "", "--tier", "free"], "invalid --tenant ''"),
    (["--id", "ok", "--tenant", "acme", "--tier", "free tier"], "invalid --tier"),
    (["--id", "ok", "--tenant", "acme", "--tier", "gold", "--config", str(EXAMPLE_CONFIG)],
     "tier 'gold' is not defined"),
    (["--id", "example-local", "--tenant", "acme", "--tier", "free", "--config",
      str(EXAMPLE_CONFIG)], "already has a key with id 'example-local'"),
])
def test_keys_command_rejects(capsys: pytest.CaptureFixture[str], arguments: list[str],
                              fragment: str):
    code = keys_module.main(["create", *arguments])
    output = capsys.readouterr()

    assert code == 2
    assert fragment in output.err
    assert output.out == ""


def test_keys_command_checks_config(capsys: pytest.CaptureFixture[str]):
    code = keys_module.main(["create", "--id", "bob", "--tenant", "acme", "--tier", "standard",
                             "--config", str(EXAMPLE_CONFIG)])
    output = capsys.readouterr()

    assert code == 0
    assert 'tier = "standard"' in output.out


def test_defences_monitor_needs_reference_data(tmp_path: Path):
    message = error_of(tmp_path, "[defences]\nenabled = true\n")

    assert "defences.reference_data" in message
    assert "training data" in message


def test_defences_secret_env_must_be_a_variable_name(tmp_path: Path):
    message = error_of(tmp_path, '[defences]\nsecret_env = "not a name"\n')

    assert "defences.secret_env" in message


def test_degrade_limit_defaults(tmp_path: Path):
    defences = load_text(tmp_path, "").defences

    assert defences == DefencesConfig()
    assert defences.degrade_rate == 1.0
    assert defences.degrade_burst == 5
    assert defences.degrade_block_after == 600


def test_degrade_limit_loaded(tmp_path: Path):
    text = "[defences]\ndegrade_rate = 2\ndegrade_burst = 1\ndegrade_block_after = 0\n"

    defences = load_text(tmp_path, text).defences

    assert defences.degrade_rate == 2.0
    assert type(defences.degrade_rate) is float
    assert defences.degrade_burst == 1
    assert defences.degrade_block_after == 0


@pytest.mark.parametrize(("line", "key", "shown"), [
    ("degrade_rate = 0", "defences.degrade_rate", "is 0.0"),
    ("degrade_rate = -1.5", "defences.degrade_rate", "is -1.5"),
    ("degrade_rate = inf", "defences.degrade_rate", "is inf"),
    ('degrade_rate = "fast"', "defences.degrade_rate", "is 'fast'"),
    ("degrade_burst = 0", "defences.degrade_burst", "is 0"),
    ("degrade_burst = 2.5", "defences.degrade_burst", "is 2.5"),
    ("degrade_block_after = -1", "defences.degrade_block_after", "is -1"),
    ("degrade_block_after = true", "defences.degrade_block_after", "is True"),
])
def test_degrade_limit_invalid_value(tmp_path: Path, line: str, key: str, shown: str):
    message = error_of(tmp_path, f"[defences]\n{line}\n")

    assert f"key {key!r} {shown}; expected" in message
    assert str(tmp_path / "gateway.toml") in message


def test_degrade_block_needs_burst_of_two(tmp_path: Path):
    message = error_of(tmp_path, "[defences]\ndegrade_burst = 1\ndegrade_block_after = 10\n")

    assert "key 'defences.degrade_burst' is 1; expected at least 2" in message
    assert "degrade_block_after = 0" in message


def test_degrade_limit_from_environment(tmp_path: Path):
    environ = {"EDGE_GATEWAY__DEFENCES__DEGRADE_RATE": "0.25",
               "EDGE_GATEWAY__DEFENCES__DEGRADE_BURST": "3",
               "EDGE_GATEWAY__DEFENCES__DEGRADE_BLOCK_AFTER": "100"}

    defences = load_text(tmp_path, "[defences]\ndegrade_rate = 4.0\n", environ).defences

    assert defences.degrade_rate == 0.25
    assert defences.degrade_burst == 3
    assert defences.degrade_block_after == 100


@pytest.mark.parametrize(("value", "fragment"), [
    ("quick", "EDGE_GATEWAY__DEFENCES__DEGRADE_RATE is 'quick'; expected a number"),
    ("0", "key 'defences.degrade_rate' from environment variable "
          "EDGE_GATEWAY__DEFENCES__DEGRADE_RATE is 0.0"),
])
def test_degrade_rate_environment_invalid(tmp_path: Path, value: str, fragment: str):
    message = error_of(tmp_path, "", {"EDGE_GATEWAY__DEFENCES__DEGRADE_RATE": value})

    assert fragment in message
