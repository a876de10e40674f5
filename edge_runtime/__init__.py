"""edge_runtime: answer on the device with a distilled student, escalate hard queries to a
teacher gateway.

Data flow: ``package`` verifies (``signing``), checks and decrypts (``encryption``) a model
package in memory -> ``model`` creates the tokenizer and the ONNX Runtime session from its
bytes -> ``gate`` scores the student's calibrated confidence -> ``runtime`` answers locally or
calls ``teacher_client``, falling back to the local answer when the teacher is unreachable.
``errors`` holds the exception hierarchy.
"""

from edge_runtime import encryption, signing
from edge_runtime.errors import (
    ConfigError,
    DataFormatError,
    EdgeRuntimeError,
    ExpiredPackageError,
    ModelError,
    PackageError,
    PackageIntegrityError,
    RollbackError,
    TeacherError,
    TeacherRejected,
    TeacherUnavailable,
)
from edge_runtime.package import ModelPackage, TrustPolicy, read_package
from edge_runtime.rollback import RollbackState
from edge_runtime.runtime import (
    SOURCE_LOCAL,
    SOURCE_LOCAL_OFFLINE,
    SOURCE_TEACHER,
    Answer,
    EdgeRuntime,
)

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "ConfigError",
    "DataFormatError",
    "EdgeRuntime",
    "EdgeRuntimeError",
    "ExpiredPackageError",
    "ModelError",
    "ModelPackage",
    "PackageError",
    "PackageIntegrityError",
    "RollbackError",
    "RollbackState",
    "SOURCE_LOCAL",
    "SOURCE_LOCAL_OFFLINE",
    "SOURCE_TEACHER",
    "TeacherError",
    "TeacherRejected",
    "TeacherUnavailable",
    "TrustPolicy",
    "encryption",
    "read_package",
    "signing",
]
