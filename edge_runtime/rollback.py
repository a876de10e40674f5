"""Rollback protection: the highest package version accepted per signer and package name.

The state is a small JSON file, ``{"schema_version": 1, "accepted": {"<signer key id>/<package
name>": <version>}}``, rewritten atomically (temporary file, fsync, rename) so that a killed
process leaves either the old or the new state, never a partial file.
"""

from __future__ import annotations

import json
import os
import threading
from typing import TYPE_CHECKING

from edge_runtime._log import get_logger
from edge_runtime.errors import PackageError, RollbackError

if TYPE_CHECKING:
    from pathlib import Path

log = get_logger(__name__)

STATE_SCHEMA_VERSION = 1
MAX_STATE_BYTES = 1024 * 1024


class RollbackState:
    """Versions accepted on this device, stored in ``path``."""

    def __init__(self, path: str | os.PathLike):
        # A string, not a Path: pathlib costs a device about 4 ms of start-up to import.
        self._path = os.fspath(path)
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        from pathlib import Path

        return Path(self._path)

    def __repr__(self) -> str:
        return f"RollbackState(path={self._path!r})"

    def _load(self) -> dict[str, int]:
        try:
            with open(self._path, "rb") as handle:
                data = handle.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise PackageError(f"cannot read rollback state {self._path}: {exc}") from exc
        if len(data) > MAX_STATE_BYTES:
            raise PackageError(
                f"rollback state {self._path} is larger than {MAX_STATE_BYTES} bytes")
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise PackageError(
                f"rollback state {self._path} is not valid JSON ({exc}); restore it from a "
                "backup, or delete it to accept any version again"
            ) from None
        accepted = raw.get("accepted") if isinstance(raw, dict) else None
        if not isinstance(accepted, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in accepted.items()
        ):
            raise PackageError(f"rollback state {self._path} has no valid 'accepted' table")
        return accepted

    def highest(self, signer_key_id: str, package_name: str) -> int | None:
        """The newest version accepted from this signer for this package name, if any."""
        return self._load().get(f"{signer_key_id}/{package_name}")

    def check(self, signer_key_id: str, package_name: str, version: int,
              allow_downgrade: bool = False) -> int | None:
        """Raise RollbackError if ``version`` is older than the newest one accepted; return
        that newest version (None when nothing was accepted yet)."""
        highest = self.highest(signer_key_id, package_name)
        if highest is None or version >= highest:
            return highest
        if allow_downgrade:
            log.warning("accepting %s version %d, older than accepted version %d, because a "
                        "downgrade was allowed", package_name, version, highest)
            return highest
        raise RollbackError(
            f"package {package_name!r} version {version} is older than version {highest}, "
            f"already accepted from signer {signer_key_id[:16]}; install version {highest} or "
            "newer, or allow the downgrade explicitly (--allow-downgrade)"
        )

    def record(self, signer_key_id: str, package_name: str, version: int) -> None:
        """Remember ``version`` if it is the newest seen from this signer for this name."""
        with self._lock:
            accepted = self._load()
            key = f"{signer_key_id}/{package_name}"
            if accepted.get(key, -1) >= version:
                return
            accepted[key] = version
            self._write({"schema_version": STATE_SCHEMA_VERSION, "accepted": accepted})

    def _write(self, state: dict) -> None:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        import tempfile  # imported here: reading the state does not need it

        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp",
                                        dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(state, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
