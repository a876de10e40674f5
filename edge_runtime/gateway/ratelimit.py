"""Rate limiting for the teacher gateway, per API key and per client address.

Each policy is a GCRA (generic cell rate algorithm) limit with a sustained ``rate`` in requests
per second and a ``burst``. GCRA stores one value per key, the theoretical arrival time (TAT):
the time at which the bucket would be full again. A request costs one emission interval
(``1 / rate``) and is admitted while the new TAT lies at most ``burst`` intervals ahead of
now. Over any interval of length T, at most ``burst + rate * T`` requests are admitted.

Times are integer microseconds, and the emission interval is rounded up to a whole
microsecond, so the limiter never admits more than the policy allows.

Two backends implement ``RateLimiter``:

- ``MemoryRateLimiter`` keeps the TATs in this process. It suits a single gateway process.
- ``RedisRateLimiter`` keeps them in Redis and applies GCRA in one Lua script that reads the
  Redis server's clock, so several gateway processes share exact limits even when their own
  clocks disagree.

``rate_limit_headers`` and ``retry_after_header`` format the decisions as HTTP response fields.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import heapq
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from edge_runtime.errors import ConfigError, EdgeRuntimeError
from edge_runtime.gateway.config import mask_url_credentials

log = logging.getLogger(__name__)

MICROSECONDS = 1_000_000
MAX_RATE = 1_000_000.0  # requests per second: one request per microsecond of the clock
MAX_WINDOW_SECONDS = 10 * 365 * 24 * 3600  # keeps every TAT exact in a Lua double
DEFAULT_MAX_KEYS = 100_000
DEFAULT_REDIS_PREFIX = "edge-gw:rl:"
DEFAULT_REDIS_TIMEOUT = 0.5  # seconds

_POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class RateLimiterUnavailable(EdgeRuntimeError):
    """The rate limiter's backend could not be reached or did not reply in time.

    The limiter leaves the request undecided. The caller chooses to fail open (admit it) or to
    fail closed (reject it with 503).
    """


@dataclass(frozen=True)
class RateLimitPolicy:
    """A GCRA limit: ``rate`` requests per second sustained, up to ``burst`` at once.

    ``name`` identifies the policy in Redis keys and in the RateLimit header fields, so it is
    limited to 1-64 letters, digits, ``_``, ``-`` and ``.``.
    """

    name: str
    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _POLICY_NAME.fullmatch(self.name):
            raise ConfigError(
                f"invalid rate limit policy name {self.name!r}; use 1-64 letters, digits, "
                "'_', '-' or '.', starting with a letter or digit, for example 'key'"
            )
        rate_is_number = isinstance(self.rate, (int, float)) and not isinstance(self.rate, bool)
        if not rate_is_number or not math.isfinite(self.rate) or not 0 < self.rate <= MAX_RATE:
            raise ConfigError(
                f"rate limit policy {self.name!r}: invalid rate {self.rate!r}; set rate to the "
                f"sustained requests per second, a number above 0 and at most {MAX_RATE:g}"
            )
        if not isinstance(self.burst, int) or isinstance(self.burst, bool) or self.burst < 1:
            raise ConfigError(
                f"rate limit policy {self.name!r}: invalid burst {self.burst!r}; set burst to "
                "the number of requests admitted at once, an integer of at least 1"
            )
        if self.window_seconds > MAX_WINDOW_SECONDS:
            raise ConfigError(
                f"rate limit policy {self.name!r}: burst / rate is {self.window_seconds} "
                f"seconds, above the maximum of {MAX_WINDOW_SECONDS}; raise rate or lower burst"
            )

    @property
    def interval_us(self) -> int:
        """Emission interval (1 / rate) in microseconds, rounded up."""
        return math.ceil(Fraction(MICROSECONDS) / Fraction(self.rate))

    @property
    def window_seconds(self) -> int:
        """Seconds for an empty bucket to fill up again (burst / rate), rounded up, at least 1."""
        return max(1, -(-self.burst * self.interval_us // MICROSECONDS))


@dataclass(frozen=True)
class Decision:
    """The outcome of one request against one policy.

    ``remaining`` counts the requests that could still be admitted right now after this one.
    ``retry_after`` is the wait in seconds until one request would be admitted, 0.0 when this
    one was allowed. ``reset_after`` is the wait in seconds until the bucket is full again.
    """

    allowed: bool
    policy: RateLimitPolicy
    remaining: int
    retry_after: float
    reset_after: float


def _gcra(stored_tat_us: int | None, now_us: int, policy: RateLimitPolicy
          ) -> tuple[Decision, int | None]:
    """Apply GCRA to one request and return the decision and the new TAT to store.

    The new TAT is None for a denied request, whose stored TAT stays unchanged. The Lua script
    in ``RedisRateLimiter`` carries out the same steps on the Redis server.
    """
    interval = policy.interval_us
    tat = now_us if stored_tat_us is None else max(stored_tat_us, now_us)
    new_tat = tat + interval
    allow_at = new_tat - policy.burst * interval
    if now_us < allow_at:
        denied = Decision(False, policy, 0, (allow_at - now_us) / MICROSECONDS,
                          (tat - now_us) / MICROSECONDS)
        return denied, None
    allowed = Decision(True, policy, (now_us - allow_at) // interval, 0.0,
                       (new_tat - now_us) / MICROSECONDS)
    return allowed, new_tat


class RateLimiter(abc.ABC):
    """Interface of the rate limiter backends, which store one TAT per policy and key."""

    backend: str

    @abc.abstractmethod
    async def hit(self, key: str, policy: RateLimitPolicy) -> Decision:
        """Count one request for ``key`` under ``policy`` and return whether it is admitted.

        Raises RateLimiterUnavailable when the backend cannot be reached.
        """

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Check whether the backend is reachable."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the backend's connections."""

    async def __aenter__(self) -> RateLimiter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class MemoryRateLimiter(RateLimiter):
    """GCRA state in a dict of this process, for a gateway that runs as one process.

    ``clock`` returns seconds as a float and is read with microsecond resolution. A lock
    guards the dict, so several threads or event loops may share one instance.

    At most ``max_keys`` keys are stored. When a new key would exceed that, keys whose bucket
    is full again (TAT in the past) are dropped first, because dropping them changes no
    decision. If more than 90 % of ``max_keys`` are still active, the keys closest to a full
    bucket are dropped until 90 % remain, so every eviction frees at least a tenth of the
    dict. A dropped active key starts again from a full bucket, so it may be admitted up to
    ``burst`` requests more than its policy allows.
    """

    backend = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = DEFAULT_MAX_KEYS):
        if not isinstance(max_keys, int) or isinstance(max_keys, bool) or max_keys < 1:
            raise ConfigError(f"invalid max_keys {max_keys!r}; set it to an integer of at least 1")
        self._clock = clock
        self._max_keys = max_keys
        self._tats: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Number of keys whose TAT is stored."""
        return len(self._tats)

    async def hit(self, key: str, policy: RateLimitPolicy) -> Decision:
        entry = (policy.name, key)
        with self._lock:
            now_us = round(self._clock() * MICROSECONDS)
            decision, new_tat = _gcra(self._tats.get(entry), now_us, policy)
            if new_tat is not None:
                if entry not in self._tats and len(self._tats) >= self._max_keys:
                    self._evict(now_us)
                self._tats[entry] = new_tat
        return decision

    def _evict(self, now_us: int) -> None:
        expired = [entry for entry, tat in self._tats.items() if tat <= now_us]
        for entry in expired:
            del self._tats[entry]

        # Drop down to a low-water mark, leaving room for the key being inserted, so that the
        # next inserts do not pay for another scan of the whole dict.
        keep = max(1, self._max_keys * 9 // 10) - 1
        drop = len(self._tats) - keep
        if drop <= 0:
            return
        nearly_full = heapq.nsmallest(drop, self._tats.items(), key=lambda item: item[1])
        for entry, _ in nearly_full:
            del self._tats[entry]
        log.warning("rate limiter dropped %d active keys because more than 90%% of "
                    "max_keys=%d were active; raise max_keys or use the redis backend",
                    drop, self._max_keys)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        with self._lock:
            self._tats.clear()


# GCRA on the Redis server, atomically. KEYS[1] is the bucket's key, ARGV[1] the emission
# interval and ARGV[2] the burst. Times are microseconds from the server's own clock (TIME), so
# gateways with skewed clocks agree. A write after TIME needs script effects replication, the
# default since Redis 5, which Redis 3.2 and 4 enable with redis.replicate_commands().
# Every number stays below 2^53, so Lua's doubles store it exactly. The division for
# remaining is corrected where rounding lifted it to the next integer.
# The reply is {allowed (0 or 1), remaining, retry_after_us, reset_after_us}.
_GCRA_SCRIPT = """
if redis.replicate_commands then
  redis.replicate_commands()
end
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
local reset_after = new_tat - now
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil(reset_after / 1000))
local remaining = math.floor((now - allow_at) / interval)
if remaining * interval > now - allow_at then
  remaining = remaining - 1
end
return {1, remaining, 0, reset_after}
"""


def _url_passwords(url: str) -> list[str]:
    """Return the secrets in ``url`` (user name, password, password query parameter) as written
    and percent-decoded, longest first."""
    try:
        parts = urlsplit(url)
        passwords = [parts.password or "", parts.username or ""]
    except ValueError:
        return []
    passwords += [value for name, value in parse_qsl(parts.query) if name == "password"]
    found = {text for password in passwords for text in (password, unquote(password)) if text}
    return sorted(found, key=len, reverse=True)


class RedisRateLimiter(RateLimiter):
    """GCRA state in Redis, shared exactly by every gateway process that uses the same server.

    Keys are ``{prefix}{policy name}:{SHA-256 of the caller's key}``, so raw API keys never
    reach Redis, and each expires when its bucket is full again. ``timeout`` bounds each call,
    connecting included, in seconds.

    NOTE: a plain SHA-256 of a client address can be reversed by hashing every IPv4 address.
    The hash keeps raw keys out of Redis listings, but it does not make addresses secret.
    """

    backend = "redis"

    def __init__(self, url: str, prefix: str = DEFAULT_REDIS_PREFIX,
                 timeout: float = DEFAULT_REDIS_TIMEOUT):
        if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
            raise ConfigError(f"invalid Redis timeout {timeout!r}; set it to a number of "
                              "seconds above 0, for example 0.5")
        self.url = mask_url_credentials(url)
        self.prefix = prefix
        self._timeout = float(timeout)
        self._secrets = _url_passwords(url)
        try:
            # One immediate retry replaces a pooled connection that the server has closed. A
            # retried script may count a request twice, which only makes the limit stricter.
            self._client = redis_asyncio.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 1),
            )
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL {self.url}: {self._scrub(exc)}; use "
                              "redis://[user:password@]host:port/db, rediss://... or "
                              "unix:///path/to/socket") from exc
        self._script = self._client.register_script(_GCRA_SCRIPT)
        self._reachable = True

    def redis_key(self, key: str, policy: RateLimitPolicy) -> str:
        """Return the Redis key that stores the TAT of ``key`` under ``policy``."""
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return f"{self.prefix}{policy.name}:{digest}"

    async def hit(self, key: str, policy: RateLimitPolicy) -> Decision:
        call = self._script(keys=[self.redis_key(key, policy)],
                            args=[policy.interval_us, policy.burst])
        try:
            reply = await asyncio.wait_for(call, self._timeout)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise self._unavailable(f"timed out after {self._timeout:g} s") from exc
        except (RedisError, OSError) as exc:
            raise self._unavailable(f"{type(exc).__name__}: {self._scrub(exc)}") from exc

        allowed, remaining, retry_after_us, reset_after_us = (int(value) for value in reply)
        return Decision(
            allowed=bool(allowed),
            policy=policy,
            remaining=remaining,
            retry_after=retry_after_us / MICROSECONDS,
            reset_after=reset_after_us / MICROSECONDS,
        )

    async def ping(self) -> bool:
        try:
            await asyncio.wait_for(self._client.ping(), self._timeout)
        except (asyncio.TimeoutError, RedisError, OSError) as exc:
            # Log a warning only when Redis goes from reachable to unreachable, because health
            # checks repeat every few seconds.
            level = logging.WARNING if self._reachable else logging.DEBUG
            log.log(level, "rate limiter Redis at %s is unreachable: %s: %s",
                    self.url, type(exc).__name__, self._scrub(exc))
            self._reachable = False
            return False
        if not self._reachable:
            log.info("rate limiter Redis at %s is reachable again", self.url)
        self._reachable = True
        return True

    async def close(self) -> None:
        await self._client.aclose()

    def _unavailable(self, reason: str) -> RateLimiterUnavailable:
        return RateLimiterUnavailable(
            f"rate limiter Redis at {self.url} is unavailable ({reason}); check that Redis is "
            "running and reachable from this host, or use the memory backend"
        )

    def _scrub(self, exc: BaseException) -> str:
        text = str(exc)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def create_rate_limiter(backend: str, redis_url: str | None = None, *,
                        redis_prefix: str = DEFAULT_REDIS_PREFIX,
                        redis_timeout: float = DEFAULT_REDIS_TIMEOUT,
                        clock: Callable[[], float] = time.monotonic,
                        max_keys: int = DEFAULT_MAX_KEYS) -> RateLimiter:
    """Create the limiter for ``backend``: "memory" or "redis" (which needs ``redis_url``).

    ``clock`` and ``max_keys`` apply to the memory backend, ``redis_prefix`` and
    ``redis_timeout`` to the redis backend.
    """
    if backend == "memory":
        return MemoryRateLimiter(clock=clock, max_keys=max_keys)
    if backend == "redis":
        if not redis_url:
            raise ConfigError("the redis rate limiter backend needs a Redis URL; set it, for "
                              "example redis://127.0.0.1:6379/0, or use the memory backend")
        return RedisRateLimiter(redis_url, prefix=redis_prefix, timeout=redis_timeout)
    raise ConfigError(f"unknown rate limiter backend {backend!r}; use 'memory' or 'redis'")


# Header fields of draft-ietf-httpapi-ratelimit-headers-11 (May 2026). Both are Structured
# Field Lists (RFC 9651) with one member per policy: the policy name as a String, then
# parameters. RateLimit-Policy carries the quota q and the window w in seconds. RateLimit
# carries the available quota r and the seconds t until it is restored. The policy name's
# character set needs no escaping inside an sf-string.
def rate_limit_headers(decisions: Sequence[Decision]) -> dict[str, str]:
    """Build the ``RateLimit-Policy`` and ``RateLimit`` fields, one list member per decision.

    Returns an empty dict for no decisions, because both fields must be non-empty lists.
    """
    if not decisions:
        return {}
    policies = [f'"{d.policy.name}";q={d.policy.burst};w={d.policy.window_seconds}'
                for d in decisions]
    limits = [f'"{d.policy.name}";r={d.remaining};t={math.ceil(d.reset_after)}'
              for d in decisions]
    return {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(limits)}


def retry_after_header(decisions: Sequence[Decision]) -> str:
    """Build the ``Retry-After`` value: whole seconds, rounded up and at least 1, until every
    denying policy would admit a request.

    Raises ValueError when no decision denies the request.
    """
    waits = [d.retry_after for d in decisions if not d.allowed]
    if not waits:
        raise ValueError("retry_after_header needs at least one denied decision")
    return str(max(1, math.ceil(max(waits))))
