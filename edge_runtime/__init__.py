"""edge_runtime: answer on the device with a distilled student, escalate hard queries to a
teacher gateway.

Data flow: ``package`` verifies (``signing``), checks and decrypts (``encryption``) a model
package in memory -> ``model`` creates the tokenizer and the ONNX Runtime session from its
bytes -> ``gate`` scores the student's calibrated confidence -> ``runtime`` answers locally or
calls ``teacher_client``, falling back to the local answer when the teacher is unreachable.
``errors`` holds the exception hierarchy.

Names are imported on first use, so that ``import edge_runtime`` stays cheap and a device's
cold start pays only for the modules it runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Answer": "edge_runtime.runtime",
    "EdgeRuntime": "edge_runtime.runtime",
    "SOURCE_CACHE": "edge_runtime.runtime",
    "SOURCE_LOCAL": "edge_runtime.runtime",
    "SOURCE_LOCAL_OFFLINE": "edge_runtime.runtime",
    "SOURCE_TEACHER": "edge_runtime.runtime",
    "ROUTES": "edge_runtime.runtime",
    "AnswerCache": "edge_runtime.cache",
    "SemanticCache": "edge_runtime.cache",
    "EscalationLog": "edge_runtime.escalation_log",
    "ModelPackage": "edge_runtime.package",
    "TrustPolicy": "edge_runtime.package",
    "read_package": "edge_runtime.package",
    "RollbackState": "edge_runtime.rollback",
    "ConfigError": "edge_runtime.errors",
    "DataFormatError": "edge_runtime.errors",
    "EdgeRuntimeError": "edge_runtime.errors",
    "ExpiredPackageError": "edge_runtime.errors",
    "ModelError": "edge_runtime.errors",
    "PackageError": "edge_runtime.errors",
    "PackageIntegrityError": "edge_runtime.errors",
    "ArchiveFormatError": "edge_runtime.errors",
    "InvalidMemberNameError": "edge_runtime.errors",
    "ManifestError": "edge_runtime.errors",
    "OversizeMemberError": "edge_runtime.errors",
    "OversizePackageError": "edge_runtime.errors",
    "PackageLimitError": "edge_runtime.errors",
    "PackageReadError": "edge_runtime.errors",
    "TooManyMembersError": "edge_runtime.errors",
    "UnsupportedSchemaVersionError": "edge_runtime.errors",
    "RollbackError": "edge_runtime.errors",
    "TeacherError": "edge_runtime.errors",
    "TeacherRejected": "edge_runtime.errors",
    "TeacherRetryLater": "edge_runtime.errors",
    "TeacherUnavailable": "edge_runtime.errors",
}
_SUBMODULES = {"encryption", "signing"}

__all__ = sorted([*_LAZY, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"edge_runtime.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from edge_runtime import encryption, signing  # noqa: F401
    from edge_runtime.cache import AnswerCache, SemanticCache  # noqa: F401
    from edge_runtime.errors import (  # noqa: F401
        ArchiveFormatError,
        ConfigError,
        DataFormatError,
        EdgeRuntimeError,
        ExpiredPackageError,
        InvalidMemberNameError,
        ManifestError,
        ModelError,
        OversizeMemberError,
        OversizePackageError,
        PackageError,
        PackageIntegrityError,
        PackageLimitError,
        PackageReadError,
        RollbackError,
        TeacherError,
        TeacherRejected,
        TeacherRetryLater,
        TeacherUnavailable,
        TooManyMembersError,
        UnsupportedSchemaVersionError,
    )
    from edge_runtime.escalation_log import EscalationLog  # noqa: F401
    from edge_runtime.package import ModelPackage, TrustPolicy, read_package  # noqa: F401
    from edge_runtime.rollback import RollbackState  # noqa: F401
    from edge_runtime.runtime import (  # noqa: F401
        ROUTES,
        SOURCE_CACHE,
        SOURCE_LOCAL,
        SOURCE_LOCAL_OFFLINE,
        SOURCE_TEACHER,
        Answer,
        EdgeRuntime,
    )
