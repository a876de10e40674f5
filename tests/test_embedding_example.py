"""Tests of examples/embedding_app.py, run as a child process on the committed CLINC150 student:
its answers and counts by source, with no teacher, an unreachable one, a running gateway and a
stopped one, and its shutdown on SIGINT and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_runtime import EdgeRuntime
from edge_runtime.package import inspect_package
from tests.conftest import (
    DEVICE_PRIVATE,
    MODELS_DIR,
    ROOT,
    SIGNER_PUBLIC,
    demo_trust,
    free_loopback_port,
)

EXAMPLE = ROOT / "examples" / "embedding_app.py"
STUDENT = MODELS_DIR / "clinc150-student.edgepkg"
TEACHER = MODELS_DIR / "clinc150-teacher.edgepkg"
# Clear requests, with the intent each one names.
CLEAR = {
    "set an alarm for 6:30 am": "alarm",
    "what's the weather going to be like in boston tomorrow": "weather",
    "transfer 200 dollars from checking to savings": "transfer",
    "what is my current bank balance": "balance",
}
# Vague requests, which the student is less sure of.
VAGUE = [
    "can you help me with the thing from yesterday",
    "is it going to be a problem if i go now",
    "what should i do about my card",
]
QUERIES = [*CLEAR, *VAGUE]
TIMEOUT = 120  # seconds for one run of the example; it takes about 2 s


@pytest.fixture(scope="module")
def student_answers() -> dict[str, tuple[str, str]]:
    """(label, source) of each query from the same package in this process, with no teacher."""
    with EdgeRuntime.load(STUDENT, trust=demo_trust()) as runtime:
        answers = {query: runtime.answer(query) for query in QUERIES}
    return {query: (answer.label, answer.source) for query, answer in answers.items()}


def example_command(tmp_path: Path, *options: str, signer: Path = SIGNER_PUBLIC) -> list[str]:
    return [
        sys.executable,
        str(EXAMPLE),
        "--signer-key",
        str(signer),
        "--device-key",
        str(DEVICE_PRIVATE),
        "--state-file",
        str(tmp_path / "state.json"),
        *options,
    ]


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
        "OMP_NUM_THREADS": "1",
    }


def run_example(
    tmp_path: Path, *options: str, stdin: str = "", signer: Path = SIGNER_PUBLIC
) -> subprocess.CompletedProcess:
    return subprocess.run(
        example_command(tmp_path, *options, signer=signer),
        input=stdin,
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def parse_output(stdout: str) -> tuple[list[tuple[str, str, str]], str]:
    """Return (label, source, query) per answer line, and the summary line."""
    *lines, summary = stdout.splitlines()
    answers = []
    for line in lines:
        label, source, milliseconds, query = line.split("\t")
        assert float(milliseconds) >= 0
        answers.append((label, source, query))
    return answers, summary


def summary_line(local: int, teacher: int, cache: int, offline: int, failed: int = 0) -> str:
    return (
        f"{local + teacher + cache + offline} answered ({local} local, {teacher} teacher, "
        f"{cache} cache, {offline} local-offline); {failed} failed"
    )


def test_answers_from_stdin(tmp_path: Path, student_answers: dict[str, tuple[str, str]]):
    result = run_example(tmp_path, stdin="\n".join(QUERIES) + "\n\n")
    answers, summary = parse_output(result.stdout)
    sources = [source for _, source, _ in answers]

    assert result.returncode == 0, result.stderr
    assert [query for _, _, query in answers] == QUERIES
    assert {query: (label, source) for label, source, query in answers} == student_answers
    for query, label in CLEAR.items():
        assert student_answers[query] == (label, "local"), query
    # Without a teacher, an escalated query gets the student's label as local-offline.
    assert "local-offline" in sources
    assert summary == summary_line(sources.count("local"), 0, 0, sources.count("local-offline"))
    assert "closing the runtime" in result.stderr


def test_records_accepted_version(tmp_path: Path):
    result = run_example(tmp_path, stdin="set an alarm for 6:30 am\n")
    state = json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))

    assert result.returncode == 0, result.stderr
    assert [key.split("/", 1)[1] for key in state["accepted"]] == ["clinc150-student"]
    assert list(state["accepted"].values()) == [inspect_package(STUDENT)["manifest"]["version"]]


def test_unreachable_teacher_answers_offline(
    tmp_path: Path, student_answers: dict[str, tuple[str, str]]
):
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n", encoding="utf-8")
    url = f"http://127.0.0.1:{free_loopback_port()}"  # nothing listens there

    result = run_example(tmp_path, "--teacher-url", url, "--queries", str(queries))
    answers, summary = parse_output(result.stdout)
    sources = [source for _, source, _ in answers]

    assert result.returncode == 0, result.stderr
    assert {query: (label, source) for label, source, query in answers} == student_answers
    assert summary == summary_line(sources.count("local"), 0, 0, sources.count("local-offline"))
    assert sources.count("local-offline") == len(
        [query for query, (_, source) in student_answers.items() if source == "local-offline"]
    )
    assert "teacher gave no answer" in result.stderr
    assert url in result.stderr


@pytest.mark.slow
def test_running_then_stopped_teacher(tmp_path: Path, student_answers: dict[str, tuple[str, str]]):
    pytest.importorskip("uvicorn")
    import httpx

    from edge_runtime.gateway.server import running_gateway

    escalated = [
        query for query, (_, source) in student_answers.items() if source == "local-offline"
    ]
    # The first escalated query again: the answer cache holds the teacher's label by then.
    stdin = "\n".join([*QUERIES, escalated[0]]) + "\n"
    with running_gateway(
        TEACHER, signer_keys=(str(SIGNER_PUBLIC),), env={"PYTHONPATH": child_env()["PYTHONPATH"]}
    ) as gateway:
        url = gateway.url
        # The first prediction loads the teacher's kernels. On a loaded machine it can take
        # longer than the example's default 2 s timeout, so warm up and allow more time.
        warm_up = httpx.post(f"{url}/v1/predict", json={"text": QUERIES[0]}, timeout=60.0)
        online = run_example(tmp_path, "--teacher-url", url, "--teacher-timeout", "30", stdin=stdin)
    stopped = run_example(tmp_path, "--teacher-url", url, "--teacher-timeout", "30", stdin=stdin)

    answers, summary = parse_output(online.stdout)
    by_query = {query: (label, source) for label, source, query in answers[: len(QUERIES)]}
    assert warm_up.status_code == 200, warm_up.text
    assert online.returncode == 0, online.stderr
    for query in QUERIES:
        expected_source = "teacher" if query in escalated else "local"
        assert by_query[query][1] == expected_source, query
        if query not in escalated:
            assert by_query[query] == student_answers[query]
    assert answers[-1] == (by_query[escalated[0]][0], "cache", escalated[0])
    local = len(QUERIES) - len(escalated)
    assert summary == summary_line(local, len(escalated), 1, 0)

    answers, summary = parse_output(stopped.stdout)
    assert stopped.returncode == 0, stopped.stderr
    assert {query: (label, source) for label, source, query in answers} == student_answers
    # Each run starts with an empty answer cache, so the repeated query escalates again.
    assert summary == summary_line(local, 0, 0, len(escalated) + 1)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_runtime(tmp_path: Path, signal_number: int):
    process = subprocess.Popen(
        example_command(tmp_path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=child_env(),
    )
    # Kills the child if it hangs, so that the blocking readline below returns.
    watchdog = threading.Timer(TIMEOUT, process.kill)
    watchdog.start()
    try:
        process.stdin.write("set an alarm for 6:30 am\n")
        process.stdin.flush()
        first = process.stdout.readline()  # the app is now waiting for the next line
        process.send_signal(signal_number)
        rest, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()

    assert first.split("\t")[:2] == ["alarm", "local"]
    assert process.returncode == 0, stderr
    assert rest.splitlines() == [summary_line(1, 0, 0, 0)]
    assert f"stopped by {signal.Signals(signal_number).name}" in stderr
    assert "closing the runtime" in stderr


def test_untrusted_package_exits_1(tmp_path: Path):
    untrusted_signer = ROOT / "tests" / "vectors" / "keys" / "test-only-signer.pub.pem"

    result = run_example(tmp_path, stdin="set an alarm for 6:30 am\n", signer=untrusted_signer)

    assert result.returncode == 1
    assert result.stdout == ""
    assert "UnknownSignerError" in result.stderr
