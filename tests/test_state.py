"""The defences' state store: the same behaviour in memory and in a real Redis server."""

from __future__ import annotations

import asyncio

import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.gateway.state import (
    MemoryStateStore,
    RedisStateStore,
    StateUnavailable,
    create_state_store,
)
from tests.conftest import free_loopback_port


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture(params=["memory", "redis"])
def store_factory(request):
    """Build a fresh store per test: memory, or Redis under a prefix of its own."""
    if request.param == "memory":
        return lambda: MemoryStateStore()
    url = request.getfixturevalue("redis_url")
    prefix = f"test-state:{request.node.name}:"
    return lambda: RedisStateStore(url, prefix=prefix)


def test_append_keeps_newest_first(store_factory):
    async def scenario():
        store = store_factory()
        lengths = [await store.append("client:a", str(i), max_items=3) for i in range(5)]
        items = await store.items("client:a")
        limited = await store.items("client:a", limit=2)
        await store.close()
        return lengths, items, limited

    lengths, items, limited = run(scenario())

    assert lengths == [1, 2, 3, 3, 3]
    assert items == ["4", "3", "2"]
    assert limited == ["4", "3"]


def test_values_and_missing_keys(store_factory):
    async def scenario():
        store = store_factory()
        await store.set("tier:a", '{"tier": "degrade"}')
        value = await store.get("tier:a")
        missing = await store.get("tier:b")
        empty = await store.items("never-written")
        await store.close()
        return value, missing, empty

    value, missing, empty = run(scenario())

    assert value == '{"tier": "degrade"}'
    assert missing is None
    assert empty == []


def test_keys_by_prefix(store_factory):
    async def scenario():
        store = store_factory()
        await store.set("marks:alice", "1")
        await store.append("marks:bob", "x", max_items=2)
        await store.set("other:carol", "1")
        await store.set("marks*:star", "1")  # a glob character in a key is not a wildcard
        found = sorted(await store.keys("marks:"))
        await store.close()
        return found

    assert run(scenario()) == ["marks:alice", "marks:bob"]


def test_memory_expiry():
    clock = FakeClock()
    store = MemoryStateStore(clock=clock)

    async def scenario():
        await store.set("tier:a", "block", ttl_seconds=10)
        await store.append("window:a", "q1", max_items=5, ttl_seconds=10)
        clock.now += 9.9
        before = (await store.get("tier:a"), await store.items("window:a"))
        clock.now += 0.2
        after = (await store.get("tier:a"), await store.items("window:a"),
                 await store.keys(""))
        return before, after

    before, after = run(scenario())

    assert before == ("block", ["q1"])
    assert after == (None, [], [])


def test_redis_expiry_is_set(redis_url):
    import redis

    async def scenario():
        store = RedisStateStore(redis_url, prefix="test-ttl:")
        await store.append("window:a", "q1", max_items=5, ttl_seconds=30)
        await store.set("tier:a", "allow", ttl_seconds=30)
        await store.close()

    run(scenario())
    client = redis.Redis.from_url(redis_url)
    assert 0 < client.pttl("test-ttl:window:a") <= 30_000
    assert 0 < client.pttl("test-ttl:tier:a") <= 30_000


def test_redis_unreachable_raises_typed_error():
    url = f"redis://:s3cret@127.0.0.1:{free_loopback_port()}/0"

    async def scenario():
        store = RedisStateStore(url, timeout=0.3)
        alive = await store.ping()
        with pytest.raises(StateUnavailable) as caught:
            await store.get("tier:a")
        await store.close()
        return alive, str(caught.value)

    alive, message = run(scenario())

    assert alive is False
    assert "s3cret" not in message
    assert "127.0.0.1" in message


def test_factory_rejects_unknown_backend():
    with pytest.raises(ConfigError, match="unknown state store backend 'disk'"):
        create_state_store("disk")
    with pytest.raises(ConfigError, match="needs a Redis URL"):
        create_state_store("redis")


def test_append_rejects_zero_items():
    with pytest.raises(ValueError, match="max_items is 0"):
        run(MemoryStateStore().append("k", "v", max_items=0))
