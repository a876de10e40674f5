"""Read a package's ZIP archive into memory and check its structure.

A package is a ZIP archive of stored (uncompressed) members (APPNOTE.TXT, the PKWARE ZIP
specification). This reader accepts only what the package writer produces and a device needs,
and rejects the rest before anything is parsed:

- one end-of-central-directory record that ends the file, on disk 0, with no ZIP64 fields;
- a central directory that ends exactly where that record starts, with as many entries as the
  record says, and no data before the first member;
- stored members only, with equal compressed and uncompressed sizes, no ZIP encryption, and
  names that are relative POSIX paths without ``.`` or ``..`` parts, each used once;
- local headers that carry the central directory's name, and member data that does not
  overlap another member or the central directory.

The file is read by a background thread while the calling thread computes each member's
SHA-256 behind it. Both release the GIL (``readinto`` in the system call, ``hashlib`` for
buffers above 2 KiB), so on two or more cores reading and hashing a 16 MB model take about as
long as the slower of the two instead of their sum.

The standard library's ``zipfile`` is not used here: it imports ``pathlib``, ``shutil`` and
the compression modules, which cost a device about 9 ms of start-up (CPython 3.11 on a 2-vCPU
x86-64 VM), and it accepts archives (prefixed data, overlapping members) that a package never
is.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import sys
import threading
import zlib
from typing import Any

from edge_runtime.errors import (
    ArchiveFormatError,
    InvalidMemberNameError,
    OversizeMemberError,
    OversizePackageError,
    PackageIntegrityError,
    PackageReadError,
    TooManyMembersError,
)

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "model.sig"
PACKAGE_SUFFIX = ".edgepkg"

# Limits that a reader enforces before it allocates anything large.
MAX_PACKAGE_BYTES = 1024 * 1024 * 1024  # bytes
MAX_MEMBERS = 16
MAX_MEMBER_BYTES = 512 * 1024 * 1024  # bytes
MAX_TOTAL_BYTES = 768 * 1024 * 1024  # bytes, all members uncompressed
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # bytes
MAX_DIRECTORY_BYTES = 1024 * 1024  # bytes of central directory

# The background reader hands the file over in chunks of this size.
READ_CHUNK_BYTES = 1024 * 1024
_HUGE_PAGE_BYTES = 2 * 1024 * 1024  # x86-64 and arm64 with 4 KiB base pages
_MADV_HUGEPAGE = 14  # from <sys/mman.h> on Linux

# End of central directory record: signature, this disk, directory disk, entries on this
# disk, total entries, directory size, directory offset, comment length (APPNOTE 4.3.16).
_END_RECORD = struct.Struct("<4sHHHHIIH")
_END_MAGIC = b"PK\x05\x06"
_MAX_COMMENT_BYTES = 0xFFFF
# Central directory header (APPNOTE 4.3.12): signature, version made by, version needed,
# flags, method, time, date, CRC-32, compressed size, uncompressed size, name length, extra
# length, comment length, disk number start, internal attributes, external attributes,
# local header offset.
_CENTRAL_HEADER = struct.Struct("<4sHHHHHHIIIHHHHHII")
_CENTRAL_MAGIC = b"PK\x01\x02"
# Local file header (APPNOTE 4.3.7): signature, version needed, flags, method, time, date,
# CRC-32, compressed size, uncompressed size, name length, extra length.
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_MAGIC = b"PK\x03\x04"

_METHOD_STORED = 0
_FLAG_ENCRYPTED = 0x01
_FLAG_UTF8_NAME = 0x800
_FLAGS_UNSUPPORTED = _FLAG_ENCRYPTED | 0x20 | 0x40  # ZIP encryption, patch data, strong encryption
_MAX_VERSION_NEEDED = 63  # ZIP 6.3; the writer needs 2.0
_ZIP64_MARKERS = (0xFFFF, 0xFFFFFFFF)


class Entry:
    """One member as the central directory describes it."""

    __slots__ = ("name", "header_offset", "size", "crc", "data_start")

    def __init__(self, name: str, header_offset: int, size: int, crc: int):
        self.name = name
        self.header_offset = header_offset
        self.size = size
        self.crc = crc
        self.data_start = -1  # set once the local header is checked


def check_member_name(name: str, seen: set[str], label: str = "package") -> None:
    """Raise InvalidMemberNameError unless ``name`` is a new relative POSIX path without
    empty, ``.`` or ``..`` parts; add it to ``seen``."""
    if not name or name.startswith("/") or "\\" in name or ":" in name:
        raise InvalidMemberNameError(
            f"{label}: member name {name!r} is not a relative POSIX path")
    if any(part in ("..", ".", "") for part in name.split("/")):
        raise InvalidMemberNameError(
            f"{label}: member name {name!r} contains an empty, '.' or '..' part")
    if name in seen:
        raise InvalidMemberNameError(f"{label}: member name {name!r} appears more than once")
    seen.add(name)


class Archive:
    """A package archive held in memory, with a read-only view of each member's bytes.

    A package read from a file lives in the bytes object of a BytesIO that only this reader
    holds. After the model is decrypted in place over it, ``take_prefix`` returns the start of
    that object as ``bytes`` without a copy. For a 16 MB model this saves a model-sized
    allocation and its page faults, and lowers the peak memory of a load.
    """

    def __init__(self, label: str, holder: io.BytesIO, buffer: memoryview, owned: bool):
        self.label = label
        self._holder = holder
        self.buffer = buffer  # writable when the reader owns the archive
        self.readonly = buffer.toreadonly()
        self.owned = owned
        self.members: dict[str, memoryview] = {}
        self.offsets: dict[str, int] = {}  # where each member's bytes start in the archive
        self.digests: dict[str, str] = {}  # SHA-256 hex per member, when hashed
        self._directory_start = 0

    @classmethod
    def read(cls, source: str | os.PathLike | bytes, hash_members: bool) -> Archive:
        """Read the archive once and check its structure and limits.

        With ``hash_members``, compute every member's SHA-256 and check the CRC-32 of the
        manifest and the signature only: the caller must then compare every other member
        with the digests that the manifest lists. Without it, check every member's CRC-32.
        """
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            if len(data) > MAX_PACKAGE_BYTES:
                raise OversizePackageError(
                    f"<bytes> is {len(data)} bytes; the limit is {MAX_PACKAGE_BYTES}")
            archive = cls("<bytes>", io.BytesIO(data), memoryview(data), owned=False)
            entries = archive._parse_directory(len(data), _Complete())
            archive._check_members(entries, _Complete(), hash_members)
            return archive
        return cls._read_file(source, hash_members)

    @classmethod
    def _read_file(cls, source: str | os.PathLike, hash_members: bool) -> Archive:
        label = os.fsdecode(source)
        try:
            with open(source, "rb", buffering=0) as handle:
                size = os.fstat(handle.fileno()).st_size
                if size > MAX_PACKAGE_BYTES:
                    raise OversizePackageError(
                        f"{label} is {size} bytes; the limit is {MAX_PACKAGE_BYTES}")
                # The BytesIO is the only owner of this bytes object, so its buffer is
                # writable in place; see take_prefix.
                holder = io.BytesIO(bytes(size))
                archive = cls(label, holder, holder.getbuffer(), owned=True)
                _advise_huge_pages(archive.buffer)
                # The end record and the central directory come first, from the end of the
                # file; then the members, from the start, in the background.
                tail_start = max(0, size - _END_RECORD.size - _MAX_COMMENT_BYTES)
                _read_exactly(handle, archive.buffer, tail_start, size, label)
                tail = _Complete(tail_start)
                entries = archive._parse_directory(size, tail, handle)
                reader = _BackgroundRead(handle, archive.buffer, tail.start, label)
                try:
                    archive._check_members(entries, reader, hash_members)
                finally:
                    reader.stop()
                reader.raise_error()
                handle.seek(size)
                if handle.read(1):
                    raise PackageReadError(f"{label} changed size while it was read; read "
                                           "it again once the copy or download has finished")
        except FileNotFoundError:
            raise PackageReadError(
                f"package file not found: {label}; pass the path of a {PACKAGE_SUFFIX} file "
                "(the default student is models/clinc150-student.edgepkg)"
            ) from None
        except IsADirectoryError:
            raise PackageReadError(f"{label} is a folder; pass a {PACKAGE_SUFFIX} file") from None
        except OSError as exc:
            raise PackageReadError(f"cannot read package {label}: {exc}") from exc
        return archive

    # -- central directory ----------------------------------------------------------------

    def _parse_directory(self, size: int, available: Any, handle: Any = None) -> list[Entry]:
        """Find the end record, check it, and parse the central directory into entries."""
        label = self.label
        end = self._find_end_record(size, available.start)
        (_, disk, directory_disk, disk_entries, total_entries, directory_size,
         directory_offset, _) = _END_RECORD.unpack(self.readonly[end:end + _END_RECORD.size])
        if disk or directory_disk or disk_entries != total_entries:
            raise ArchiveFormatError(f"{label} is a multi-disk (split) ZIP archive, which "
                                     "packages never are")
        if total_entries in _ZIP64_MARKERS or directory_size in _ZIP64_MARKERS \
                or directory_offset in _ZIP64_MARKERS:
            raise ArchiveFormatError(f"{label} is a ZIP64 archive; packages are smaller than "
                                     "4 GiB and never use ZIP64")
        if total_entries > MAX_MEMBERS:
            raise TooManyMembersError(f"{label} has {total_entries} members; the limit is "
                                      f"{MAX_MEMBERS}")
        if directory_size > MAX_DIRECTORY_BYTES:
            raise OversizePackageError(f"{label}: its central directory is {directory_size} "
                                       f"bytes; the limit is {MAX_DIRECTORY_BYTES}")
        if directory_offset + directory_size != end:
            raise PackageIntegrityError(
                f"{label}: the central directory ({directory_size} bytes at offset "
                f"{directory_offset}) does not end where the end record starts (offset {end}); "
                "the archive is truncated, has data added, or is not a package")
        if directory_offset < available.start:
            # A directory larger than the tail that was read: read the rest of it now.
            _read_exactly(handle, self.buffer, directory_offset, available.start, label)
            available.start = directory_offset
        self._directory_start = directory_offset
        return self._parse_entries(directory_offset, end, total_entries)

    def _find_end_record(self, size: int, searched_from: int) -> int:
        """Return the offset of the end record whose comment ends the file."""
        data = self.readonly
        # The record and its comment fill at most the last 22 + 65,535 bytes.
        searched_from = max(searched_from, size - _END_RECORD.size - _MAX_COMMENT_BYTES)
        position = size - _END_RECORD.size
        while position >= searched_from:
            position = bytes(data[searched_from:position + 4]).rfind(_END_MAGIC)
            if position < 0:
                break
            position += searched_from
            comment_length = int.from_bytes(data[position + 20:position + 22], "little")
            if position + _END_RECORD.size + comment_length == size:
                return position
            position -= 1
        raise ArchiveFormatError(f"{self.label} is not a model package: not a ZIP archive (no "
                                 "end of central directory record at its end)")

    def _parse_entries(self, start: int, end: int, count: int) -> list[Entry]:
        label = self.label
        data = self.readonly
        entries: list[Entry] = []
        seen: set[str] = set()
        total = 0
        position = start
        for index in range(count):
            header = data[position:position + _CENTRAL_HEADER.size]
            if len(header) < _CENTRAL_HEADER.size or position + len(header) > end:
                raise PackageIntegrityError(
                    f"{label}: central directory entry {index} is truncated")
            (magic, _, version_needed, flags, method, _, _, crc, compressed_size, size,
             name_length, extra_length, comment_length, disk_start, _, _,
             header_offset) = _CENTRAL_HEADER.unpack(header)
            if magic != _CENTRAL_MAGIC:
                raise PackageIntegrityError(
                    f"{label}: central directory entry {index} at offset {position} has no "
                    "central header signature")
            name_start = position + _CENTRAL_HEADER.size
            position = name_start + name_length + extra_length + comment_length
            if position > end:
                raise PackageIntegrityError(
                    f"{label}: central directory entry {index} runs past the directory")
            name = _decode_name(bytes(data[name_start:name_start + name_length]), flags)
            if name is None:
                raise InvalidMemberNameError(f"{label}: central directory entry {index} has a "
                                             "name that is not valid UTF-8")
            check_member_name(name, seen, label)
            if version_needed & 0xFF > _MAX_VERSION_NEEDED:
                raise ArchiveFormatError(
                    f"{label}: member {name!r} needs ZIP version "
                    f"{(version_needed & 0xFF) / 10:.1f}; packages need 2.0")
            if flags & _FLAGS_UNSUPPORTED:
                raise ArchiveFormatError(
                    f"{label}: member {name!r} uses ZIP flags {flags:#06x} (ZIP encryption or "
                    "patch data), which packages never use")
            if method != _METHOD_STORED:
                raise ArchiveFormatError(
                    f"{label}: member {name!r} is compressed (method {method}); package "
                    "members must be stored")
            if compressed_size != size:
                raise PackageIntegrityError(
                    f"{label}: stored member {name!r} has compressed size {compressed_size} "
                    f"and uncompressed size {size}; they must be equal")
            if disk_start or size in _ZIP64_MARKERS or header_offset in _ZIP64_MARKERS:
                raise ArchiveFormatError(f"{label}: member {name!r} uses a split-archive or "
                                         "ZIP64 field, which packages never use")
            limit = MAX_MANIFEST_BYTES if name == MANIFEST_NAME else MAX_MEMBER_BYTES
            if size > limit:
                raise OversizeMemberError(
                    f"{label}: member {name!r} is {size} bytes; the limit is {limit}")
            total += size
            if total > MAX_TOTAL_BYTES:
                raise OversizePackageError(
                    f"{label}: members add up to more than {MAX_TOTAL_BYTES} bytes")
            entries.append(Entry(name, header_offset, size, crc))
        if position != end:
            raise PackageIntegrityError(
                f"{label}: the central directory has {end - position} bytes after its "
                f"{count} entries")
        if MANIFEST_NAME not in seen:
            raise ArchiveFormatError(f"{label} has no {MANIFEST_NAME}")
        return entries

    # -- members --------------------------------------------------------------------------

    def _check_members(self, entries: list[Entry], available: Any, hash_members: bool) -> None:
        """Check each local header and member extent in file order as the bytes arrive, and
        hash each member's data behind the reader."""
        label = self.label
        data = self.readonly
        expected_start = 0
        for entry in sorted(entries, key=lambda item: item.header_offset):
            if entry.header_offset != expected_start:
                raise PackageIntegrityError(
                    f"{label}: member {entry.name!r} starts at offset {entry.header_offset}, "
                    f"but the previous member ends at {expected_start}; members must follow "
                    "each other without gaps or overlap")
            entry.data_start = self._check_local_header(entry, available)
            expected_start = entry.data_start + entry.size
            if expected_start > self._directory_start:
                raise PackageIntegrityError(
                    f"{label}: member {entry.name!r} is truncated: the central directory lists "
                    f"{entry.size} bytes")
            view = data[entry.data_start:expected_start]
            if hash_members:
                self.digests[entry.name] = _hash_as_read(view, entry.data_start, available)
            else:
                available.wait_for(expected_start)
            self.members[entry.name] = view
            self.offsets[entry.name] = entry.data_start
        if expected_start != self._directory_start:
            raise PackageIntegrityError(
                f"{label}: {self._directory_start - expected_start} bytes lie between the "
                "last member and the central directory")
        available.wait_for(expected_start)

        checked = [entry for entry in entries
                   if not hash_members or entry.name in (MANIFEST_NAME, SIGNATURE_NAME)]
        failures = []
        for entry in checked:
            actual = zlib.crc32(self.members[entry.name])
            if actual != entry.crc:
                failures.append(f"member {entry.name!r} has CRC-32 {actual:08x}, the archive "
                                f"directory says {entry.crc:08x}")
        if failures:
            raise PackageIntegrityError(f"{label}: {'; '.join(failures)}")

    def _check_local_header(self, entry: Entry, available: Any) -> int:
        """Return where a member's stored bytes start, after checking that its local header
        has the signature and the central directory's name."""
        label, name, start = self.label, entry.name, entry.header_offset
        available.wait_for(min(start + _LOCAL_HEADER.size, self._directory_start))
        header = self.readonly[start:start + _LOCAL_HEADER.size]
        if len(header) != _LOCAL_HEADER.size:
            raise PackageIntegrityError(f"{label}: member {name!r} has a truncated local header")
        magic, _, flags, _, _, _, _, _, _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if magic != _LOCAL_MAGIC:
            raise PackageIntegrityError(
                f"{label}: member {name!r} has no local header at offset {start}")
        name_start = start + _LOCAL_HEADER.size
        data_start = name_start + name_length + extra_length
        if data_start > self._directory_start:
            raise PackageIntegrityError(f"{label}: member {name!r} has a truncated local header")
        available.wait_for(data_start)
        local_name = bytes(self.readonly[name_start:name_start + name_length])
        if _decode_name(local_name, flags) != name:
            raise PackageIntegrityError(
                f"{label}: member {name!r} is named {local_name!r:.80} in its local header")
        return data_start

    # -- the model's bytes ----------------------------------------------------------------

    def release_views(self) -> None:
        """Release every member view; the members cannot be used afterwards."""
        for view in self.members.values():
            view.release()
        self.members.clear()

    def release_buffers(self) -> None:
        self.readonly.release()
        self.buffer.release()

    def take_prefix(self, size: int) -> bytes:
        """Return the first ``size`` bytes of the archive as ``bytes``, without a copy when no
        view of the archive is left."""
        try:
            self._holder.truncate(size)
            # Shrinks the bytes object in place when no view is left, without a copy.
            return self._holder.getvalue()
        except BufferError:  # a view is still alive somewhere: copy instead
            return self._holder.getbuffer()[:size].tobytes()


def _decode_name(raw: bytes, flags: int) -> str | None:
    try:
        return raw.decode("utf-8" if flags & _FLAG_UTF8_NAME else "cp437")
    except UnicodeDecodeError:
        return None


def _hash_as_read(view: memoryview, start: int, available: Any) -> str:
    """Return the SHA-256 hex of ``view`` (which starts at ``start`` in the archive), hashing
    each part as soon as the reader has filled it."""
    digest = hashlib.sha256()
    done = 0
    while done < len(view):
        ready = min(available.wait_for_any(start + done), start + len(view)) - start
        digest.update(view[done:ready])
        done = ready
    return digest.hexdigest()


def _advise_huge_pages(buffer: memoryview) -> None:
    """Ask Linux to back the untouched archive buffer with 2 MiB pages where it can.

    Filling a 16 MB buffer otherwise takes about 4,000 page faults, which cost about 10 ms on a
    2-vCPU x86-64 VM. With transparent huge pages in "madvise" mode, the default of many
    distributions, reading the archive there took about 5 ms less. Where the call is missing or
    THP is off, nothing changes.
    """
    if not sys.platform.startswith("linux") or len(buffer) < 2 * _HUGE_PAGE_BYTES:
        return
    try:
        import ctypes  # numpy and onnxruntime import it too, so it costs a device nothing extra

        libc = ctypes.CDLL(None, use_errno=True)
        anchor = ctypes.c_char.from_buffer(buffer)
        address = ctypes.addressof(anchor)
        del anchor  # releases the buffer export, which would block BytesIO.truncate later
        start = -(-address // _HUGE_PAGE_BYTES) * _HUGE_PAGE_BYTES
        end = (address + len(buffer)) // _HUGE_PAGE_BYTES * _HUGE_PAGE_BYTES
        if end > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    except (OSError, AttributeError, TypeError, ValueError):
        return  # an advice only: the read works the same without it


def _read_exactly(handle: Any, buffer: memoryview, start: int, end: int, label: str) -> None:
    handle.seek(start)
    position = start
    while position < end:
        count = handle.readinto(buffer[position:end])
        if not count:
            raise PackageReadError(f"{label} changed size while it was read; read it again "
                                   "once the copy or download has finished")
        position += count


_EVERYTHING = 1 << 62  # an offset past any archive: every byte is in memory


class _Complete:
    """Availability of an archive that is already entirely in memory, from ``start`` on
    before the members are read."""

    def __init__(self, start: int = 0):
        self.start = start

    def wait_for(self, offset: int) -> None:
        return None

    def wait_for_any(self, offset: int) -> int:
        return _EVERYTHING


class _BackgroundRead:
    """Read ``buffer[:end]`` from a file in a worker thread, chunk by chunk, and let the
    calling thread wait until a given offset has arrived."""

    def __init__(self, handle: Any, buffer: memoryview, end: int, label: str):
        self._handle = handle
        self._buffer = buffer
        self._end = end
        self._label = label
        self._filled = 0
        self._finished = False
        self._stopping = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        if end == 0:
            self._filled = _EVERYTHING
        handle.seek(0)
        self._thread = threading.Thread(target=self._run, name="package-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        position = 0
        try:
            while position < self._end and not self._stopping:
                count = self._handle.readinto(
                    self._buffer[position:min(position + READ_CHUNK_BYTES, self._end)])
                if not count:
                    break
                position += count
                with self._changed:
                    # The bytes from ``end`` on were read before this reader started.
                    self._filled = position if position < self._end else _EVERYTHING
                    self._changed.notify_all()
        except BaseException as exc:  # handed to the calling thread by raise_error
            self._error = exc
        finally:
            with self._changed:
                self._finished = True
                self._changed.notify_all()

    def wait_for(self, offset: int) -> None:
        """Block until ``buffer[:offset]`` is filled; raise if the read ended before."""
        with self._changed:
            while self._filled < offset and not self._finished:
                self._changed.wait()
            if self._filled < offset:
                self._fail()

    def wait_for_any(self, offset: int) -> int:
        """Block until the reader is past ``offset``; return how far it has filled."""
        with self._changed:
            while self._filled <= offset and not self._finished:
                self._changed.wait()
            if self._filled <= offset:
                self._fail()
            return self._filled

    def _fail(self) -> None:
        self.raise_error()
        raise PackageReadError(f"{self._label} changed size while it was read; read it again "
                               "once the copy or download has finished")

    def raise_error(self) -> None:
        if self._error is not None:
            if isinstance(self._error, OSError):
                raise PackageReadError(f"cannot read package {self._label}: {self._error}") \
                    from self._error
            raise self._error

    def stop(self) -> None:
        """Stop reading at the next chunk and wait for the thread to end."""
        self._stopping = True
        self._thread.join()
