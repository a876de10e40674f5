"""``edge-runtime eval``: a whole split through the cascade, with the teacher-only and
student-only baselines measured in the same run.

Every query is sent one at a time, as a device would, so the latencies are single-query
figures. The student baseline times tokenization plus ONNX inference in this process; the
teacher baseline and escalations time the HTTP round trip to the gateway on loopback.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

from edge_runtime.data import OOS_LABEL, Example
from edge_runtime.errors import ConfigError
from edge_runtime.metrics import accuracy_figures, percentile_ms
from edge_runtime.runtime import SOURCE_LOCAL, EdgeRuntime
from edge_runtime.teacher_client import TeacherClient

WARMUP_QUERIES = 20


class ProgressLine:
    """A one-line progress counter on stderr, redrawn in place when stderr is a terminal."""

    def __init__(self, description: str, total: int, enabled: bool = True):
        self.description = description
        self.total = total
        self.enabled = enabled
        self.interactive = sys.stderr.isatty()
        self.started = time.perf_counter()
        self._last_draw = 0.0

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < self.total and now - self._last_draw < (0.2 if self.interactive else 10.0):
            return
        self._last_draw = now
        elapsed = now - self.started
        line = f"{self.description}: {done}/{self.total} queries, {elapsed:.0f} s"
        if self.interactive:
            sys.stderr.write("\r" + line + ("\n" if done >= self.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _run(description: str, examples: Sequence[Example], answer: Callable[[str], str],
         progress: bool) -> tuple[list[str], list[float]]:
    labels, latencies = [], []
    bar = ProgressLine(description, len(examples), enabled=progress)
    for done, example in enumerate(examples, start=1):
        start = time.perf_counter()
        labels.append(answer(example.text))
        latencies.append((time.perf_counter() - start) * 1000.0)
        bar.update(done)
    return labels, latencies


def _baseline(predicted: list[str], expected: list[str], latencies: list[float],
              oos_label: str) -> dict:
    figures = accuracy_figures(predicted, expected, oos_label)
    figures["p50_ms"] = percentile_ms(latencies, 50)
    figures["p95_ms"] = percentile_ms(latencies, 95)
    return figures


def out_of_scope_label(manifest: dict) -> str:
    """Return the out-of-scope label that a package's build recorded in its provenance, ""
    when its data had none, or "oos" for packages built before the build recorded it."""
    data = (manifest.get("provenance") or {}).get("data") or {}
    return data.get("out_of_scope_label", OOS_LABEL)


def evaluate(runtime: EdgeRuntime, teacher: TeacherClient, examples: Sequence[Example],
             progress: bool = True) -> dict:
    """Run the student, the teacher and the cascade over ``examples``; return the figures."""
    if not examples:
        raise ConfigError("no examples to evaluate; check --data and --split")
    expected = [e.label for e in examples]
    unknown = sorted(set(expected) - set(runtime.student.labels))
    if unknown:
        raise ConfigError(
            f"the data has {len(unknown)} label(s) that package {runtime.manifest.name!r} does "
            f"not know, for example {unknown[:5]}; evaluate it on the data set it was built for"
        )
    student = runtime.student
    oos_label = out_of_scope_label(runtime.manifest.raw)

    def student_label(text: str) -> str:
        prediction = student.predict(text)
        return student.labels[int(prediction.logits.argmax())]

    # Warm-up so that first-call allocations do not count in the percentiles.
    for example in examples[:WARMUP_QUERIES]:
        student_label(example.text)
        teacher.predict(example.text)

    student_labels, student_ms = _run("student only", examples, student_label, progress)
    teacher_labels, teacher_ms = _run("teacher only", examples, lambda t: teacher.predict(t).label,
                                      progress)

    answers = []
    bar = ProgressLine("cascade", len(examples), enabled=progress)
    for done, example in enumerate(examples, start=1):
        answers.append(runtime.answer(example.text))
        bar.update(done)
    local_ms = [a.timings_ms["total"] for a in answers if a.source == SOURCE_LOCAL]
    escalated_ms = [a.timings_ms["total"] for a in answers if a.source != SOURCE_LOCAL]
    sources = Counter(a.source for a in answers)

    result = {
        "n": len(examples),
        **accuracy_figures([a.label for a in answers], expected, oos_label),
        "local_fraction": sources[SOURCE_LOCAL] / len(examples),
        "sources": dict(sorted(sources.items())),
        "latency_ms": {
            "local_p50": percentile_ms(local_ms, 50),
            "local_p95": percentile_ms(local_ms, 95),
            "escalated_p50": percentile_ms(escalated_ms, 50),
            "escalated_p95": percentile_ms(escalated_ms, 95),
        },
        "gate": {"score": runtime.gate.kind, "temperature": runtime.gate.temperature,
                 "threshold": runtime.gate.threshold},
        "baselines": {
            "teacher": _baseline(teacher_labels, expected, teacher_ms, oos_label),
            "student": _baseline(student_labels, expected, student_ms, oos_label),
        },
        "out_of_scope_label": oos_label or None,
        "package": {"name": runtime.manifest.name, "version": runtime.manifest.version},
    }
    return result


def format_report(result: dict) -> str:
    """Format an ``evaluate`` result as a short table for a terminal."""

    def pct(value: float | None) -> str:
        return "   n/a" if value is None else f"{value * 100:6.2f}"

    def ms(value: float | None) -> str:
        return "  n/a" if value is None else f"{value:5.2f}"

    rows = [
        ("cascade", result, result["latency_ms"]["local_p50"]),
        ("teacher only", result["baselines"]["teacher"], result["baselines"]["teacher"]["p50_ms"]),
        ("student only", result["baselines"]["student"], result["baselines"]["student"]["p50_ms"]),
    ]
    lines = [f"{'path':<14} {'acc %':>6} {'in-scope %':>10} {'oos recall %':>12} {'p50 ms':>7}"]
    for name, figures, p50 in rows:
        lines.append(
            f"{name:<14} {pct(figures['accuracy'])} {pct(figures['in_scope_accuracy']):>10} "
            f"{pct(figures['oos_recall']):>12} {ms(p50):>7}"
        )
    latency = result["latency_ms"]
    lines.append(
        f"{result['n']} queries; {result['local_fraction'] * 100:.1f}% answered locally "
        f"(p50 {ms(latency['local_p50']).strip()} ms, p95 {ms(latency['local_p95']).strip()} ms), "
        f"escalated p50 {ms(latency['escalated_p50']).strip()} ms, "
        f"p95 {ms(latency['escalated_p95']).strip()} ms; sources {result['sources']}"
    )
    return "\n".join(lines)
