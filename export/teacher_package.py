"""The teacher of ``teacher.mode = "package"``: the int8 ONNX model of an existing teacher
package. It gives the student's soft targets and the teacher labels that calibration compares
with, so a new student can be built in minutes without training a teacher.

The package is verified as the gateway verifies it: its signature must come from
``teacher.package_signer_key``, or by default from the public half of ``package.signer_key``.
Its labels must include every label of the build. When the build uses fewer labels (a quick
build on a subset), the teacher's logits are restricted to the build's labels, in the build's
order, so the teacher's prediction is its best label among them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime import signing
from edge_runtime.errors import ConfigError, PackageError
from edge_runtime.model import OnnxClassifier
from edge_runtime.package import TrustPolicy, inspect_package, read_package
from export.config import PackageConfig, TeacherConfig
from export.progress import StageProgress

log = logging.getLogger(__name__)

# Texts per progress step when computing logits one query at a time.
PROGRESS_STEP = 256


@dataclass(frozen=True)
class PackageTeacher:
    """A verified teacher package's classifier and the columns of the build's labels in its
    logits."""

    classifier: OnnxClassifier
    columns: np.ndarray  # (num_build_labels,) indices into the package's labels
    report: dict

    def logits(self, texts: list[str], description: str | None = None) -> np.ndarray:
        """Return logits (len(texts), num_build_labels), one query per ONNX Runtime call.

        Single calls give the logits the gateway computes for each query: in a dynamically
        quantized int8 model the activation scale is taken over the whole batch, so a batched
        row can differ from the same query alone.
        """
        rows = np.zeros((len(texts), len(self.columns)), dtype=np.float32)
        steps = (len(texts) + PROGRESS_STEP - 1) // PROGRESS_STEP
        with StageProgress(
            description or "teacher logits", steps, visible=description is not None
        ) as bar:
            for first in range(0, len(texts), PROGRESS_STEP):
                chunk = texts[first : first + PROGRESS_STEP]
                logits = self.classifier.predict_batch(chunk, batch_size=1)
                rows[first : first + len(chunk)] = logits[:, self.columns]
                bar.advance()
        return rows


def teacher_trust(teacher: TeacherConfig, package: PackageConfig) -> TrustPolicy:
    """Return the trust policy for ``teacher.package``: its signer must be
    ``teacher.package_signer_key``, or the public half of ``package.signer_key``."""
    if teacher.package_signer_key:
        key = "teacher.package_signer_key"
        path = teacher.package_signer_key
    else:
        key = "package.signer_key"
        path = package.signer_key
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{key}: cannot read {path}: {exc}; this key verifies teacher.package"
        ) from None
    try:
        if key == "teacher.package_signer_key":
            public_key = signing.load_public_key_pem(pem)
        else:
            public_key = signing.load_private_key_pem(pem).public_key()
    except PackageError as exc:
        raise ConfigError(f"{key}: {path} is not a usable key: {exc}") from exc
    return TrustPolicy(trusted_keys=(public_key,))


def _check_teacher_role(manifest: dict, path: Path) -> None:
    model = manifest.get("model")
    role = model.get("role") if isinstance(model, dict) else None
    if role != "teacher" or manifest.get("gate") is not None:
        raise ConfigError(
            f"teacher.package: {path} is a {role or 'student'} package "
            f"({manifest.get('name')}); point it to the teacher package of a build"
        )


def load_package_teacher(
    teacher: TeacherConfig, package: PackageConfig, labels: list[str]
) -> PackageTeacher:
    """Read and verify ``teacher.package`` and check that it is a teacher for ``labels``.

    Raises ``ConfigError`` naming ``teacher.package`` when the file is missing, fails
    verification, is not a teacher package or lacks one of ``labels``.
    """
    path = Path(teacher.package)
    if not path.is_file():
        raise ConfigError(
            f"teacher.package: {teacher.package} not found; point it to a teacher package such "
            "as models/clinc150-teacher.edgepkg (relative paths start at the current folder)"
        )
    trust = teacher_trust(teacher, package)
    try:
        # A student package's model is encrypted for devices, so verifying it would fail with
        # a decryption error. The unverified manifest gives a clearer message first.
        _check_teacher_role(inspect_package(path)["manifest"], path)
        teacher_package = read_package(path, trust)
    except PackageError as exc:
        raise ConfigError(f"teacher.package: {path} failed verification: {exc}") from exc

    manifest = teacher_package.manifest
    _check_teacher_role(manifest.raw, path)
    missing = sorted(set(labels) - set(manifest.labels))
    if missing:
        raise ConfigError(
            f"teacher.package: {path} lacks {len(missing)} label(s) of this build, for example "
            f"{missing[:5]}; use a teacher trained on the same label set"
        )
    position = {label: i for i, label in enumerate(manifest.labels)}
    columns = np.array([position[label] for label in labels], dtype=np.int64)
    # One intra-op thread: for single queries of about 13 tokens, 2 threads took 6.1 ms a query
    # and 1 thread 2.6 ms on a 2-vCPU x86-64 VM.
    classifier = OnnxClassifier(teacher_package, threads=1)
    report = {
        "package": str(path),
        "name": manifest.name,
        "version": manifest.version,
        "precision": manifest.precision,
        "signer_key_id": teacher_package.signer_key_id,
        "labels_used": len(labels),
        "labels_in_package": len(manifest.labels),
        "size_bytes": path.stat().st_size,
    }
    log.info(
        "teacher: package %s version %d, signer %s, %d of its %d labels used",
        manifest.name,
        manifest.version,
        teacher_package.signer_key_id,
        len(labels),
        len(manifest.labels),
    )
    return PackageTeacher(classifier=classifier, columns=columns, report=report)
