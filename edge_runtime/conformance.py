"""Check this package reader against a set of conformance vectors.

    python -m edge_runtime.conformance tests/vectors

A vector set is a folder holding ``vectors.json`` and the package files and test keys it names;
``docs/package-format.md`` (section "Conformance vectors") describes the JSON. For each vector
the runner reads the package with ``read_package`` under the vector's trusted keys, device key,
clock and rollback state, and compares the outcome with the vector's verdict:

- ``reject``: the reader must raise exactly the named exception class (``type(exc).__name__``,
  not a subclass or a base) and leave the rollback state unchanged.
- ``accept``: the reader must return the expected name, version and signer, each member's
  plaintext SHA-256 and the expected rollback state afterwards, and the student must give
  the expected label for the vector's input and pass its golden inputs. With an optional
  ``gate`` expectation, the package's gate must compute the named score, its value within
  ``GATE_SCORE_TOLERANCE``, and the expected local-or-escalate decision for that input.

It prints one line per vector and a summary, and exits with 0 when every vector matches, 1 when
any does not, and 2 when the vector set itself is invalid. Needs only the base install.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime import encryption, signing
from edge_runtime.errors import DataFormatError, PackageError
from edge_runtime.package import ModelPackage, TrustPolicy, read_package
from edge_runtime.rollback import STATE_SCHEMA_VERSION, RollbackState

FORMAT = "edge-runtime package conformance vectors"
SCHEMA_VERSION = 1
VECTORS_FILE = "vectors.json"
VERDICT_ACCEPT = "accept"
VERDICT_REJECT = "reject"
KIND_SIGNER = "signer-public-key"
KIND_DEVICE = "device-private-key"
# Fields of "expected" in an accepted vector, with their JSON types.
EXPECTED_FIELDS = {
    "name": str,
    "version": int,
    "signer_key_id": str,
    "plaintext_sha256": dict,
    "input": str,
    "label": str,
    "rollback_state": dict,
}
# Fields of the optional "gate" of "expected", with their JSON types.
GATE_FIELDS = {"score": str, "value": (int, float), "local": bool}
# The vectors' logits are float32, so the score can differ from the generator's float64 value.
GATE_SCORE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Vector:
    """One package and what a reader must make of it."""

    name: str
    path: Path
    trusted_keys: tuple[str, ...]
    device_key: str | None
    now: dt.datetime
    rollback_state: dict[str, int]
    verdict: str
    error: str | None  # exception class name, for a rejected vector
    check: str | None  # the reader check expected to reject it
    expected: dict[str, Any] | None  # for an accepted vector


@dataclass(frozen=True)
class VectorSet:
    """A parsed vectors.json: loaded keys by name and the vectors in file order."""

    path: Path
    clock_skew: float
    keys: dict[str, Any]
    vectors: tuple[Vector, ...]


@dataclass(frozen=True)
class VectorResult:
    """The outcome of one vector. ``message`` is the reader's error message, if it raised."""

    name: str
    passed: bool
    detail: str
    message: str | None = None


# ---------------------------------------------------------------------------------------------
# Loading vectors.json
# ---------------------------------------------------------------------------------------------


def load_vector_set(source: str | os.PathLike) -> VectorSet:
    """Parse a vector set from its folder or its ``vectors.json`` and load its keys.

    Raises DataFormatError naming the field for a missing or invalid entry, a key file that
    cannot be loaded or whose key id differs from the listed one, and a file path that leaves
    the set's folder.
    """
    path = Path(source)
    if path.is_dir():
        path = path / VECTORS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(
            path, None, None, f"not found; pass a folder holding {VECTORS_FILE}, or the file itself"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataFormatError(path, None, None, f"cannot be read as UTF-8 JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DataFormatError(path, None, None, "must be a JSON object")
    if raw.get("format") != FORMAT:
        raise DataFormatError(
            path, None, "format", f"is {raw.get('format')!r:.60}; expected {FORMAT!r}"
        )
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise DataFormatError(
            path,
            None,
            "schema_version",
            f"is {raw.get('schema_version')!r:.20}; this runner reads version {SCHEMA_VERSION}",
        )
    reader = _field(raw, "reader", dict, path, "reader")
    clock_skew = _field(
        reader, "clock_skew_seconds", (int, float), path, "reader.clock_skew_seconds"
    )
    keys = _load_keys(_field(raw, "keys", dict, path, "keys"), path)

    vectors = []
    seen: set[str] = set()
    for index, item in enumerate(_field(raw, "vectors", list, path, "vectors")):
        vector = _parse_vector(item, f"vectors[{index}]", path, keys)
        if vector.name in seen:
            raise DataFormatError(
                path,
                None,
                f"vectors[{index}].name",
                f"{vector.name!r} is used by an earlier vector",
            )
        seen.add(vector.name)
        vectors.append(vector)
    if not vectors:
        raise DataFormatError(path, None, "vectors", "is empty")
    return VectorSet(path=path, clock_skew=float(clock_skew), keys=keys, vectors=tuple(vectors))


def _field(mapping: Any, key: str, kind: type | tuple[type, ...], path: Path, name: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise DataFormatError(path, None, name, "is missing")
    value = mapping[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = (
            kind.__name__ if isinstance(kind, type) else " or ".join(item.__name__ for item in kind)
        )
        raise DataFormatError(
            path, None, name, f"is {type(value).__name__} {value!r:.60}; expected {expected}"
        )
    return value


def _member_path(path: Path, relative: str, name: str) -> Path:
    """Return ``relative`` under the vector set's folder; reject absolute or ``..`` paths."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or "\\" in relative or ".." in parts:
        raise DataFormatError(
            path, None, name, f"{relative!r} must be a relative path inside the vector set's folder"
        )
    return path.parent.joinpath(*parts)


def _load_keys(table: dict[str, Any], path: Path) -> dict[str, Any]:
    keys = {}
    for name, entry in table.items():
        where = f"keys.{name}"
        file = _member_path(
            path, _field(entry, "file", str, path, f"{where}.file"), f"{where}.file"
        )
        kind = _field(entry, "kind", str, path, f"{where}.kind")
        listed_id = _field(entry, "key_id", str, path, f"{where}.key_id")
        try:
            if kind == KIND_SIGNER:
                key = signing.load_public_key_pem(file.read_bytes())
                actual_id = signing.key_id(key)
            elif kind == KIND_DEVICE:
                key = encryption.load_private_key(file)
                actual_id = encryption.device_key_id(key)
            else:
                raise DataFormatError(
                    path,
                    None,
                    f"{where}.kind",
                    f"is {kind!r:.40}; expected {KIND_SIGNER!r} or {KIND_DEVICE!r}",
                )
        except (OSError, PackageError) as exc:
            raise DataFormatError(
                path, None, f"{where}.file", f"failed to load {file}: {exc}"
            ) from None
        if actual_id != listed_id:
            raise DataFormatError(
                path, None, f"{where}.key_id", f"is {listed_id}, but {file} has key id {actual_id}"
            )
        keys[name] = key
    return keys


def _parse_vector(item: Any, where: str, path: Path, keys: dict[str, Any]) -> Vector:
    name = _field(item, "name", str, path, f"{where}.name")
    file = _member_path(path, _field(item, "file", str, path, f"{where}.file"), f"{where}.file")

    trusted = _field(item, "trusted_keys", list, path, f"{where}.trusted_keys")
    for key_name in trusted:
        _check_key_name(key_name, keys, path, f"{where}.trusted_keys")
    device_key = item.get("device_key")
    if device_key is not None:
        _check_key_name(device_key, keys, path, f"{where}.device_key")

    now_text = _field(item, "now", str, path, f"{where}.now")
    try:
        now = dt.datetime.fromisoformat(now_text)
    except ValueError:
        now = None
    if now is None or now.tzinfo is None:
        raise DataFormatError(
            path,
            None,
            f"{where}.now",
            f"{now_text!r:.60} is not an ISO 8601 time with a UTC offset",
        )
    rollback_state = _version_table(item, "rollback_state", path, f"{where}.rollback_state")

    verdict = _field(item, "verdict", str, path, f"{where}.verdict")
    error = check = expected = None
    if verdict == VERDICT_REJECT:
        error = _field(item, "error", str, path, f"{where}.error")
        if item.get("check") is not None:
            check = _field(item, "check", str, path, f"{where}.check")
    elif verdict == VERDICT_ACCEPT:
        expected = _field(item, "expected", dict, path, f"{where}.expected")
        for key, kind in EXPECTED_FIELDS.items():
            _field(expected, key, kind, path, f"{where}.expected.{key}")
        if expected.get("gate") is not None:
            gate = _field(expected, "gate", dict, path, f"{where}.expected.gate")
            for key, kind in GATE_FIELDS.items():
                _field(gate, key, kind, path, f"{where}.expected.gate.{key}")
        _version_table(expected, "rollback_state", path, f"{where}.expected.rollback_state")
    else:
        raise DataFormatError(
            path,
            None,
            f"{where}.verdict",
            f"is {verdict!r:.40}; expected {VERDICT_ACCEPT!r} or {VERDICT_REJECT!r}",
        )
    return Vector(
        name=name,
        path=file,
        trusted_keys=tuple(trusted),
        device_key=device_key,
        now=now,
        rollback_state=rollback_state,
        verdict=verdict,
        error=error,
        check=check,
        expected=expected,
    )


def _check_key_name(key_name: Any, keys: dict[str, Any], path: Path, name: str) -> None:
    if not isinstance(key_name, str) or key_name not in keys:
        raise DataFormatError(
            path, None, name, f"names key {key_name!r:.60}, which the keys table does not list"
        )


def _version_table(mapping: dict[str, Any], key: str, path: Path, name: str) -> dict[str, int]:
    table = _field(mapping, key, dict, path, name)
    for entry, version in table.items():
        if "/" not in entry or isinstance(version, bool) or not isinstance(version, int):
            raise DataFormatError(
                path,
                None,
                f"{name}.{entry}",
                "needs a key '<signer key id>/<package name>' and an integer version",
            )
    return dict(table)


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------


def run_vectors(vector_set: VectorSet) -> list[VectorResult]:
    """Check every vector of the set in file order."""
    return [check_vector(vector_set, vector) for vector in vector_set.vectors]


def check_vector(vector_set: VectorSet, vector: Vector) -> VectorResult:
    """Read one vector's package as a device with the vector's settings would, and compare."""
    with tempfile.TemporaryDirectory(prefix="edge-runtime-conformance-") as scratch:
        state_path = os.path.join(scratch, "accepted-versions.json")
        _write_state(state_path, vector.rollback_state)
        trust = TrustPolicy(
            trusted_keys=tuple(vector_set.keys[name] for name in vector.trusted_keys),
            device_key=vector_set.keys[vector.device_key] if vector.device_key else None,
            rollback=RollbackState(state_path),
            clock_skew=vector_set.clock_skew,
            now=lambda: vector.now,
        )
        try:
            package, failure = read_package(vector.path, trust), None
        # Any exception is an outcome to compare with the vector, including one that the
        # reader should not raise at all.
        except Exception as exc:  # noqa: BLE001
            package, failure = None, exc
        state_after = _read_state(state_path)

    message = None if failure is None else f"{type(failure).__name__}: {failure}"
    if vector.verdict == VERDICT_REJECT:
        return _compare_rejection(vector, failure, state_after, message)
    if failure is not None:
        return VectorResult(vector.name, False, f"expected accept, got {message}", message)
    return _compare_acceptance(vector, package, state_after)


def _compare_rejection(
    vector: Vector, failure: BaseException | None, state_after: dict[str, int], message: str | None
) -> VectorResult:
    expected = f"{vector.error}" + (f" ({vector.check})" if vector.check else "")
    if failure is None:
        return VectorResult(vector.name, False, f"expected {expected}, got accepted")
    actual = type(failure).__name__
    if actual != vector.error:
        return VectorResult(vector.name, False, f"expected {expected}, got {message}", message)
    if state_after != vector.rollback_state:
        return VectorResult(
            vector.name,
            False,
            f"rejected with {actual} as expected, but the rollback state changed to {state_after}",
            message,
        )
    return VectorResult(vector.name, True, f"rejected: {expected}", message)


def _compare_acceptance(
    vector: Vector, package: ModelPackage, state_after: dict[str, int]
) -> VectorResult:
    expected = vector.expected or {}
    problems = []
    manifest = package.manifest
    for field, actual in (
        ("name", manifest.name),
        ("version", manifest.version),
        ("signer_key_id", package.signer_key_id),
    ):
        if actual != expected[field]:
            problems.append(f"{field} is {actual!r}, expected {expected[field]!r}")
    digests = {name: hashlib.sha256(blob).hexdigest() for name, blob in package.members.items()}
    for member in sorted(set(digests) | set(expected["plaintext_sha256"])):
        actual, expected_digest = digests.get(member), expected["plaintext_sha256"].get(member)
        if actual != expected_digest:
            problems.append(f"{member} plaintext sha256 is {actual}, expected {expected_digest}")
    if state_after != expected["rollback_state"]:
        problems.append(
            f"rollback state afterwards is {state_after}, expected {expected['rollback_state']}"
        )

    answer, model_problem = _answer(package, expected["input"])
    label = answer["label"] if answer else None
    if model_problem is not None:
        problems.append(model_problem)
    else:
        if label != expected["label"]:
            problems.append(
                f"{expected['input']!r} gives label {label!r}, expected {expected['label']!r}"
            )
        if expected.get("gate") is not None:
            problems += _gate_problems(answer, expected["gate"], expected["input"])
    if problems:
        return VectorResult(vector.name, False, "; ".join(problems))
    model_digest = digests.get(manifest.model_member, "")
    gate = ""
    if expected.get("gate") is not None:
        decision = "local" if answer["local"] else "escalate"
        gate = f" ({answer['score_kind']} {answer['score']:.4f}, {decision})"
    return VectorResult(
        vector.name,
        True,
        f"accepted: {manifest.model_member} sha256 {model_digest[:16]}..., "
        f"{expected['input']!r} -> {label}{gate}",
    )


def _gate_problems(answer: dict, expected: dict, text: str) -> list[str]:
    """Compare the gate's score kind, score and decision for ``text`` with ``expected``."""
    problems = []
    if answer["score_kind"] != expected["score"]:
        problems.append(f"gate score is {answer['score_kind']!r}, expected {expected['score']!r}")
    score = answer["score"]
    if score is None or abs(score - expected["value"]) > GATE_SCORE_TOLERANCE:
        problems.append(
            f"{text!r} gives gate score {score}, expected {expected['value']} "
            f"(tolerance {GATE_SCORE_TOLERANCE})"
        )
    if answer["local"] != expected["local"]:
        action = "answer locally" if expected["local"] else "escalate"
        problems.append(f"the gate does not {action} for {text!r}")
    return problems


def _answer(package: ModelPackage, text: str) -> tuple[dict | None, str | None]:
    """Return the student's label for ``text`` with the gate's score kind, score and decision,
    or a description of what failed."""
    from edge_runtime.runtime import ROUTE_LOCAL_ONLY, EdgeRuntime  # loads onnxruntime

    try:
        with EdgeRuntime(
            package, route=ROUTE_LOCAL_ONLY, answer_cache=False, debug=True
        ) as runtime:
            if runtime.golden_failures:
                return None, f"golden inputs failed: {runtime.golden_failures}"
            answer = runtime.answer(text)
            score = (answer.debug or {}).get("score")
            return {
                "label": answer.label,
                "score_kind": runtime.gate.kind,
                "score": score,
                "local": runtime.gate.accepts(score),
            }, None
    # The model of a vector is untrusted input: any failure is a mismatch to report.
    except Exception as exc:  # noqa: BLE001
        return None, f"the student failed: {type(exc).__name__}: {exc}"


def _write_state(path: str, accepted: dict[str, int]) -> None:
    """Write a rollback state file in the format that ``edge_runtime.rollback`` reads."""
    if not accepted:
        return
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"schema_version": STATE_SCHEMA_VERSION, "accepted": accepted}, handle)


def _read_state(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as handle:
            return dict(json.load(handle)["accepted"])
    except FileNotFoundError:
        return {}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def format_results(results: list[VectorResult], verbose: bool = False) -> list[str]:
    """Return one line per result (``pass`` or ``FAIL``, name, detail) and a summary line."""
    width = max((len(result.name) for result in results), default=0)
    lines = []
    for result in results:
        status = "pass" if result.passed else "FAIL"
        lines.append(f"{status}  {result.name:<{width}}  {result.detail}")
        if verbose and result.message and result.passed:
            lines.append(f"{'':<{width + 6}}  reader: {result.message}")
    failed = sum(not result.passed for result in results)
    lines.append(f"{len(results)} vectors: {len(results) - failed} passed, {failed} failed")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge_runtime.conformance",
        description="Check this package reader against conformance vectors.",
    )
    parser.add_argument("vectors", help=f"folder holding {VECTORS_FILE}, or the file itself")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print the reader's error message for each rejected vector",
    )
    args = parser.parse_args(argv)
    try:
        vector_set = load_vector_set(args.vectors)
    except DataFormatError as exc:
        print(f"error: invalid vector set: {exc}", file=sys.stderr)
        return 2
    results = run_vectors(vector_set)
    for line in format_results(results, args.verbose):
        print(line)
    return 0 if all(result.passed for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
