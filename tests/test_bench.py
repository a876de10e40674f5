"""``edge-runtime bench``: the JSON record of a real run on the bundled student, its errors, and
the helpers that parse options, /proc/cpuinfo and memory figures."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime import bench, signing
from edge_runtime.errors import ConfigError
from edge_runtime.keys import generate_keys
from edge_runtime.package import inspect_package
from tests.conftest import DEVICE_PRIVATE, MODELS_DIR, ROOT, SIGNER_PUBLIC

STUDENT_PACKAGE = MODELS_DIR / "clinc150-student.edgepkg"
DEMO_KEYS = ["--signer-key", str(SIGNER_PUBLIC), "--device-key", str(DEVICE_PRIVATE)]


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """Return the non-empty stderr lines other than logged warnings."""
    return [line for line in result.stderr.splitlines() if line.strip() and " WARNING " not in line]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One real run with a rollback state file, as the README's ``ask`` runs with one."""
    state_file = tmp_path_factory.mktemp("bench-state") / "accepted-versions.json"
    result = run_bench(
        str(STUDENT_PACKAGE),
        "--json",
        "--runs",
        "20",
        "--cold-runs",
        "1",
        "--threads",
        "1",
        "--batch-sizes",
        "1,4",
        *DEMO_KEYS,
        "--state-file",
        str(state_file),
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), state_file, result.stderr


# The JSON record of a real run


def test_json_top_level_fields(bench_run):
    report, _, _ = bench_run
    assert report["schema"] == bench.SCHEMA
    for key in (
        "created_at",
        "duration_s",
        "package",
        "session",
        "queries",
        "machine",
        "load_average_1min",
        "cold_start",
        "latency",
        "throughput",
        "memory",
        "notes",
    ):
        assert key in report, key
    assert report["duration_s"] > 0


def test_json_cold_start_stages(bench_run):
    report, _, _ = bench_run
    stages = report["cold_start"]["stages"]
    assert list(stages) == list(bench.COLD_STAGES)
    for name, stage in stages.items():
        assert stage["median_ms"] > 0, name
        assert stage["min_ms"] <= stage["median_ms"] <= stage["max_ms"], name
        assert stage["covers"] == bench.COLD_STAGES[name]
    parts = sum(stage["median_ms"] for name, stage in stages.items() if name != "total")
    # With one run each median is that run's value, and the stages tile the total.
    assert parts == pytest.approx(stages["total"]["median_ms"], abs=0.01)


def test_json_cold_start_answer(bench_run):
    report, _, _ = bench_run
    cold = report["cold_start"]
    manifest = inspect_package(STUDENT_PACKAGE)["manifest"]
    assert cold["runs"] == 1
    assert cold["warmup_runs"] == 1
    assert cold["threads"] == 1
    assert cold["query"] == bench.BUILT_IN_QUERIES[0]
    assert cold["label"] in manifest["labels"]
    assert cold["golden"]["checked"] == len(manifest["golden"])
    assert isinstance(cold["golden"]["failures"], list)


def test_json_latency_percentiles(bench_run):
    report, _, _ = bench_run
    (row,) = report["latency"]
    assert row["threads"] == 1
    assert row["runs"] == 20
    assert row["warmup"] == bench.DEFAULT_WARMUP
    assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert row["min_ms"] <= row["mean_ms"] <= row["max_ms"]
    assert 0 < row["tokenize_p50_ms"] < row["p50_ms"]
    assert 0 < row["inference_p50_ms"] < row["p50_ms"]


def test_json_throughput_rows(bench_run):
    report, _, _ = bench_run
    rows = {(row["threads"], row["batch_size"]): row for row in report["throughput"]}
    assert set(rows) == {(1, 1), (1, 4)}
    for (_, batch_size), row in rows.items():
        assert row["queries_per_second"] > 0
        assert row["batch_p50_ms"] > 0
        assert row["queries"] == row["batches"] * batch_size
        assert row["queries"] >= 20
        assert row["batches"] >= bench.MIN_THROUGHPUT_BATCHES


def test_json_package_and_memory(bench_run):
    report, _, _ = bench_run
    package, memory = report["package"], report["memory"]
    assert package["name"] == "clinc150-student"
    assert package["file_bytes"] == os.path.getsize(STUDENT_PACKAGE)
    assert package["encrypted_members"] == ["model.onnx"]
    assert package["signer_key_id"]
    assert package["labels"] == 151
    assert 0 < package["model_bytes"] < package["file_bytes"]
    assert package["tokenizer_bytes"] > 0
    # Both processes hold the decrypted model, so each peak is larger than it.
    assert memory["cold_start_peak_rss_bytes"] > package["model_bytes"]
    assert memory["benchmark_peak_rss_bytes"] > package["model_bytes"]
    assert memory["source"]


def test_json_machine_fields(bench_run):
    report, _, _ = bench_run
    machine = report["machine"]
    assert isinstance(machine["cpu_model"], str)
    assert machine["cpu_model"]
    assert machine["cpu_model_source"]
    assert machine["logical_cpus"] >= 1
    assert 1 <= machine["usable_cpus"] <= machine["logical_cpus"]
    assert machine["architecture"] == platform.machine()
    assert machine["python"].endswith(platform.python_version())
    assert machine["onnxruntime"] == ort.__version__
    assert machine["numpy"] == np.__version__
    assert "CPUExecutionProvider" in machine["onnxruntime_providers"]
    if platform.machine() in ("x86_64", "AMD64"):
        assert set(machine["isa_flags"]) == set(bench.X86_INT8_FLAGS)
    elif platform.machine() in ("aarch64", "arm64"):
        assert set(machine["isa_flags"]) == set(bench.ARM_INT8_FLAGS)


def test_json_session_and_queries(bench_run):
    report, _, _ = bench_run
    assert report["session"]["providers"] == ["CPUExecutionProvider"]
    assert report["session"]["graph_optimization"] == "all"
    assert report["session"]["threads"] == [1]
    assert report["queries"]["source"] == "built-in"
    assert report["queries"]["count"] == len(bench.BUILT_IN_QUERIES)
    assert report["queries"]["mean_tokens"] > 2


def test_rollback_state_recorded_once(bench_run):
    # The parent records the version as ``ask`` does, and the children check private copies.
    report, state_file, _ = bench_run
    state = json.loads(state_file.read_text(encoding="utf-8"))
    key = f"{report['package']['signer_key_id']}/clinc150-student"
    assert state["accepted"] == {key: report["package"]["version"]}
    assert list(state_file.parent.iterdir()) == [state_file]


def test_progress_lines_on_stderr(bench_run):
    _, _, stderr = bench_run
    assert "cold start: fresh process, warm-up" in stderr
    assert "cold start: fresh process, run 1 of 1" in stderr
    assert "latency: 20 single queries, 1 intra-op thread(s)" in stderr


def test_table_shows_every_section(bench_run):
    report, _, _ = bench_run
    table = bench.format_table(report)
    for stage in bench.COLD_STAGES:
        assert f"  {stage} " in table, stage
    for heading in ("Cold start:", "Warm single-query latency:", "Throughput,", "Memory"):
        assert heading in table
    assert report["machine"]["cpu_model"] in table
    assert "batch 4" in table


# Errors: one line on stderr and exit code 2


def test_corrupt_package_one_line_error(tmp_path):
    corrupt = tmp_path / "corrupt.edgepkg"
    data = bytearray(STUDENT_PACKAGE.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)
    corrupt.write_bytes(bytes(data))
    result = run_bench(str(corrupt), *DEMO_KEYS, "--state-file", "")
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edge-runtime bench: error: ")
    assert "model.onnx" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_truncated_package_one_line_error(tmp_path):
    truncated = tmp_path / "truncated.edgepkg"
    truncated.write_bytes(STUDENT_PACKAGE.read_bytes()[:4096])
    result = run_bench(str(truncated), *DEMO_KEYS, "--state-file", "")
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert "not a model package" in lines[0]


def test_missing_package_one_line_error(tmp_path):
    missing = tmp_path / "nothing.edgepkg"
    result = run_bench(str(missing), *DEMO_KEYS, "--state-file", "")
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert f"package file not found: {missing}" in lines[0]


def test_wrong_device_key_one_line_error(tmp_path):
    private_key, _ = generate_keys(tmp_path, "other-device", "device")
    result = run_bench(
        str(STUDENT_PACKAGE),
        "--signer-key",
        str(SIGNER_PUBLIC),
        "--device-key",
        str(private_key),
        "--state-file",
        "",
    )
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edge-runtime bench: error: ")
    assert "Traceback" not in result.stderr


def test_wrong_signer_key_one_line_error(tmp_path):
    _, public_key = generate_keys(tmp_path, "other-signer", "signer")
    result = run_bench(
        str(STUDENT_PACKAGE),
        "--signer-key",
        str(public_key),
        "--device-key",
        str(DEVICE_PRIVATE),
        "--state-file",
        "",
    )
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_rollback_rejected_one_line_error(tmp_path):
    # A newer version was already accepted from the same signer, so the benchmark rejects the
    # package, as ask does.
    manifest = inspect_package(STUDENT_PACKAGE)["manifest"]
    key_id = signing.key_id(signing.load_public_key_pem(SIGNER_PUBLIC.read_bytes()))
    state_file = tmp_path / "accepted-versions.json"
    state_file.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "accepted": {f"{key_id}/{manifest['name']}": manifest["version"] + 1},
            }
        ),
        encoding="utf-8",
    )
    result = run_bench(str(STUDENT_PACKAGE), *DEMO_KEYS, "--state-file", str(state_file))
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert f"older than version {manifest['version'] + 1}" in lines[0]


def test_invalid_graph_optimization_one_line_error():
    result = run_bench(
        str(STUDENT_PACKAGE), *DEMO_KEYS, "--state-file", "", "--graph-optimization", "fast"
    )
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert "'fast'" in lines[0]
    assert "disable, basic, extended, all" in lines[0]


def test_empty_queries_file_one_line_error(tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("\n   \n", encoding="utf-8")
    result = run_bench(
        str(STUDENT_PACKAGE), *DEMO_KEYS, "--state-file", "", "--queries", str(queries)
    )
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert str(queries) in lines[0]


# Helpers


def test_positive_int_list_parses():
    assert bench.positive_int_list("1,2,4") == [1, 2, 4]
    assert bench.positive_int_list(" 8 , 1 ,8") == [8, 1]


@pytest.mark.parametrize("value", ["0", "1,-2", "two", "1,,2", ""])
def test_positive_int_list_rejects(value):
    with pytest.raises(argparse.ArgumentTypeError):
        bench.positive_int_list(value)


def test_name_list_parses():
    assert bench.name_list("A, B") == ["A", "B"]
    with pytest.raises(argparse.ArgumentTypeError):
        bench.name_list(" , ")


def test_cap_threads_notes_excess():
    threads, notes = bench.cap_threads((1, 2, 4, 8), cpus=2)
    assert threads == [1, 2]
    assert len(notes) == 1
    assert "4, 8" in notes[0]
    assert "capped at 2" in notes[0]


def test_cap_threads_within_cpus():
    assert bench.cap_threads((4, 1), cpus=4) == ([4, 1], [])


def test_load_queries_file(tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_bytes("\ufeffbook a table for two\n\n  what's my balance  \n".encode())
    assert bench.load_queries(str(queries)) == (
        ["book a table for two", "what's my balance"],
        str(queries),
    )


def test_load_queries_invalid_utf8(tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        bench.load_queries(str(queries))


def test_load_queries_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the queries file"):
        bench.load_queries(str(tmp_path / "absent.txt"))


def test_peak_rss_positive():
    rss, source = bench.peak_rss()
    assert rss is not None
    assert rss > 10_000_000  # this process has numpy and onnxruntime loaded
    assert source


def test_percentiles_ordered():
    values = [float(value) for value in range(1, 101)]
    figures = bench.percentiles_ms(values)
    assert figures["p50_ms"] == pytest.approx(50.5)
    assert figures["p90_ms"] == pytest.approx(90.1)
    assert figures["p99_ms"] == pytest.approx(99.01)
    assert figures["min_ms"] == 1.0
    assert figures["max_ms"] == 100.0


# /proc/cpuinfo samples, written in the kernel's format for each kind of machine

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_vnni

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_vnni
"""

PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Revision\t: c03114
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""

PI5_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""


def test_describe_cpu_x86():
    info = bench.describe_cpu(bench.parse_cpuinfo(X86_CPUINFO), "x86_64", "")
    assert info["cpu_model"] == "AMD EPYC 7B13"
    assert info["cpu_model_source"] == "model name in /proc/cpuinfo"
    assert info["isa_flags"] == {
        "avx2": True,
        "avx512f": True,
        "avx512_vnni": True,
        "avx_vnni": False,
        "amx_tile": False,
        "amx_int8": False,
    }


def test_this_cpu_reads_this_machine():
    info = bench.this_cpu()
    assert info == bench.describe_cpu(bench.read_cpuinfo(), platform.machine(),
                                      platform.processor())
    assert info["cpu_model"]


def test_describe_cpu_raspberry_pi_4():
    fields = bench.parse_cpuinfo(PI4_CPUINFO)
    info = bench.describe_cpu(fields, "aarch64", "")
    assert info["cpu_model"] == "ARM Cortex-A72"
    assert info["isa_flags"] == {"asimd": True, "asimddp": False, "i8mm": False, "sve": False}
    assert fields["Model"] == "Raspberry Pi 4 Model B Rev 1.4"


def test_describe_cpu_raspberry_pi_5():
    info = bench.describe_cpu(bench.parse_cpuinfo(PI5_CPUINFO), "aarch64", "")
    assert info["cpu_model"] == "ARM Cortex-A76"
    assert info["isa_flags"]["asimddp"] is True
    assert info["isa_flags"]["i8mm"] is False


def test_describe_cpu_unknown_arm_part():
    text = "CPU implementer\t: 0x61\nCPU part\t: 0x022\nFeatures\t: asimd\n"
    info = bench.describe_cpu(bench.parse_cpuinfo(text), "aarch64", "")
    assert info["cpu_model"] == "CPU implementer 0x61, part 0x022"


def test_describe_cpu_hardware_field():
    info = bench.describe_cpu(bench.parse_cpuinfo("Hardware\t: BCM2835\n"), "armv7l", "")
    assert info["cpu_model"] == "BCM2835"
    assert info["isa_flags"] is None


def test_describe_cpu_without_cpuinfo():
    info = bench.describe_cpu({}, "arm64", "arm")
    assert info["cpu_model"] == "arm"
    assert info["cpu_model_source"] == "platform.processor()"
    assert info["isa_flags"] is None


def test_child_trust_options_copy_state(tmp_path):
    state = tmp_path / "state.json"
    state.write_text('{"schema_version": 1, "accepted": {}}', encoding="utf-8")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    options = dict(bench.TRUST_OPTION_DEFAULTS, state_file=str(state))
    copied = bench.child_trust_options(options, str(scratch))
    assert Path(copied["state_file"]).parent == scratch
    assert Path(copied["state_file"]).read_text(encoding="utf-8") == state.read_text("utf-8")
    assert options["state_file"] == str(state)


def test_child_trust_options_skip_rollback(tmp_path):
    options = dict(bench.TRUST_OPTION_DEFAULTS, state_file="")
    assert bench.child_trust_options(options, str(tmp_path))["state_file"] == ""


def test_child_environment_bytecode(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    notes: list[str] = []
    env = bench.child_environment(str(tmp_path), notes)
    assert "PYTHONDONTWRITEBYTECODE" not in env
    assert env["PYTHONPYCACHEPREFIX"] == str(tmp_path / "pycache")
    assert len(notes) == 1
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


def test_module_entry_runs_cli(tmp_path):
    # ``python -m edge_runtime.bench`` without --child is the same as ``edge-runtime bench``.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_runtime.bench",
            str(tmp_path / "absent.edgepkg"),
            "--state-file",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "package file not found" in result.stderr
