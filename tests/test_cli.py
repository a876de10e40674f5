"""The edge-runtime command line, run as a user runs it: in a child process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_runtime.data import load_split
from edge_runtime.package import read_package
from tests.conftest import CLI_TRUST, CLINC150_DIR, ROOT, demo_trust

pytestmark = pytest.mark.slow


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime", *args, *CLI_TRUST],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def test_ask_prints_label(tiny_build):
    result = run_cli("ask", "set a timer for five minutes", "--package",
                     str(tiny_build.student_package))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "timer"


def test_ask_json_fields(tiny_build):
    result = run_cli("ask", "what's the weather like", "--json", "--package",
                     str(tiny_build.student_package))
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert set(body) == {"label", "source", "timings_ms"}
    assert body["source"] in ("local", "local-offline")


def test_ask_debug_shows_score(tiny_build):
    result = run_cli("ask", "what's the weather like", "--json", "--debug", "--package",
                     str(tiny_build.student_package))
    body = json.loads(result.stdout)
    assert 0.0 <= body["debug"]["score"] <= 1.0
    assert len(body["debug"]["probabilities"]) == 8


def test_ask_missing_package_exit_2(tmp_path):
    missing = tmp_path / "nothing.edgepkg"
    result = run_cli("ask", "hello", "--package", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def tiny_test_split(tiny_build, folder):
    """Write the CLINC150 test queries of the tiny build's labels as test.jsonl."""
    labels = set(read_package(tiny_build.student_package, demo_trust()).manifest.labels)
    rows = [e for e in load_split(CLINC150_DIR, "test") if e.label in labels]
    folder.mkdir()
    with open(folder / "test.jsonl", "w", encoding="utf-8") as handle:
        for example in rows:
            handle.write(json.dumps({"text": example.text, "label": example.label}) + "\n")
    return folder


def test_eval_json_fields(tiny_build, tmp_path):
    data = tiny_test_split(tiny_build, tmp_path / "tiny")
    result = run_cli(
        "eval", "--data", str(data), "--split", "test", "--json",
        "--package", str(tiny_build.student_package),
        "--teacher-package", str(tiny_build.teacher_package),
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["n"] == 7 * 30 + 1000
    for key in ("accuracy", "in_scope_accuracy", "oos_recall", "local_fraction"):
        assert 0.0 <= body[key] <= 1.0, key
    assert set(body["latency_ms"]) == {"local_p50", "local_p95", "escalated_p50",
                                       "escalated_p95"}
    for baseline in ("teacher", "student"):
        figures = body["baselines"][baseline]
        for key in ("accuracy", "in_scope_accuracy", "oos_recall", "p50_ms"):
            assert key in figures, (baseline, key)
    assert body["sources"].get("local-offline", 0) == 0


def test_eval_foreign_labels_exit_2(tiny_build):
    result = run_cli("eval", "--data", str(CLINC150_DIR), "--split", "test",
                     "--package", str(tiny_build.student_package),
                     "--teacher-package", str(tiny_build.teacher_package))
    assert result.returncode == 2
    assert "does not know" in result.stderr


@pytest.mark.parametrize("option", [["--limit", "0"], ["--threads", "0"], ["--timeout", "nan"]])
def test_eval_invalid_number_exit_2(tiny_build, option):
    result = run_cli("eval", "--data", str(CLINC150_DIR), *option,
                     "--package", str(tiny_build.student_package))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_ask_surrogate_text_exit_2(tiny_build):
    result = run_cli("ask", "caf\udce9 alarm", "--package", str(tiny_build.student_package))
    assert result.returncode == 2
    assert "not valid Unicode" in result.stderr


def test_eval_unknown_split_exit_2(tiny_build):
    result = run_cli("eval", "--data", str(CLINC150_DIR), "--split", "holdout",
                     "--package", str(tiny_build.student_package))
    assert result.returncode == 2
    assert "holdout" in result.stderr


def test_demo_shows_both_sources(tiny_build):
    result = run_cli("demo", "--package", str(tiny_build.student_package),
                     "--teacher-package", str(tiny_build.teacher_package))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("query")
    summary = lines[-1]
    assert " local " in summary
    assert " teacher " in summary
    rows = [line for line in lines[2:-1]]
    assert any(" local " in row for row in rows)
    assert any(" teacher " in row for row in rows)


def test_ask_route_and_escalation_log(tiny_build, tmp_path):
    log_path = tmp_path / "escalations.sqlite"
    # Port 9 (discard) has no server on loopback, so the teacher is unreachable.
    result = run_cli("ask", "pay my card bill of 4111 1111 1111 1111", "--json",
                     "--route", "prefer-teacher", "--teacher-url", "http://127.0.0.1:9",
                     "--escalation-log", str(log_path), "--package",
                     str(tiny_build.student_package))
    local = run_cli("ask", "pay my card bill", "--json", "--route", "local-only",
                    "--teacher-url", "http://127.0.0.1:9", "--escalation-log", str(log_path),
                    "--package", str(tiny_build.student_package))
    from edge_runtime.escalation_log import read_all

    records = read_all(log_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["source"] == "local-offline"
    assert json.loads(local.stdout)["source"] == "local"
    assert len(records) == 1
    assert records[0].source == "local-offline"
    assert "4111" not in records[0].text


def test_ask_unknown_route_exit_2(tiny_build):
    result = run_cli("ask", "hello", "--route", "cloud-first", "--package",
                     str(tiny_build.student_package))
    assert result.returncode == 2
    assert "cloud-first" in result.stderr
