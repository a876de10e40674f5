"""HTTP clients for the teacher gateway's ``POST /v1/predict``: ``TeacherClient`` (blocking)
and ``AsyncTeacherClient`` (asyncio).

Failures map to two errors: ``TeacherUnavailable`` when the teacher cannot answer now
(connection refused, timeout, HTTP 5xx or 429, a reply that is not the documented JSON, an
open circuit breaker) and ``TeacherRejected`` when the gateway rejects this request (HTTP 4xx
other than 429), which a retry will not fix. ``TeacherRetryLater``, a ``TeacherUnavailable``,
also carries the time at which asking again makes sense.

Both clients retry, honour ``Retry-After`` and keep a circuit breaker with the same rules,
because the decisions live in ``edge_runtime.teacher_policy`` and only the transport differs.
docs/runtime-client.md describes the rules and their defaults. httpx is imported and the
connection pool created on the first call, so a device whose first answers are local does not
pay for them at start-up. That call builds the httpx client before its query's budget and
deadlines start, because loading the CA bundle can take longer than a deadline on a slow CPU
(2.6 s under qemu emulation of a Cortex-A72, measured with scripts/arm64-emulation.sh).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from edge_runtime.errors import ConfigError
from edge_runtime.teacher_policy import (
    BREAKER_CLOSED,
    BREAKER_HALF_OPEN,
    BREAKER_OPEN,
    FAILURE_FINAL,
    FAILURE_NOT_SENT,
    FAILURE_READ,
    MAX_RESPONSE_BYTES,
    Attempt,
    AttemptFailure,
    BreakerPolicy,
    CircuitBreaker,
    QueryPolicy,
    Reply,
    ReplyBuffer,
    RetryPolicy,
    TeacherAnswer,
    TeacherRetryLater,
)

if TYPE_CHECKING:
    import ssl

    import httpx

__all__ = [
    "BREAKER_CLOSED",
    "BREAKER_HALF_OPEN",
    "BREAKER_OPEN",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_READ_TIMEOUT",
    "MAX_RESPONSE_BYTES",
    "AsyncTeacherClient",
    "BreakerPolicy",
    "RetryPolicy",
    "TeacherAnswer",
    "TeacherClient",
    "TeacherRetryLater",
]

DEFAULT_CONNECT_TIMEOUT = 1.0  # seconds
DEFAULT_READ_TIMEOUT = 2.0  # seconds
PREDICT_PATH = "/v1/predict"
HEALTH_PATH = "/healthz"


class _ClientBase:
    """Settings, validation, the shared ``QueryPolicy`` and the lazily built httpx client of
    both clients."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        connect_timeout: float,
        read_timeout: float,
        *,
        retry: RetryPolicy | None,
        breaker: BreakerPolicy | None,
        ca_bundle: str | os.PathLike[str] | None,
        transport: object | None,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        random: Callable[[], float] | None,
    ):
        self.base_url = _validated_base_url(base_url)
        for name, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout)):
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not 0 < value < float("inf")
            ):
                raise ConfigError(
                    f"{name} must be a finite number of seconds above 0, got {value!r}"
                )
        self._headers = {"User-Agent": "edge-runtime"}
        if api_key:
            _check_api_key(api_key)
            self._headers["Authorization"] = f"Bearer {api_key}"
        if transport is not None and ca_bundle is not None:
            raise ConfigError(
                "pass ca_bundle or transport, not both: a custom transport "
                "carries its own TLS settings"
            )
        self._ssl_context = _ssl_context(ca_bundle) if ca_bundle is not None else None
        self._transport = transport
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        if random is None:
            import random as random_module

            random = random_module.random
        self._policy = QueryPolicy(
            self.base_url,
            api_key or None,
            connect_timeout,
            read_timeout,
            retry if retry is not None else RetryPolicy(),
            breaker if breaker is not None else BreakerPolicy(),
            clock=clock,
            wall_clock=wall_clock,
            random=random,
        )
        self._client_lock = threading.Lock()
        self._client: httpx.Client | httpx.AsyncClient | None = None

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker of this client, for its ``state`` and ``open_for``."""
        return self._policy.breaker

    @property
    def breaker_state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"``."""
        return self._policy.breaker.state

    def __repr__(self) -> str:  # the API key stays out of reprs and logs
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _http_client(self):
        """Return the httpx client, building it and its TLS context on the first call and
        after a close."""
        with self._client_lock:
            if self._client is None:
                import httpx

                self._client = self._build_client(httpx)
            return self._client

    def _build_client(self, httpx_module):
        raise NotImplementedError

    def _client_options(self, httpx_module, transport_class) -> dict:
        import socket

        timeout = httpx_module.Timeout(self._read_timeout, connect=self._connect_timeout)
        transport = self._transport
        if transport is None:
            # httpcore writes the headers and the body of a POST separately. With Nagle's
            # algorithm on, the body then waits for the server's delayed ACK (about 40 ms on
            # Linux), so Nagle is turned off. TLS verification stays on: verify is True, or
            # a context that trusts ca_bundle.
            transport = transport_class(
                verify=self._ssl_context if self._ssl_context is not None else True,
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            )
        return {
            "base_url": self.base_url,
            "headers": self._headers,
            "timeout": timeout,
            "transport": transport,
        }


class TeacherClient(_ClientBase):
    """Blocking client for one gateway; reuses one connection pool across calls and is safe
    to call from several threads.

    ``retry`` and ``breaker`` set the retry and circuit-breaker rules (see ``RetryPolicy``
    and ``BreakerPolicy``). ``ca_bundle`` is a PEM file of CA certificates to trust in place
    of the system's. ``transport`` replaces the httpx transport, for example to count or
    route requests, and then carries its own TLS settings. ``clock`` (monotonic seconds),
    ``wall_clock`` (Unix time, for Retry-After dates and messages), ``sleep`` and ``random``
    (uniform in [0, 1), for the backoff jitter) are there for tests.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        *,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        random: Callable[[], float] | None = None,
    ):
        super().__init__(
            base_url,
            api_key,
            connect_timeout,
            read_timeout,
            retry=retry,
            breaker=breaker,
            ca_bundle=ca_bundle,
            transport=transport,
            clock=clock,
            wall_clock=wall_clock,
            random=random,
        )
        self._sleep = sleep

    def _build_client(self, httpx_module) -> httpx.Client:
        return httpx_module.Client(**self._client_options(httpx_module, httpx_module.HTTPTransport))

    def predict(self, text: str) -> TeacherAnswer:
        """Return the teacher's answer for ``text``, retrying where that is safe.

        Raises ``TeacherRejected`` on HTTP 4xx other than 429, ``TeacherRetryLater`` while the
        breaker is open or when Retry-After is beyond the query's budget, and
        ``TeacherUnavailable`` on any other failure.
        """
        # Built before the query starts, so its budget and deadlines cover only network work.
        self._http_client()
        query = self._policy.start_query()
        while True:
            wait = query.next_wait()
            if wait > 0:
                self._sleep(wait)
            attempt = query.begin_attempt()
            try:
                reply = self._send(attempt, text)
            except AttemptFailure as failure:
                query.record_failure(attempt, failure)
                continue
            except BaseException:
                query.abandon(attempt)
                raise
            answer = query.record_reply(attempt, reply)
            if answer is not None:
                return answer

    def _send(self, attempt: Attempt, text: str) -> Reply:
        import httpx

        try:
            with self._http_client().stream(
                "POST", PREDICT_PATH, json={"text": text}, timeout=_attempt_timeout(httpx, attempt)
            ) as response:
                # NOTE: headers sent slowly are bounded only by the per-read timeout, so a
                # server that drips them can hold an attempt past its deadline. The
                # deadline applies from the first byte of the body.
                body = ReplyBuffer(attempt, self._policy.clock)
                for chunk in response.iter_bytes():
                    body.add(chunk)
                return Reply(
                    response.status_code, response.headers.get("retry-after"), body.getvalue()
                )
        except httpx.HTTPError as exc:
            raise _attempt_failure(httpx, exc, attempt) from exc

    def healthy(self) -> bool:
        """Return True when ``GET /healthz`` returns HTTP 200. This bypasses the circuit
        breaker and does not change its state."""
        import httpx

        try:
            return self._http_client().get(HEALTH_PATH).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncTeacherClient(_ClientBase):
    """asyncio client for one gateway, with the same arguments and rules as ``TeacherClient``.

    ``sleep`` is a coroutine function and defaults to ``asyncio.sleep``. The connection pool
    belongs to the event loop of the first request, so use one client per event loop and
    close it with ``await client.aclose()`` (or ``async with``) before that loop ends.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        *,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        random: Callable[[], float] | None = None,
    ):
        super().__init__(
            base_url,
            api_key,
            connect_timeout,
            read_timeout,
            retry=retry,
            breaker=breaker,
            ca_bundle=ca_bundle,
            transport=transport,
            clock=clock,
            wall_clock=wall_clock,
            random=random,
        )
        self._sleep = sleep

    def _build_client(self, httpx_module) -> httpx.AsyncClient:
        return httpx_module.AsyncClient(
            **self._client_options(httpx_module, httpx_module.AsyncHTTPTransport)
        )

    async def _ready_client(self) -> httpx.AsyncClient:
        """Return the httpx client. When there is none yet, build it in a worker thread, so
        that loading the CA bundle does not stall the other tasks of the event loop."""
        client = self._client
        if client is None:
            import asyncio

            client = await asyncio.to_thread(self._http_client)
        return client

    async def predict(self, text: str) -> TeacherAnswer:
        """Return the teacher's answer for ``text``; see ``TeacherClient.predict``."""
        sleep = self._sleep
        if sleep is None:
            import asyncio

            sleep = asyncio.sleep
        # Built before the query starts, as in TeacherClient.predict.
        await self._ready_client()
        query = self._policy.start_query()
        while True:
            wait = query.next_wait()
            if wait > 0:
                await sleep(wait)
            attempt = query.begin_attempt()
            try:
                reply = await self._send(attempt, text)
            except AttemptFailure as failure:
                query.record_failure(attempt, failure)
                continue
            except BaseException:  # including asyncio.CancelledError
                query.abandon(attempt)
                raise
            answer = query.record_reply(attempt, reply)
            if answer is not None:
                return answer

    async def _send(self, attempt: Attempt, text: str) -> Reply:
        import asyncio

        # Unlike the blocking client, the whole exchange, headers included, is cancelled at
        # the attempt's deadline.
        seconds = max(0.0, attempt.deadline - self._policy.clock())
        try:
            return await asyncio.wait_for(self._exchange(attempt, text), timeout=seconds)
        except asyncio.TimeoutError:
            raise AttemptFailure(
                FAILURE_READ, f"no complete reply within the attempt's {seconds:.1f} s deadline"
            ) from None

    async def _exchange(self, attempt: Attempt, text: str) -> Reply:
        import httpx

        client = await self._ready_client()
        try:
            async with client.stream(
                "POST", PREDICT_PATH, json={"text": text}, timeout=_attempt_timeout(httpx, attempt)
            ) as response:
                body = ReplyBuffer(attempt, self._policy.clock)
                async for chunk in response.aiter_bytes():
                    body.add(chunk)
                return Reply(
                    response.status_code, response.headers.get("retry-after"), body.getvalue()
                )
        except httpx.HTTPError as exc:
            raise _attempt_failure(httpx, exc, attempt) from exc

    async def healthy(self) -> bool:
        """Return True when ``GET /healthz`` returns HTTP 200. This bypasses the circuit
        breaker and does not change its state."""
        import httpx

        client = await self._ready_client()
        try:
            return (await client.get(HEALTH_PATH)).status_code == 200
        except httpx.HTTPError:
            return False

    async def aclose(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> AsyncTeacherClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _attempt_timeout(httpx_module, attempt: Attempt) -> httpx.Timeout:
    return httpx_module.Timeout(
        connect=attempt.connect_timeout,
        read=attempt.read_timeout,
        write=attempt.read_timeout,
        pool=attempt.connect_timeout,
    )


def _attempt_failure(httpx_module, exc: httpx.HTTPError, attempt: Attempt) -> AttemptFailure:
    """Classify an httpx error by whether the request may have reached the teacher."""
    import ssl

    message = f"{type(exc).__name__}: {exc}"
    cause: BaseException | None = exc
    root: BaseException = exc
    for _ in range(6):  # httpx wraps httpcore's error, which wraps the socket's
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            return AttemptFailure(
                FAILURE_FINAL,
                f"TLS certificate verification failed "
                f"({cause.verify_message}); pass the CA that "
                "signed the gateway's certificate as ca_bundle",
            )
        root = cause
        cause = cause.__cause__ or cause.__context__
    if str(root) not in message:
        # With asyncio, the outer error contains only "All connection attempts failed".
        message += f" ({type(root).__name__}: {root})"
    if isinstance(exc, httpx_module.ConnectTimeout):
        return AttemptFailure(
            FAILURE_NOT_SENT, f"connect timed out after {attempt.connect_timeout:.1f} s"
        )
    if isinstance(exc, (httpx_module.ConnectError, httpx_module.PoolTimeout)):
        return AttemptFailure(FAILURE_NOT_SENT, f"connection failed: {message}")
    if isinstance(exc, (httpx_module.WriteError, httpx_module.WriteTimeout)):
        return AttemptFailure(FAILURE_NOT_SENT, f"sending the request failed: {message}")
    if isinstance(exc, httpx_module.ReadTimeout):
        return AttemptFailure(FAILURE_READ, f"read timed out after {attempt.read_timeout:.1f} s")
    if isinstance(exc, (httpx_module.ReadError, httpx_module.RemoteProtocolError)):
        return AttemptFailure(
            FAILURE_READ, f"the connection failed after the request was sent: {message}"
        )
    return AttemptFailure(FAILURE_FINAL, f"the request failed: {message}")


def _validated_base_url(base_url: str) -> str:
    from urllib.parse import urlsplit

    if not isinstance(base_url, str):
        raise ConfigError(f"base_url must be a str, got {type(base_url).__name__}")
    try:
        parts = urlsplit(base_url)
        has_credentials = parts.username is not None or parts.password is not None
    except ValueError:
        raise ConfigError("base_url is not a valid URL; expected http(s)://host[:port]") from None
    if has_credentials:
        # The URL is left out of this message because it contains a password.
        raise ConfigError(
            "base_url must not contain a user name or password; pass the API key as api_key"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"base_url must be an http:// or https:// URL with a host, got {base_url!r}"
        )
    return base_url.rstrip("/")


def _check_api_key(api_key: str) -> None:
    # The key itself never goes into the message.
    if not isinstance(api_key, str):
        raise ConfigError(f"api_key must be a str, got {type(api_key).__name__}")
    for position, character in enumerate(api_key):
        if not 33 <= ord(character) <= 126:
            raise ConfigError(
                f"api_key has a space, control or non-ASCII character at "
                f"position {position}, which cannot go in an Authorization "
                "header; check how the key was copied"
            )


def _ssl_context(ca_bundle: str | os.PathLike[str]) -> ssl.SSLContext:
    """Return a verifying TLS context that trusts the CA certificates in ``ca_bundle``."""
    import ssl

    path = os.fspath(ca_bundle)
    if not os.path.isfile(path):
        raise ConfigError(f"ca_bundle {path!r} is not a file; pass a PEM file of CA certificates")
    try:
        return ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"ca_bundle {path!r} contains no valid PEM certificate: {exc.reason or exc}"
        ) from None
