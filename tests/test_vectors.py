"""Tests of the conformance runner (edge_runtime.conformance) against the committed vectors
in tests/vectors/, of the runner's failure reports when an expectation is wrong, and of the
generator that writes the vectors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_runtime import errors
from edge_runtime.conformance import VECTORS_FILE, load_vector_set, main, run_vectors
from tests.conftest import ROOT

VECTORS_DIR = ROOT / "tests" / "vectors"
# The kinds of invalid package that the vectors must cover, by vector name.
REQUIRED_REJECTIONS = {
    "bad-signature",
    "unknown-signer",
    "digest-mismatch",
    "truncated-segment",
    "reordered-segments",
    "wrong-recipient",
    "rollback",
    "expired",
    "path-traversal",
    "oversize-member",
}
# Each archive or member-name check has its own error class, which the vectors name exactly.
ARCHIVE_CHECK_ERRORS = {
    "path-traversal": "InvalidMemberNameError",
    "oversize-member": "OversizeMemberError",
    "too-many-members": "TooManyMembersError",
}


def committed_set() -> dict[str, Any]:
    return json.loads((VECTORS_DIR / VECTORS_FILE).read_text(encoding="utf-8"))


def copy_vectors(tmp_path: Path) -> Path:
    """Copy the vector set (packages, keys and JSON, without the generator) to tmp_path."""
    target = tmp_path / "vectors"
    shutil.copytree(VECTORS_DIR, target, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return target


def edit_vector(folder: Path, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    path = folder / VECTORS_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    (vector,) = [item for item in data["vectors"] if item["name"] == name]
    change(vector)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def run_main(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main([str(folder)])
    return code, capsys.readouterr().out.splitlines()


def test_committed_vectors_pass():
    results = run_vectors(load_vector_set(VECTORS_DIR))

    assert [(result.name, result.detail) for result in results if not result.passed] == []
    assert len(results) == len(committed_set()["vectors"])


def test_vectors_cover_invalid_kinds():
    vectors = committed_set()["vectors"]
    names = {vector["name"] for vector in vectors}

    assert REQUIRED_REJECTIONS <= names
    assert {vector["verdict"] for vector in vectors if vector["name"] in REQUIRED_REJECTIONS} == {
        "reject"
    }
    assert any(vector["verdict"] == "accept" for vector in vectors)


def test_expected_errors_are_package_errors():
    data = committed_set()
    known = {
        name: cls
        for name, cls in vars(errors).items()
        if isinstance(cls, type) and issubclass(cls, errors.PackageError)
    }
    from edge_runtime import encryption, signing

    for module in (encryption, signing):
        known.update(
            {
                name: cls
                for name, cls in vars(module).items()
                if isinstance(cls, type) and issubclass(cls, errors.PackageError)
            }
        )

    for vector in data["vectors"]:
        if vector["verdict"] == "reject":
            assert vector["error"] in known, vector["name"]
            assert vector["error"] in data["errors"], vector["name"]
            bases = [
                base.__name__
                for base in known[vector["error"]].__mro__[1:]
                if issubclass(base, errors.PackageError)
            ]
            assert data["errors"][vector["error"]] == bases


def test_archive_vectors_name_exact_errors():
    rejected = {
        vector["name"]: vector["error"]
        for vector in committed_set()["vectors"]
        if vector["verdict"] == "reject"
    }

    for name, error in ARCHIVE_CHECK_ERRORS.items():
        assert rejected[name] == error, name
    assert "PackageError" not in rejected.values()


def test_keys_marked_test_only():
    data = committed_set()

    assert data["test_only"] is True
    assert "test-only" in data["notice"]
    for name, entry in data["keys"].items():
        assert name.startswith("test-only-")
        assert entry["test_only"] is True
        assert Path(entry["file"]).name.startswith("test-only-")
    for path in (VECTORS_DIR / "keys").iterdir():
        assert path.name.startswith("test-only-"), path


def test_vectors_stay_small():
    for path in VECTORS_DIR.glob("*.edgepkg"):
        assert path.stat().st_size < 16 * 1024, path


def test_command_line_passes():
    result = subprocess.run(
        [sys.executable, "-m", "edge_runtime.conformance", str(VECTORS_DIR)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    count = len(committed_set()["vectors"])
    lines = result.stdout.splitlines()

    assert result.returncode == 0, result.stdout + result.stderr
    assert len(lines) == count + 1
    assert all(line.startswith("pass  ") for line in lines[:-1])
    assert lines[-1] == f"{count} vectors: {count} passed, 0 failed"


def test_command_line_fails_on_wrong_error(tmp_path: Path):
    folder = copy_vectors(tmp_path)
    edit_vector(folder, "bad-signature", lambda vector: vector.update(error="UnknownSignerError"))

    result = subprocess.run(
        [sys.executable, "-m", "edge_runtime.conformance", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = result.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]

    assert result.returncode == 1
    assert len(failed) == 1
    assert failed[0].startswith("FAIL  bad-signature ")
    assert "expected UnknownSignerError (signature), got InvalidSignatureError" in failed[0]
    assert lines[-1].endswith("passed, 1 failed")


def set_expected(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda vector: vector["expected"].update({field: value})


# (vector, change to its expectation, text the FAIL line must contain)
WRONG_EXPECTATIONS = [
    (
        "bad-signature",
        lambda vector: vector.update(error="SignatureError"),
        "expected SignatureError (signature), got InvalidSignatureError",
    ),
    (
        "expired",
        lambda vector: vector.update(error="RollbackError"),
        "expected RollbackError (expiry), got ExpiredPackageError",
    ),
    (
        "valid",
        set_expected("label", "weather"),
        "'Set an alarm for 7 am' gives label 'alarm', expected 'weather'",
    ),
    ("valid", set_expected("plaintext_sha256", {"model.onnx": "0" * 64}), f"expected {'0' * 64}"),
    ("valid-x25519", set_expected("version", 4), "version is 3, expected 4"),
    (
        "valid-logit-margin",
        lambda vector: vector["expected"]["gate"].update(local=False),
        "the gate does not escalate for 'wake me up at 7'",
    ),
    (
        "valid-logit-margin",
        lambda vector: vector["expected"]["gate"].update(score="max_probability"),
        "gate score is 'logit_margin', expected 'max_probability'",
    ),
    (
        "valid-logit-margin",
        lambda vector: vector["expected"]["gate"].update(value=0.8421),
        "'wake me up at 7' gives gate score 0.904",
    ),
    (
        "valid-without-key-commitment",
        set_expected("rollback_state", {}),
        "rollback state afterwards is",
    ),
    (
        "valid",
        lambda vector: vector.update(verdict="reject", error="PackageError"),
        "expected PackageError, got accepted",
    ),
    # The runner compares exact classes, so a base of the raised class does not match.
    (
        "path-traversal",
        lambda vector: vector.update(error="PackageError"),
        "expected PackageError (member-names), got InvalidMemberNameError",
    ),
    (
        "oversize-member",
        lambda vector: vector.update(error="PackageLimitError"),
        "expected PackageLimitError (archive), got OversizeMemberError",
    ),
]


@pytest.mark.parametrize(
    ("name", "change", "reported"),
    WRONG_EXPECTATIONS,
    ids=[f"{name}-{index}" for index, (name, _, _) in enumerate(WRONG_EXPECTATIONS)],
)
def test_wrong_expectation_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, change: Callable, reported: str
):
    folder = copy_vectors(tmp_path)
    edit_vector(folder, name, change)

    code, lines = run_main(folder, capsys)
    failed = [line for line in lines if line.startswith("FAIL")]

    assert code == 1
    assert len(failed) == 1
    assert failed[0].startswith(f"FAIL  {name} ")
    assert reported in failed[0]


def test_swapped_package_files_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder = copy_vectors(tmp_path)
    valid = (folder / "valid.edgepkg").read_bytes()
    shutil.copyfile(folder / "expired.edgepkg", folder / "valid.edgepkg")
    (folder / "expired.edgepkg").write_bytes(valid)

    code, lines = run_main(folder, capsys)
    failed = {line.split()[1]: line for line in lines if line.startswith("FAIL")}

    assert code == 1
    assert sorted(failed) == ["expired", "valid"]
    assert "expected accept, got ExpiredPackageError" in failed["valid"]
    assert "expected ExpiredPackageError (expiry), got accepted" in failed["expired"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda data: data["vectors"][0].update(file="../valid.edgepkg"), "vectors[0].file"),
        (lambda data: data["vectors"][0].update(device_key="no-such-key"), "vectors[0].device_key"),
        (
            lambda data: data["vectors"][0].update(trusted_keys=[["list"]]),
            "vectors[0].trusted_keys",
        ),
        (lambda data: data["vectors"][0].update(now="2026-06-01T00:00:00"), "vectors[0].now"),
        (
            lambda data: data["vectors"][1].update(name=data["vectors"][0]["name"]),
            "vectors[1].name",
        ),
        (
            lambda data: data["keys"]["test-only-signer"].update(key_id="0" * 64),
            "keys.test-only-signer.key_id",
        ),
        (lambda data: data.update(schema_version=2), "schema_version"),
        (
            lambda data: data["vectors"][3]["expected"]["gate"].update(local="yes"),
            "vectors[3].expected.gate.local",
        ),
    ],
)
def test_invalid_vector_set_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Callable, field: str
):
    folder = copy_vectors(tmp_path)
    path = folder / VECTORS_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")

    code = main([str(folder)])
    captured = capsys.readouterr()

    assert code == 2
    assert captured.out == ""
    assert f"field {field!r}" in captured.err


def test_missing_vector_set_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code = main([str(tmp_path)])

    assert code == 2
    assert "not found" in capsys.readouterr().err


def test_generator_reproduces_expectations(tmp_path: Path):
    pytest.importorskip("onnx")
    from tests.vectors.generate import generate

    path = generate(tmp_path / "generated", keys_dir=VECTORS_DIR / "keys")
    results = run_vectors(load_vector_set(path))

    # The packages differ (random keys, nonces and signatures), the expectations must not.
    assert path.read_text(encoding="utf-8") == (VECTORS_DIR / VECTORS_FILE).read_text(
        encoding="utf-8"
    )
    assert sorted(p.name for p in path.parent.glob("*.edgepkg")) == sorted(
        p.name for p in VECTORS_DIR.glob("*.edgepkg")
    )
    assert [(result.name, result.detail) for result in results if not result.passed] == []
