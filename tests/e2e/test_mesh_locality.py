"""End to end: locality failover as in Istio, with each pod's zone taken from its Node's
``topology.kubernetes.io/region`` / ``zone`` labels: the mesh of ``examples/locality``.

A client in region1/zone-a calls ``web``, which has one pod per zone: zone-a (the
client's node), zone-b (same region) and zone-c (region2). While all are healthy only
zone-a answers; once outlier detection ejects it, zone-b answers; once zone-b is ejected
too, region2's zone-c; when they recover, traffic comes home. Checked the way an
operator would: which pod answered, ``nodeagent ctl explain`` (tiers by locality) and
``nodeagent ctl requests`` (the ejections).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.admin.client import AdminClient
from nodeagent.sandbox import Sandbox

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

REDIRECT_MODES = ("iptables",)
"""Locality is the proxy's choice of endpoint, the same whichever way traffic is captured."""

HERE = Path(__file__).parent
EXAMPLE = HERE.parents[1] / "examples" / "locality"
HTTPCLIENT = str(HERE / "httpclient.py")
WEB = "http://web.default.svc.cluster.local/"
BASE_EJECTION = 10.0
"""``baseEjectionTime`` in the example's DestinationRule: the failing steps fit inside it."""


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("locality")
    for f in EXAMPLE.glob("*.yaml"):
        shutil.copy(f, d / f.name)
    return d


def requests_from_client(sb: Sandbox, n: int) -> dict[str, Any]:
    """``n`` GETs to ``web`` from the client pod, one keep-alive connection: the summary
    (``statuses``, ``pods`` that answered)."""
    p = sb.exec("client", [sys.executable, HTTPCLIENT, WEB, "-n", str(n)],
                capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def fail(sb: Sandbox, pod: str, status: int) -> None:
    """Make ``pod``'s app answer ``status`` to every request (0: healthy again), asked
    from inside its own pod, not through the mesh."""
    p = sb.exec(pod, ["curl", "-sS", "-m", "5", f"http://127.0.0.1:8080/toggle-fail/{status}"],
                capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr


def ctl(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "nodeagent", "ctl", "--node", "node1", *args],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr
    return p.stdout


def ejected(sb: Sandbox) -> set[str]:
    with AdminClient(sb.agent_socket("node1")) as c:
        return {e["endpoint"] for e in c.requests()["ejected"]}


@pytest.fixture
def healthy_after(sb: Sandbox) -> Iterator[None]:
    yield
    for pod in ("web-a", "web-b", "web-c"):
        fail(sb, pod, 0)


def test_zone_from_node_labels_and_failover_when_a_zone_is_ejected(
    sb: Sandbox, healthy_after: None
) -> None:
    addr = {p: f"{sb.pod_ip(p)}:8080" for p in ("web-a", "web-b", "web-c")}

    # all healthy: only the client's own zone answers
    first = requests_from_client(sb, 20)
    assert first["statuses"] == {"200": 20} and first["pods"] == {"web-a": 20}, first
    tiers = ctl("explain", "--from", "client", "--to", "web:80")
    assert "locality: region1/zone-a" in tiers, tiers  # the client's, from node1's labels
    assert f"tier 0: {addr['web-a']} default/web-a [region1/zone-a]" in tiers, tiers
    assert f"tier 1: {addr['web-b']} default/web-b [region1/zone-b]" in tiers, tiers
    assert f"tier 2: {addr['web-c']} default/web-c [region2/zone-c]" in tiers, tiers

    # zone-a fails: 2 consecutive 5xx eject it (no retries: the client sees those 2),
    # then the other zone of the same region answers
    fail(sb, "web-a", 503)
    t0 = time.monotonic()
    out = requests_from_client(sb, 20)
    assert out["statuses"] == {"503": 2, "200": 18}, out
    assert out["pods"] == {"web-a": 2, "web-b": 18}, out
    out = requests_from_client(sb, 20)
    assert out["statuses"] == {"200": 20} and out["pods"] == {"web-b": 20}, out
    assert ejected(sb) == {addr["web-a"]}
    shown = ctl("requests")
    assert "Ejected by outlier detection" in shown and addr["web-a"] in shown, shown

    # zone-b fails too: the failover region (region2) is next
    fail(sb, "web-b", 503)
    out = requests_from_client(sb, 20)
    assert out["pods"] == {"web-b": 2, "web-c": 18}, out
    assert ejected(sb) == {addr["web-a"], addr["web-b"]}
    assert time.monotonic() - t0 < BASE_EJECTION, "too slow: web-a may have returned already"

    # both recover: once their ejection time is up, zone-a serves its client again
    fail(sb, "web-a", 0)
    fail(sb, "web-b", 0)
    deadline = time.monotonic() + 3 * BASE_EJECTION
    while ejected(sb) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ejected(sb)
    back = requests_from_client(sb, 20)
    assert back["statuses"] == {"200": 20} and back["pods"] == {"web-a": 20}, back
