"""TeacherClient and AsyncTeacherClient against real HTTP servers on loopback: retries,
Retry-After, the circuit breaker, TLS verification and keeping the API key secret.

Most cases run for both clients through a small harness. Where the breaker's cool-down or a
wait matters, time is a fake clock, so the tests never sleep for long. Real timeouts are
used only where a server must be slow.
"""

from __future__ import annotations

import asyncio
import datetime
import http.server
import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import format_datetime

import httpx
import pytest

from edge_runtime.errors import ConfigError, TeacherRejected, TeacherUnavailable
from edge_runtime.teacher_client import (
    MAX_RESPONSE_BYTES,
    AsyncTeacherClient,
    BreakerPolicy,
    RetryPolicy,
    TeacherClient,
    TeacherRetryLater,
)
from edge_runtime.teacher_policy import format_utc, parse_retry_after
from tests.conftest import ROOT, free_loopback_port

API_KEY = "egw_TEST-secret-7f3a9c"
ANSWER = {"label": "weather", "request_id": "req-1", "model_version": "teacher-v1"}
START_WALL = 1_700_000_000.0  # Unix time of the fake clock's start


@dataclass
class Step:
    """One scripted reply of ``ScriptedServer``."""

    status: int = 200
    body: bytes = json.dumps(ANSWER).encode()
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before the reply
    gate: threading.Event | None = None  # the reply waits until this is set


class ScriptedServer:
    """A loopback HTTP server whose POST replies follow a script; the last step repeats."""

    def __init__(self, steps: list[Step], tls: ssl.SSLContext | None = None):
        self.requests: list[dict[str, str | None]] = []
        self._steps = list(steps)
        self._offset = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                step = outer._record(self.headers.get("authorization"), body)
                if step.gate is not None:
                    step.gate.wait(10)
                if step.delay:
                    time.sleep(step.delay)
                self._reply(step.status, step.body, step.headers)

            def do_GET(self):
                if self.path == "/healthz":
                    self._reply(200, b'{"status": "ok"}', {})
                else:
                    self._reply(404, b'{"title": "Not found"}', {})

            def _reply(self, status, body, headers):
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first, as some tests intend

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        # A short poll interval lets shutdown() return quickly at the end of each test.
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def _record(self, authorization: str | None, body: bytes) -> Step:
        with self._lock:
            self.requests.append({"authorization": authorization, "body": body.decode()})
            index = len(self.requests) - 1 - self._offset
            return self._steps[min(index, len(self._steps) - 1)]

    def set_steps(self, steps: list[Step]) -> None:
        """Replace the script; the next request gets its first step."""
        with self._lock:
            self._steps = list(steps)
            self._offset = len(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SilentListener:
    """A TCP listener that accepts connections, counts them and never sends a byte."""

    def __init__(self):
        self.accepted = 0
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.05)
        self._connections: list[socket.socket] = []
        self._stop = threading.Event()
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self._connections.append(connection)
            self.accepted += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()
        for connection in self._connections:
            connection.close()


class FakeClock:
    """A monotonic clock and a wall clock that move only through advance() and the sleep
    functions, which record each wait."""

    def __init__(self):
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return START_WALL + (self.now - 1_000.0)

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


class CountingTransport(httpx.HTTPTransport):
    """The default httpx transport, counting the requests handed to it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.count = 0

    def handle_request(self, request):
        self.count += 1
        return super().handle_request(request)


class CountingAsyncTransport(httpx.AsyncHTTPTransport):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.count = 0

    async def handle_async_request(self, request):
        self.count += 1
        return await super().handle_async_request(request)


class Harness:
    """Drives a TeacherClient ("sync") or an AsyncTeacherClient ("async") through one
    blocking interface. The async client runs on one event loop for the harness's life,
    because its connection pool belongs to that loop."""

    def __init__(
        self,
        kind: str,
        url: str,
        clock: FakeClock | None = None,
        count_requests: bool = False,
        **kwargs,
    ):
        self.kind = kind
        if clock is not None:
            kwargs.update(
                clock=clock.monotonic,
                wall_clock=clock.time,
                sleep=clock.sleep if kind == "sync" else clock.async_sleep,
            )
        kwargs.setdefault("random", lambda: 0.5)
        self.transport = None
        if count_requests:
            self.transport = CountingTransport() if kind == "sync" else CountingAsyncTransport()
            kwargs["transport"] = self.transport
        if kind == "sync":
            self.client = TeacherClient(url, **kwargs)
        else:
            self.loop = asyncio.new_event_loop()
            self.client = AsyncTeacherClient(url, **kwargs)

    def predict(self, text: str = "weather in rome"):
        if self.kind == "sync":
            return self.client.predict(text)
        return self.loop.run_until_complete(self.client.predict(text))

    def healthy(self) -> bool:
        if self.kind == "sync":
            return self.client.healthy()
        return self.loop.run_until_complete(self.client.healthy())

    def close(self) -> None:
        if self.kind == "sync":
            self.client.close()
        else:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def make_client(request):
    """A factory of harnesses for the parametrized client kind; closes them at the end."""
    harnesses = []

    def make(url: str, **kwargs) -> Harness:
        harness = Harness(request.param, url, **kwargs)
        harnesses.append(harness)
        return harness

    yield make
    for harness in harnesses:
        harness.close()


@pytest.fixture
def make_server():
    servers = []

    def make(*steps: Step, tls: ssl.SSLContext | None = None) -> ScriptedServer:
        server = ScriptedServer(list(steps) or [Step()], tls=tls)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def problem(status: int, detail: str) -> bytes:
    return json.dumps(
        {"type": "about:blank", "status": status, "title": "Problem", "detail": detail}
    ).encode()


def messages(error: BaseException) -> list[str]:
    """str and repr of an exception and of every exception it was raised from."""
    found = []
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return found


# A dead teacher and the circuit breaker


def test_dead_teacher_costs_one_query_each(make_client, caplog):
    caplog.set_level(logging.INFO, logger="edge_runtime.teacher_client")
    clock = FakeClock()
    client = make_client(
        f"http://127.0.0.1:{free_loopback_port()}", clock=clock, count_requests=True
    )
    errors = []
    for _ in range(1000):
        with pytest.raises(TeacherUnavailable) as info:
            client.predict()
        errors.append(info.value)

    # 3 failed queries (failure_threshold) of 3 attempts each, then no request at all.
    assert client.transport.count == 9
    assert client.client.breaker_state == "open"
    for error in errors[:3]:
        assert "refused" in str(error).lower()
        assert "failed all 3 attempts" in str(error)
    for error in errors[3:]:
        assert isinstance(error, TeacherRetryLater)
        assert "circuit breaker is open" in str(error)
        assert error.retry_after == pytest.approx(30.0)
        assert error.retry_at == pytest.approx(clock.time() + 30.0)
    assert format_utc(clock.time() + 30.0) in str(errors[-1])
    assert clock.sleeps == pytest.approx([0.05, 0.1] * 3)

    opened = [r for r in caplog.records if "circuit breaker opened" in r.getMessage()]
    assert len(opened) == 1
    assert opened[0].levelno == logging.WARNING
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 6
    assert f"teacher at {client.client.base_url}: attempt 1 of 3 failed" in retries[0]
    assert "attempt 2 of 3 failed" in retries[1]
    assert len(caplog.records) < 20  # short-circuited calls are not logged one by one


def test_silent_server_opens_breaker(make_client):
    listener = SilentListener()
    try:
        client = make_client(listener.url, connect_timeout=0.5, read_timeout=0.2)
        errors = []
        for _ in range(10):
            with pytest.raises(TeacherUnavailable) as info:
                client.predict()
            errors.append(info.value)
    finally:
        listener.close()

    # A read timeout is not retried, so each of the first 3 queries cost one connection.
    assert listener.accepted == 3
    for error in errors[:3]:
        assert not isinstance(error, TeacherRetryLater)
        assert "read timed out" in str(error)
        assert "not retried" in str(error)
    for error in errors[3:]:
        assert isinstance(error, TeacherRetryLater)
        assert "circuit breaker is open" in str(error)
    assert client.client.breaker_state == "open"


def open_breaker(client: Harness, server: ScriptedServer) -> None:
    """Fail 3 queries with HTTP 500, which is not retried, so that the breaker opens."""
    server.set_steps([Step(500, problem(500, "teacher crashed"))])
    for _ in range(3):
        with pytest.raises(TeacherUnavailable, match="HTTP 500"):
            client.predict()
    assert client.client.breaker_state == "open"


def test_half_open_sends_one_probe_threads(make_server):
    server = make_server()
    clock = FakeClock()
    client = Harness("sync", server.url, clock=clock)
    try:
        open_breaker(client, server)
        assert len(server.requests) == 3
        clock.advance(30.0)
        assert client.client.breaker_state == "half-open"

        release = threading.Event()
        server.set_steps([Step(gate=release)])
        callers = 8
        start = threading.Barrier(callers)
        answers, errors = [], []

        def call():
            start.wait()
            try:
                answers.append(client.predict())
            except TeacherUnavailable as exc:
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(callers)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(errors) < callers - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        for thread in threads:
            thread.join(10)
    finally:
        client.close()

    assert len(server.requests) == 4  # the 3 failures and one probe
    assert len(answers) == 1
    assert answers[0].label == "weather"
    assert len(errors) == callers - 1
    for error in errors:
        assert isinstance(error, TeacherRetryLater)
        assert "half-open" in str(error)
        assert error.retry_after is None
    assert client.client.breaker_state == "closed"


def test_half_open_sends_one_probe_tasks(make_server):
    server = make_server()
    clock = FakeClock()
    release = threading.Event()
    callers = 8

    async def scenario():
        async with AsyncTeacherClient(
            server.url, clock=clock.monotonic, wall_clock=clock.time, sleep=clock.async_sleep
        ) as client:
            server.set_steps([Step(500, problem(500, "teacher crashed"))])
            for _ in range(3):
                with pytest.raises(TeacherUnavailable):
                    await client.predict("weather in rome")
            clock.advance(30.0)
            server.set_steps([Step(gate=release)])
            tasks = [asyncio.create_task(client.predict("weather in rome")) for _ in range(callers)]
            for _ in range(1000):
                if sum(task.done() for task in tasks) == callers - 1:
                    break
                await asyncio.sleep(0.01)
            release.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return results, client.breaker_state

    results, state = asyncio.run(scenario())
    answers = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(server.requests) == 4
    assert [a.label for a in answers] == ["weather"]
    assert len(errors) == callers - 1
    assert all(isinstance(e, TeacherRetryLater) and "half-open" in str(e) for e in errors)
    assert state == "closed"


def test_failed_probe_reopens_longer(make_client, make_server, caplog):
    caplog.set_level(logging.INFO, logger="edge_runtime.teacher_client")
    server = make_server()
    clock = FakeClock()
    client = make_client(server.url, clock=clock)
    open_breaker(client, server)
    clock.advance(30.0)

    with pytest.raises(TeacherUnavailable, match="HTTP 500"):
        client.predict()  # the probe fails
    assert len(server.requests) == 4
    assert client.client.breaker_state == "open"
    assert client.client.breaker.open_for == pytest.approx(60.0)  # the cool-down doubled

    clock.advance(59.0)
    with pytest.raises(TeacherRetryLater, match="the probe request failed"):
        client.predict()
    assert len(server.requests) == 4

    clock.advance(1.0)
    server.set_steps([Step()])
    assert client.predict().label == "weather"
    assert client.client.breaker_state == "closed"
    assert len(server.requests) == 5
    changes = [r.getMessage() for r in caplog.records if "circuit breaker" in r.getMessage()]
    assert [m.split("circuit breaker ")[1].split(" ")[0] for m in changes] == [
        "opened",
        "half-open",
        "opened",
        "half-open",
        "closed,",
    ]


def test_cooldown_growth_capped(make_client, make_server):
    server = make_server()
    clock = FakeClock()
    client = make_client(
        server.url,
        clock=clock,
        breaker=BreakerPolicy(failure_threshold=1, cooldown=10.0, max_cooldown=25.0),
    )
    server.set_steps([Step(500, problem(500, "down"))])
    with pytest.raises(TeacherUnavailable):
        client.predict()
    cooldowns = []
    for _ in range(3):
        clock.advance(client.client.breaker.open_for)
        with pytest.raises(TeacherUnavailable, match="HTTP 500"):
            client.predict()  # a failed probe
        cooldowns.append(client.client.breaker.open_for)
    assert cooldowns == pytest.approx([20.0, 25.0, 25.0])


def test_async_cancelled_probe_frees_slot(make_server):
    server = make_server()
    clock = FakeClock()
    gate = threading.Event()

    async def scenario():
        async with AsyncTeacherClient(
            server.url, clock=clock.monotonic, wall_clock=clock.time, sleep=clock.async_sleep
        ) as client:
            server.set_steps([Step(500, problem(500, "down"))])
            for _ in range(3):
                with pytest.raises(TeacherUnavailable):
                    await client.predict("weather in rome")
            clock.advance(30.0)
            server.set_steps([Step(gate=gate), Step()])
            probe = asyncio.create_task(client.predict("weather in rome"))
            for _ in range(1000):
                if len(server.requests) == 4:
                    break
                await asyncio.sleep(0.01)
            probe.cancel()
            with pytest.raises(asyncio.CancelledError):
                await probe
            state_after_cancel = client.breaker_state
            answer = await client.predict("weather in rome")  # the next caller may probe
            return state_after_cancel, answer, client.breaker_state

    try:
        state_after_cancel, answer, state = asyncio.run(scenario())
    finally:
        gate.set()
    assert state_after_cancel == "half-open"
    assert answer.label == "weather"
    assert state == "closed"
    assert len(server.requests) == 5


def test_rejections_do_not_open_breaker(make_client, make_server):
    server = make_server(Step(400, problem(400, "Invalid field 'text'")))
    client = make_client(server.url, clock=FakeClock())
    for _ in range(10):
        with pytest.raises(TeacherRejected):
            client.predict()
    assert client.client.breaker_state == "closed"
    assert len(server.requests) == 10


# Retries


def test_503_then_200_retries_once(make_client, make_server):
    server = make_server(Step(503, problem(503, "teacher restarting")), Step())
    clock = FakeClock()
    client = make_client(server.url, clock=clock, random=lambda: 0.5)

    answer = client.predict()

    assert answer.label == "weather"
    assert answer.request_id == "req-1"
    assert answer.model_version == "teacher-v1"
    assert len(server.requests) == 2
    assert clock.sleeps == pytest.approx([0.05])  # 0.5 * backoff_base


def test_backoff_doubles_up_to_cap(make_client):
    clock = FakeClock()
    client = make_client(
        f"http://127.0.0.1:{free_loopback_port()}",
        clock=clock,
        count_requests=True,
        random=lambda: 0.75,
        retry=RetryPolicy(max_retries=4, backoff_base=0.2, backoff_cap=0.5, budget=10.0),
    )
    with pytest.raises(TeacherUnavailable, match="failed all 5 attempts"):
        client.predict()
    assert client.transport.count == 5
    # 0.75 of min(0.5, 0.2 * 2 ** (n - 1)) for retries n = 1 to 4
    assert clock.sleeps == pytest.approx([0.15, 0.3, 0.375, 0.375])


def test_429_retry_after_seconds(make_client, make_server):
    server = make_server(Step(429, problem(429, "slow down"), {"Retry-After": "1"}), Step())
    clock = FakeClock()
    client = make_client(server.url, clock=clock)

    assert client.predict().label == "weather"
    assert clock.sleeps == [1.0]
    assert len(server.requests) == 2


def test_429_retry_after_http_date(make_client, make_server):
    clock = FakeClock()
    when = datetime.datetime.fromtimestamp(START_WALL + 2, tz=datetime.timezone.utc)
    server = make_server(
        Step(429, problem(429, "slow down"), {"Retry-After": format_datetime(when, usegmt=True)}),
        Step(),
    )
    client = make_client(server.url, clock=clock)

    assert client.predict().label == "weather"
    assert clock.sleeps == [2.0]
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_beyond_budget(make_client, make_server, status):
    server = make_server(
        Step(status, problem(status, "come back later"), {"Retry-After": "120"}), Step()
    )
    clock = FakeClock()
    client = make_client(server.url, clock=clock)

    with pytest.raises(TeacherRetryLater) as info:
        client.predict()
    error = info.value
    assert len(server.requests) == 1
    assert clock.sleeps == []
    assert error.retry_after == 120.0
    assert error.retry_at == START_WALL + 120.0
    assert "120.0 s" in str(error)
    assert format_utc(START_WALL + 120.0) in str(error)
    assert f"HTTP {status}" in str(error)

    # Later calls honour the same Retry-After without a request.
    clock.advance(60.0)
    with pytest.raises(TeacherRetryLater) as info:
        client.predict()
    assert info.value.retry_after == pytest.approx(60.0)
    assert len(server.requests) == 1

    clock.advance(60.0)
    assert client.predict().label == "weather"
    assert len(server.requests) == 2


def test_retry_after_capped_by_max_cooldown(make_client, make_server):
    server = make_server(Step(429, problem(429, "slow down"), {"Retry-After": "86400"}))
    client = make_client(server.url, clock=FakeClock())
    with pytest.raises(TeacherRetryLater) as info:
        client.predict()
    assert info.value.retry_after == BreakerPolicy().max_cooldown


def test_429_every_attempt_gives_up(make_client, make_server):
    server = make_server(Step(429, problem(429, "slow down"), {"Retry-After": "1"}))
    clock = FakeClock()
    client = make_client(server.url, clock=clock)
    with pytest.raises(TeacherRetryLater, match="failed all 3 attempts") as info:
        client.predict()
    assert len(server.requests) == 3
    assert clock.sleeps == [1.0, 1.0]
    assert info.value.retry_after == 1.0
    assert client.client.breaker_state == "closed"  # rate limiting is not a teacher failure


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_error_not_retried(make_client, make_server, status):
    server = make_server(Step(status, problem(status, f"rejected with {status}")))
    clock = FakeClock()
    client = make_client(server.url, clock=clock)

    with pytest.raises(TeacherRejected) as info:
        client.predict()

    assert info.value.status_code == status
    assert info.value.detail == f"rejected with {status}"
    assert len(server.requests) == 1
    assert clock.sleeps == []


def test_read_timeout_not_retried(make_client, make_server):
    server = make_server(Step(delay=1.0))
    client = make_client(server.url, connect_timeout=0.5, read_timeout=0.2)
    with pytest.raises(TeacherUnavailable, match="read timed out after 0.2 s") as info:
        client.predict()
    assert "not retried" in str(info.value)
    assert len(server.requests) == 1


def test_read_timeout_retried_when_enabled(make_client, make_server):
    server = make_server(Step(delay=1.0))
    clock = FakeClock()
    client = make_client(
        server.url,
        connect_timeout=0.5,
        read_timeout=0.2,
        clock=clock,
        retry=RetryPolicy(retry_read_failures=True),
    )
    with pytest.raises(TeacherUnavailable, match="failed all 3 attempts"):
        client.predict()
    assert len(server.requests) == 3
    assert len(clock.sleeps) == 2


def test_async_deadline_covers_slow_headers():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop = threading.Event()

    def drip_headers():
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(30):  # one byte every 0.1 s: no single read waits 0.3 s
                if stop.is_set():
                    break
                try:
                    connection.sendall(b"a")
                except OSError:
                    break
                time.sleep(0.1)

    server = threading.Thread(target=drip_headers, daemon=True)
    server.start()

    async def scenario():
        async with AsyncTeacherClient(url, connect_timeout=0.2, read_timeout=0.3) as client:
            with pytest.raises(TeacherUnavailable, match="within the attempt's 0.5 s deadline"):
                await client.predict("weather in rome")

    try:
        asyncio.run(scenario())
    finally:
        stop.set()
        server.join(5)
        listener.close()


def slow_down_tls_setup(monkeypatch, wait: Callable[[], None]) -> list[tuple]:
    """Make ``ssl.create_default_context``, which httpx 0.28 calls to load the CA bundle when
    it builds a client's transport, call ``wait`` first. Return the list of calls it records,
    so a test can check that the client really went through it."""
    original = ssl.create_default_context
    calls = []

    def create_default_context(*args, **kwargs):
        calls.append((args, kwargs))
        wait()
        return original(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", create_default_context)
    return calls


def test_slow_tls_setup_outside_deadline(make_client, make_server, monkeypatch):
    # The TLS setup moves the fake clock past the attempt's deadline and the query's budget, as
    # a slow CPU does: under qemu (scripts/arm64-emulation.sh), loading the CA bundle took 2.6 s.
    server = make_server()
    clock = FakeClock()
    calls = slow_down_tls_setup(monkeypatch, lambda: clock.advance(60.0))
    client = make_client(server.url, clock=clock)  # default deadline 3 s, default budget 5 s

    answer = client.predict()

    assert calls  # the client was built on the first predict, through the slowed function
    assert answer.label == "weather"
    assert len(server.requests) == 1
    assert clock.sleeps == []
    assert client.client.breaker_state == "closed"


def test_async_slow_tls_setup_real_clock(make_server, monkeypatch):
    # On the real clock, asyncio.wait_for enforces the attempt's deadline. The TLS setup waits
    # until another task of the event loop releases it, which that task can do only while the
    # loop is free. The release comes 2 s after the setup starts, past the deadline of 1.5 s.
    server = make_server()
    building = threading.Event()
    released = threading.Event()
    releases = []

    def wait_for_release():
        building.set()
        releases.append(released.wait(10))

    calls = slow_down_tls_setup(monkeypatch, wait_for_release)

    async def scenario():
        async with AsyncTeacherClient(server.url, connect_timeout=0.5, read_timeout=1.0) as client:
            prediction = asyncio.create_task(client.predict("weather in rome"))
            while not building.is_set():
                await asyncio.sleep(0.01)
            await asyncio.sleep(2.0)
            released.set()
            return await prediction

    answer = asyncio.run(scenario())

    assert calls
    assert releases == [True]  # released by the other task, not after the 10 s timeout
    assert answer.label == "weather"
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>teacher</html>", "not a JSON object"),
        (b'{"label": 7}', "string 'label'"),
        (b'{"label": "' + b"x" * MAX_RESPONSE_BYTES + b'"}', f"longer than {MAX_RESPONSE_BYTES}"),
    ],
    ids=["html", "label-not-string", "oversized"],
)
def test_bad_200_body_not_retried(make_client, make_server, body, message):
    server = make_server(Step(200, body))
    clock = FakeClock()
    client = make_client(server.url, clock=clock)
    with pytest.raises(TeacherUnavailable, match=message):
        client.predict()
    assert len(server.requests) == 1
    assert clock.sleeps == []


def test_backoff_beyond_budget_gives_up(make_client, make_server):
    server = make_server(Step(503, problem(503, "teacher restarting")))
    clock = FakeClock()
    client = make_client(
        server.url,
        clock=clock,
        connect_timeout=1.0,
        random=lambda: 0.5,
        retry=RetryPolicy(backoff_base=1.0, budget=1.2),
    )
    with pytest.raises(TeacherUnavailable, match="would not fit in the 1.2 s left"):
        client.predict()
    assert len(server.requests) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", 1.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("Tue, 14 Nov 2023 22:13:25 GMT", 5.0),  # START_WALL is 22:13:20 UTC
        ("Tue, 14 Nov 2023 22:00:00 GMT", 0.0),  # in the past
        ("-1", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        (None, None),
        ("١٢", None),
    ],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, START_WALL) == expected


# TLS, health, the API key and settings


def test_healthy(make_client, make_server):
    server = make_server()
    assert make_client(server.url).healthy() is True
    assert make_client(f"http://127.0.0.1:{free_loopback_port()}").healthy() is False


def test_api_key_never_leaks(make_client, make_server, caplog):
    caplog.set_level(logging.DEBUG)
    echo = f"invalid key {API_KEY}"
    server = make_server()
    clock = FakeClock()
    client = make_client(server.url, api_key=API_KEY, clock=clock)
    dead = make_client(f"http://127.0.0.1:{free_loopback_port()}", api_key=API_KEY, clock=clock)
    texts = [repr(client.client), str(client.client), repr(dead.client)]

    scripts = [
        [Step(401, problem(401, echo))],
        [Step(503, problem(503, echo), {"Retry-After": "600"})],
        [Step(200, echo.encode())],
        [Step(429, echo.encode(), {"Retry-After": "1"}), Step(500, echo.encode())],
    ]
    for steps in scripts:
        clock.advance(1_000.0)  # past any Retry-After hold and breaker cool-down
        server.set_steps(steps)
        with pytest.raises((TeacherUnavailable, TeacherRejected)) as info:
            client.predict()
        texts += messages(info.value)
    for _ in range(4):  # connection refused, then the open breaker
        with pytest.raises(TeacherUnavailable) as info:
            dead.predict()
        texts += messages(info.value)
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(record.args) for record in caplog.records]

    assert any("***" in text for text in texts)  # the echoed key was replaced
    for text in texts:
        assert API_KEY not in text
    assert {r["authorization"] for r in server.requests} == {f"Bearer {API_KEY}"}


def self_signed_certificate(tmp_path):
    """Write a self-signed certificate for 127.0.0.1 and its key; return both paths."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-runtime test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    certificate_path = tmp_path / "ca.pem"
    key_path = tmp_path / "key.pem"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificate_path, key_path


def test_tls_verified_with_ca_bundle(make_client, make_server, tmp_path):
    certificate_path, key_path = self_signed_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate_path, key_path)
    server = make_server(Step(), tls=context)

    untrusting = make_client(server.url, count_requests=True, clock=FakeClock())
    with pytest.raises(TeacherUnavailable, match="certificate verification failed"):
        untrusting.predict()
    assert untrusting.transport.count == 1  # a certificate failure is not retried
    assert server.requests == []

    trusting = make_client(server.url, ca_bundle=certificate_path)
    assert trusting.predict().label == "weather"
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "ftp://127.0.0.1:1"}, "http:// or https://"),
        ({"base_url": "http://user:hunter2@127.0.0.1:1"}, "user name or password"),
        ({"api_key": "key with space"}, "position 3"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"read_timeout": float("nan")}, "read_timeout"),
        ({"ca_bundle": "/nonexistent/ca.pem"}, "is not a file"),
        ({"ca_bundle": __file__, "transport": httpx.HTTPTransport()}, "not both"),
        ({"retry": RetryPolicy(budget=0.5)}, "at least the connect timeout"),
    ],
)
def test_invalid_settings_raise(kwargs, message):
    kwargs = {"base_url": "http://127.0.0.1:1", **kwargs}
    with pytest.raises(ConfigError, match=message) as info:
        TeacherClient(**kwargs)
    assert "hunter2" not in str(info.value)
    assert "key with space" not in str(info.value)


def test_ca_bundle_without_certificate_raises(tmp_path):
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="no valid PEM certificate"):
        TeacherClient("https://127.0.0.1:1", ca_bundle=empty)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"backoff_base": -0.1}, "backoff_base"),
        ({"budget": 0}, "budget"),
    ],
)
def test_invalid_retry_policy_raises(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"cooldown": 0}, "cooldown"),
        ({"cooldown": 60.0, "max_cooldown": 30.0}, "max_cooldown"),
        ({"cooldown_growth": 0.5}, "cooldown_growth"),
    ],
)
def test_invalid_breaker_policy_raises(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BreakerPolicy(**kwargs)


def test_import_does_not_load_httpx():
    code = (
        "import sys, edge_runtime.teacher_client\n"
        "print(sorted(m for m in ('httpx', 'asyncio', 'ssl', 'json') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
