"""Shared state of the gateway's defences: per-client windows, tiers and ledgers.

One interface, two backends, as for the rate limiter: ``MemoryStateStore`` keeps the state in
this process, and ``RedisStateStore`` in a Redis server that several gateway replicas share.
Values are strings (callers store JSON); keys are strings chosen by the caller, which should
never put a raw API key in them. Every key can expire, so the state of clients that went away
does not pile up.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Callable

from edge_runtime.errors import ConfigError, EdgeRuntimeError
from edge_runtime.gateway.config import mask_url_credentials

DEFAULT_PREFIX = "edge-gw:state:"
DEFAULT_TIMEOUT = 0.5  # seconds for one Redis round trip
DEFAULT_MAX_KEYS = 200_000  # keys the memory store keeps before it drops expired ones


class StateUnavailable(EdgeRuntimeError):
    """The state backend could not be reached or did not reply in time."""


class StateStore(abc.ABC):
    """Lists capped in length and plain values, each with an optional expiry."""

    backend: str

    @abc.abstractmethod
    async def append(self, key: str, item: str, max_items: int,
                     ttl_seconds: float | None = None) -> int:
        """Add ``item`` to the front of the list at ``key``, keep its ``max_items`` newest
        items and return the list's length afterwards."""

    @abc.abstractmethod
    async def items(self, key: str, limit: int | None = None) -> list[str]:
        """Return the list at ``key``, newest first (at most ``limit`` items)."""

    @abc.abstractmethod
    async def get(self, key: str) -> str | None:
        """Return the value at ``key``, or None when it is missing or expired."""

    @abc.abstractmethod
    async def set(self, key: str, value: str, ttl_seconds: float | None = None) -> None:
        """Store ``value`` at ``key``, replacing what was there."""

    @abc.abstractmethod
    async def keys(self, prefix: str) -> list[str]:
        """Return every live key that starts with ``prefix``, in no particular order."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Return True when the backend answers."""

    async def close(self) -> None:  # noqa: B027 - a concrete default, not an abstract method
        """Release connections; the memory store has none."""


class MemoryStateStore(StateStore):
    """State in this process only: for one gateway, tests and benchmarks."""

    backend = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = DEFAULT_MAX_KEYS):
        self._clock = clock
        self._max_keys = max_keys
        self._lists: dict[str, list[str]] = {}
        self._values: dict[str, str] = {}
        self._expiry: dict[str, float] = {}

    def _live(self, key: str) -> bool:
        deadline = self._expiry.get(key)
        if deadline is not None and deadline <= self._clock():
            self._lists.pop(key, None)
            self._values.pop(key, None)
            self._expiry.pop(key, None)
            return False
        return key in self._lists or key in self._values

    def _touch(self, key: str, ttl_seconds: float | None) -> None:
        if ttl_seconds is None:
            self._expiry.pop(key, None)
        else:
            self._expiry[key] = self._clock() + ttl_seconds
        if len(self._lists) + len(self._values) > self._max_keys:
            for stale in [name for name, deadline in self._expiry.items()
                          if deadline <= self._clock()]:
                self._live(stale)

    async def append(self, key: str, item: str, max_items: int,
                     ttl_seconds: float | None = None) -> int:
        _check_max_items(max_items)
        entries = self._lists[key] if self._live(key) and key in self._lists else []
        entries.insert(0, item)
        del entries[max_items:]
        self._lists[key] = entries
        self._touch(key, ttl_seconds)
        return len(entries)

    async def items(self, key: str, limit: int | None = None) -> list[str]:
        if not self._live(key) or key not in self._lists:
            return []
        entries = self._lists[key]
        return list(entries if limit is None else entries[:limit])

    async def get(self, key: str) -> str | None:
        return self._values.get(key) if self._live(key) else None

    async def set(self, key: str, value: str, ttl_seconds: float | None = None) -> None:
        self._values[key] = value
        self._touch(key, ttl_seconds)

    async def keys(self, prefix: str) -> list[str]:
        return [key for key in [*self._lists, *self._values]
                if key.startswith(prefix) and self._live(key)]

    async def ping(self) -> bool:
        return True


class RedisStateStore(StateStore):
    """State in a Redis server shared by gateway replicas. Each call is one round trip
    (a transaction for ``append``), bounded by ``timeout`` seconds."""

    backend = "redis"

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, timeout: float = DEFAULT_TIMEOUT):
        try:
            import redis.asyncio as redis_asyncio
        except ImportError:
            raise ConfigError("the Redis state store needs the 'gateway' extra: "
                              "pip install 'edge-runtime[gateway]'") from None
        self.url = mask_url_credentials(url)
        self._prefix = prefix
        self._timeout = timeout
        self._client = redis_asyncio.Redis.from_url(url, socket_timeout=timeout,
                                                    socket_connect_timeout=timeout)

    async def _call(self, operation: Callable, *args):
        import redis

        try:
            return await asyncio.wait_for(operation(*args), timeout=self._timeout)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            raise StateUnavailable(
                f"Redis state store at {self.url} failed ({type(exc).__name__}); check that "
                "the server runs and the URL is right"
            ) from None

    async def append(self, key: str, item: str, max_items: int,
                     ttl_seconds: float | None = None) -> int:
        _check_max_items(max_items)
        name = self._prefix + key

        async def run() -> int:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.lpush(name, item)
                pipe.ltrim(name, 0, max_items - 1)
                pipe.llen(name)
                if ttl_seconds is not None:
                    pipe.pexpire(name, max(1, int(ttl_seconds * 1000)))
                results = await pipe.execute()
            return int(results[2])

        return await self._call(run)

    async def items(self, key: str, limit: int | None = None) -> list[str]:
        end = -1 if limit is None else max(0, limit - 1)
        if limit == 0:
            return []
        values = await self._call(self._client.lrange, self._prefix + key, 0, end)
        return [value.decode("utf-8") for value in values]

    async def get(self, key: str) -> str | None:
        value = await self._call(self._client.get, self._prefix + key)
        return None if value is None else value.decode("utf-8")

    async def set(self, key: str, value: str, ttl_seconds: float | None = None) -> None:
        expiry = None if ttl_seconds is None else max(1, int(ttl_seconds * 1000))
        await self._call(self._client.set, self._prefix + key, value, None, expiry)

    async def keys(self, prefix: str) -> list[str]:
        async def run() -> list[str]:
            found = []
            async for name in self._client.scan_iter(match=_glob_escape(self._prefix + prefix)
                                                     + "*", count=500):
                found.append(name.decode("utf-8")[len(self._prefix):])
            return found

        return await self._call(run)

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self._client.ping))
        except StateUnavailable:
            return False

    async def close(self) -> None:
        await self._client.aclose()


def create_state_store(backend: str, redis_url: str | None = None, *,
                       prefix: str = DEFAULT_PREFIX, timeout: float = DEFAULT_TIMEOUT,
                       clock: Callable[[], float] = time.monotonic) -> StateStore:
    """Create the store for ``backend``: "memory" or "redis" (which needs ``redis_url``)."""
    if backend == "memory":
        return MemoryStateStore(clock=clock)
    if backend == "redis":
        if not redis_url:
            raise ConfigError("the redis state store needs a Redis URL; set it, for example "
                              "redis://127.0.0.1:6379/0, or use the memory backend")
        return RedisStateStore(redis_url, prefix=prefix, timeout=timeout)
    raise ConfigError(f"unknown state store backend {backend!r}; use 'memory' or 'redis'")


def _check_max_items(max_items: int) -> None:
    if not isinstance(max_items, int) or isinstance(max_items, bool) or max_items < 1:
        raise ValueError(f"max_items is {max_items!r}; pass an integer of at least 1")


def _glob_escape(text: str) -> str:
    """Escape Redis glob characters so that a prefix matches only itself."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
