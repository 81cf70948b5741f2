"""End to end: with iptables capture the destination app sees the client pod's address,
not the proxy's (the proxy's upstream socket in the destination pod binds to it with
``IP_TRANSPARENT``; ``iptables.apply_source_routing`` routes the app's answers back to
the proxy): over HBONE from another node, from the same node, on a port served request
by request; a pod calling itself through its Service still works. With eBPF capture the
app sees its own pod's address (the proxy's), as before.

Mesh: ``client`` on node1; ``echo-1``, ``echo-2`` and ``victim`` on node2 (``tests/e2e/mesh``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from meshops import apply_file, http_status

from nodeagent.redirect.netns import netns_path
from nodeagent.sandbox import Sandbox

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

TCPCLIENT = str(Path(__file__).parent / "tcpclient.py")

# an HTTP rule: echo's port 8080 is served request by request
DENY_ADMIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"""


def seen_by_app(sb: Sandbox, pod: str, url: str) -> str:
    code, body = http_status(sb, pod, url)
    assert code == 200, (code, body)
    client: str = json.loads(body)["client"]
    return client.rsplit(":", 1)[0]


def test_the_app_sees_the_client_pods_address(
    sb: Sandbox, config_dir: Path, redirect: str
) -> None:
    def expected(caller: str) -> set[str]:
        if redirect == "iptables":
            return {sb.pod_ip(caller)}
        return {sb.pod_ip("echo-1"), sb.pod_ip("echo-2")}  # the proxy's: the pod's own

    assert seen_by_app(sb, "client", "http://echo/") in expected("client")  # HBONE, L4
    assert seen_by_app(sb, "victim", "http://echo/") in expected("victim")  # same node
    path = config_dir / "authz-source.yaml"
    apply_file(sb, path, DENY_ADMIN)
    try:
        # a port served request by request (L7)
        assert seen_by_app(sb, "client", "http://echo/") in expected("client")
    finally:
        apply_file(sb, path, None)
    if redirect != "iptables":
        return
    # the routing is in the pod's netns: the app's answers go back to the proxy
    rules = subprocess.run(
        ["nsenter", f"--net={netns_path(sb.pod_netns('echo-1'))}", "ip", "rule", "show"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    assert "fwmark 0x111/0xfff lookup 100" in rules, rules


def test_a_pod_calling_itself_through_its_service(sb: Sandbox, redirect: str) -> None:
    echoes = {sb.pod_ip("echo-1"), sb.pod_ip("echo-2")}
    expected = {sb.pod_ip("echo-1")} if redirect == "iptables" else echoes
    for _ in range(4):  # both endpoints, itself among them
        assert seen_by_app(sb, "echo-1", "http://echo/") in expected
    p = sb.exec("echo-1", [sys.executable, TCPCLIENT, "echo", "echo", "9000", "--bytes", "1000"],
                capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0 and json.loads(p.stdout.strip().splitlines()[-1])["ok"] == 1
