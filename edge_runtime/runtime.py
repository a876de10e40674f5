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
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime._log import get_logger
from edge_runtime._value import FrozenValue
from edge_runtime.errors import ConfigError, PackageError, TeacherError, TeacherRejected
from edge_runtime.gate import ConfidenceGate, softmax
from edge_runtime.model import DEFAULT_THREADS, OnnxClassifier
from edge_runtime.package import ModelPackage, TrustPolicy, read_package
from edge_runtime.teacher_client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    TeacherClient,
)

if TYPE_CHECKING:
    from pathlib import Path

log = get_logger(__name__)

SOURCE_LOCAL = "local"
SOURCE_TEACHER = "teacher"
SOURCE_LOCAL_OFFLINE = "local-offline"
# The gateway accepts at most 2,000 characters, so longer text could never be escalated.
MAX_TEXT_CHARS = 2_000


class Answer(FrozenValue):
    """One answer. ``timings_ms`` holds ``tokenize``, ``student``, ``teacher`` (only when the
    teacher was called) and ``total``, in milliseconds. ``debug`` is set only with
    ``debug=True``: the calibrated top-1 probability and the student's label probabilities."""

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
        return self.source in (SOURCE_TEACHER, SOURCE_LOCAL_OFFLINE)


class EdgeRuntime:
    """Load a student package once, then answer queries through the local-or-teacher cascade."""

    def __init__(
        self,
        package: ModelPackage,
        teacher: TeacherClient | None = None,
        threads: int = DEFAULT_THREADS,
        debug: bool = False,
    ):
        if package.manifest.gate is None:
            raise PackageError(
                f"{package.path} has no confidence gate in its manifest; a student package is "
                "needed (teacher packages are served by the gateway)"
            )
        self.student = OnnxClassifier(package, threads=threads)
        self._label_set = frozenset(self.student.labels)
        self.gate = ConfidenceGate(package.manifest.gate)
        self.teacher = teacher
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
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        threads: int = DEFAULT_THREADS,
        debug: bool = False,
        trust: TrustPolicy | None = None,
    ) -> EdgeRuntime:
        """Verify and decrypt the package at ``package_path`` in memory, then create the
        session; escalate to ``teacher_url`` if given.

        ``trust`` holds the trusted signer keys, the device key and the rollback state. The
        default, ``TrustPolicy()``, trusts no signer, so a device must say whom it trusts.
        """
        package = read_package(package_path, trust if trust is not None else TrustPolicy())
        teacher = None
        if teacher_url:
            teacher = TeacherClient(
                teacher_url, api_key=api_key,
                connect_timeout=connect_timeout, read_timeout=read_timeout,
            )
        return cls(package, teacher=teacher, threads=threads, debug=debug)

    def answer(self, text: str) -> Answer:
        """Answer one query through the cascade.

        A teacher that is unreachable, rejects the request (4xx) or returns a label this package
        does not know does not raise: the student's label comes back as ``local-offline``.
        Raises ``ConfigError`` for invalid text, and ``TeacherError`` when the student's logits
        are unusable and the teacher gave no answer.
        """
        if not isinstance(text, str):
            raise ConfigError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ConfigError("text is empty; pass a non-empty query")
        if len(text) > MAX_TEXT_CHARS:
            raise ConfigError(
                f"text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(
                f"text is not valid Unicode ({exc.reason} at position {exc.start}); pass UTF-8 "
                "text"
            ) from None
        start = time.perf_counter()
        prediction = self.student.predict(text)
        decision = self.gate.decide(prediction.logits)
        timings = {"tokenize": prediction.tokenize_ms, "student": prediction.inference_ms}
        student_label = (
            self.student.labels[decision.label_index] if decision.label_index is not None else None
        )

        source = SOURCE_LOCAL
        label = student_label
        if not decision.local or self.golden_failures:
            label, source, teacher_ms = self._escalate(text, student_label)
            if teacher_ms is not None:
                timings["teacher"] = teacher_ms
        timings["total"] = (time.perf_counter() - start) * 1000.0

        if label is None:
            # The student gave no usable logits and the teacher is unreachable.
            raise TeacherError(
                "the student returned invalid logits and the teacher could not be reached"
            )
        return Answer(label=label, source=source, timings_ms=timings,
                      debug=self._debug_info(prediction.logits, decision.score))

    def _escalate(
        self, text: str, student_label: str | None
    ) -> tuple[str | None, str, float | None]:
        if self.teacher is None:
            return student_label, SOURCE_LOCAL_OFFLINE, None
        start = time.perf_counter()
        try:
            reply = self.teacher.predict(text)
        except TeacherError as exc:
            # A rejection (4xx) is logged as an error because retrying will not fix it, but the
            # device still gets the student's answer.
            if isinstance(exc, TeacherRejected):
                log.error("teacher gave no answer, answering locally: %s", exc)
            else:
                log.warning("teacher gave no answer, answering locally: %s", exc)
            return student_label, SOURCE_LOCAL_OFFLINE, (time.perf_counter() - start) * 1000.0
        if reply.label not in self._label_set:
            log.error("teacher returned a label %r that this package does not know; answering "
                      "locally", reply.label[:80])
            return student_label, SOURCE_LOCAL_OFFLINE, (time.perf_counter() - start) * 1000.0
        return reply.label, SOURCE_TEACHER, (time.perf_counter() - start) * 1000.0

    def _debug_info(self, logits: np.ndarray, score: float | None) -> dict[str, object] | None:
        if not self.debug:
            return None
        probabilities = softmax(logits, self.gate.temperature).round(6).tolist()
        return {
            "score": score,
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
