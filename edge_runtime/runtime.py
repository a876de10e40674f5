"""The device-side cascade: answer with the student when the gate allows, else ask the teacher.

Flow of one ``EdgeRuntime.answer`` call::

    text -> tokenizer -> student ONNX session -> logits -> ConfidenceGate
         -> score >= threshold:  Answer(source="local")
         -> otherwise:           TeacherClient.predict -> Answer(source="teacher")
                                 teacher unreachable   -> Answer(source="local-offline")

The public ``Answer`` carries the label, its source and timings; the calibrated score and the
student's probabilities are attached only when the runtime was created with ``debug=True``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime._log import get_logger
from edge_runtime._value import FrozenValue
from edge_runtime.cache import AnswerCache, SemanticCache
from edge_runtime.errors import (
    ConfigError,
    ModelError,
    PackageError,
    TeacherError,
    TeacherRejected,
    TeacherUnavailable,
)
from edge_runtime.gate import ConfidenceGate, softmax
from edge_runtime.model import DEFAULT_THREADS, OnnxClassifier
from edge_runtime.package import ModelPackage, TrustPolicy, read_package

if TYPE_CHECKING:
    from pathlib import Path

    from edge_runtime.escalation_log import EscalationLog
    from edge_runtime.teacher_client import TeacherClient

log = get_logger(__name__)

SOURCE_LOCAL = "local"
SOURCE_TEACHER = "teacher"
SOURCE_LOCAL_OFFLINE = "local-offline"
SOURCE_CACHE = "cache"  # a teacher label from the answer cache, without a network call
# Routes: which path may answer a query.
ROUTE_PREFER_LOCAL = "prefer-local"
ROUTE_LOCAL_ONLY = "local-only"
ROUTE_PREFER_TEACHER = "prefer-teacher"
ROUTE_TEACHER_ONLY = "teacher-only"
ROUTES = (ROUTE_PREFER_LOCAL, ROUTE_LOCAL_ONLY, ROUTE_PREFER_TEACHER, ROUTE_TEACHER_ONLY)
# A teacher that keeps failing is logged once per this many seconds, with a count.
FAILURE_LOG_INTERVAL = 60.0
# Keyword options of OnnxClassifier that a runtime passes through.
SESSION_OPTIONS = frozenset({"inter_op_threads", "graph_optimization", "providers"})
# The gateway accepts at most 2,000 characters, so longer text could never be escalated.
MAX_TEXT_CHARS = 2_000


class Answer(FrozenValue):
    """One answer. ``timings_ms`` holds ``tokenize``, ``student``, ``teacher`` (only when the
    teacher was called) and ``total``, in milliseconds. ``debug`` is set only with
    ``debug=True``: the gate's score and its kind, the threshold and the student's calibrated
    label probabilities."""

    __slots__ = ("label", "source", "timings_ms", "debug")
    _hidden_in_repr = frozenset({"debug"})
    label: str
    source: str
    timings_ms: dict[str, float]
    debug: dict[str, object] | None

    def __init__(self, label: str, source: str, timings_ms: dict[str, float],
                 debug: dict[str, object] | None = None):
        self._init(label=label, source=source, timings_ms=timings_ms, debug=debug)

    @property
    def escalated(self) -> bool:
        """True when the gate sent the query to the teacher, whether or not it answered."""
        return self.source in (SOURCE_TEACHER, SOURCE_LOCAL_OFFLINE, SOURCE_CACHE)


class EdgeRuntime:
    """Load a student package once, then answer queries through the local-or-teacher cascade."""

    def __init__(
        self,
        package: ModelPackage,
        teacher: TeacherClient | None = None,
        threads: int = DEFAULT_THREADS,
        debug: bool = False,
        route: str = ROUTE_PREFER_LOCAL,
        answer_cache: AnswerCache | bool = True,
        semantic_cache: SemanticCache | None = None,
        escalation_log: EscalationLog | None = None,
        session_options: dict[str, Any] | None = None,
    ):
        """``answer_cache`` is True for an ``AnswerCache`` with its defaults (10,000 entries,
        24 h), False for none, or a cache to use. ``semantic_cache`` is off by default; see
        ``edge_runtime.cache`` for what it measured. ``escalation_log`` (opt-in) records every
        escalated query; the caller keeps ownership and closes it. ``session_options`` are
        the keyword options of ``OnnxClassifier``: ``inter_op_threads``,
        ``graph_optimization`` and ``providers``."""
        if package.manifest.gate is None:
            raise PackageError(
                f"{package.path} has no confidence gate in its manifest; a student package is "
                "needed (teacher packages are served by the gateway)"
            )
        unknown = sorted(set(session_options or {}) - SESSION_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown session option(s) {', '.join(unknown)}; use "
                              f"{', '.join(sorted(SESSION_OPTIONS))}")
        self.student = OnnxClassifier(package, threads=threads, **(session_options or {}))
        self._label_set = frozenset(self.student.labels)
        self.gate = ConfidenceGate(package.manifest.gate)
        self.teacher = teacher
        self.route = self._check_route(route, "route")
        self._teacher_failures = _FailureLog()
        if answer_cache is True:
            answer_cache = AnswerCache()
        # Not "answer_cache or None": an empty cache has length 0, so it is falsy.
        self.answer_cache: AnswerCache | None = None if answer_cache is False else answer_cache
        self.semantic_cache = semantic_cache
        self.escalation_log = escalation_log
        self.debug = debug
        self.manifest = package.manifest
        self.golden_failures = self._check_golden(package.manifest.raw.get("golden") or [])
        if self.golden_failures:
            log.error(
                "%s: the student disagrees with %d golden input(s) on this CPU, so every query "
                "is escalated to the teacher: %s",
                package.path, len(self.golden_failures), self.golden_failures[:3],
            )

    @property
    def student_trusted(self) -> bool:
        """False when the student failed its golden inputs on this CPU; it then never answers
        while the teacher is reachable."""
        return not self.golden_failures

    def _check_golden(self, golden: list) -> list[str]:
        """Run the manifest's golden inputs; return a description of each mismatch."""
        failures = []
        for item in golden:
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                failures.append(f"malformed golden entry {item!r:.80}")
                continue
            # One at a time, as queries run: on a 2-core x86 VM, 8 single runs took 8.8 ms
            # and one padded batch of 8 took 12.4 ms (benchmarks/cold_start.py, median).
            logits = self.student.predict(item["text"]).logits
            label = self.student.labels[int(logits.argmax())]
            if label != item.get("label"):
                failures.append(f"{item['text']!r}: expected {item.get('label')!r}, got {label!r}")
        return failures

    @classmethod
    def load(
        cls,
        package_path: str | Path,
        teacher_url: str | None = None,
        api_key: str | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        threads: int = DEFAULT_THREADS,
        debug: bool = False,
        trust: TrustPolicy | None = None,
        route: str = ROUTE_PREFER_LOCAL,
        answer_cache: AnswerCache | bool = True,
        semantic_cache: SemanticCache | None = None,
        escalation_log: EscalationLog | None = None,
        session_options: dict[str, Any] | None = None,
    ) -> EdgeRuntime:
        """Verify and decrypt the package at ``package_path`` in memory, then create the
        session; escalate to ``teacher_url`` if given.

        ``trust`` holds the trusted signer keys, the device key and the rollback state. The
        default, ``TrustPolicy()``, trusts no signer, so a device must say whom it trusts.
        Timeouts left at None take ``TeacherClient``'s defaults (1 s to connect, 2 s to read).
        """
        package = read_package(package_path, trust if trust is not None else TrustPolicy())
        teacher = None
        if teacher_url:
            # Imported here: a runtime without a teacher does not load the HTTP client.
            from edge_runtime.teacher_client import TeacherClient

            timeouts = {name: value for name, value in (("connect_timeout", connect_timeout),
                                                        ("read_timeout", read_timeout))
                        if value is not None}
            teacher = TeacherClient(teacher_url, api_key=api_key, **timeouts)
        return cls(package, teacher=teacher, threads=threads, debug=debug, route=route,
                   answer_cache=answer_cache, semantic_cache=semantic_cache,
                   escalation_log=escalation_log, session_options=session_options)

    def answer(self, text: str, route: str | None = None) -> Answer:
        """Answer one query by ``route`` (default: the runtime's route).

        ``prefer-local`` answers with the student when the gate allows and asks the teacher
        otherwise; ``local-only`` never asks the teacher; ``prefer-teacher`` asks the teacher
        first and answers locally only when it gives no answer; ``teacher-only`` never answers
        locally. A query for the teacher is first looked up in the answer caches. Except with
        ``teacher-only``, a teacher that is unreachable, rejects the request (4xx) or returns
        a label this package does not know does not raise: the student's label comes back as
        ``local-offline``.

        Raises ``ConfigError`` for invalid text or route; ``TeacherUnavailable`` or
        ``TeacherRejected`` when ``teacher-only`` gets no answer; ``ModelError`` when
        ``local-only`` finds the student's logits unusable; and ``TeacherError`` when the
        student's logits are unusable and the teacher gave no answer.
        """
        route = self.route if route is None else self._check_route(route, "route")
        _check_text(text)
        start = time.perf_counter()
        timings: dict[str, float] = {}
        if route in (ROUTE_PREFER_TEACHER, ROUTE_TEACHER_ONLY):
            label, source, failure = self._ask_teacher(text, timings, None)
            if label is not None:
                return self._finish(label, source, timings, start)
            if route == ROUTE_TEACHER_ONLY and failure is not None:
                raise failure
            student = self._run_student(text, timings)
            self._log_escalation(text, student, None)
            return self._finish(student.label, SOURCE_LOCAL_OFFLINE, timings, start, student)

        student = self._run_student(text, timings)
        return self._answer_after_student(text, route, student, timings, start)

    def answer_many(self, texts: Sequence[str], route: str | None = None,
                    batch_size: int = 32) -> list[Answer]:
        """Answer several queries, running the student on them in batches of ``batch_size``.

        Escalated queries then go to the teacher one at a time, as in ``answer``. Each
        answer's ``timings_ms["student"]`` is its share of its batch's time. NOTE: with an
        int8 model quantized dynamically, a row's logits depend on the rest of its batch (see
        ``OnnxClassifier.predict_batch``), so a score near the threshold can be decided
        differently from ``answer``; ``batch_size=1`` gives the same decisions.
        """
        route = self.route if route is None else self._check_route(route, "route")
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ConfigError("texts must be a list of str; pass one string per query")
        for text in texts:
            _check_text(text)
        if route in (ROUTE_PREFER_TEACHER, ROUTE_TEACHER_ONLY):
            return [self.answer(text, route) for text in texts]
        answers = []
        for first in range(0, len(texts), batch_size):
            chunk = texts[first:first + batch_size]
            start = time.perf_counter()
            logits = self.student.predict_batch(chunk, batch_size=len(chunk))
            share = (time.perf_counter() - start) * 1000.0 / len(chunk)
            for text, row in zip(chunk, logits, strict=True):
                row_start = time.perf_counter()
                student = self._student_result(row)
                answers.append(self._answer_after_student(
                    text, route, student, {"student": share}, row_start))
        return answers

    def _answer_after_student(self, text: str, route: str, student: _StudentResult,
                              timings: dict[str, float], start: float) -> Answer:
        if route == ROUTE_LOCAL_ONLY:
            if student.label is None:
                raise ModelError("the student returned logits that are not finite; with the "
                                 "local-only route there is no teacher to ask")
            return self._finish(student.label, SOURCE_LOCAL, timings, start, student)
        if student.decision.local and not self.golden_failures:
            return self._finish(student.label, SOURCE_LOCAL, timings, start, student)
        label, source, _ = self._ask_teacher(text, timings, student)
        if label is not None:
            return self._finish(label, source, timings, start, student)
        self._log_escalation(text, student, None)
        return self._finish(student.label, SOURCE_LOCAL_OFFLINE, timings, start, student)

    def _check_route(self, route: str, name: str) -> str:
        if route not in ROUTES:
            raise ConfigError(f"{name} {route!r} is not a route; use one of {', '.join(ROUTES)}")
        if route == ROUTE_TEACHER_ONLY and self.teacher is None:
            raise ConfigError("the teacher-only route needs a teacher; pass its URL")
        return route

    def _run_student(self, text: str, timings: dict[str, float]) -> _StudentResult:
        prediction = self.student.predict(text)
        timings["tokenize"] = prediction.tokenize_ms
        timings["student"] = prediction.inference_ms
        return self._student_result(prediction.logits)

    def _student_result(self, logits: np.ndarray) -> _StudentResult:
        decision = self.gate.decide(logits)
        label = (self.student.labels[decision.label_index]
                 if decision.label_index is not None else None)
        return _StudentResult(logits, decision, label)

    def _finish(self, label: str | None, source: str, timings: dict[str, float], start: float,
                student: _StudentResult | None = None) -> Answer:
        if label is None:
            # The student gave no usable logits and the teacher gave no answer.
            raise TeacherError(
                "the student returned invalid logits and the teacher could not be reached"
            )
        timings["total"] = (time.perf_counter() - start) * 1000.0
        return Answer(label=label, source=source, timings_ms=timings,
                      debug=self._debug_info(student))

    def _ask_teacher(self, text: str, timings: dict[str, float],
                     student: _StudentResult | None
                     ) -> tuple[str | None, str, TeacherError | None]:
        """Return (label, source, None) from a cache or the teacher, or (None, "", reason)
        when neither has an answer."""
        start = time.perf_counter()
        cached = self.answer_cache.get(text) if self.answer_cache is not None else None
        if cached is None and self.semantic_cache is not None and student is not None:
            hit = self.semantic_cache.get(_cache_vector(student.logits))
            cached = hit[0] if hit is not None else None
        if cached is not None and cached in self._label_set:
            timings["cache"] = (time.perf_counter() - start) * 1000.0
            return cached, SOURCE_CACHE, None

        if self.teacher is None:
            return None, "", TeacherUnavailable("no teacher is configured")
        start = time.perf_counter()
        try:
            reply = self.teacher.predict(text)
        except TeacherError as exc:
            self._teacher_failures.report(exc)
            return None, "", exc
        finally:
            timings["teacher"] = (time.perf_counter() - start) * 1000.0
        if reply.label not in self._label_set:
            failure = TeacherUnavailable(
                f"the teacher returned the label {reply.label[:80]!r}, which this package does "
                "not know; the teacher and the package are from different builds")
            self._teacher_failures.report(failure)
            return None, "", failure
        self._teacher_failures.recovered()
        if self.answer_cache is not None:
            self.answer_cache.put(text, reply.label)
        if self.semantic_cache is not None and student is not None:
            self.semantic_cache.put(_cache_vector(student.logits), reply.label)
        self._log_escalation(text, student, reply)
        return reply.label, SOURCE_TEACHER, None

    def _log_escalation(self, text: str, student: _StudentResult | None, reply: Any) -> None:
        """Write an escalated query to the escalation log, when one is configured."""
        if self.escalation_log is None:
            return
        self.escalation_log.record(
            text,
            source=SOURCE_TEACHER if reply is not None else SOURCE_LOCAL_OFFLINE,
            teacher_label=reply.label if reply is not None else None,
            student_label=student.label if student is not None else None,
            package_name=self.manifest.name,
            package_version=self.manifest.version,
            student_score=student.decision.score if student is not None else None,
            teacher_model_version=getattr(reply, "model_version", None),
            teacher_request_id=getattr(reply, "request_id", None),
        )

    def _debug_info(self, student: _StudentResult | None) -> dict[str, object] | None:
        if not self.debug or student is None:
            return None
        probabilities = softmax(student.logits, self.gate.temperature).round(6).tolist()
        return {
            "score": student.decision.score,
            "score_kind": self.gate.kind,
            "threshold": self.gate.threshold,
            "probabilities": dict(zip(self.student.labels, probabilities, strict=True)),
        }

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()

    def __enter__(self) -> EdgeRuntime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise ConfigError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ConfigError("text is empty; pass a non-empty query")
    if len(text) > MAX_TEXT_CHARS:
        raise ConfigError(f"text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"text is not valid Unicode ({exc.reason} at position {exc.start}); pass UTF-8 text"
        ) from None


class _FailureLog:
    """Log teacher failures without a line per query: the first one, then at most one line
    per ``interval`` seconds with the number of failures since the last line."""

    def __init__(self, interval: float = FAILURE_LOG_INTERVAL, clock: Any = time.monotonic):
        self._interval = interval
        self._clock = clock
        self._last_logged: float | None = None
        self._unlogged = 0
        self._failing = False

    def report(self, exc: TeacherError) -> None:
        self._failing = True
        self._unlogged += 1
        now = self._clock()
        if self._last_logged is not None and now - self._last_logged < self._interval:
            return
        # A rejection (4xx) is an error because retrying will not fix it.
        write = log.error if isinstance(exc, TeacherRejected) else log.warning
        write("teacher gave no answer (%d time(s) since the last message): %s",
              self._unlogged, exc)
        self._last_logged = now
        self._unlogged = 0

    def recovered(self) -> None:
        if self._failing:
            log.warning("teacher responds again")
            self._failing = False
            self._last_logged = None
            self._unlogged = 0


class _StudentResult:
    """The student's logits for one query, the gate's decision and the top-1 label."""

    __slots__ = ("logits", "decision", "label")

    def __init__(self, logits: np.ndarray, decision: Any, label: str | None):
        self.logits = logits
        self.decision = decision
        self.label = label


def _cache_vector(logits: np.ndarray) -> np.ndarray:
    # Softmax ignores a constant added to every logit, so the cache compares centred logits.
    return logits - logits.mean()
