"""Tests of the gateway's GCRA rate limiter: the memory backend on a fake clock, the Redis
backend against a real redis-server (including two processes sharing one key) and the
RateLimit header fields."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import socket
import subprocess
import sys
import time
import uuid
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("redis")

from edge_runtime.errors import ConfigError, EdgeRuntimeError  # noqa: E402
from edge_runtime.gateway.config import mask_url_credentials
from edge_runtime.gateway.ratelimit import (  # noqa: E402
    Decision,
    MemoryRateLimiter,
    RateLimiterUnavailable,
    RateLimitPolicy,
    RedisRateLimiter,
    create_rate_limiter,
    rate_limit_headers,
    retry_after_header,
)
from tests.conftest import ROOT, free_loopback_port  # noqa: E402


class FakeClock:
    """A clock in seconds that moves only when a test advances it."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def hit_many(limiter, key: str, policy: RateLimitPolicy, count: int) -> list[Decision]:
    async def run() -> list[Decision]:
        return [await limiter.hit(key, policy) for _ in range(count)]

    return asyncio.run(run())


def hit_once(limiter, key: str, policy: RateLimitPolicy) -> Decision:
    return hit_many(limiter, key, policy, 1)[0]


# --- policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "field_name"), [
    ({"name": "", "rate": 1.0, "burst": 1}, "name"),
    ({"name": "key:x", "rate": 1.0, "burst": 1}, "name"),
    ({"name": 'a"b', "rate": 1.0, "burst": 1}, "name"),
    ({"name": "k" * 65, "rate": 1.0, "burst": 1}, "name"),
    ({"name": "key", "rate": 0, "burst": 1}, "rate"),
    ({"name": "key", "rate": -1.0, "burst": 1}, "rate"),
    ({"name": "key", "rate": math.inf, "burst": 1}, "rate"),
    ({"name": "key", "rate": math.nan, "burst": 1}, "rate"),
    ({"name": "key", "rate": True, "burst": 1}, "rate"),
    ({"name": "key", "rate": "5", "burst": 1}, "rate"),
    ({"name": "key", "rate": 2e6, "burst": 1}, "rate"),
    ({"name": "key", "rate": 1.0, "burst": 0}, "burst"),
    ({"name": "key", "rate": 1.0, "burst": 2.0}, "burst"),
    ({"name": "key", "rate": 1.0, "burst": True}, "burst"),
    ({"name": "key", "rate": 1e-9, "burst": 1}, "burst / rate"),
])
def test_policy_rejects_invalid_field(fields, field_name):
    with pytest.raises(ConfigError) as raised:
        RateLimitPolicy(**fields)
    assert field_name in str(raised.value)


def test_policy_interval_rounds_up():
    assert RateLimitPolicy("key", 2.0, 3).interval_us == 500_000
    assert RateLimitPolicy("key", 3.0, 20).interval_us == 333_334
    assert RateLimitPolicy("key", 0.1, 3).interval_us == 10_000_000
    assert RateLimitPolicy("key", 1e6, 1).interval_us == 1


def test_policy_window_seconds():
    assert RateLimitPolicy("key", 0.5, 20).window_seconds == 40
    assert RateLimitPolicy("key", 0.1, 3).window_seconds == 30
    assert RateLimitPolicy("key", 3.0, 20).window_seconds == 7
    assert RateLimitPolicy("key", 100.0, 5).window_seconds == 1


# --- memory backend ----------------------------------------------------------------------------


def test_memory_burst_then_denied():
    limiter = MemoryRateLimiter(clock=FakeClock())
    policy = RateLimitPolicy("key", 2.0, 3)

    decisions = hit_many(limiter, "client", policy, 5)

    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0, 0]


def test_memory_decision_values_exact():
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    policy = RateLimitPolicy("key", 2.0, 3)

    first, second, third, denied = hit_many(limiter, "client", policy, 4)
    assert (first.retry_after, first.reset_after) == (0.0, 0.5)
    assert (second.retry_after, second.reset_after) == (0.0, 1.0)
    assert (third.retry_after, third.reset_after) == (0.0, 1.5)
    assert denied.allowed is False
    assert (denied.remaining, denied.retry_after, denied.reset_after) == (0, 0.5, 1.5)
    assert denied.policy == policy

    clock.advance(0.25)
    later = hit_once(limiter, "client", policy)
    assert later.allowed is False
    assert (later.retry_after, later.reset_after) == (0.25, 1.25)


def test_memory_refills_at_sustained_rate():
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    policy = RateLimitPolicy("key", 2.0, 3)
    hit_many(limiter, "client", policy, 3)

    clock.advance(0.5)
    after_one_interval = hit_many(limiter, "client", policy, 2)
    assert [d.allowed for d in after_one_interval] == [True, False]

    clock.advance(1.0)
    after_two_intervals = hit_many(limiter, "client", policy, 3)
    assert [d.allowed for d in after_two_intervals] == [True, True, False]

    clock.advance(60.0)
    after_idle = hit_many(limiter, "client", policy, 4)
    assert [d.allowed for d in after_idle] == [True, True, True, False]
    assert after_idle[0].remaining == 2


def test_memory_admits_after_retry_after():
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    policy = RateLimitPolicy("key", 4.0, 2)
    hit_many(limiter, "client", policy, 2)
    denied = hit_once(limiter, "client", policy)
    assert denied.retry_after == 0.25

    clock.advance(0.249999)
    assert hit_once(limiter, "client", policy).allowed is False
    clock.advance(0.000001)
    assert hit_once(limiter, "client", policy).allowed is True


def test_memory_steady_arrivals_all_admitted():
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    policy = RateLimitPolicy("key", 10.0, 1)

    decisions = []
    for _ in range(50):
        decisions.append(hit_once(limiter, "client", policy))
        clock.advance(0.1)

    assert all(d.allowed for d in decisions)


def test_memory_keys_independent():
    limiter = MemoryRateLimiter(clock=FakeClock())
    key_policy = RateLimitPolicy("key", 1.0, 2)
    address_policy = RateLimitPolicy("address", 1.0, 2)
    hit_many(limiter, "alice", key_policy, 3)

    assert hit_once(limiter, "alice", key_policy).allowed is False
    assert hit_once(limiter, "bob", key_policy).allowed is True
    assert hit_once(limiter, "alice", address_policy).allowed is True
    assert hit_once(limiter, "alice", address_policy).remaining == 0


def test_memory_clock_going_back_admits_no_extra():
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    policy = RateLimitPolicy("key", 1.0, 2)
    hit_many(limiter, "client", policy, 2)

    clock.advance(-30.0)

    assert hit_once(limiter, "client", policy).allowed is False


def test_memory_evicts_full_buckets_first():
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock, max_keys=10)
    policy = RateLimitPolicy("key", 1.0, 5)
    for index in range(5):
        hit_once(limiter, f"idle-{index}", policy)
    clock.advance(2.0)
    for index in range(5):
        hit_many(limiter, f"active-{index}", policy, 5)
    assert len(limiter) == 10

    hit_once(limiter, "new", policy)

    assert len(limiter) == 6
    for index in range(5):
        assert hit_once(limiter, f"active-{index}", policy).allowed is False


def test_memory_evicts_nearly_full_active_buckets(caplog):
    limiter = MemoryRateLimiter(clock=FakeClock(), max_keys=10)
    policy = RateLimitPolicy("key", 1.0, 5)
    hit_many(limiter, "busy", policy, 5)
    for index in range(9):
        hit_once(limiter, f"light-{index}", policy)
    assert len(limiter) == 10

    hit_once(limiter, "new", policy)

    assert len(limiter) == 9
    assert "dropped 2 active keys" in caplog.text
    assert hit_once(limiter, "busy", policy).allowed is False
    assert hit_once(limiter, "new", policy).remaining == 3


def test_memory_rejects_invalid_max_keys():
    with pytest.raises(ConfigError, match="max_keys"):
        MemoryRateLimiter(max_keys=0)


def test_memory_ping_and_close():
    limiter = MemoryRateLimiter(clock=FakeClock())
    policy = RateLimitPolicy("key", 1.0, 1)
    hit_once(limiter, "client", policy)

    assert asyncio.run(limiter.ping()) is True
    asyncio.run(limiter.close())
    assert len(limiter) == 0
    assert limiter.backend == "memory"


def admitted_times(policy: RateLimitPolicy, arrival_us: list[int]) -> list[int]:
    """Run arrivals (microseconds) through a memory limiter and return the admitted ones."""
    clock = FakeClock(0.0)
    limiter = MemoryRateLimiter(clock=clock)
    admitted = []
    for when in arrival_us:
        clock.now = when / 1_000_000
        if hit_once(limiter, "client", policy).allowed:
            admitted.append(when)
    return admitted


@settings(max_examples=150, deadline=None)
@given(
    rate=st.floats(min_value=0.05, max_value=500.0, allow_nan=False, allow_infinity=False),
    burst=st.integers(min_value=1, max_value=12),
    gaps_us=st.lists(st.integers(min_value=0, max_value=3_000_000), min_size=1, max_size=60),
)
def test_memory_admitted_count_within_bound(rate, burst, gaps_us):
    policy = RateLimitPolicy("key", rate, burst)
    arrivals = []
    now = 0
    for gap in gaps_us:
        now += gap
        arrivals.append(now)

    admitted = admitted_times(policy, arrivals)

    # Every window [admitted[i], admitted[j]] contains j - i + 1 admissions, so checking windows
    # that start and end on admissions covers every interval. Fraction keeps the bound exact.
    assert admitted, "the first request of a fresh bucket must be admitted"
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            length = Fraction(admitted[j] - start, 1_000_000)
            assert j - i + 1 <= burst + Fraction(rate) * length


@settings(max_examples=100, deadline=None)
@given(
    rate=st.floats(min_value=0.05, max_value=500.0, allow_nan=False, allow_infinity=False),
    burst=st.integers(min_value=1, max_value=12),
    count=st.integers(min_value=1, max_value=40),
)
def test_memory_simultaneous_arrivals_admit_burst(rate, burst, count):
    policy = RateLimitPolicy("key", rate, burst)

    admitted = admitted_times(policy, [5_000_000] * count)

    assert len(admitted) == min(count, burst)


# --- factory -----------------------------------------------------------------------------------


def test_create_memory_limiter():
    limiter = create_rate_limiter("memory")
    assert isinstance(limiter, MemoryRateLimiter)


def test_create_redis_limiter():
    limiter = create_rate_limiter("redis", "redis://127.0.0.1:6379/0")
    assert isinstance(limiter, RedisRateLimiter)
    assert limiter.backend == "redis"


def test_create_rejects_unknown_backend():
    with pytest.raises(ConfigError, match="unknown rate limiter backend 'memcached'"):
        create_rate_limiter("memcached")


def test_create_redis_requires_url():
    with pytest.raises(ConfigError, match="needs a Redis URL"):
        create_rate_limiter("redis")


def test_redis_rejects_invalid_url():
    with pytest.raises(ConfigError) as raised:
        RedisRateLimiter("http://user:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in str(raised.value)
    assert "redis://" in str(raised.value)


def test_redis_rejects_invalid_timeout():
    with pytest.raises(ConfigError, match="timeout"):
        RedisRateLimiter("redis://127.0.0.1:6379/0", timeout=0)


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:hunter2@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    ("redis://alice:hunter2@cache:6379/1", "redis://***@cache:6379/1"),
    ("redis://topsecret@cache:6379", "redis://***@cache:6379"),
    ("unix:///run/redis.sock?db=0&password=hunter2", "unix:///run/redis.sock?db=0&password=***"),
])
def test_redis_url_masked(url, expected):
    assert mask_url_credentials(url) == expected


# --- Redis backend -----------------------------------------------------------------------------


# A tiny rate makes refill during a test negligible, so the assertions count admissions.
SLOW_RATE = 0.001


def unique_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"


def test_redis_burst_then_denied(redis_url):
    policy = RateLimitPolicy("key", SLOW_RATE, 5)

    async def run():
        async with RedisRateLimiter(redis_url, prefix=unique_prefix()) as limiter:
            return [await limiter.hit("client", policy) for _ in range(7)]

    decisions = asyncio.run(run())

    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
    assert decisions[0].retry_after == 0.0
    assert decisions[0].reset_after == 1000.0
    assert 999.0 < decisions[5].retry_after <= 1000.0
    assert 4999.0 < decisions[5].reset_after <= 5000.0


def test_redis_keys_independent(redis_url):
    key_policy = RateLimitPolicy("key", SLOW_RATE, 2)
    address_policy = RateLimitPolicy("address", SLOW_RATE, 2)

    async def run():
        async with RedisRateLimiter(redis_url, prefix=unique_prefix()) as limiter:
            for _ in range(3):
                await limiter.hit("alice", key_policy)
            return (await limiter.hit("alice", key_policy),
                    await limiter.hit("bob", key_policy),
                    await limiter.hit("alice", address_policy))

    alice_key, bob_key, alice_address = asyncio.run(run())

    assert alice_key.allowed is False
    assert bob_key.allowed is True
    assert alice_address.allowed is True


def test_redis_uses_server_clock(redis_url, monkeypatch):
    policy = RateLimitPolicy("key", SLOW_RATE, 3)
    # A client wall clock one hour ahead must not move the stored arrival time.
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600.0)

    async def run():
        async with RedisRateLimiter(redis_url, prefix=unique_prefix()) as limiter:
            before_s, before_us = await limiter._client.time()
            await limiter.hit("client", policy)
            after_s, after_us = await limiter._client.time()
            stored = int(await limiter._client.get(limiter.redis_key("client", policy)))
            return before_s * 1_000_000 + before_us, stored, after_s * 1_000_000 + after_us

    server_before, stored_tat, server_after = asyncio.run(run())

    assert server_before + policy.interval_us <= stored_tat
    assert stored_tat <= server_after + policy.interval_us


def test_redis_stores_hashed_key(redis_url):
    policy = RateLimitPolicy("key", SLOW_RATE, 3)
    raw_key = f"sk-live-{uuid.uuid4().hex}"
    prefix = unique_prefix()

    async def run():
        async with RedisRateLimiter(redis_url, prefix=prefix) as limiter:
            await limiter.hit(raw_key, policy)
            return [name.decode() async for name in limiter._client.scan_iter(count=1000)]

    names = asyncio.run(run())

    expected = f"{prefix}key:{hashlib.sha256(raw_key.encode()).hexdigest()}"
    assert expected in names
    assert not [name for name in names if raw_key in name]


def test_redis_key_expires_at_reset(redis_url):
    policy = RateLimitPolicy("key", SLOW_RATE, 3)

    async def run():
        async with RedisRateLimiter(redis_url, prefix=unique_prefix()) as limiter:
            decision = await limiter.hit("client", policy)
            ttl_ms = await limiter._client.pttl(limiter.redis_key("client", policy))
            return decision, ttl_ms

    decision, ttl_ms = asyncio.run(run())

    assert ttl_ms > 0
    assert ttl_ms <= math.ceil(decision.reset_after * 1000)
    assert ttl_ms > decision.reset_after * 1000 - 60_000


def test_redis_ping(redis_url):
    async def run():
        async with RedisRateLimiter(redis_url) as limiter:
            return await limiter.ping()

    assert asyncio.run(run()) is True


def test_redis_unreachable_raises(caplog):
    url = f"redis://gateway:hunter2-secret@127.0.0.1:{free_loopback_port()}/0"
    policy = RateLimitPolicy("key", 1.0, 1)

    async def run():
        async with RedisRateLimiter(url, timeout=2.0) as limiter:
            with pytest.raises(RateLimiterUnavailable) as raised:
                await limiter.hit("client", policy)
            return raised.value, await limiter.ping()

    error, reachable = asyncio.run(run())

    assert isinstance(error, EdgeRuntimeError)
    assert "hunter2-secret" not in str(error)
    assert "redis://***@127.0.0.1:" in str(error)
    assert "check that Redis is running" in str(error)
    assert reachable is False
    assert "hunter2-secret" not in caplog.text


def test_redis_silent_server_times_out():
    # A listening socket that never replies: connecting succeeds, the script call times out.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        policy = RateLimitPolicy("key", 1.0, 1)

        async def run():
            async with RedisRateLimiter(url, timeout=0.2) as limiter:
                with pytest.raises(RateLimiterUnavailable) as raised:
                    await limiter.hit("client", policy)
                return raised.value

        error = asyncio.run(run())

    assert "timed out after 0.2 s" in str(error)


# Each worker process connects, reports "ready", waits for "go" on stdin, then runs TASKS
# concurrent tasks of HITS hits each on one key, and prints how many were admitted.
WORKER_SCRIPT = """
import asyncio, sys
from edge_runtime.gateway.ratelimit import RateLimitPolicy, RedisRateLimiter

url, prefix, key, rate, burst, tasks, hits = sys.argv[1:8]
policy = RateLimitPolicy("key", float(rate), int(burst))

async def worker(limiter):
    return sum([(await limiter.hit(key, policy)).allowed for _ in range(int(hits))])

async def main():
    async with RedisRateLimiter(url, prefix=prefix, timeout=10.0) as limiter:
        assert await limiter.ping()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        counts = await asyncio.gather(*(worker(limiter) for _ in range(int(tasks))))
    print(sum(counts), flush=True)

asyncio.run(main())
"""


def test_redis_two_processes_share_limit(redis_url):
    rate, burst, tasks, hits = 0.5, 20, 50, 4
    prefix, key = unique_prefix(), "shared-client"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", WORKER_SCRIPT, redis_url, prefix, key,
               str(rate), str(burst), str(tasks), str(hits)]
    workers = [subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for _ in range(2)]
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready", worker.stderr.read()

        started = time.monotonic()
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        outputs = [worker.communicate(timeout=60) for worker in workers]
        elapsed = time.monotonic() - started
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr
    admitted = sum(int(stdout.strip()) for stdout, _ in outputs)
    # The bucket starts full at `started`, before any hit, and every hit ends before
    # `elapsed` is read, so rounding elapsed up gives a sound bound.
    assert admitted >= burst
    assert admitted <= burst + rate * math.ceil(elapsed)
    assert 2 * tasks * hits - admitted > 0


# --- header fields -----------------------------------------------------------------------------


KEY_POLICY = RateLimitPolicy("key", 0.5, 20)
ADDRESS_POLICY = RateLimitPolicy("address", 3.0, 20)


def test_headers_single_policy():
    decision = Decision(True, KEY_POLICY, 19, 0.0, 2.0)

    assert rate_limit_headers([decision]) == {
        "RateLimit-Policy": '"key";q=20;w=40',
        "RateLimit": '"key";r=19;t=2',
    }


def test_headers_two_policies_round_reset_up():
    decisions = [Decision(True, KEY_POLICY, 7, 0.0, 26.000001),
                 Decision(False, ADDRESS_POLICY, 0, 0.25, 6.5)]

    assert rate_limit_headers(decisions) == {
        "RateLimit-Policy": '"key";q=20;w=40, "address";q=20;w=7',
        "RateLimit": '"key";r=7;t=27, "address";r=0;t=7',
    }


def test_headers_empty():
    assert rate_limit_headers([]) == {}


def test_retry_after_uses_longest_denial():
    decisions = [Decision(True, KEY_POLICY, 7, 0.0, 26.0),
                 Decision(False, ADDRESS_POLICY, 0, 1.2, 6.5),
                 Decision(False, KEY_POLICY, 0, 3.0, 40.0)]

    assert retry_after_header(decisions) == "3"


def test_retry_after_at_least_one_second():
    assert retry_after_header([Decision(False, ADDRESS_POLICY, 0, 0.001, 6.5)]) == "1"


def test_retry_after_requires_denial():
    with pytest.raises(ValueError, match="denied"):
        retry_after_header([Decision(True, KEY_POLICY, 7, 0.0, 26.0)])
