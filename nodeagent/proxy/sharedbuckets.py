"""Token buckets that every process of a node takes from (``--workers``): a table in
shared memory that the main process creates (a memfd each worker gets at its start),
so that a ``LocalRateLimit`` admits as many requests across the processes as one
process alone would (as Envoy's worker threads share one bucket).

Layout: a header, then ``slots`` fixed slots of 64 bytes: the bucket's identity (16
bytes, ``core.ratelimit.shared_ident``; zeros: never used), and six integers: its
origin and fill interval (monotonic nanoseconds: one clock for every process of the
machine), fills applied, tokens, ``maxTokens`` and ``tokensPerFill``.

Locking: a POSIX record lock (``fcntl``) on a slot's bytes while a process reads and
takes its tokens (two system calls a request), and one on the header's first byte while
a process gives a slot to a new bucket. The kernel drops a process's locks when it dies,
so a worker killed mid-request leaves no slot locked. Slots are found by open
addressing from the identity's hash (at most ``PROBE`` slots on); a slot whose bucket is
full may be given to another bucket (a full bucket and a new one are alike); a process
remembers each bucket's slot and checks it holds its identity under the slot's lock.
When no slot is free in a bucket's run (more live, non-full buckets than the table
holds), the bucket is counted in the process alone (logged once).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Sequence

from nodeagent.core.ratelimit import SharedRef, TokenBucketState

log = logging.getLogger("nodeagent.policy")

SLOTS = 1 << 14
"""Buckets the table holds (1 MiB): beyond the keyed buckets one process keeps (10,000)."""
PROBE = 32
_HEAD = struct.Struct("=8sQ")  # magic, slots
_MAGIC = b"NABUCK01"
_HEADER = 64
_SLOT = struct.Struct("=16sqqqqqq")
_STATE = struct.Struct("=qqqqqq")
_FILLS = struct.Struct("=qq")
_SIZE = _SLOT.size
_EMPTY = bytes(16)
_NS = 1_000_000_000


class SharedBuckets:
    """The table, mapped in this process (``create`` in the main one, ``attach`` in a
    worker, given the descriptor); a ``core.ratelimit.SharedBuckets``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        size = os.fstat(fd).st_size
        self.mm = mmap.mmap(fd, size)
        magic, slots = _HEAD.unpack_from(self.mm)
        if magic != _MAGIC or size < _HEADER + slots * _SIZE:
            self.mm.close()
            raise ValueError(f"descriptor {fd} holds no bucket table")
        self.slots: int = slots
        self.full_warned = False

    @classmethod
    def create(cls, slots: int = SLOTS) -> SharedBuckets:
        """A new, empty table in a memfd (its descriptor closes on exec: pass it on)."""
        fd = os.memfd_create("nodeagent-buckets", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _HEADER + slots * _SIZE)
            os.pwrite(fd, _HEAD.pack(_MAGIC, slots), 0)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)

    # -- locks ------------------------------------------------------------------------
    def _lock(self, i: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, _SIZE, _HEADER + i * _SIZE)

    def _unlock(self, i: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, _SIZE, _HEADER + i * _SIZE)

    # -- one slot's bucket (its lock held) -------------------------------------------
    def _read(self, i: int, now_ns: int) -> tuple[int, int, int, int, int, int, int]:
        """(origin, interval, fills, tokens, max, per fill, elapsed), fills applied."""
        origin, interval, fills, tokens, most, per_fill = _STATE.unpack_from(
            self.mm, _HEADER + i * _SIZE + 16
        )
        elapsed = max(0, now_ns - origin)
        due = elapsed // interval
        if due > fills:
            tokens = min(most, tokens + (due - fills) * per_fill)
            fills = due
        return origin, interval, fills, tokens, most, per_fill, elapsed

    def _find(self, ref: SharedRef, now_ns: int) -> int:
        """The slot holding ``ref``'s bucket, given one if none does (-1: no room)."""
        mm, n, ident = self.mm, self.slots, ref.ident
        start = int.from_bytes(ident[:8], "little") % n
        run = [(start + p) % n for p in range(min(PROBE, n))]
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)  # keys change under this lock only
        try:
            free = -1
            for i in run:
                key = mm[_HEADER + i * _SIZE : _HEADER + i * _SIZE + 16]
                if key == ident:
                    return i
                if key == _EMPTY:  # a run ends at a slot never used: the bucket is not on
                    free = i
                    break
            for i in [free] if free >= 0 else run:
                self._lock(i)
                try:
                    if free < 0:
                        _, _, _, tokens, most, _, _ = self._read(i, now_ns)
                        if tokens < most:
                            continue
                    b = ref.bucket
                    interval = max(1, round(b.fill_interval * _NS))
                    _SLOT.pack_into(
                        mm,
                        _HEADER + i * _SIZE,
                        ident,
                        now_ns,
                        interval,
                        0,
                        b.max_tokens,
                        b.max_tokens,
                        b.tokens_per_fill,
                    )
                    return i
                finally:
                    self._unlock(i)
            return -1
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def _slot(self, ref: SharedRef, now_ns: int) -> int:
        if ref.slot < 0 and ref.local is None:
            ref.slot = self._find(ref, now_ns)
            if ref.slot < 0:
                ref.local = TokenBucketState(ref.bucket, now_ns / _NS)
                if not self.full_warned:
                    self.full_warned = True
                    log.warning(
                        "rate limits: the node's table of %d token buckets has no room "
                        "near a new bucket; it is counted by one process alone",
                        self.slots,
                    )
        return ref.slot

    # -- SharedBuckets ----------------------------------------------------------------
    def take_all(self, refs: Sequence[SharedRef], now: float) -> list[tuple[int, float]]:
        now_ns = round(now * _NS)
        for _ in range(3):
            got = self._try_take(refs, now_ns)
            if got is not None:
                return got
        # a slot given away three times over in a row: count here this once
        return [r.local.peek(now) if r.local else (r.bucket.max_tokens, 0.0) for r in refs]

    def _try_take(self, refs: Sequence[SharedRef], now_ns: int) -> list[tuple[int, float]] | None:
        if len(refs) == 1:  # the usual case: one limit applies
            return self._take_one(refs[0], now_ns)
        slots = [self._slot(r, now_ns) for r in refs]
        held = sorted({i for i in slots if i >= 0})  # one order for all: no deadlock
        for i in held:
            self._lock(i)
        try:
            mm = self.mm
            states = []
            for r, i in zip(refs, slots, strict=True):
                if i < 0:
                    continue
                if mm[_HEADER + i * _SIZE : _HEADER + i * _SIZE + 16] != r.ident:
                    r.slot = -1  # given to another bucket (it was full): look again
                    return None
                states.append(self._read(i, now_ns))
            out: list[tuple[int, float]] = []
            it = iter(states)
            for r, i in zip(refs, slots, strict=True):
                if i < 0:
                    assert r.local is not None
                    out.append(r.local.peek(now_ns / _NS))
                else:
                    _, interval, fills, tokens, _, _, elapsed = next(it)
                    out.append((tokens, ((fills + 1) * interval - elapsed) / _NS))
            take = all(t >= 1 for t, _ in out)
            it = iter(states)
            for r, i in zip(refs, slots, strict=True):
                if i < 0:
                    if take:
                        assert r.local is not None
                        r.local.tokens -= 1
                    continue
                _, _, fills, tokens, _, _, _ = next(it)
                _FILLS.pack_into(
                    mm, _HEADER + i * _SIZE + 32, fills, tokens - 1 if take else tokens
                )
            return out
        finally:
            for i in reversed(held):
                self._unlock(i)

    def _take_one(self, r: SharedRef, now_ns: int) -> list[tuple[int, float]] | None:
        i = r.slot if r.slot >= 0 else self._slot(r, now_ns)
        if i < 0:
            assert r.local is not None
            got = r.local.peek(now_ns / _NS)
            if got[0] >= 1:
                r.local.tokens -= 1
            return [got]
        at = _HEADER + i * _SIZE
        fd = self.fd
        fcntl.lockf(fd, fcntl.LOCK_EX, _SIZE, at)
        try:
            mm = self.mm
            if mm[at : at + 16] != r.ident:
                r.slot = -1  # given to another bucket (it was full): look again
                return None
            origin, interval, fills, tokens, most, per_fill = _STATE.unpack_from(mm, at + 16)
            elapsed = max(0, now_ns - origin)
            due = elapsed // interval
            if due > fills:
                tokens = min(most, tokens + (due - fills) * per_fill)
                fills = due
            _FILLS.pack_into(mm, at + 32, fills, tokens - 1 if tokens >= 1 else tokens)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, _SIZE, at)
        return [(tokens, ((fills + 1) * interval - elapsed) / _NS)]

    def peek(self, ref: SharedRef, now: float) -> tuple[int, float]:
        now_ns = round(now * _NS)
        i = self._slot(ref, now_ns)
        if i < 0:
            assert ref.local is not None
            return ref.local.peek(now)
        self._lock(i)
        try:
            if self.mm[_HEADER + i * _SIZE : _HEADER + i * _SIZE + 16] != ref.ident:
                ref.slot = -1
                return ref.bucket.max_tokens, 0.0  # given away: it was full
            _, interval, fills, tokens, _, _, elapsed = self._read(i, now_ns)
            return tokens, ((fills + 1) * interval - elapsed) / _NS
        finally:
            self._unlock(i)


__all__ = ["PROBE", "SLOTS", "SharedBuckets"]
