"""Exceptions raised by edge_runtime.

Every exception derives from ``EdgeRuntimeError``, with one base per subsystem so that a caller
can tell bad input data from a broken package or an unreachable teacher::

    EdgeRuntimeError
    ├── DataFormatError         a data file is malformed (names the file, line and field)
    ├── PackageError            a model package cannot be read or trusted
    │   ├── PackageReadError        the file is missing, cannot be read or changed while read
    │   ├── ArchiveFormatError      not a ZIP archive of the shape that packages have
    │   ├── PackageLimitError       a size or count limit checked before any large allocation
    │   │   ├── OversizePackageError    the file, its directory or all members are too large
    │   │   ├── OversizeMemberError     one member is larger than its limit
    │   │   └── TooManyMembersError     the archive has more members than the limit
    │   ├── InvalidMemberNameError  a name is absolute, has a ``..`` part, repeats or is not UTF-8
    │   ├── ManifestError           the manifest is not JSON or does not follow the schema
    │   │   └── UnsupportedSchemaVersionError   a schema version this reader does not know
    │   ├── PackageIntegrityError   a member's digest or size differs from the manifest
    │   ├── RollbackError           the version is older than one already accepted
    │   ├── ExpiredPackageError     the package's expiry time has passed
    │   ├── signing.SignatureError  the signature is missing, malformed, invalid or unknown
    │   └── encryption.DecryptionError  a member or the content key cannot be decrypted
    ├── ModelError              ONNX Runtime could not load or run a model
    ├── ConfigError             an invalid setting (names the key and the expected value)
    └── TeacherError            the teacher gateway could not answer
        ├── TeacherUnavailable      connection failed, timed out or the server returned 5xx
        │   └── TeacherRetryLater       not before a known time (breaker open, Retry-After)
        └── TeacherRejected         the gateway refused the request (4xx)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class EdgeRuntimeError(Exception):
    """Base class of every error raised by edge_runtime."""


class DataFormatError(EdgeRuntimeError, ValueError):
    """A data file does not have the expected format.

    ``line`` is the 1-based line number in the file where the problem was found, or None when
    the problem is not tied to one line (for example an empty file).
    """

    def __init__(self, path: str | Path, line: int | None, field: str | None, problem: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = self.path if line is None else f"{self.path}, line {line}"
        if field:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")


class PackageError(EdgeRuntimeError):
    """A model package cannot be read, or fails a check."""


class PackageReadError(PackageError):
    """The package file cannot be read: it does not exist, is a folder, fails with an I/O
    error, or changes size while it is read because a copy or download is still running."""


class ArchiveFormatError(PackageError):
    """The file is not a ZIP archive of the shape that the package writer produces.

    Raised for a file without an end-of-central-directory record at its end (which includes a
    download cut short), split-archive or ZIP64 fields, compressed or ZIP-encrypted members, a
    ZIP version above 6.3, and an archive without ``manifest.json``.
    """


class PackageLimitError(PackageError):
    """The package exceeds a size or count limit that the reader checks before it allocates
    memory for the package's contents."""


class OversizePackageError(PackageLimitError):
    """The package file, its central directory or all its members together are larger than
    the reader's limit."""


class OversizeMemberError(PackageLimitError):
    """A member's declared size is above the limit for one member (a lower one for
    ``manifest.json``)."""


class TooManyMembersError(PackageLimitError):
    """The archive's central directory lists more members than the reader's limit."""


class InvalidMemberNameError(PackageError):
    """A member name is not a relative POSIX path without empty, ``.`` or ``..`` parts,
    backslashes or colons, is not valid UTF-8, repeats, or (when writing) is reserved."""


class ManifestError(PackageError):
    """The manifest is not UTF-8 JSON, or breaks the schema: a missing key, a value of the
    wrong type or out of range, or a model or tokenizer member that it does not list."""


class UnsupportedSchemaVersionError(ManifestError):
    """The manifest's ``schema_version`` is one that this reader does not support."""


class PackageIntegrityError(PackageError):
    """A package member does not match the digest or size that the manifest lists."""


class RollbackError(PackageError):
    """The package's version is older than the newest one accepted from the same signer."""


class ExpiredPackageError(PackageError):
    """The package's ``expires_at`` time has passed, beyond the allowed clock skew."""


class ModelError(EdgeRuntimeError):
    """ONNX Runtime failed to load or run a model."""


class ConfigError(EdgeRuntimeError, ValueError):
    """An invalid configuration value."""


class TeacherError(EdgeRuntimeError):
    """The teacher gateway did not return a usable answer."""


class TeacherUnavailable(TeacherError):
    """The teacher could not be reached, timed out, or returned a server error."""


class TeacherRetryLater(TeacherUnavailable):
    """The teacher must not be asked before a known time.

    Raised while the circuit breaker is open or half-open, and when the gateway's
    ``Retry-After`` (on HTTP 429 or 503) is beyond what is left of the query's budget.
    ``retry_after`` is the number of seconds to wait from the moment of raising, and
    ``retry_at`` the same moment as a Unix time. Both are None while a half-open breaker's
    probe is in flight, because its end is not known.
    """

    def __init__(self, message: str, retry_after: float | None, retry_at: float | None):
        self.retry_after = retry_after
        self.retry_at = retry_at
        super().__init__(message)


class TeacherRejected(TeacherError):
    """The gateway rejected the request with a client error (4xx)."""

    def __init__(self, status_code: int, detail: str):
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"teacher gateway rejected the request with HTTP {status_code}: {detail}")
