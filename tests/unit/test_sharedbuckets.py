"""Token buckets in shared memory (``--workers``): the same decisions as one process's
buckets, one bucket for several real processes (each admits its share, the node the
limit), a process killed while it holds a bucket's lock, and a table with no room."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nodeagent.core.ratelimit import RateDecision, RateLimiter
from nodeagent.model.ratelimit import (
    NO_KEY,
    HttpRateLimit,
    KeyKind,
    LocalRateLimit,
    RateLimitKey,
    TcpRateLimit,
    TokenBucket,
)
from nodeagent.proxy.sharedbuckets import SharedBuckets

ROOT = Path(__file__).resolve().parents[2]


def policy(
    name: str,
    http: TokenBucket | None = None,
    key: RateLimitKey = NO_KEY,
    tcp: TokenBucket | None = None,
) -> LocalRateLimit:
    return LocalRateLimit(
        namespace="default",
        name=name,
        selector=None,
        ports=(),
        http=None if http is None else HttpRateLimit(http, key),
        tcp=None if tcp is None else TcpRateLimit(tcp),
    )


def check(rl: RateLimiter, p: tuple[LocalRateLimit, ...], now: float, user: str) -> RateDecision:
    return rl.check_http(
        p,
        workload="default/w",
        source_principal=None,
        header={"x-user": user}.get,
        route="",
        now=now,
    )


def test_shared_buckets_decide_as_one_process_does() -> None:
    """A random run of requests (several policies at once, keyed ones, fills) gets the
    same decisions, headers and all, from the shared table as from local buckets."""
    policies = [
        policy("a", http=TokenBucket(3, 1, 0.5)),
        policy("b", http=TokenBucket(5, 2, 1.0), key=RateLimitKey(KeyKind.HEADER, "x-user")),
        policy("c", http=TokenBucket(2, 1, 0.25), tcp=TokenBucket(2, 1, 0.3)),
    ]
    table = SharedBuckets.create(slots=64)
    local, shared = RateLimiter(), RateLimiter(shared=table)
    rnd = random.Random(7)
    now = 1000.0
    try:
        for _ in range(400):
            now += rnd.choice((0.0, 0.0, 0.01, 0.1, 0.3))
            p = tuple(rnd.sample(policies, rnd.randint(1, 3)))
            user = rnd.choice("xyz")
            if rnd.random() < 0.2:
                got = [r.check_tcp(p, workload="default/w", now=now) for r in (local, shared)]
            else:
                got = [check(r, p, now, user) for r in (local, shared)]
            assert got[0] == got[1], (now, [x.key for x in p], user)
        assert [v.remaining for v in local.state(now)] == [v.remaining for v in shared.state(now)]
    finally:
        table.close()


WORKER = """
import sys, time
from nodeagent.core.ratelimit import RateLimiter
from nodeagent.model.ratelimit import LocalRateLimit, HttpRateLimit, TokenBucket, NO_KEY
from nodeagent.proxy.sharedbuckets import SharedBuckets
p = (LocalRateLimit("default", "p", None, (), HttpRateLimit(TokenBucket(50, 50, 3600.0), NO_KEY)),)
rl = RateLimiter(shared=SharedBuckets(int(sys.argv[1])))
sys.stdout.write("ready\\n"); sys.stdout.flush(); sys.stdin.readline()
ok = 0
for _ in range(200):
    ok += rl.check_http(p, workload="default/w", source_principal=None, header={}.get,
                        route="", now=time.monotonic()).allowed
print(ok)
"""


def _process(code: str, fd: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(fd)],
        pass_fds=(fd,),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_processes_share_one_bucket_and_admit_its_tokens_exactly() -> None:
    table = SharedBuckets.create()
    procs = [_process(WORKER, table.fd) for _ in range(3)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for p in procs:  # all three take from the bucket at once
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        admitted = [int(p.communicate(timeout=60)[0]) for p in procs]
        assert sum(admitted) == 50, admitted  # 3 x 200 tried, the bucket holds 50
    finally:
        for p in procs:
            p.kill()
            p.wait()
        table.close()


HOLDER = """
import fcntl, sys, time
fd = int(sys.argv[1])
fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)  # every slot and the header
sys.stdout.write("locked\\n"); sys.stdout.flush()
time.sleep(60)
"""


def test_a_process_killed_holding_the_lock_leaves_the_buckets_usable() -> None:
    table = SharedBuckets.create()
    rl = RateLimiter(shared=table)
    p = (policy("p", http=TokenBucket(2, 1, 60.0)),)
    holder = _process(HOLDER, table.fd)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        started = time.monotonic()
        assert [check(rl, p, 0.0, "").allowed for _ in range(3)] == [True, True, False]
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
        table.close()


def test_a_full_bucket_gives_its_slot_to_a_new_one(caplog: pytest.LogCaptureFixture) -> None:
    table = SharedBuckets.create(slots=2)
    rl = RateLimiter(shared=table)
    keyed = (policy("k", http=TokenBucket(1, 1, 1.0), key=RateLimitKey(KeyKind.HEADER, "x-user")),)
    try:
        assert check(rl, keyed, 0.0, "a").allowed
        assert check(rl, keyed, 0.0, "b").allowed
        with caplog.at_level(logging.WARNING, "nodeagent.policy"):
            # a and b are empty: c has no slot, and is counted by this process alone
            assert check(rl, keyed, 0.0, "c").allowed
            assert not check(rl, keyed, 0.0, "c").allowed
        assert "no room" in caplog.text
        # a second on, a and b are full again: d takes one of their slots, and a or b,
        # whichever lost it, comes back full as a new bucket would
        assert check(rl, keyed, 1.0, "d").allowed
        assert not check(rl, keyed, 1.0, "d").allowed
        assert check(rl, keyed, 1.0, "a").allowed
        assert check(rl, keyed, 1.0, "b").allowed
    finally:
        table.close()


def test_a_descriptor_that_is_no_table_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "other"
    f.write_bytes(b"x" * 4096)
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(ValueError, match="no bucket table"):
            SharedBuckets(fd)
    finally:
        os.close(fd)


def test_state_shows_what_another_process_took_once_looked_up() -> None:
    """``ctl explain`` in the main process: a bucket only a worker took from is shown
    as the worker left it."""
    table = SharedBuckets.create()
    worker, main = RateLimiter(shared=table), RateLimiter(shared=table)
    p = (policy("p", http=TokenBucket(5, 1, 60.0), key=RateLimitKey(KeyKind.HEADER, "x-user")),)
    try:
        for _ in range(3):
            assert check(worker, p, 0.0, "alice").allowed
        assert main.state(0.0) == ()
        main.look(p, workload="default/w", http=True, header={"x-user": "alice"}.get)
        ((view),) = main.state(0.0)
        assert (view.value, view.remaining) == ("alice", 2)
    finally:
        table.close()
