"""``NetnsHandle``'s batches of spare sockets near the process's descriptor limit: a batch
that cannot be made whole gives the sockets it could make, rather than none (run in the
agent's own netns, as host mode does: no ``setns``, no root)."""

from __future__ import annotations

import json
import subprocess
import sys

from checkout import ROOT, python_env

SCENARIO = """
import json, os, resource
from nodeagent.redirect.netns import NetnsHandle

def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True

handle = NetnsHandle("/proc/self/ns/net")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
# the limit bounds descriptor numbers: leave exactly three free below it, fewer than a
# batch (8)
free = [n for n in range(4096) if not is_open(n)][:4]
resource.setrlimit(resource.RLIMIT_NOFILE, (free[3], hard))
got = [handle.socket()]  # a batch of 8 asked, 3 made: one out, two spare
got += [handle.socket(), handle.socket()]
try:
    handle.socket()
    last = "made"
except OSError as e:  # none left at all: that one is an error
    last = e.strerror
print(json.dumps({"fds": sorted(s.fileno() for s in got), "free": free[:3], "last": last}))
"""


def test_a_batch_near_the_descriptor_limit_gives_what_it_could_make() -> None:
    # In a process of its own: in the test run's, other threads (gRPC's, executors) open
    # and close descriptors meanwhile and take the free numbers counted on.
    env = python_env()
    done = subprocess.run(
        [sys.executable, "-c", SCENARIO],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["fds"] == seen["free"]
    assert seen["last"] == "Too many open files"
