"""Quota counts that survive the agent: ``QuotaStore`` keeps a ``core.ratelimit.
QuotaCounter`` and writes every granted unit to a journal file before granting it.

The file is a journal of lines ``<crc32 as 8 hex digits> <JSON>\\n``, the JSON being a list
of ``QuotaCharge`` records ``[policy, window, start, principal, units]``: one line per
grant (its charges against every applicable quota, so a grant is counted whole or not at
all), or one line per live count after a compaction. Loading adds the lines up.

- A grant: one ``write(2)`` of one short line on an ``O_APPEND`` descriptor (no buffer in
  this process), then the count in memory, then the answer. No fsync.
- Compaction (when the journal passes ``compact_bytes``, at start and on ``close``): the
  live counts go to ``<file>.tmp``, which is fsynced, renamed over the journal with
  ``os.replace``, and the directory fsynced. A crash at any point leaves either the old
  journal or the new file, each complete.
- Loading tolerates a missing file and damage: a line with a wrong checksum or shape is
  skipped with a warning naming the file and the lines (a torn last line is what a crash
  mid-write leaves); when more than the last line is damaged, the file is kept as
  ``<file>.corrupt`` for a person to look at. Counts of ended windows are dropped.

Guarantee: after the process dies in any way (``kill -9`` included), a restart counts at
least every unit granted before the death (maybe one more, written but not yet granted):
written data is in the kernel's page cache. After a power loss or kernel crash, grants
since the last ``flush()`` or compaction may be lost. When the journal cannot be written
(disk full), units are still granted and counted in memory (fail open, like Envoy's rate
limit service by default), and an error is logged.

Several processes (``--workers``, or an old and a new agent during an upgrade) share one
journal: each grant is made under an exclusive ``flock`` of ``<file>.lock``, after the
process has added the lines the others appended since its last look (and reloaded the
file when another one compacted it: a new inode), so a quota holds node-wide as in one
process. The kernel drops a dead process's lock.

Synchronous and single-threaded: the proxy's event loop owns the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import orjson

from nodeagent.core.ratelimit import QuotaCharge, QuotaCounter, QuotaView, RateDecision
from nodeagent.errors import LocalStateError
from nodeagent.model.ratelimit import LocalRateLimit

log = logging.getLogger(__name__)

COMPACT_BYTES = 4 << 20
_REPORTED_LINES = 5


def encode_line(charges: Iterable[QuotaCharge]) -> bytes:
    """One journal line, checksum first."""
    payload = orjson.dumps([c.to_record() for c in charges])
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _decode_line(line: bytes) -> list[QuotaCharge]:
    """The charges of one line; ValueError saying what is wrong."""
    crc, sep, payload = line.partition(b" ")
    if not sep or len(crc) != 8:
        raise ValueError("no checksum")
    try:
        expected = int(crc, 16)
    except ValueError:
        raise ValueError("no checksum") from None
    if zlib.crc32(payload) != expected:
        raise ValueError("checksum mismatch")
    try:
        records = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(records, list):
        raise ValueError("not a list of records")
    return [QuotaCharge.from_record(r) for r in records]


@dataclass(frozen=True)
class JournalRead:
    """What a journal's bytes hold."""

    charges: tuple[QuotaCharge, ...]
    damaged: tuple[tuple[int, str], ...]
    """(line number from 1, what is wrong) for each skipped line but a torn last one."""
    torn_tail: bool
    """The last line was incomplete (a write cut short)."""


def read_journal(data: bytes) -> JournalRead:
    """Parse a journal, skipping damaged lines."""
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    charges: list[QuotaCharge] = []
    damaged: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            charges.extend(_decode_line(line))
        except ValueError as e:
            damaged.append((number, str(e)))
    torn = False
    if tail:
        try:
            charges.extend(_decode_line(tail))
        except ValueError:
            torn = True
    return JournalRead(tuple(charges), tuple(damaged), torn)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unwritable(path: Path, e: OSError) -> LocalStateError:
    return LocalStateError(
        f"quota store {path}: cannot open for writing: {e} "
        "(check the directory exists and the agent may write there)"
    )


class QuotaStore:
    """A ``QuotaCounter`` backed by a journal file (see the module docstring).

    Raises ``LocalStateError`` when the file cannot be opened for writing; a missing or
    damaged file is not an error.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        compact_bytes: int = COMPACT_BYTES,
    ) -> None:
        self.path = path
        self.counter = QuotaCounter()
        self.compact_bytes = compact_bytes
        self._compact_at = compact_bytes
        """Journal size that triggers the next compaction: at least twice the live
        counts, so a store whose live counts alone are large does not compact per grant."""
        self.write_errors = 0
        """Grants that could not be written (granted anyway)."""
        self._clock = clock
        self._fd = -1
        self._size = 0
        self._closed = False
        self._broken = False
        """The last write failed, maybe half-way: start the next line on a new one."""
        self._ino = 0
        """The journal's inode as this process opened it (another one: compacted since)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(
                path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            raise _unwritable(path, e) from e
        try:
            with self._locked():
                self._load()
                try:
                    self._open_journal()
                except OSError as e:
                    raise _unwritable(path, e) from e
                self._compact()
        except BaseException:  # (closed after the lock is given back, not inside it)
            os.close(self._lock_fd)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The other processes' grants, compactions and loads wait meanwhile."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _catch_up(self) -> None:
        """Count what the other processes wrote since this one last looked (the lock held)."""
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        if st is None or st.st_ino != self._ino:  # compacted by another process: reload
            self.counter = QuotaCounter()
            self._load(quiet=True)
            try:
                self._open_journal()
            except OSError:
                self._close_journal()  # (_append tries again, and logs)
            return
        if st.st_size <= self._size or self._fd < 0:
            return
        try:
            data = os.pread(self._fd, st.st_size - self._size, self._size)
        except OSError as e:
            log.error("quota store %s: cannot read the other processes' grants: %s", self.path, e)
            return
        read = read_journal(data)
        self.counter.apply(read.charges)
        self._size += len(data)
        if data and not data.endswith(b"\n"):
            self._broken = True  # a write cut short: ours starts on a line of its own

    # -- loading -----------------------------------------------------------------------

    def _load(self, *, quiet: bool = False) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("quota store %s: cannot read (%s); quotas start from zero", self.path, e)
            return
        read = read_journal(data)
        self.counter.apply(read.charges)
        self.counter.expire(self._clock())
        if quiet:  # another process's compaction: it was told of damage when it loaded
            return
        if read.damaged:
            shown = "; ".join(f"line {n}: {why}" for n, why in read.damaged[:_REPORTED_LINES])
            more = len(read.damaged) - _REPORTED_LINES
            kept = self._keep_copy(data)
            log.warning(
                "quota store %s: skipped %d damaged line(s) (%s%s)%s; recovered %d record(s)",
                self.path,
                len(read.damaged),
                shown,
                f"; and {more} more" if more > 0 else "",
                f"; the file as found is kept as {kept}" if kept else "",
                len(read.charges),
            )
        if read.torn_tail:
            log.warning(
                "quota store %s: skipped a truncated last line (a write cut short by a "
                "crash); recovered %d record(s)",
                self.path,
                len(read.charges),
            )

    def _keep_copy(self, data: bytes) -> Path | None:
        copy = self.path.with_name(self.path.name + ".corrupt")
        try:
            copy.write_bytes(data)
        except OSError as e:
            log.warning("quota store %s: cannot keep a copy as %s: %s", self.path, copy, e)
            return None
        return copy

    # -- writing -----------------------------------------------------------------------

    def _open_journal(self) -> None:
        """Open the journal for appending, ending a torn last line first."""
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        except OSError:
            os.close(fd)
            raise
        self._close_journal()
        self._fd, self._size, self._ino = fd, size, os.fstat(fd).st_ino
        self._broken = self._broken or torn

    def _close_journal(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def _append(self, line: bytes) -> None:
        try:
            if self._fd < 0:
                self._open_journal()
            if self._broken:
                line = b"\n" + line
            _write_all(self._fd, line)
        except OSError as e:
            self.write_errors += 1
            if not self._broken:
                log.error(
                    "quota store %s: cannot write (%s); granting without persisting until "
                    "writes succeed again",
                    self.path,
                    e,
                )
            self._broken = True
            return
        if self._broken:
            log.info("quota store %s: writing again", self.path)
        self._broken = False
        self._size += len(line)

    def check(
        self, policies: Sequence[LocalRateLimit], source_principal: str | None, now_wall: float
    ) -> RateDecision:
        """``QuotaCounter.check``, with each grant written to the journal before it is
        counted and answered (the other processes' grants counted first)."""
        with self._locked():
            self._catch_up()
            decision, charges = self.counter.plan(policies, source_principal, now_wall)
            if charges:
                self._append(encode_line(charges))
                self.counter.apply(charges)
                if self._size >= self._compact_at:
                    self._compact(now_wall)
        return decision

    def state(self, policies: Sequence[LocalRateLimit], now_wall: float) -> tuple[QuotaView, ...]:
        """The node's live counts of ``policies``' quotas (every process's grants)."""
        with self._locked():
            self._catch_up()
        return self.counter.state(policies, now_wall)

    def compact(self, now_wall: float | None = None) -> None:
        """Replace the journal by the live counts, crash-safely (see the module
        docstring). On failure the journal stays as it is, and is still appended to."""
        with self._locked():
            self._catch_up()
            self._compact(now_wall)

    def _compact(self, now_wall: float | None = None) -> None:
        now = self._clock() if now_wall is None else now_wall
        data = b"".join(encode_line((c,)) for c in self.counter.export(now))
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            log.error("quota store %s: compaction failed, journal kept: %s", self.path, e)
            return
        self._compact_at = max(self.compact_bytes, 2 * len(data))
        # The old descriptor now writes to an unlinked file: never use it again.
        try:
            _fsync_dir(self.path.parent)
        except OSError as e:
            log.error("quota store %s: fsync of its directory failed: %s", self.path, e)
        self._broken = False
        try:
            self._open_journal()
        except OSError as e:
            self._close_journal()
            log.error("quota store %s: cannot reopen after compaction: %s", self.path, e)

    def flush(self) -> None:
        """Make every grant so far durable against a power loss (fsync)."""
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError as e:
                log.error("quota store %s: fsync failed: %s", self.path, e)

    def close(self) -> None:
        """Compact and close; the store is not used after."""
        if self._closed:
            return
        self.compact()
        self._close_journal()
        os.close(self._lock_fd)
        self._closed = True

    def __enter__(self) -> QuotaStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
