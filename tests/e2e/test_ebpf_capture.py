"""The eBPF capture programs, for real (bcc-compiled ``bpf/capture.c``, pinned links on
a test cgroup and netns; ``bpfrig.py``): outbound connects to the mesh land on the proxy
with ``SO_ORIGINAL_DST`` answered and ``getpeername`` restored, 1 MiB relayed intact;
non-mesh addresses, the pod's own loopback and the proxy's marked sockets are untouched;
inbound TCP to the pod IP is steered to 15006 (not 15008); with no proxy both directions
fail closed; a new loader re-adopts the pinned maps and links; nothing is left after. A
compile error in the one-shot loader reaches its caller whole, and nothing is pinned;
nor when the loader runs past its time and is killed.

This proves the kernel side on this machine; the agent's use of it (``--redirect ebpf``)
is tested in the sandbox by test_mesh_ebpf.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bpfrig
import pytest

from nodeagent.errors import LocalStateError
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


def test_a_compile_error_is_reported_and_nothing_is_pinned(tmp_path: Path) -> None:
    # the loader is a child process: its compile error must still reach the agent whole
    broken = tmp_path / "capture.c"
    broken.write_text(ebpf.SOURCE.read_text() + "\nint broken(void) { return undeclared_x; }\n")
    pin = f"/sys/fs/bpf/nodeagent-broken-{os.getpid()}"
    try:
        with pytest.raises(LocalStateError) as e:
            ebpf.Capture(pin, src=broken)
        text = str(e.value)
        assert text.startswith(f"cannot load {broken}"), text
        assert "undeclared_x" in text, text  # clang's own line, carried over
        assert not ebpf.progs_pinned(os.path.join(pin, f"maps-{ebpf.abi_of(broken)}"))
    finally:
        ebpf.teardown(pin)
    assert "bcc" not in sys.modules  # this process never imported it


def test_a_loader_past_its_time_is_killed_and_leaves_nothing_pinned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ebpf, "LOADER_TIMEOUT", 0.5)  # a compile takes seconds
    pin = f"/sys/fs/bpf/nodeagent-slow-{os.getpid()}"
    try:
        with pytest.raises(LocalStateError, match=r"the eBPF loader took more than 0\.5s"):
            ebpf.Capture(pin)
        maps = os.path.join(pin, f"maps-{ebpf.abi_of(ebpf.SOURCE)}")
        assert not [n for n in os.listdir(maps) if n.startswith(ebpf.PROGS_DIR)], os.listdir(maps)
    finally:
        ebpf.teardown(pin)
