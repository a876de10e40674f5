"""Retry, Retry-After and circuit-breaker decisions of the teacher client, without any I/O.

``teacher_client.TeacherClient`` (blocking) and ``teacher_client.AsyncTeacherClient``
(asyncio) only send requests and read replies. Everything else lives here so that both
behave the same:

- ``QueryPolicy.start_query`` returns a ``Query``, the state of one ``predict`` call. Its
  methods return how long to wait before the next attempt, hand out the attempt's timeouts and
  turn a reply or a transport failure into an answer, a retry or an error.
- ``CircuitBreaker`` fails calls at once while the teacher is known to be down.
- ``QueryPolicy`` also stores the time before which the gateway asked for no requests
  (``Retry-After`` on HTTP 429 or 503), shared by every thread or task of a client.

Which failures are retried: a connection that could not be opened (refused, reset, connect
timeout), a request that could not be written, HTTP 503 and HTTP 429. A read timeout or a
connection closed after the request was sent is not retried unless
``RetryPolicy.retry_read_failures`` is set: the teacher may still be working on it, and
asking again makes a slow query slower.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from edge_runtime.errors import (  # noqa: F401 (TeacherRetryLater re-exported)
    ConfigError,
    TeacherRejected,
    TeacherRetryLater,
    TeacherUnavailable,
)

log = logging.getLogger("edge_runtime.teacher_client")

MAX_RESPONSE_BYTES = 64 * 1024  # a reply larger than this is treated as a failed teacher
DEFAULT_RETRY_ALLOWANCE = 2.0  # seconds a query may spend on retries beyond one full attempt

BREAKER_CLOSED = "closed"
BREAKER_OPEN = "open"
BREAKER_HALF_OPEN = "half-open"

# Kinds of transport failure, which decide whether an attempt is retried.
FAILURE_NOT_SENT = "not-sent"  # connect refused, reset or timed out, or the write failed
FAILURE_READ = "read"  # the request was sent but the reply did not arrive in full
FAILURE_FINAL = "final"  # retrying cannot help: TLS verification, an oversized reply, ...


@dataclass(frozen=True)
class TeacherAnswer:
    label: str
    request_id: str | None
    model_version: str | None


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long one query tries the teacher.

    After a retryable failure, retry ``n`` (1, 2, ...) waits a random time between 0 and
    ``min(backoff_cap, backoff_base * 2 ** (n - 1))`` seconds ("full jitter"), or the time
    that the gateway's ``Retry-After`` requests. ``budget`` is the most a whole query may
    take in seconds, waits included; None means the connect and read timeouts plus
    ``DEFAULT_RETRY_ALLOWANCE``. A retry is made only when, after its wait, at least the
    connect timeout is left of the budget.
    """

    max_retries: int = 2
    backoff_base: float = 0.1  # seconds
    backoff_cap: float = 1.0  # seconds
    budget: float | None = None  # seconds
    retry_read_failures: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or not 0 <= self.max_retries <= 10:
            raise ConfigError(
                f"RetryPolicy.max_retries must be an integer from 0 to 10, got {self.max_retries!r}"
            )
        _check_seconds("RetryPolicy.backoff_base", self.backoff_base, allow_zero=True)
        _check_seconds("RetryPolicy.backoff_cap", self.backoff_cap, allow_zero=True)
        if self.budget is not None:
            _check_seconds("RetryPolicy.budget", self.budget)


@dataclass(frozen=True)
class BreakerPolicy:
    """When the circuit breaker opens and for how long.

    ``failure_threshold`` consecutive failed queries open the breaker for ``cooldown``
    seconds. Each failed probe multiplies the cool-down by ``cooldown_growth``, up to
    ``max_cooldown``, and a successful probe resets it to ``cooldown``. ``max_cooldown`` also
    caps how long a ``Retry-After`` from the gateway delays requests.
    """

    failure_threshold: int = 3
    cooldown: float = 30.0  # seconds
    cooldown_growth: float = 2.0
    max_cooldown: float = 300.0  # seconds

    def __post_init__(self) -> None:
        if not isinstance(self.failure_threshold, int) or self.failure_threshold < 1:
            raise ConfigError(
                f"BreakerPolicy.failure_threshold must be an integer of at least "
                f"1, got {self.failure_threshold!r}"
            )
        _check_seconds("BreakerPolicy.cooldown", self.cooldown)
        _check_seconds("BreakerPolicy.max_cooldown", self.max_cooldown)
        if self.max_cooldown < self.cooldown:
            raise ConfigError(
                f"BreakerPolicy.max_cooldown ({self.max_cooldown} s) must be at "
                f"least cooldown ({self.cooldown} s)"
            )
        if (
            not isinstance(self.cooldown_growth, (int, float))
            or not math.isfinite(self.cooldown_growth)
            or self.cooldown_growth < 1
        ):
            raise ConfigError(
                f"BreakerPolicy.cooldown_growth must be a number of at least 1, "
                f"got {self.cooldown_growth!r}"
            )


def _check_seconds(name: str, value: object, allow_zero: bool = False) -> None:
    valid = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not valid:
        bound = "0 or more" if allow_zero else "above 0"
        raise ConfigError(f"{name} must be a finite number of seconds {bound}, got {value!r}")


def format_utc(unix_time: float) -> str:
    """Format a Unix time as ISO 8601 UTC to the second, for messages."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_time))


@dataclass
class Permit:
    """Permission from the breaker to send one request. ``probe`` marks the half-open probe."""

    probe: bool
    settled: bool = False


class CircuitBreaker:
    """Circuit breaker of one teacher, shared by every thread and task of a client.

    - closed: requests go out. ``failure_threshold`` consecutive failed queries open it.
    - open: calls fail at once with ``TeacherRetryLater`` until the cool-down has passed,
      and the breaker then turns half-open.
    - half-open: the first caller's request goes out as the probe, and other calls fail at
      once. A probe that gets an answer, or any HTTP reply that is not a teacher failure
      (a 4xx rejection, a 429), closes the breaker. A failed probe opens it again with a
      longer cool-down.

    A success from a request sent before the breaker opened also closes it, because the
    teacher evidently answers. State changes are logged. Calls failed while the breaker is
    open are counted and the count is logged when it turns half-open, not one line per call.
    """

    def __init__(
        self,
        policy: BreakerPolicy,
        base_url: str,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ):
        self.policy = policy
        self._base_url = base_url
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._state = BREAKER_CLOSED
        self._failed_queries = 0
        self._cooldown = policy.cooldown
        self._open_until = 0.0
        self._open_reason = ""
        self._probe: Permit | None = None
        self._rejected = 0

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"``; an open breaker whose cool-down has
        passed reports ``"half-open"``."""
        with self._lock:
            self._refresh(self._clock())
            return self._state

    @property
    def open_for(self) -> float:
        """Seconds until an open breaker lets a probe through; 0 when it is not open."""
        with self._lock:
            now = self._clock()
            self._refresh(now)
            return self._open_until - now if self._state == BREAKER_OPEN else 0.0

    def acquire(self) -> Permit:
        """Return a permit to send one request, or raise ``TeacherRetryLater``."""
        with self._lock:
            now = self._clock()
            self._refresh(now)
            if self._state == BREAKER_CLOSED:
                return Permit(probe=False)
            if self._state == BREAKER_HALF_OPEN and self._probe is None:
                self._probe = Permit(probe=True)
                return self._probe
            self._rejected += 1
            if self._state == BREAKER_HALF_OPEN:
                raise TeacherRetryLater(
                    f"teacher at {self._base_url} was not called: the circuit breaker is "
                    "half-open and one probe request is checking whether the teacher is back; "
                    "retry when it has finished",
                    retry_after=None,
                    retry_at=None,
                )
            wait = self._open_until - now
            retry_at = self._wall_clock() + wait
            raise TeacherRetryLater(
                f"teacher at {self._base_url} was not called: the circuit breaker is open "
                f"because {self._open_reason}; retry in {wait:.1f} s, after "
                f"{format_utc(retry_at)}",
                retry_after=wait,
                retry_at=retry_at,
            )

    def attempt_succeeded(self, permit: Permit) -> None:
        """Record that the teacher returned an HTTP reply that is not a teacher failure."""
        with self._lock:
            permit.settled = True
            if self._probe is permit:
                self._probe = None
            self._failed_queries = 0
            if self._state != BREAKER_CLOSED:
                self._state = BREAKER_CLOSED
                self._cooldown = self.policy.cooldown
                cause = "the probe request" if permit.probe else "a request"
                log.info(
                    "teacher at %s: circuit breaker closed, %s got a reply", self._base_url, cause
                )

    def attempt_failed(self, permit: Permit, reason: str) -> None:
        """Record a failed attempt. Only a failed probe changes the state: it re-opens the
        breaker with a longer cool-down."""
        with self._lock:
            permit.settled = True
            if self._probe is permit:
                self._probe = None
                self._cooldown = min(
                    self._cooldown * self.policy.cooldown_growth, self.policy.max_cooldown
                )
                self._open(self._clock(), f"the probe request failed: {reason}")

    def query_failed(self, reason: str) -> None:
        """Record a query that ended without an answer because of a teacher failure."""
        with self._lock:
            if self._state != BREAKER_CLOSED:
                return
            self._failed_queries += 1
            if self._failed_queries >= self.policy.failure_threshold:
                self._open(
                    self._clock(),
                    f"{self._failed_queries} consecutive queries failed, the last with: {reason}",
                )

    def release(self, permit: Permit) -> None:
        """Free an attempt's permit that got no outcome (a cancelled or interrupted call), so
        that the next caller may send the probe."""
        with self._lock:
            if not permit.settled and self._probe is permit:
                self._probe = None
            permit.settled = True

    def _open(self, now: float, reason: str) -> None:
        self._state = BREAKER_OPEN
        self._open_until = now + self._cooldown
        self._open_reason = reason
        self._failed_queries = 0
        self._rejected = 0
        log.warning(
            "teacher at %s: circuit breaker opened for %.1f s because %s",
            self._base_url,
            self._cooldown,
            reason,
        )

    def _refresh(self, now: float) -> None:
        if self._state == BREAKER_OPEN and now >= self._open_until:
            self._state = BREAKER_HALF_OPEN
            log.info(
                "teacher at %s: circuit breaker half-open after %.1f s, %d call(s) "
                "failed at once while it was open; the next request is the probe",
                self._base_url,
                self._cooldown,
                self._rejected,
            )
            self._rejected = 0


@dataclass(frozen=True)
class Attempt:
    """One request of a query: its number (1 for the first), timeouts and deadline."""

    number: int
    permit: Permit
    connect_timeout: float  # seconds
    read_timeout: float  # seconds
    deadline: float  # clock time by which the whole reply must have arrived


@dataclass(frozen=True)
class Reply:
    """The parts of an HTTP reply that the policy reads."""

    status_code: int
    retry_after: str | None  # the Retry-After header, if any
    body: bytes


class AttemptFailure(Exception):
    """A transport failure of one attempt. ``kind`` is one of the ``FAILURE_*`` constants."""

    def __init__(self, kind: str, detail: str):
        self.kind = kind
        self.detail = detail
        super().__init__(detail)


class ReplyBuffer:
    """The body of a reply as it streams in, bounded in size and by the attempt's deadline.

    httpx applies the read timeout to each read, so a server that sends one byte at a time
    could otherwise hold a query for long.
    """

    def __init__(self, attempt: Attempt, clock: Callable[[], float]):
        self._attempt = attempt
        self._clock = clock
        self._content = bytearray()

    def add(self, chunk: bytes) -> None:
        self._content += chunk
        if self._clock() > self._attempt.deadline:
            raise AttemptFailure(
                FAILURE_READ, "the reply did not arrive in full by the attempt's deadline"
            )
        if len(self._content) > MAX_RESPONSE_BYTES:
            raise AttemptFailure(
                FAILURE_FINAL,
                f"the reply is longer than {MAX_RESPONSE_BYTES} "
                "bytes; a prediction is a few hundred",
            )

    def getvalue(self) -> bytes:
        return bytes(self._content)


def parse_retry_after(value: str | None, now_unix: float) -> float | None:
    """Return the wait in seconds that a Retry-After header value requests, or None when it
    is missing or invalid. Both RFC 9110 forms are read: delta-seconds (``120``) and an
    HTTP-date (``Wed, 21 Oct 2015 07:28:00 GMT``), which is compared with ``now_unix``. A
    date in the past means no wait."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses as naive; HTTP-dates are always UTC
        from datetime import timezone

        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now_unix)


def problem_detail(body: bytes) -> str:
    """Return the ``detail``, else the ``title``, of a JSON problem details body.

    A body that is not a JSON object gives its own start. The result has at most 200
    characters.
    """
    import json

    try:
        parsed = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(parsed, dict):
        return str(parsed.get("detail") or parsed.get("title") or parsed)[:200]
    return str(parsed)[:200]


def parse_answer(body: bytes) -> TeacherAnswer | None:
    """Return the answer in a 200 reply's body, or None when the body is not the documented
    JSON object with a string ``label``."""
    import json

    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("label"), str):
        return None
    request_id = parsed.get("request_id")
    model_version = parsed.get("model_version")
    return TeacherAnswer(
        label=parsed["label"],
        request_id=request_id if isinstance(request_id, str) else None,
        model_version=model_version if isinstance(model_version, str) else None,
    )


class QueryPolicy:
    """The retry and breaker decisions of one client, shared by its threads or tasks."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        connect_timeout: float,
        read_timeout: float,
        retry: RetryPolicy,
        breaker: BreakerPolicy,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        random: Callable[[], float],
    ):
        self.base_url = base_url
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retry = retry
        self.budget = (
            retry.budget
            if retry.budget is not None
            else connect_timeout + read_timeout + DEFAULT_RETRY_ALLOWANCE
        )
        if self.budget < connect_timeout:
            raise ConfigError(
                f"RetryPolicy.budget ({self.budget} s) must be at least the "
                f"connect timeout ({connect_timeout} s)"
            )
        self.breaker = CircuitBreaker(breaker, base_url, clock, wall_clock)
        self.clock = clock
        self.wall_clock = wall_clock
        self.random = random
        self._api_key = api_key
        self._hold_lock = threading.Lock()
        self._hold_until = 0.0  # clock time before which the gateway asked for no requests
        self._hold_reason = ""

    def start_query(self) -> Query:
        return Query(self)

    def redact(self, text: str) -> str:
        """Replace the API key in text that came from outside (a server's reply, an
        exception message) with ``***``."""
        if self._api_key and self._api_key in text:
            return text.replace(self._api_key, "***")
        return text

    def hold(self, seconds: float, reason: str) -> None:
        """Hold every request of this client back for ``seconds``, as Retry-After asked."""
        with self._hold_lock:
            until = self.clock() + seconds
            if until > self._hold_until:
                self._hold_until = until
                self._hold_reason = reason

    def held_for(self) -> tuple[float, str]:
        """Return the seconds left of the Retry-After hold (0 when none) and its reason."""
        with self._hold_lock:
            return max(0.0, self._hold_until - self.clock()), self._hold_reason


class Query:
    """The state of one ``predict`` call. A client drives it with this loop::

        query = policy.start_query()
        while True:
            wait(query.next_wait())  # raises when the query gives up
            attempt = query.begin_attempt()  # raises when the breaker refuses
            try:
                reply = send(attempt)
            except AttemptFailure as failure:
                query.record_failure(attempt, failure)  # raises unless it is retried
                continue
            except BaseException:
                query.abandon(attempt)
                raise
            answer = query.record_reply(attempt, reply)  # raises on a final error
            if answer is not None:
                return answer

    Only ``wait`` and ``send`` differ between the blocking and the asyncio client.
    """

    def __init__(self, policy: QueryPolicy):
        self._policy = policy
        self._deadline = policy.clock() + policy.budget
        self._attempts = 0
        self._wait = 0.0  # the wait that the last failure requires before the next attempt
        self._retry_after: float | None = None  # the last reply's Retry-After, in seconds
        self._last_problem = ""
        self._teacher_failed = False  # whether the last attempt failed because of the teacher

    @property
    def max_attempts(self) -> int:
        return self._policy.retry.max_retries + 1

    def next_wait(self) -> float:
        """Return the seconds to wait before the next attempt, or raise when the wait does not
        fit in the query's budget.

        The wait is the one the last failure asked for, or longer while the gateway's
        Retry-After delays requests.
        """
        wait = self._wait
        from_retry_after = self._retry_after is not None
        held_for, hold_reason = self._policy.held_for()
        if held_for > wait:
            wait = held_for
            from_retry_after = True
        if wait <= 0:
            return 0.0
        reason = hold_reason if held_for > self._wait else self._last_problem
        self._check_wait_fits(wait, reason if from_retry_after else None)
        return wait

    def begin_attempt(self) -> Attempt:
        """Return the next attempt with its timeouts, or raise when the breaker refuses it."""
        policy = self._policy
        try:
            permit = policy.breaker.acquire()
        except TeacherRetryLater as exc:
            if self._attempts == 0:
                raise  # not logged: the breaker logs its state changes, not each call
            raise self._give_up(
                TeacherRetryLater(
                    f"teacher at {policy.base_url} failed attempt {self._attempts} of "
                    f"{self.max_attempts} ({self._last_problem}) and was not retried: {exc}",
                    retry_after=exc.retry_after,
                    retry_at=exc.retry_at,
                )
            ) from None
        self._attempts += 1
        now = policy.clock()
        left = self._deadline - now
        return Attempt(
            number=self._attempts,
            permit=permit,
            connect_timeout=min(policy.connect_timeout, left),
            read_timeout=min(policy.read_timeout, left),
            deadline=now + min(policy.connect_timeout + policy.read_timeout, left),
        )

    def record_failure(self, attempt: Attempt, failure: AttemptFailure) -> None:
        """Record a transport failure: set up a retry, or raise ``TeacherUnavailable``."""
        policy = self._policy
        detail = policy.redact(failure.detail)
        policy.breaker.attempt_failed(attempt.permit, detail)
        self._last_problem = detail
        self._teacher_failed = True
        self._retry_after = None
        retryable = failure.kind == FAILURE_NOT_SENT or (
            failure.kind == FAILURE_READ and policy.retry.retry_read_failures
        )
        if not retryable:
            note = (
                "; the request was sent, so it is not retried (RetryPolicy.retry_read_failures)"
                if failure.kind == FAILURE_READ
                else ""
            )
            raise self._give_up(
                TeacherUnavailable(f"teacher at {policy.base_url} failed: {detail}{note}")
            )
        self._plan_retry(attempt, retry_after=None)

    def record_reply(self, attempt: Attempt, reply: Reply) -> TeacherAnswer | None:
        """Return the answer in a reply, or None when the query is to be retried; raise
        ``TeacherRejected`` on a 4xx and ``TeacherUnavailable`` on a final failure."""
        policy = self._policy
        status = reply.status_code
        if status == 200:
            answer = parse_answer(reply.body)
            if answer is not None:
                policy.breaker.attempt_succeeded(attempt.permit)
                return answer
            return self._final_failure(
                attempt, "returned a body that is not a JSON object with a string 'label' field"
            )
        if status in (429, 503):
            detail = policy.redact(problem_detail(reply.body))
            retry_after = parse_retry_after(reply.retry_after, policy.wall_clock())
            if retry_after is not None:
                retry_after = min(retry_after, policy.breaker.policy.max_cooldown)
            problem = f"HTTP {status}: {detail}"
            if status == 429:
                # Rate limiting is not a teacher failure: the gateway is up and answering.
                policy.breaker.attempt_succeeded(attempt.permit)
                self._teacher_failed = False
            else:
                policy.breaker.attempt_failed(attempt.permit, problem)
                self._teacher_failed = True
            self._last_problem = problem
            if retry_after is not None:
                policy.hold(retry_after, f"HTTP {status} with Retry-After")
            self._plan_retry(attempt, retry_after)
            return None
        if 400 <= status < 500:
            policy.breaker.attempt_succeeded(attempt.permit)
            raise TeacherRejected(status, policy.redact(problem_detail(reply.body)))
        if status >= 500:
            return self._final_failure(attempt, f"returned HTTP {status}")
        return self._final_failure(attempt, f"returned HTTP {status}; expected 200")

    def abandon(self, attempt: Attempt) -> None:
        """Release the attempt's permit when the call ended without an outcome."""
        self._policy.breaker.release(attempt.permit)

    def _final_failure(self, attempt: Attempt, problem: str) -> NoReturn:
        policy = self._policy
        policy.breaker.attempt_failed(attempt.permit, problem)
        self._last_problem = problem
        self._teacher_failed = True
        raise self._give_up(TeacherUnavailable(f"teacher at {policy.base_url} {problem}"))

    def _plan_retry(self, attempt: Attempt, retry_after: float | None) -> None:
        """Set the wait before the next attempt, or raise when there is to be none: no attempt
        is left, the breaker is open, or the wait does not fit in the budget."""
        policy = self._policy
        self._retry_after = retry_after
        if attempt.number >= self.max_attempts:
            message = (
                f"teacher at {policy.base_url} failed all {self.max_attempts} "
                f"attempts, the last with: {self._last_problem}"
            )
            if retry_after is None:
                raise self._give_up(TeacherUnavailable(message))
            retry_at = policy.wall_clock() + retry_after
            raise self._give_up(
                TeacherRetryLater(
                    f"{message}; retry in {retry_after:.1f} s, after {format_utc(retry_at)}",
                    retry_after=retry_after,
                    retry_at=retry_at,
                )
            )
        open_for = policy.breaker.open_for
        if open_for > 0:
            retry_at = policy.wall_clock() + open_for
            raise self._give_up(
                TeacherRetryLater(
                    f"teacher at {policy.base_url} failed attempt {attempt.number} of "
                    f"{self.max_attempts} ({self._last_problem}) and is not retried because the "
                    f"circuit breaker is open; retry in "
                    f"{open_for:.1f} s, after {format_utc(retry_at)}",
                    retry_after=open_for,
                    retry_at=retry_at,
                )
            )
        if retry_after is not None:
            self._wait = retry_after
        else:
            ceiling = min(
                policy.retry.backoff_cap, policy.retry.backoff_base * 2 ** (attempt.number - 1)
            )
            self._wait = policy.random() * ceiling
        self._check_wait_fits(self._wait, self._last_problem if retry_after is not None else None)
        log.info(
            "teacher at %s: attempt %d of %d failed (%s); retrying in %.2f s",
            policy.base_url,
            attempt.number,
            self.max_attempts,
            self._last_problem,
            self._wait,
        )

    def _check_wait_fits(self, wait: float, retry_after_reason: str | None) -> None:
        """Raise unless ``wait`` leaves at least the connect timeout of the query's budget.
        ``retry_after_reason`` is None when the wait is a backoff, else the reply or hold that
        asked for it."""
        policy = self._policy
        left = self._deadline - policy.clock()
        if wait + policy.connect_timeout <= left:
            return
        if retry_after_reason is not None:
            retry_at = policy.wall_clock() + wait
            error: TeacherUnavailable = TeacherRetryLater(
                f"teacher at {policy.base_url} asked for no requests for {wait:.1f} s "
                f"({retry_after_reason}), which is beyond the {left:.1f} s left of this "
                f"query's {policy.budget:.1f} s budget; retry after {format_utc(retry_at)}",
                retry_after=wait,
                retry_at=retry_at,
            )
        else:
            error = TeacherUnavailable(
                f"teacher at {policy.base_url} failed attempt {self._attempts} of "
                f"{self.max_attempts} ({self._last_problem}), and a retry after {wait:.2f} s "
                f"would not fit in the {left:.1f} s left of this query's "
                f"{policy.budget:.1f} s budget"
            )
        if self._attempts == 0:
            # Held back by an earlier reply's Retry-After before sending anything: not logged
            # per call, like the calls that an open breaker fails.
            raise error
        raise self._give_up(error)

    def _give_up(self, error: TeacherUnavailable) -> TeacherUnavailable:
        """Record a query that ends without an answer, log it and return the error to raise."""
        if self._teacher_failed:
            self._policy.breaker.query_failed(self._last_problem)
        log.info(
            "teacher at %s: giving up after attempt %d of %d: %s",
            self._policy.base_url,
            self._attempts,
            self.max_attempts,
            error,
        )
        return error
