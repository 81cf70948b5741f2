"""The eBPF capture programs, for real (bcc-compiled ``bpf/capture.c``, pinned links on
a test cgroup and netns; ``bpfrig.py``): outbound connects to the mesh land on the proxy
with ``SO_ORIGINAL_DST`` answered and ``getpeername`` restored, 1 MiB relayed intact;
non-mesh addresses, the pod's own loopback and the proxy's marked sockets are untouched;
inbound TCP to the pod IP is steered to 15006 (not 15008); with no proxy both directions
fail closed; a new loader re-adopts the pinned maps and links; nothing is left after.

The agent does not use this capture yet (``--redirect ebpf`` is the next step of
issue 6); this proves the kernel side on this machine.
"""

from __future__ import annotations

import os

import bpfrig
import pytest

from nodeagent.redirect import ebpf

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for BPF, netns and cgroups"),
]


def test_ebpf_capture_end_to_end() -> None:
    why = ebpf.probe()
    assert why is None, f"eBPF capture cannot work here: {why} (scripts/setup.sh sets it up)"
    checks, results = bpfrig.run_checks()
    failed = [(name, detail) for name, ok, detail in checks if not ok]
    assert not failed, failed
    assert len(checks) >= 16, [name for name, _, _ in checks]
    assert results["stats"]["captured"] > 0 and results["stats"]["inbound_steered"] > 0
