"""Request snapshots of the SQLite store, in append-only files beside the database.

A submit must record its request for another process to take the task over
(:mod:`flask_restful_async.takeover`), but that copy is read only when the
accepting process cannot run the task itself: almost never. In the database it
would cost a submit several more pages of the write-ahead log (a leaf of a
snapshot table, its parents, the file's header as the file grows); appended to a
file it costs one ``write`` of its own bytes. So each process appends snapshots
to a segment file of its own, and the task row keeps where its snapshot lies
(``segment:offset:length``).

The segment is written before the row that points into it, so every reader that
finds the row finds the bytes. Bytes that no row points to (a submit whose insert
failed, a partial write on a full disk) are never read. A whole segment is
removed once no task that may still be claimed points into it and no process
will write to it again: it belongs to a process whose lease has lapsed, or its
process has moved on to a newer segment (:meth:`SnapshotSpool.collect`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import secrets
import threading
import time
import typing as t
import weakref

#: A process starts a new segment once its current one holds this many bytes.
SEGMENT_SIZE = 64 * 1024 * 1024
#: What segment files are called: ``<owner>-<serial>.snapshots``.
SUFFIX = ".snapshots"
#: Seconds between two looks at whether this process's segment was removed (see
#: :meth:`SnapshotSpool.collect`), rather than one per append.
LINK_CHECK_INTERVAL = 1.0


@dataclasses.dataclass
class _Segment:
    """A segment this process appends to: only it writes there, so the size it
    counts is where the next bytes land."""

    fd: int
    name: str
    size: int = 0
    check_at: float = 0.0


#: Every spool of this process, to tell the segments they append to (see collect).
_spools: weakref.WeakSet[SnapshotSpool] = weakref.WeakSet()


@functools.lru_cache(maxsize=64)
def owner_tag(worker: str | None) -> str:
    """The part of a segment's name that tells whose it is (a worker name can hold
    any character; this is 16 hex digits)."""
    return hashlib.sha256((worker or "").encode()).hexdigest()[:16]


class SnapshotSpool:
    """The segment files in ``folder``: appends for this process, reads and
    removal for any process of the machine.

    Appends happen under the store's write lock (see
    :meth:`~flask_restful_async.stores.sqlite.SQLiteStore.create`), so the offset
    read before a write is the one the write lands at.
    """

    def __init__(self, folder: str, segment_size: int = SEGMENT_SIZE) -> None:
        self.folder = folder
        self.segment_size = segment_size
        self._lock = threading.Lock()
        # The segment this process appends to for each owner (one in practice).
        self._current: dict[str, _Segment] = {}
        self._serial = 0
        self._place = os.path.abspath(folder)
        _spools.add(self)

    def holds_segments(self) -> bool:
        """Whether any segment file lies in the folder (written by any process)."""
        try:
            return any(name.endswith(SUFFIX) for name in os.listdir(self.folder))
        except OSError:
            return False

    def append(self, worker: str | None, data: bytes) -> str:
        """Write ``data`` at the end of this process's segment; return where it lies.

        Raises ``OSError`` if the bytes could not all be written (a full disk):
        the store answers 503, and whatever part was written is never read.
        """
        owner = owner_tag(worker)
        with self._lock:
            segment = self._current.get(owner) or self._open(owner)
            if segment.size >= self.segment_size or (
                time.monotonic() >= segment.check_at and self._removed(segment)
            ):
                # Full, or removed under us (see collect): a new one.
                self._seal(owner)
                segment = self._open(owner)
            offset = segment.size
            try:
                written = os.write(segment.fd, data)
                if written < len(data):
                    # A large write may be cut short (by a signal): write the rest.
                    with memoryview(data) as rest:
                        while written < len(data):
                            step = os.write(segment.fd, rest[written:])
                            if step == 0:
                                raise OSError("the snapshot spool takes no more bytes")
                            written += step
            except OSError:
                # Start over in a new segment: this one's end is a fragment.
                self._seal(owner)
                raise
            segment.size += written
            return f"{segment.name}:{offset}:{written}"

    def read(self, reference: str) -> bytes | None:
        """The bytes at ``reference`` (as :meth:`append` returned it), or None if
        they are gone: the segment was removed, or is shorter than it says."""
        try:
            name, offset, length = reference.rsplit(":", 2)
            start, size = int(offset), int(length)
        except ValueError:
            return None
        if os.sep in name or not name.endswith(SUFFIX):
            return None
        try:
            fd = os.open(os.path.join(self.folder, name), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data = os.pread(fd, size, start)
        finally:
            os.close(fd)
        return data if len(data) == size else None

    def collect(self, referenced: t.Callable[[], set[str]], live_workers: t.Iterable[str]) -> int:
        """Remove the segments that nobody needs any longer; return how many.

        A candidate is a segment this process does not append to whose owner is
        gone (no live lease among ``live_workers``) or has a newer segment (it
        moved on). ``referenced()`` names the segments that task rows still point
        into; it is called only when there are candidates, since it reads every
        row. A process whose lease lapsed while it lived, and whose segment was
        removed, sees that within :data:`LINK_CHECK_INTERVAL` and starts a new one
        (snapshots it wrote meanwhile cannot be taken over: a task of theirs that
        this process does not run ends lost).
        """
        live = {owner_tag(worker) for worker in live_workers}
        # What this process appends to, through this spool or another on the same
        # folder (two stores, of two apps, on one file): both name their segments
        # by the process's worker name, and each would take the other's for old.
        mine: set[str] = set()
        for spool in list(_spools):
            if spool._place == self._place:
                with spool._lock:
                    mine.update(segment.name for segment in spool._current.values())
        try:
            names = [name for name in os.listdir(self.folder) if name.endswith(SUFFIX)]
        except FileNotFoundError:
            return 0
        newest: dict[str, str] = {}
        for name in names:
            owner = name.split("-", 1)[0]
            if _serial(name) >= _serial(newest.get(owner)):
                newest[owner] = name
        candidates = [
            name
            for name in names
            if name not in mine
            and (name.split("-", 1)[0] not in live or newest[name.split("-", 1)[0]] != name)
        ]
        if not candidates:
            return 0
        needed = referenced()
        removed = 0
        for name in candidates:
            if name in needed:
                continue
            try:
                os.unlink(os.path.join(self.folder, name))
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    def close(self) -> None:
        """Close this process's segments (they stay on disk for others to read)."""
        with self._lock:
            for segment in self._current.values():
                os.close(segment.fd)
            self._current = {}

    def after_fork(self) -> None:
        """In a forked child: append to segments of its own. The parent's
        descriptors are left open and untouched: the child must not write at the
        parent's offsets, and a lock held by a parent's thread would never be freed."""
        self._lock = threading.Lock()
        self._current = {}
        self._serial = 0

    def _open(self, owner: str) -> _Segment:
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        while True:
            self._serial += 1
            # The random part keeps two processes of one owner apart (a fork
            # that has not taken a new name yet).
            name = f"{owner}-{self._serial:08d}{secrets.token_hex(4)}{SUFFIX}"
            try:
                fd = os.open(
                    os.path.join(self.folder, name),
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                    0o600,
                )
            except FileExistsError:
                continue
            segment = self._current[owner] = _Segment(fd, name)
            return segment

    def _seal(self, owner: str) -> None:
        os.close(self._current.pop(owner).fd)

    @staticmethod
    def _removed(segment: _Segment) -> bool:
        segment.check_at = time.monotonic() + LINK_CHECK_INTERVAL
        return os.fstat(segment.fd).st_nlink == 0


def _serial(name: str | None) -> int:
    """A segment name's serial number (its order among its owner's); -1 for None."""
    if name is None:
        return -1
    try:
        return int(name.split("-", 1)[1][:8])
    except (IndexError, ValueError):
        return -1
