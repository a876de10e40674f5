"""The teacher gateway as a service: child processes on loopback, each started from a TOML
config written by the test, driven by a real HTTP client.

Covers API keys and request ids, rate limits in memory and in a Redis server shared by two
gateway processes, hostile input, an OpenAI-compatible teacher (the fake server of
``edge_runtime.gateway.fake_openai``) and the Prometheus metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.gateway.app import TERMS_NOTICE
from edge_runtime.gateway.fake_openai import FakeOpenAIServer, running_fake_openai
from edge_runtime.gateway.keys import generate_api_key, hash_api_key
from edge_runtime.gateway.observability import DEFENCES, LATENCY_BUCKETS, METRICS_CONTENT_TYPE
from edge_runtime.gateway.server import (
    DEMO_SIGNER_SHA256,
    EXAMPLE_KEY_HASH,
    LISTENING_PATTERN,
    GatewayProcess,
    start_gateway,
)
from edge_runtime.package import inspect_package
from tests.conftest import CLINC150_DIR, ROOT, SIGNER_PUBLIC, free_loopback_port

pytestmark = pytest.mark.slow

PROBLEM_TYPE = "application/problem+json"
PROBLEM_FIELDS = {"type", "title", "status", "detail", "request_id"}
LABEL_ANSWER_FIELDS = {"label", "request_id", "model_version", "notice"}
FRESH_REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, the form of the gateway's ids
# Members of the RateLimit-Policy and RateLimit fields as the gateway writes them: the policy
# name as a string, then quota q and window w, or remaining r and seconds to reset t.
POLICY_MEMBER = re.compile(r'"([A-Za-z0-9._-]+)";q=(\d+);w=(\d+)')
LIMIT_MEMBER = re.compile(r'"([A-Za-z0-9._-]+)";r=(\d+);t=(\d+)')
STARTUP_TIMEOUT = 60.0  # seconds for a child started by launch_gateway to serve
# Seconds per request. A gateway that hangs fails the test with a timeout instead of
# blocking the run.
CLIENT_TIMEOUT = 10.0

# [limits] of the main gateway, small so that requests at each limit stay small.
MAX_BODY_BYTES = 16384
MAX_TEXT_CHARS = 500
MAX_TOOLS = 4
MAX_TOOL_BYTES = 1024

# A limit that no test here reaches, and its window burst / rate in seconds.
HIGH_LIMIT = {"rate": 10000.0, "burst": 100000}
HIGH_WINDOW = 10
# A tier that admits a burst of 3 and then one request per 1000 s, so nothing more within a
# test run.
SMALL_BURST = 3
SMALL_INTERVAL = 1000  # seconds per request, 1 / rate
SMALL_LIMIT = {"rate": 1 / SMALL_INTERVAL, "burst": SMALL_BURST}
SMALL_WINDOW = SMALL_BURST * SMALL_INTERVAL

# Two gateways share this key's limit through Redis: a burst of 15, then one request per 100 s.
REPLICA_BURST = 15
REPLICA_RATE = 0.01
REPLICA_REQUESTS = 480
REPLICA_CLIENT_THREADS = 24
REPLICA_REDIS_DB = 7  # a database of its own on the session's Redis, emptied before use

FAKE_MODEL = "fake-chat"
UPSTREAM_KEY_ENV = "EDGE_TEST_UPSTREAM_API_KEY"
UPSTREAM_KEY = f"sk-test-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ClientKey:
    """An API key for a gateway config: its public id, its tier and the raw key clients send."""

    id: str
    tier: str
    secret: str = field(default_factory=generate_api_key, repr=False)

    def entry(self) -> dict[str, str]:
        """Return the [[keys]] table of this key, which stores only its hash."""
        return {"id": self.id, "hash": hash_api_key(self.secret), "tenant": "tests",
                "tier": self.tier}

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


# Keys of the main gateway. Each test that exhausts a limit has keys of its own.
HIGH_KEY = ClientKey("high-client", "high")
LIMITED_KEY = ClientKey("limited-client", "small")
EXHAUSTED_KEY = ClientKey("exhausted-client", "small")
BYSTANDER_KEY = ClientKey("bystander-client", "small")
METRICS_KEY = ClientKey("metrics-client", "small")
MAIN_KEYS = (HIGH_KEY, LIMITED_KEY, EXHAUSTED_KEY, BYSTANDER_KEY, METRICS_KEY)

REPLICA_KEY = ClientKey("replica-client", "replicated")
OPENAI_KEY = ClientKey("openai-client", "high")


def toml_value(value: Any) -> str:
    """Format a boolean, number, ASCII string, list or dict as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string of ASCII text is also a TOML basic string.
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = ", ".join(f"{name} = {toml_value(item)}" for name, item in value.items())
        return "{ " + pairs + " }"
    raise TypeError(f"no TOML form for a {type(value).__name__}")


def write_config(path: Path, sections: dict[str, dict[str, Any]],
                 tiers: dict[str, dict[str, Any]], keys: tuple[ClientKey, ...]) -> Path:
    """Write a gateway config with the given sections, [tiers.NAME] tables and [[keys]]."""
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{name} = {toml_value(value)}" for name, value in table.items()]
    for tier, limit in tiers.items():
        lines.append(f"[tiers.{tier}]")
        lines += [f"{name} = {toml_value(value)}" for name, value in limit.items()]
    for key in keys:
        lines.append("[[keys]]")
        lines += [f"{name} = {toml_value(value)}" for name, value in key.entry().items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def onnx_teacher(package: Path) -> dict[str, Any]:
    return {"backend": "onnx", "package": str(package), "signer_keys": [str(SIGNER_PUBLIC)]}


def openai_teacher(base_url: str, **timeouts: float) -> dict[str, Any]:
    return {"backend": "openai", "base_url": base_url, "model": FAKE_MODEL,
            "api_key_env": UPSTREAM_KEY_ENV, "signer_keys": [str(SIGNER_PUBLIC)], **timeouts}


@dataclass
class LoggedGateway:
    """A gateway child whose stdout and stderr go to files next to its config."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def stop(self) -> str:
        """Terminate the child, wait for it to exit, and return its stderr log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def launch_gateway(config: Path, env: dict[str, str] | None = None) -> LoggedGateway:
    """Start ``edge-runtime gateway --config CONFIG`` on a free loopback port.

    Unlike ``start_gateway``, this waits only until /metrics responds, not for a healthy
    /healthz, so it can start gateways whose teacher or rate limiter is down. It also keeps
    the child's stderr log, which ``stop`` returns.
    """
    stdout_path = config.with_suffix(".stdout")
    log_path = config.with_suffix(".stderr")
    command = [sys.executable, "-m", "edge_runtime", "gateway", "--config", str(config),
               "--host", "127.0.0.1", "--port", "0"]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(stdout_path, "w") as stdout, open(log_path, "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=child_env)
    gateway = LoggedGateway(process, url="", log_path=log_path)

    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        match = LISTENING_PATTERN.search(stdout_path.read_text(encoding="utf-8"))
        if match is not None:
            gateway.url = match.group(1)
            break
        if process.poll() is not None or time.monotonic() > deadline:
            log = gateway.stop()
            pytest.fail(f"gateway for {config.name} did not listen within "
                        f"{STARTUP_TIMEOUT:.0f} s; stderr:\n{log[-3000:]}")
        time.sleep(0.05)

    while True:
        try:
            httpx.get(gateway.url + "/metrics", timeout=1.0)
            return gateway
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = gateway.stop()
                pytest.fail(f"gateway at {gateway.url} did not answer /metrics within "
                            f"{STARTUP_TIMEOUT:.0f} s; stderr:\n{log[-3000:]}")
            time.sleep(0.05)


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """Check that ``response`` is an RFC 9457 problem with ``status``, and return its body."""
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_TYPE
    body = response.json()
    assert set(body) == PROBLEM_FIELDS
    assert body["type"] == "about:blank"
    assert body["status"] == status
    return body


def parse_members(header: str, pattern: re.Pattern[str]) -> dict[str, tuple[int, int]]:
    """Parse a RateLimit-Policy or RateLimit field into {policy name: (number, number)}, in
    the order of the field."""
    members = {}
    for member in header.split(", "):
        match = pattern.fullmatch(member)
        assert match is not None, f"{member!r} in {header!r} does not match {pattern.pattern}"
        members[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    return members


def read_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the Prometheus text format into {(sample name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    """Return one sample's value, 0.0 for a labelled sample that was never counted."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def teacher_manifest(tiny_build) -> dict[str, Any]:
    return inspect_package(tiny_build.teacher_package)["manifest"]


@pytest.fixture(scope="module")
def model_version(teacher_manifest) -> str:
    return f"{teacher_manifest['name']}@{teacher_manifest['version']}"


@pytest.fixture(scope="module")
def main_gateway(tiny_build, tmp_path_factory) -> Iterator[GatewayProcess]:
    """A gateway with the memory rate limiter, small [limits], and a high and a small tier."""
    sections = {
        "teacher": onnx_teacher(tiny_build.teacher_package),
        "limits": {"max_body_bytes": MAX_BODY_BYTES, "max_text_chars": MAX_TEXT_CHARS,
                   "max_tools": MAX_TOOLS, "max_tool_bytes": MAX_TOOL_BYTES},
        "rate_limit": {"backend": "memory", "per_address": HIGH_LIMIT},
    }
    config = write_config(tmp_path_factory.mktemp("main-gateway") / "gateway.toml", sections,
                          {"high": HIGH_LIMIT, "small": SMALL_LIMIT}, MAIN_KEYS)
    gateway = start_gateway(None, config=config, rate_limit=True, port=0)
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def client(main_gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=main_gateway.url, timeout=CLIENT_TIMEOUT) as http:
        yield http


# API keys and request ids


def test_trailing_slash_404_with_request_id(client):
    response = client.post("/v1/predict/", json={"text": "set an alarm for 7 am"},
                           headers=HIGH_KEY.headers)
    body = assert_problem(response, 404)
    assert body["request_id"] == response.headers["x-request-id"]


def test_predict_without_key_401(client):
    response = client.post("/v1/predict", json={"text": "set an alarm for 7 am"})
    body = assert_problem(response, 401)
    assert body["title"] == "Unauthorized"
    assert body["detail"] == "Send an API key as 'Authorization: Bearer <key>'."
    assert response.headers["www-authenticate"] == 'Bearer realm="edge-gateway"'
    assert body["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("authorization", [
    "Basic dXNlcjpwYXNzd29yZA==",
    "Bearer",
    "Token egw_abcdefgh",
    "Bearer two words",
])
def test_predict_malformed_authorization_401(client, authorization):
    response = client.post("/v1/predict", json={"text": "set an alarm for 7 am"},
                           headers={"Authorization": authorization})
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == 'Bearer realm="edge-gateway"'


@pytest.mark.parametrize("presented", [
    generate_api_key(),
    HIGH_KEY.secret[:-1] + ("A" if HIGH_KEY.secret[-1] != "A" else "B"),
    HIGH_KEY.secret + "A",
], ids=["unknown", "last-character-changed", "one-character-longer"])
def test_predict_unknown_key_401(client, presented):
    response = client.post("/v1/predict", json={"text": "set an alarm for 7 am"},
                           headers={"Authorization": f"Bearer {presented}"})
    body = assert_problem(response, 401)
    assert body["detail"] == "The API key is not valid."
    assert response.headers["www-authenticate"] == (
        'Bearer realm="edge-gateway", error="invalid_token"')


def test_predict_valid_key_200(client, model_version, teacher_manifest):
    response = client.post("/v1/predict", json={"text": "what's the weather in paris today"},
                           headers=HIGH_KEY.headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == LABEL_ANSWER_FIELDS
    assert body["label"] in teacher_manifest["labels"]
    assert body["model_version"] == model_version
    assert body["notice"] == TERMS_NOTICE
    assert FRESH_REQUEST_ID.fullmatch(body["request_id"])
    assert response.headers["x-request-id"] == body["request_id"]
    assert response.headers["x-terms-notice"] == TERMS_NOTICE


@pytest.mark.parametrize("request_id", [
    "client-req.0001", "abcdefgh", "Z" * 64, "a_b-c.d_e-f.0123",
])
def test_request_id_echoed(client, request_id):
    answered = client.post("/v1/predict", json={"text": "set a timer"},
                           headers={**HIGH_KEY.headers, "X-Request-Id": request_id})
    rejected = client.post("/v1/predict", json={"text": "set a timer"},
                           headers={"X-Request-Id": request_id})
    assert answered.status_code == 200
    assert answered.headers["x-request-id"] == request_id
    assert answered.json()["request_id"] == request_id
    assert rejected.status_code == 401
    assert rejected.headers["x-request-id"] == request_id
    assert rejected.json()["request_id"] == request_id


@pytest.mark.parametrize("request_id", [
    "", "short", "x" * 65, "has space 1234", "semi;colon;1234", 'quote"d-12345',
    "<script>alert(1)</script>", "tab\tinside-1234",
])
def test_request_id_replaced_when_invalid(client, request_id):
    response = client.post("/v1/predict", json={"text": "set a timer"},
                           headers={**HIGH_KEY.headers, "X-Request-Id": request_id})
    assert response.status_code == 200
    replaced = response.headers["x-request-id"]
    assert FRESH_REQUEST_ID.fullmatch(replaced)
    assert replaced != request_id
    assert response.json()["request_id"] == replaced


def test_request_ids_differ_between_requests(client):
    ids = {client.post("/v1/predict", json={"text": "set a timer"},
                       headers=HIGH_KEY.headers).headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3


def test_api_key_absent_from_log(tiny_build, tmp_path):
    key = ClientKey("logged-client", "small")
    config = write_config(tmp_path / "logged.toml",
                          {"teacher": onnx_teacher(tiny_build.teacher_package)},
                          {"small": SMALL_LIMIT}, (key,))
    near_miss = key.secret[:-1] + ("A" if key.secret[-1] != "A" else "B")
    gateway = launch_gateway(config)
    try:
        with httpx.Client(base_url=gateway.url, timeout=CLIENT_TIMEOUT) as http:
            # The key's limit counts this request too, so the burst of 3 ends after the
            # two valid ones.
            invalid_json = http.post("/v1/predict", content=b"{not json",
                                     headers={**key.headers, "X-Request-Id": "log-check-bad"})
            answered = [
                http.post("/v1/predict", json={"text": f"set an alarm for {hour} am"},
                          headers={**key.headers, "X-Request-Id": f"log-check-{hour:04d}"})
                for hour in (7, 8)
            ]
            limited = http.post("/v1/predict", json={"text": "set an alarm"},
                                headers=key.headers)
            unknown = http.post("/v1/predict", json={"text": "set an alarm"},
                                headers={"Authorization": f"Bearer {near_miss}"})
    finally:
        log = gateway.stop()

    assert invalid_json.status_code == 400
    assert [response.status_code for response in answered] == [200, 200]
    assert limited.status_code == 429
    assert unknown.status_code == 401
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    answered_entries = [entry for entry in entries if entry.get("message") == "answered"]
    assert [entry["request_id"] for entry in answered_entries] == [
        "log-check-0007", "log-check-0008"]
    assert {entry["key_id"] for entry in answered_entries} == {"logged-client"}
    assert key.secret not in log
    # Any 12 characters in a row of the key's random part, which the near-miss key shares
    # except for the last character, would show a partial leak.
    random_part = key.secret[len("egw_"):]
    windows = [random_part[start:start + 12] for start in range(len(random_part) - 11)]
    assert [window for window in windows if window in log] == []


# Rate limits with the memory backend


def test_key_burst_then_429(client):
    remaining = []
    for index in range(SMALL_BURST):
        response = client.post("/v1/predict", json={"text": "check my balance"},
                               headers=LIMITED_KEY.headers)
        assert response.status_code == 200
        policies = parse_members(response.headers["ratelimit-policy"], POLICY_MEMBER)
        assert policies == {"address": (HIGH_LIMIT["burst"], HIGH_WINDOW),
                            "key": (SMALL_BURST, SMALL_WINDOW)}
        assert list(policies) == ["address", "key"]
        limits = parse_members(response.headers["ratelimit"], LIMIT_MEMBER)
        assert list(limits) == ["address", "key"]
        remaining.append(limits["key"][0])
        # t counts the seconds until the bucket is full again: one interval per request.
        assert 0 < limits["key"][1] <= (index + 1) * SMALL_INTERVAL
    assert remaining == list(reversed(range(SMALL_BURST)))

    response = client.post("/v1/predict", json={"text": "check my balance"},
                           headers=LIMITED_KEY.headers)
    body = assert_problem(response, 429)
    assert body["title"] == "Too many requests"
    assert body["detail"] == (
        "The key rate limit is exhausted; retry after the time in Retry-After.")
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit()
    assert 1 <= int(retry_after) <= SMALL_INTERVAL
    policies = parse_members(response.headers["ratelimit-policy"], POLICY_MEMBER)
    assert policies == {"address": (HIGH_LIMIT["burst"], HIGH_WINDOW),
                        "key": (SMALL_BURST, SMALL_WINDOW)}
    limits = parse_members(response.headers["ratelimit"], LIMIT_MEMBER)
    assert limits["key"][0] == 0
    assert 0 < limits["key"][1] <= SMALL_WINDOW


def test_other_key_unaffected_by_429(client):
    statuses = [client.post("/v1/predict", json={"text": "start a timer"},
                            headers=EXHAUSTED_KEY.headers).status_code
                for _ in range(SMALL_BURST + 1)]
    response = client.post("/v1/predict", json={"text": "start a timer"},
                           headers=BYSTANDER_KEY.headers)
    assert statuses == [200] * SMALL_BURST + [429]
    assert response.status_code == 200
    limits = parse_members(response.headers["ratelimit"], LIMIT_MEMBER)
    assert limits["key"][0] == SMALL_BURST - 1


def test_address_policy_before_authentication(client):
    response = client.post("/v1/predict", json={"text": "start a timer"})
    assert response.status_code == 401
    assert response.headers["ratelimit-policy"] == (
        f'"address";q={HIGH_LIMIT["burst"]};w={HIGH_WINDOW}')
    limits = parse_members(response.headers["ratelimit"], LIMIT_MEMBER)
    assert list(limits) == ["address"]
    assert limits["address"][0] < HIGH_LIMIT["burst"]


def test_healthz_reports_memory_limiter(client, model_version):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "model_version": model_version,
        "backend": {"status": "ok"},
        "rate_limiter": {"backend": "memory", "status": "ok"},
    }


# Rate limits in Redis, shared by two gateway processes


@pytest.fixture(scope="module")
def replica_redis_url(redis_url) -> str:
    """The session's Redis with a database of its own, emptied, so that no bucket of another
    test shares a key with the buckets here."""
    url = f"{redis_url.rsplit('/', 1)[0]}/{REPLICA_REDIS_DB}"
    with redis.Redis.from_url(url) as connection:
        connection.flushdb()
    return url


@pytest.fixture(scope="module")
def redis_replicas(tiny_build, replica_redis_url, tmp_path_factory
                   ) -> Iterator[list[GatewayProcess]]:
    """Two gateway processes with the same config, which keeps rate limits in Redis."""
    sections = {
        "teacher": onnx_teacher(tiny_build.teacher_package),
        "rate_limit": {"backend": "redis", "redis_url": replica_redis_url,
                       "per_address": HIGH_LIMIT},
    }
    config = write_config(tmp_path_factory.mktemp("replicas") / "gateway.toml", sections,
                          {"replicated": {"rate": REPLICA_RATE, "burst": REPLICA_BURST}},
                          (REPLICA_KEY,))
    gateways: list[GatewayProcess] = []
    try:
        for _ in range(2):
            gateways.append(start_gateway(None, config=config, rate_limit=True, port=0))
        yield gateways
    finally:
        for gateway in gateways:
            gateway.stop()


def test_redis_replicas_share_key_limit(redis_replicas):
    clients = [httpx.Client(base_url=gateway.url, headers=REPLICA_KEY.headers,
                            timeout=CLIENT_TIMEOUT,
                            limits=httpx.Limits(max_connections=REPLICA_CLIENT_THREADS))
               for gateway in redis_replicas]

    def send(index: int) -> int:
        replica = clients[index % len(clients)]
        return replica.post("/v1/predict", json={"text": "transfer 200 dollars"}).status_code

    try:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=REPLICA_CLIENT_THREADS) as pool:
            statuses = list(pool.map(send, range(REPLICA_REQUESTS)))
        elapsed = time.monotonic() - started
    finally:
        for replica in clients:
            replica.close()

    admitted = statuses.count(200)
    denied = statuses.count(429)
    # GCRA admits at most burst + rate * T requests in any interval of length T.
    assert admitted >= REPLICA_BURST
    assert admitted <= REPLICA_BURST + math.ceil(REPLICA_RATE * elapsed)
    assert denied == REPLICA_REQUESTS - admitted


def launch_unreachable_redis_gateway(tiny_build, tmp_path: Path,
                                     on_backend_error: str) -> LoggedGateway:
    """Start a gateway whose redis_url names a loopback port that nothing listens on."""
    sections = {
        "teacher": onnx_teacher(tiny_build.teacher_package),
        "rate_limit": {"backend": "redis",
                       "redis_url": f"redis://127.0.0.1:{free_loopback_port()}/0",
                       "on_backend_error": on_backend_error, "per_address": HIGH_LIMIT},
    }
    config = write_config(tmp_path / f"redis-{on_backend_error}.toml", sections,
                          {"high": HIGH_LIMIT}, (HIGH_KEY,))
    return launch_gateway(config)


def assert_limiter_unavailable(http: httpx.Client) -> None:
    response = http.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["backend"] == {"status": "ok"}
    assert body["rate_limiter"] == {"backend": "redis", "status": "unavailable"}


def assert_limiter_degraded(http: httpx.Client) -> None:
    # Failing open, the replica still serves, so a load balancer must keep it.
    response = http.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["backend"] == {"status": "ok"}
    assert body["rate_limiter"] == {"backend": "redis", "status": "degraded"}


def test_redis_unreachable_fails_closed(tiny_build, tmp_path):
    gateway = launch_unreachable_redis_gateway(tiny_build, tmp_path, "closed")
    try:
        with httpx.Client(base_url=gateway.url, timeout=CLIENT_TIMEOUT) as http:
            with_key = http.post("/v1/predict", json={"text": "set a timer"},
                                 headers=HIGH_KEY.headers)
            without_key = http.post("/v1/predict", json={"text": "set a timer"})
            assert_limiter_unavailable(http)
            samples = read_metrics(http.get("/metrics").text)
    finally:
        log = gateway.stop()

    body = assert_problem(with_key, 503)
    assert body["title"] == "Service unavailable"
    assert body["detail"] == "The rate limiter is unavailable; retry later."
    assert with_key.headers["retry-after"] == "1"
    assert "ratelimit" not in with_key.headers
    # The per-address limit comes before the API key, so a request without one gets 503 too.
    assert_problem(without_key, 503)
    assert metric(samples, "edge_gateway_rate_limiter_errors_total", action="closed") == 2
    assert "rate limiter unavailable, failing closed" in log


def test_redis_unreachable_fails_open(tiny_build, tmp_path, teacher_manifest):
    gateway = launch_unreachable_redis_gateway(tiny_build, tmp_path, "open")
    try:
        with httpx.Client(base_url=gateway.url, timeout=CLIENT_TIMEOUT) as http:
            with_key = http.post("/v1/predict", json={"text": "set a timer"},
                                 headers=HIGH_KEY.headers)
            without_key = http.post("/v1/predict", json={"text": "set a timer"})
            assert_limiter_degraded(http)
            samples = read_metrics(http.get("/metrics").text)
    finally:
        log = gateway.stop()

    assert with_key.status_code == 200
    assert with_key.json()["label"] in teacher_manifest["labels"]
    assert "ratelimit" not in with_key.headers
    # Failing open skips the limits but not the API key check.
    assert_problem(without_key, 401)
    # Two failed limiter calls for the request with a key (address and key), one without.
    assert metric(samples, "edge_gateway_rate_limiter_errors_total", action="open") == 3
    assert "rate limiter unavailable, failing open" in log


# Hostile input


@dataclass(frozen=True)
class Probe:
    """One request of the hostile-input test and the status it must get.

    ``expected`` None accepts any status below 500. ``authorization`` None sends no
    Authorization header.
    """

    kind: str
    content: bytes = b""
    expected: int | None = 400
    method: str = "POST"
    path: str = "/v1/predict"
    content_type: str | None = "application/json"
    authorization: str | bytes | None = f"Bearer {HIGH_KEY.secret}"
    request_id: str | None = None
    chunked: bool = False


WORDS = ("set an alarm for seven am what is the weather in paris today transfer two hundred "
         "dollars to savings book a flight to tokyo translate hello into french start a timer "
         "check my balance please").split()
UNICODE_TEXTS = (
    "réveille-moi à sept heures", "明天北京的天气怎么样", "حوّل مئتي دولار إلى التوفير",
    "😀 set an alarm", "e\u0301te\u0301", "zero\u200bwidth", "\u200b", "tab\tand\nnewline",
    "nul\u0000char", "\U0001d54b\U0001d55a\U0001d55e\U0001d556\U0001d563", "Ω" * MAX_TEXT_CHARS,
)
TOOL_NAMES = ("get_weather", "set_alarm", "book-flight", "transfer_money", "Translate", "t0",
              "x" * 64, "check_balance")
UNKNOWN_PATHS = ("/", "/v1", "/v1/predict/", "/v2/predict", "/v1/predicts", "/V1/PREDICT",
                 "/admin",
                 "/v1/predict%00", "/.env", "/v1/%2e%2e/metrics", "/v1/predict;x=1",
                 "/v1//predict")
FORBIDDEN_KEY_PARTS = ("score", "prob", "logit", "rank", "top_k", "topk", "confidence")
CHUNK_BYTES = 8192


def json_probe(kind: str, payload: Any, expected: int | None = 400, **fields: Any) -> Probe:
    """Encode ``payload`` as JSON. A body above MAX_BODY_BYTES must get 413 whatever it
    contains, because the gateway checks the size before it parses the body."""
    content = json.dumps(payload).encode("utf-8")
    if len(content) > MAX_BODY_BYTES:
        expected = 413
    return Probe(kind, content, expected, **fields)


def random_text(rng: random.Random, max_words: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))


def random_tool(rng: random.Random, name: Any) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if rng.random() < 0.7:
        function["description"] = random_text(rng)
    if rng.random() < 0.7:
        function["parameters"] = {"type": "object",
                                  "properties": {"value": {"type": "string"}},
                                  "required": ["value"]}
    return {"type": "function", "function": function}


def probe_valid_text(rng: random.Random) -> Probe:
    return json_probe("valid text", {"text": random_text(rng)}, 200)


def probe_valid_unicode(rng: random.Random) -> Probe:
    return json_probe("valid unicode text", {"text": rng.choice(UNICODE_TEXTS)}, 200)


def probe_valid_tools(rng: random.Random) -> Probe:
    tools = [random_tool(rng, name)
             for name in rng.sample(TOOL_NAMES, rng.randint(0, MAX_TOOLS))]
    payload = {"text": random_text(rng), "tools": tools or rng.choice([[], None])}
    return json_probe("valid tools", payload, 200)


def probe_bad_json(rng: random.Random) -> Probe:
    valid = json.dumps({"text": random_text(rng)})
    broken = rng.choice([
        valid[:rng.randint(1, len(valid) - 1)],
        valid + rng.choice(["x", "}", ",", " {}"]),
        valid.replace('"', "'"),
        valid.replace('"text"', "text"),
        valid[:-1] + ",}",
        '{"text": "a" /* comment */}',
        '{"text": "unterminated}',
    ])
    return Probe("bad JSON", broken.encode("utf-8"))


def probe_wrong_type(rng: random.Random) -> Probe:
    payload = rng.choice([
        {"text": rng.choice([5, -1.5, True, None, ["set", "alarm"], {"text": "x"}])},
        rng.choice([[{"text": "set an alarm"}], "set an alarm", 42, None, True]),
        {"text": random_text(rng),
         "tools": rng.choice(["set_alarm", {"type": "function"}, 7, True, False, 0, ""])},
    ])
    return json_probe("wrong type", payload)


def probe_missing_or_extra_field(rng: random.Random) -> Probe:
    extra = rng.choice(["score", "labels", "model", "Text", "text ", "tool", "top_k", "é"])
    payload = rng.choice([
        {},
        {"tools": []},
        {"Text": "set an alarm"},
        {"text": random_text(rng), extra: rng.choice([1, "x", None, []])},
    ])
    return json_probe("missing or extra field", payload)


def probe_empty_text(rng: random.Random) -> Probe:
    text = rng.choice(["", " ", "\t\n", "\u3000", " " * MAX_TEXT_CHARS])
    return json_probe("empty text", {"text": text})


def probe_long_text(rng: random.Random) -> Probe:
    text = rng.choice(["a", "é", "😀", "明"]) * (MAX_TEXT_CHARS + rng.randint(1, 300))
    return json_probe("text too long", {"text": text})


def probe_unpaired_surrogate(rng: random.Random) -> Probe:
    if rng.random() < 0.2:
        # CESU-8 bytes of U+D800, which UTF-8 forbids.
        return Probe("unpaired surrogate", b'{"text": "a\xed\xa0\x80b"}')
    text = random_text(rng)
    position = rng.randint(0, len(text))
    lone = rng.choice(["\ud800", "\udbff", "\udc00", "\udfff", "\udc00\ud800"])
    # json.dumps writes the lone surrogate as a \ud800-style escape, which is valid JSON.
    return json_probe("unpaired surrogate", {"text": text[:position] + lone + text[position:]})


def probe_deep_nesting(rng: random.Random) -> Probe:
    depth = rng.choice([64, 500, 990, 1000, 3000, 10000])
    body = rng.choice([
        "[" * depth + "]" * depth,
        "[" * depth,
        '{"text": ' + '{"a": ' * depth + "1" + "}" * depth + "}",
        '{"text": "a", "tools": ' + "[" * depth + "]" * depth + "}",
    ]).encode("utf-8")
    return Probe("deep nesting", body, 413 if len(body) > MAX_BODY_BYTES else 400)


def probe_huge_body(rng: random.Random) -> Probe:
    size = MAX_BODY_BYTES + rng.choice([1, 2, 100, 10_000, 100_000, 1_000_000])
    body = rng.choice([b"x" * size, json.dumps({"text": "a" * size}).encode("utf-8")])
    return Probe("huge body", body, 413, chunked=rng.random() < 0.5)


def probe_too_many_tools(rng: random.Random) -> Probe:
    count = MAX_TOOLS + rng.randint(1, 3)
    tools = [random_tool(rng, name) for name in rng.sample(TOOL_NAMES, count)]
    return json_probe("too many tools", {"text": random_text(rng), "tools": tools})


def probe_bad_tool(rng: random.Random) -> Probe:
    good = random_tool(rng, "set_alarm")
    function = good["function"]
    bad = rng.choice([
        random_tool(rng, rng.choice(["", "has space", "a" * 65, "naïve", "semi;colon", 5,
                                     None, ["set_alarm"]])),
        {"type": rng.choice(["func", "Function", 1, None]), "function": function},
        {"function": function},
        {"type": "function", "function": rng.choice(["set_alarm", [], 5, None])},
        {"type": "function"},
        {"type": "function",
         "function": {**function, "description": rng.choice([5, [], {}, True])}},
        {"type": "function",
         "function": {**function, "parameters": rng.choice([[], "object", 5, True])}},
        good,  # the same name twice
        rng.choice(["set_alarm", 5, None, []]),
    ])
    tools = [good, bad]
    rng.shuffle(tools)
    return json_probe("bad tool", {"text": random_text(rng), "tools": tools})


def probe_tool_too_large(rng: random.Random) -> Probe:
    # With 2- and 3-byte characters, the description has fewer characters than the limit
    # has bytes, so only a count of bytes rejects it.
    character = rng.choice(["d", "é", "明"])
    count = MAX_TOOL_BYTES // len(character.encode("utf-8")) + rng.randint(1, 100)
    tool = {"type": "function", "function": {"name": "pad", "description": character * count}}
    return json_probe("tool too large", {"text": random_text(rng), "tools": [tool]})


def probe_content_type(rng: random.Random) -> Probe:
    content_type = rng.choice(["text/plain", "application/x-www-form-urlencoded",
                               "multipart/form-data; boundary=xyz", "application/xml",
                               "application/json; charset=latin-1", None])
    if rng.random() < 0.5:
        # The gateway parses any body as JSON and does not require a JSON media type.
        return json_probe("non-JSON content type", {"text": random_text(rng)}, None,
                          content_type=content_type)
    body = rng.choice([b"text=set+an+alarm", b"<text>set an alarm</text>",
                       b'--xyz\r\nContent-Disposition: form-data; name="text"\r\n\r\n'
                       b"set an alarm\r\n--xyz--\r\n"])
    return Probe("non-JSON content type", body, 400, content_type=content_type)


def probe_random_bytes(rng: random.Random) -> Probe:
    return Probe("random bytes", rng.randbytes(rng.randint(0, 3000)),
                 content_type=rng.choice([None, "application/json", "application/octet-stream"]))


def probe_wrong_method(rng: random.Random) -> Probe:
    method, path = rng.choice([("GET", "/v1/predict"), ("PUT", "/v1/predict"),
                               ("DELETE", "/v1/predict"), ("PATCH", "/v1/predict"),
                               ("OPTIONS", "/v1/predict"), ("POST", "/healthz"),
                               ("PUT", "/healthz"), ("DELETE", "/metrics")])
    return json_probe("wrong method", {"text": random_text(rng)}, 405, method=method, path=path)


def probe_unknown_path(rng: random.Random) -> Probe:
    path = rng.choice([*UNKNOWN_PATHS, "/" + "a" * rng.randint(100, 4000)])
    return json_probe("unknown path", {"text": random_text(rng)}, 404,
                      method=rng.choice(["GET", "POST"]), path=path)


def probe_bad_authorization(rng: random.Random) -> Probe:
    authorization = rng.choice([
        None,
        "Basic dXNlcjpwYXNzd29yZA==",
        "Bearer",
        f"Bearer egw_{rng.randbytes(32).hex()}",
        f"Bearer {HIGH_KEY.secret}x",
        f"Bearer {HIGH_KEY.secret[:-1]}",
        f"Token {HIGH_KEY.secret}",
        f"Bearer {HIGH_KEY.secret} extra",
        "Bearer " + "A" * 5000,
        b"Bearer \xff\xfe\xfd",
    ])
    return json_probe("bad authorization", {"text": random_text(rng)}, 401,
                      authorization=authorization)


def probe_invalid_request_id(rng: random.Random) -> Probe:
    request_id = rng.choice(["", "short", "x" * 65, "has space 1234",
                             "<script>alert(1)</script>", "semi;colon;id", "a" * 1000,
                             "line\tand-tab-1234"])
    return json_probe("invalid request id", {"text": random_text(rng)}, 200,
                      request_id=request_id)


PROBE_GENERATORS = (
    probe_valid_text, probe_valid_unicode, probe_valid_tools, probe_bad_json, probe_wrong_type,
    probe_missing_or_extra_field, probe_empty_text, probe_long_text, probe_unpaired_surrogate,
    probe_deep_nesting, probe_huge_body, probe_too_many_tools, probe_bad_tool,
    probe_tool_too_large, probe_content_type, probe_random_bytes, probe_wrong_method,
    probe_unknown_path, probe_bad_authorization, probe_invalid_request_id,
)
PROBE_ROUNDS = 25  # each generator makes one probe per round


def boundary_probes() -> list[Probe]:
    """Requests at each size limit and one past it."""
    def padded(size: int) -> bytes:
        body = b'{"text": "set an alarm"}'
        return body + b" " * (size - len(body))  # JSON allows trailing whitespace

    tools = [{"type": "function", "function": {"name": name}} for name in TOOL_NAMES]
    return [
        json_probe("text at limit", {"text": "a" * MAX_TEXT_CHARS}, 200),
        json_probe("text past limit", {"text": "a" * (MAX_TEXT_CHARS + 1)}, 400),
        json_probe("tools at limit", {"text": "a", "tools": tools[:MAX_TOOLS]}, 200),
        json_probe("tools past limit", {"text": "a", "tools": tools[:MAX_TOOLS + 1]}, 400),
        Probe("body at limit", padded(MAX_BODY_BYTES), 200),
        Probe("body past limit", padded(MAX_BODY_BYTES + 1), 413),
        Probe("chunked body at limit", padded(MAX_BODY_BYTES), 200, chunked=True),
        Probe("chunked body past limit", padded(MAX_BODY_BYTES + 1), 413, chunked=True),
    ]


def generate_probes(seed: int) -> list[Probe]:
    rng = random.Random(seed)
    probes = boundary_probes()
    for _ in range(PROBE_ROUNDS):
        probes += [generator(rng) for generator in PROBE_GENERATORS]
    rng.shuffle(probes)
    return probes


def send_probe(http: httpx.Client, probe: Probe) -> httpx.Response:
    headers: dict[str, str | bytes] = {}
    if probe.content_type is not None:
        headers["Content-Type"] = probe.content_type
    if probe.authorization is not None:
        headers["Authorization"] = probe.authorization
    if probe.request_id is not None:
        headers["X-Request-Id"] = probe.request_id
    content: bytes | Iterator[bytes] = probe.content
    if probe.chunked:
        # An iterator makes httpx send the body with chunked encoding, without Content-Length.
        content = iter([probe.content[start:start + CHUNK_BYTES]
                        for start in range(0, len(probe.content), CHUNK_BYTES)])
    return http.request(probe.method, probe.path, content=content, headers=headers)


def find_leaks(value: Any, path: str = "$") -> list[str]:
    """List the places in a JSON value that look like scores: a key such as "score" or
    "logits", or a list that contains a float."""
    leaks = []
    if isinstance(value, dict):
        for key, item in value.items():
            if any(part in key.lower() for part in FORBIDDEN_KEY_PARTS):
                leaks.append(f"{path}.{key}")
            leaks += find_leaks(item, f"{path}.{key}")
    elif isinstance(value, list):
        if any(isinstance(item, float) for item in value):
            leaks.append(f"{path} is a list with floats")
        for index, item in enumerate(value):
            leaks += find_leaks(item, f"{path}[{index}]")
    return leaks


def test_find_leaks_detects_scores():
    body = {"label": "alarm", "details": [{"Scores": 1}, [0.1, 0.9]], "top_k": ["alarm"]}
    assert find_leaks(body) == ["$.details[0].Scores", "$.details[1] is a list with floats",
                                "$.top_k"]
    assert find_leaks({"label": "alarm", "request_id": "x", "notice": "y"}) == []


def test_hostile_requests(client, teacher_manifest):
    probes = generate_probes(seed=20240611)
    no_responses = []
    server_errors = []
    unexpected_statuses = []
    non_json_bodies = []
    malformed_problems = []
    leaks = []
    malformed_answers = []
    kept_invalid_ids = []
    missing_notices = []

    for index, probe in enumerate(probes):
        request = f"probe {index} ({probe.kind}, {probe.method} {probe.path[:40]})"
        try:
            response = send_probe(client, probe)
        except httpx.TransportError as exc:
            # uvicorn may close a connection after an unhandled error, so the cause can be
            # the previous probe on the same connection.
            previous = probes[index - 1].kind if index else None
            no_responses.append(f"{request}: {exc!r}; previous probe: {previous}")
            continue
        status = response.status_code
        case = f"{request} got {status}"
        if status >= 500:
            server_errors.append(case)
        if probe.expected is not None and status != probe.expected:
            unexpected_statuses.append(f"{case}, expected {probe.expected}")
        try:
            body = response.json()
        except ValueError:
            non_json_bodies.append(case)
            continue
        leaks += [f"{case}: {leak}" for leak in find_leaks(body)]
        if response.headers.get("x-terms-notice") != TERMS_NOTICE:
            missing_notices.append(case)
        if status >= 400:
            is_problem = (response.headers.get("content-type") == PROBLEM_TYPE
                          and isinstance(body, dict) and set(body) == PROBLEM_FIELDS
                          and body["status"] == status
                          and body["request_id"] == response.headers.get("x-request-id"))
            if not is_problem:
                malformed_problems.append(f"{case}: {body!r:.200}")
        if status == 200:
            is_answer = (set(body) == LABEL_ANSWER_FIELDS
                         and body["label"] in teacher_manifest["labels"]
                         and body["notice"] == TERMS_NOTICE
                         and body["request_id"] == response.headers["x-request-id"])
            if not is_answer:
                malformed_answers.append(f"{case}: {body!r:.200}")
        if probe.request_id is not None:
            returned = response.headers.get("x-request-id", "")
            if returned == probe.request_id or not FRESH_REQUEST_ID.fullmatch(returned):
                kept_invalid_ids.append(f"{case}: X-Request-Id {returned!r:.80}")

    assert len(probes) == len(boundary_probes()) + PROBE_ROUNDS * len(PROBE_GENERATORS)
    assert server_errors == []
    assert no_responses == []
    assert unexpected_statuses == []
    assert non_json_bodies == []
    assert malformed_problems == []
    assert leaks == []
    assert malformed_answers == []
    assert missing_notices == []
    assert kept_invalid_ids == []
    final = client.post("/v1/predict", json={"text": "set an alarm for 7 am"},
                        headers=HIGH_KEY.headers)
    assert final.status_code == 200
    assert set(final.json()) == LABEL_ANSWER_FIELDS


# An OpenAI-compatible teacher

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ALARM_TOOL = {"type": "function", "function": {
    "name": "set_alarm", "description": "Set an alarm clock",
    "parameters": {"type": "object", "properties": {"time": {"type": "string"}},
                   "required": ["time"]}}}


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(api_key=UPSTREAM_KEY, model=FAKE_MODEL) as server:
        yield server


@pytest.fixture(scope="module")
def openai_gateway(fake_openai, tmp_path_factory) -> Iterator[GatewayProcess]:
    sections = {"teacher": openai_teacher(fake_openai.base_url),
                "rate_limit": {"per_address": HIGH_LIMIT}}
    config = write_config(tmp_path_factory.mktemp("openai-gateway") / "gateway.toml",
                          sections, {"high": HIGH_LIMIT}, (OPENAI_KEY,))
    gateway = start_gateway(None, config=config, rate_limit=True, port=0,
                            env={UPSTREAM_KEY_ENV: UPSTREAM_KEY})
    try:
        yield gateway
    finally:
        gateway.stop()


def test_openai_tool_call(openai_gateway, fake_openai):
    text = "set an alarm for 7 am"
    response = httpx.post(f"{openai_gateway.url}/v1/predict",
                          json={"text": text, "tools": [WEATHER_TOOL, ALARM_TOOL]},
                          headers=OPENAI_KEY.headers, timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"tool_call", "request_id", "model_version", "notice"}
    # The fake picks the tool that shares the most words with the text, and fills each
    # required string argument with the whole text.
    assert body["tool_call"] == {"name": "set_alarm", "arguments": {"time": text}}
    assert body["model_version"] == FAKE_MODEL
    assert body["notice"] == TERMS_NOTICE
    upstream = fake_openai.requests[-1]
    assert [tool["function"]["name"] for tool in upstream["tools"]] == [
        "get_weather", "set_alarm"]
    assert upstream["messages"][-1] == {"role": "user", "content": text}


def test_openai_text_answer(openai_gateway):
    response = httpx.post(f"{openai_gateway.url}/v1/predict", json={"text": "hello there"},
                          headers=OPENAI_KEY.headers, timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"text", "request_id", "model_version", "notice"}
    assert body["text"] == "hello there"  # without labels or tools, the fake echoes the text


@pytest.mark.parametrize("modes", [{"status_code": 500}, {"delay": 5.0}],
                         ids=["status-500", "delay-past-timeout"])
def test_openai_failure_503(tmp_path, modes):
    # The gateway must give up after connect_timeout + read_timeout = 1 s, well before the
    # fake's 5 s delay ends and before the client's timeout.
    with running_fake_openai(api_key=UPSTREAM_KEY, model=FAKE_MODEL, **modes) as base_url:
        sections = {"teacher": openai_teacher(base_url, connect_timeout=0.5, read_timeout=0.5),
                    "rate_limit": {"per_address": HIGH_LIMIT}}
        config = write_config(tmp_path / "openai-failing.toml", sections,
                              {"high": HIGH_LIMIT}, (OPENAI_KEY,))
        gateway = launch_gateway(config, env={UPSTREAM_KEY_ENV: UPSTREAM_KEY})
        try:
            response = httpx.post(f"{gateway.url}/v1/predict", json={"text": "set an alarm"},
                                  headers=OPENAI_KEY.headers, timeout=CLIENT_TIMEOUT)
        finally:
            log = gateway.stop()

    body = assert_problem(response, 503)
    assert body["title"] == "Teacher unavailable"
    assert response.headers["retry-after"] == "1"
    assert "teacher backend unavailable" in log
    assert UPSTREAM_KEY not in log


# Metrics


def test_metrics_count_requests_and_limits(client):
    before = read_metrics(client.get("/metrics").text)
    statuses = [client.post("/v1/predict", json={"text": "book a flight"},
                            headers=METRICS_KEY.headers).status_code
                for _ in range(SMALL_BURST + 1)]
    unknown = client.post("/v1/predict", json={"text": "book a flight"},
                          headers={"Authorization": f"Bearer {generate_api_key()}"})
    response = client.get("/metrics")
    after = read_metrics(response.text)

    def increase(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert statuses == [200] * SMALL_BURST + [429]
    assert unknown.status_code == 401
    assert response.status_code == 200
    assert response.headers["content-type"] == METRICS_CONTENT_TYPE
    requests = "edge_gateway_requests_total"
    assert increase(requests, route="/v1/predict", status="200") == SMALL_BURST
    assert increase(requests, route="/v1/predict", status="429") == 1
    assert increase(requests, route="/v1/predict", status="401") == 1
    assert increase("edge_gateway_rate_limited_total", policy="key") == 1
    assert increase("edge_gateway_auth_failures_total", reason="unknown") == 1

    count = "edge_gateway_request_duration_seconds_count"
    assert increase(count, route="/v1/predict") == SMALL_BURST + 2
    buckets = {float(dict(labels)["le"]): value for (name, labels), value in after.items()
               if name == "edge_gateway_request_duration_seconds_bucket"
               and dict(labels)["route"] == "/v1/predict"}
    assert set(buckets) == {*LATENCY_BUCKETS, math.inf}
    cumulative = [buckets[bound] for bound in sorted(buckets)]
    assert cumulative == sorted(cumulative)
    assert buckets[math.inf] == metric(after, count, route="/v1/predict")

    for action in DEFENCES:
        sample = ("edge_gateway_defence_actions_total", (("action", action),))
        assert sample in after
        assert after[sample] == 0


# Slow and vanishing clients


def raw_post_prefix(url: str, key: ClientKey, declared: int, sent: bytes) -> socket.socket:
    """Open a connection and send a POST's headers and the first bytes of its body."""
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=CLIENT_TIMEOUT)
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {key.secret}\r\nContent-Length: {declared}\r\n\r\n")
    connection.sendall(head.encode("ascii") + sent)
    return connection


def test_slow_body_and_disconnect(tiny_build, tmp_path):
    key = ClientKey("slow-client", "high")
    config = write_config(tmp_path / "slow.toml", {
        "server": {"body_timeout": 1.0},
        "teacher": onnx_teacher(tiny_build.teacher_package),
        "rate_limit": {"backend": "memory", "per_address": HIGH_LIMIT},
    }, {"high": HIGH_LIMIT}, (key,))
    gateway = launch_gateway(config)
    try:
        # A body that stops arriving gets 408 once body_timeout has passed.
        with raw_post_prefix(gateway.url, key, 64, b'{"text": ') as slow:
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = slow.recv(4096)
                if not chunk:
                    break
                reply += chunk
        # A client that leaves in the middle of its body is not a server error.
        raw_post_prefix(gateway.url, key, 64, b'{"text": ').close()
        with httpx.Client(base_url=gateway.url, timeout=CLIENT_TIMEOUT) as http:
            after = http.post("/v1/predict", json={"text": "set a timer"}, headers=key.headers)
    finally:
        log = gateway.stop()

    status_line = reply.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 408 Request Timeout"
    assert b"application/problem+json" in reply
    assert after.status_code == 200
    assert "unhandled error" not in log
    assert "Traceback" not in log


EXAMPLE_KEY = "egw_example-key-for-local-testing-only"  # documented in examples/gateway.toml


def test_example_key_and_demo_signer_warned(tiny_build, tmp_path):
    example = ClientKey("example-local", "high")
    config = write_config(tmp_path / "example.toml", {
        "teacher": onnx_teacher(tiny_build.teacher_package),
    }, {"high": HIGH_LIMIT}, (example,))
    text = config.read_text(encoding="utf-8").replace(hash_api_key(example.secret),
                                                      EXAMPLE_KEY_HASH)
    config.write_text(text, encoding="utf-8")
    gateway = launch_gateway(config)
    log = gateway.stop()

    assert "is the public example key" in log
    assert "demo signer key" in log
    assert hash_api_key(EXAMPLE_KEY) == EXAMPLE_KEY_HASH
    assert hashlib.sha256(SIGNER_PUBLIC.read_bytes()).hexdigest() == DEMO_SIGNER_SHA256


def test_environment_overrides_without_config_file():
    environment = {**os.environ, "EDGE_GATEWAY__SERVER__LOG_FORMAT": "yaml"}
    environment.pop("EDGE_GATEWAY_CONFIG", None)
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "gateway", "--port", "0"],
                            capture_output=True, text=True, env=environment, timeout=60,
                            cwd=ROOT)

    assert result.returncode == 2
    assert "EDGE_GATEWAY__SERVER__LOG_FORMAT" in result.stderr
    assert "Traceback" not in result.stderr


# Extraction defences through HTTP


TEACHER_PACKAGE = ROOT / "models" / "clinc150-teacher.edgepkg"


def test_monitor_blocks_repeats_and_spares_honest_client(tmp_path):
    from edge_runtime.data import load_split

    honest = ClientKey("honest-device", "high")
    attacker = ClientKey("repeating-client", "high")
    audit_log = tmp_path / "audit.jsonl"
    config = write_config(tmp_path / "defended.toml", {
        "teacher": onnx_teacher(TEACHER_PACKAGE),
        "rate_limit": {"backend": "memory", "per_address": HIGH_LIMIT},
        "defences": {"enabled": True, "reference_data": str(CLINC150_DIR),
                     "audit_log": str(audit_log)},
    }, {"high": HIGH_LIMIT}, (honest, attacker))
    queries = [example.text for example in load_split(CLINC150_DIR, "test")[:2000:25]]
    gateway = launch_gateway(config, env={"EDGE_GATEWAY_DEFENCE_SECRET": "5e" * 32})
    try:
        with httpx.Client(base_url=gateway.url, timeout=CLIENT_TIMEOUT) as http:
            honest_statuses = [http.post("/v1/predict", json={"text": text},
                                         headers=honest.headers).status_code
                               for text in queries]
            attacker_statuses = [http.post("/v1/predict", json={"text": "what is my balance"},
                                           headers=attacker.headers).status_code
                                 for _ in range(len(queries))]
            refused = http.post("/v1/predict", json={"text": "what is my balance"},
                                headers=attacker.headers)
            samples = read_metrics(http.get("/metrics").text)
    finally:
        gateway.stop()

    events = [json.loads(line) for line in audit_log.read_text(encoding="utf-8").splitlines()]
    assert honest_statuses == [200] * len(queries)
    assert attacker_statuses[:40] == [200] * 40
    assert 403 in attacker_statuses
    body = assert_problem(refused, 403)
    assert "model extraction" in body["detail"]
    assert metric(samples, "edge_gateway_defence_actions_total", action="blocked") >= 1
    assert {event["client_id"] for event in events} == {"key:repeating-client"}
    assert events[-1]["new_tier"] == "block"


def test_defences_without_secret_refuse_to_start(tmp_path):
    config = write_config(tmp_path / "no-secret.toml", {
        "teacher": onnx_teacher(TEACHER_PACKAGE),
        "defences": {"enabled": True, "monitor": False},
    }, {"high": HIGH_LIMIT}, (ClientKey("any", "high"),))
    environment = {**os.environ}
    environment.pop("EDGE_GATEWAY_DEFENCE_SECRET", None)
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "gateway", "--config",
                             str(config), "--port", "0"], capture_output=True, text=True,
                            env=environment, timeout=120, cwd=ROOT)

    assert result.returncode == 2
    assert "EDGE_GATEWAY_DEFENCE_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


def tool(name: str, description: str, **properties: str) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object",
                       "properties": {key: {"type": kind} for key, kind in properties.items()}},
    }}


CLIENT_TOOLS = [
    tool("set_alarm", "Set an alarm for a time", time="string"),
    tool("get_weather", "Get the weather forecast for a city", city="string"),
    tool("transfer_money", "Transfer money between bank accounts", amount="number"),
    tool("check_balance", "Check the balance of a bank account"),
    tool("book_flight", "Book a flight to a city", destination="string"),
]


def test_decoys_spare_honest_client_and_canary_refused(tmp_path):
    import time as clock

    from edge_runtime.data import load_split
    from edge_runtime.gateway.backends import ToolSpec
    from edge_runtime.gateway.decoys import DecoyFactory

    secret_hex = "7c" * 32
    device = ClientKey("tool-device", "high")
    config = write_config(tmp_path / "decoys.toml", {
        "teacher": onnx_teacher(TEACHER_PACKAGE),
        "rate_limit": {"backend": "memory", "per_address": HIGH_LIMIT},
        "defences": {"enabled": True, "monitor": False, "randomize": False,
                     "watermark": False, "audit_log": str(tmp_path / "audit.jsonl")},
    }, {"high": HIGH_LIMIT}, (device,))
    queries = [example.text for example in load_split(CLINC150_DIR, "test")[:3000:30]]
    real_names = {entry["function"]["name"] for entry in CLIENT_TOOLS}
    # The same secret, tenant and period as the gateway give the same decoys.
    factory = DecoyFactory(bytes.fromhex(secret_hex), 86400, known_tenants=["tests"])
    now = clock.time()
    real = [ToolSpec.from_openai(entry) for entry in CLIENT_TOOLS]
    decoys = factory.decoys("tests", now, real, 8)
    canary = next(decoy for decoy in decoys if factory.is_canary([decoy], "tests", now))
    gateway = launch_gateway(config, env={"EDGE_GATEWAY_DEFENCE_SECRET": secret_hex})
    try:
        with httpx.Client(base_url=gateway.url, timeout=CLIENT_TIMEOUT) as http:
            replies = [http.post("/v1/predict", json={"text": text, "tools": CLIENT_TOOLS},
                                 headers=device.headers) for text in queries]
            caught = http.post("/v1/predict",
                               json={"text": "what is my balance",
                                     "tools": [*CLIENT_TOOLS, canary.to_openai()]},
                               headers=device.headers)
            after = http.post("/v1/predict", json={"text": "what is my balance"},
                              headers=device.headers)
            samples = read_metrics(http.get("/metrics").text)
    finally:
        gateway.stop()

    bodies = [reply.json() for reply in replies]
    tool_calls = [body["tool_call"]["name"] for body in bodies if "tool_call" in body]
    assert [reply.status_code for reply in replies] == [200] * len(queries)
    assert tool_calls
    assert set(tool_calls) <= real_names
    # The canary request is refused before its decoys count as offered.
    offered = metric(samples, "edge_gateway_defence_actions_total", action="decoy_offered")
    assert offered == len(queries)
    assert_problem(caught, 403)
    assert metric(samples, "edge_gateway_defence_actions_total", action="canary") == 1
    # Without the monitor the canary refuses that request only.
    assert after.status_code == 200
