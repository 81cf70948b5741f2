"""End to end: AuthorizationPolicy enforced on the destination node, with the identity the
mTLS handshake proved: per connection (L4), or per request on HTTP ports when a policy
looks at HTTP attributes. A denied HTTP request gets 403 ``RBAC: access denied``; a denied
TCP connection is closed before any byte reaches the app; the app's own request counter
proves it never saw them.

Mesh: ``client`` on node1; ``echo-1``, ``echo-2`` and ``victim`` on node2 (``tests/e2e/mesh``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshops import apply_file, http_request, http_status, served

from nodeagent.admin.client import AdminClient
from nodeagent.sandbox import Sandbox

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

TCPCLIENT = str(Path(__file__).parent / "tcpclient.py")
PY = sys.executable


@pytest.fixture
def policy(sb: Sandbox, config_dir: Path) -> Iterator[Any]:
    """``policy(yaml)``: apply an AuthorizationPolicy file; removed after the test."""
    path = config_dir / "authz.yaml"

    def apply(text: str) -> None:
        apply_file(sb, path, text)

    try:
        yield apply
    finally:
        if path.exists():
            apply_file(sb, path, None)


def tcp_echo(sb: Sandbox, pod: str, host: str) -> dict[str, Any]:
    p = sb.exec(pod, [PY, TCPCLIENT, "echo", host, "9000", "--bytes", "1000"],
                capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def denied_count(sb: Sandbox) -> float:
    import subprocess

    from nodeagent.redirect.netns import netns_path

    p = subprocess.run(
        ["nsenter", f"--net={netns_path(sb.node_netns('node2'))}", "curl", "-s",
         "http://127.0.0.1:15020/metrics"],
        capture_output=True, text=True, timeout=10, check=True,
    )
    total = 0.0
    for line in p.stdout.splitlines():
        name, _, rest = line.partition("{")
        if name == "nodeagent_connection_failures_total" and 'response_flags="RBAC"' in rest:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_allow_nothing_denies_http_and_tcp_before_the_app(sb: Sandbox, policy: Any) -> None:
    policy("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-nothing, namespace: default}
        spec: {}
    """)
    before = served(sb, "echo-1") + served(sb, "echo-2")
    denied0 = denied_count(sb)
    for _ in range(4):
        code, body = http_status(sb, "client", "http://echo/")
        assert code == 403 and "RBAC: access denied" in body, (code, body)
    echo = tcp_echo(sb, "client", "echo")
    assert echo["ok"] == 0, echo  # closed: nothing echoed
    # +2: the two count requests themselves (made inside the pods, not through the mesh)
    assert served(sb, "echo-1") + served(sb, "echo-2") == before + 2
    assert denied_count(sb) - denied0 >= 5


def test_allow_only_from_one_principal(sb: Sandbox, policy: Any) -> None:
    policy("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: echo-from-client, namespace: default}
        spec:
          selector: {matchLabels: {app: echo}}
          action: ALLOW
          rules:
          - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
    """)
    assert tcp_echo(sb, "client", "echo")["ok"] == 1
    assert http_status(sb, "client", "http://echo/")[0] == 200
    # victim (another identity, on echo's own node) is refused
    assert tcp_echo(sb, "victim", "echo")["ok"] == 0
    # the policy selects echo only: victim itself still accepts anyone
    assert tcp_echo(sb, "client", "victim")["ok"] == 1


def test_deny_a_port_from_a_namespace(sb: Sandbox, policy: Any) -> None:
    policy("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: no-raw-tcp, namespace: default}
        spec:
          action: DENY
          rules:
          - from: [{source: {namespaces: [default]}}]
            to: [{operation: {ports: ["9000"]}}]
    """)
    assert tcp_echo(sb, "client", "echo")["ok"] == 0
    assert http_status(sb, "client", "http://echo/")[0] == 200  # port 8080 is not denied
    # the refused connection is in the destination's access log, with policy and rule
    with AdminClient(sb.agent_socket("node2")) as c:
        recs = [r for r in c.requests()["records"] if r["protocol"] == "TCP"]
    assert recs and recs[-1]["authz_policy"] == "default/no-raw-tcp", recs[-1:]
    assert recs[-1]["authz_rule"] == 0 and recs[-1]["response_flags"] == "RBAC", recs[-1]
    assert recs[-1]["source_workload"] == "client", recs[-1]


def test_allow_get_but_not_post_on_a_path_prefix(sb: Sandbox, policy: Any) -> None:
    """L7 policy at the destination: the called node parses each request; a denied one
    gets 403 ``RBAC: access denied`` and never reaches the app."""
    policy("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: read-only-api, namespace: default}
        spec:
          selector: {matchLabels: {app: echo}}
          rules:
          - to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
    """)
    before = served(sb, "echo-1") + served(sb, "echo-2")
    assert http_request(sb, "client", "http://echo/api/items")[0] == 200
    code, body, _ = http_request(sb, "client", "http://echo/api/items", method="POST")
    assert (code, body.strip()) == (403, "RBAC: access denied"), (code, body)
    assert http_request(sb, "client", "http://echo/other")[0] == 403
    # one allowed request reached an app (+2: the count requests themselves)
    assert served(sb, "echo-1") + served(sb, "echo-2") == before + 1 + 2
    # the TCP port cannot satisfy an HTTP-only ALLOW rule: closed (fail closed)
    assert tcp_echo(sb, "client", "echo")["ok"] == 0
    # the destination's access log names the deciding policy (and rule, when one matched)
    with AdminClient(sb.agent_socket("node2")) as c:
        recs = [r for r in c.requests()["records"] if r.get("reporter") == "destination"]
    post = [r for r in recs if r["method"] == "POST" and r["path"] == "/api/items"][-1]
    assert post["response_code"] == 403 and post["response_flags"] == "RBAC", post
    assert post["authz_policy"] == "default/read-only-api" and "authz_rule" not in post, post
    assert post["source_principal"] == "spiffe://cluster.local/ns/default/sa/client", post
    assert post["source_workload"] == "client" and post["upstream_host"] == "-", post
    get = [r for r in recs if r["method"] == "GET" and r["path"] == "/api/items"][-1]
    assert get["response_code"] == 200 and get["authz_rule"] == 0, get


def test_deny_by_source_namespace_and_when_header(sb: Sandbox, policy: Any) -> None:
    policy("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: no-admin-from-default, namespace: default}
        spec:
          selector: {matchLabels: {app: echo}}
          action: DENY
          rules:
          - from: [{source: {namespaces: [default]}}]
            to: [{operation: {paths: ["/admin*"]}}]
          - when: [{key: "request.headers[x-user]", values: [mallory]}]
    """)
    assert http_request(sb, "client", "http://echo/admin/x")[0] == 403
    # dot segments and escapes do not dodge a path rule (normalized as Istio does)
    for raw in ("/x/../admin/y", "/./admin", "/%61dmin"):
        p = sb.exec("client", ["curl", "-s", "--path-as-is", "-o", "/dev/null", "-w",
                               "%{http_code}", f"http://echo{raw}"],
                    capture_output=True, text=True, timeout=30)
        assert p.stdout == "403", (raw, p.stdout)
    # nor does a request target in absolute form, any scheme case, or a backslash
    for target in ("http://echo/admin", "HTTP://echo/admin/y", "hTtP://x/x/..\\admin"):
        p = sb.exec("client", ["curl", "-s", "--request-target", target, "-o", "/dev/null",
                               "-w", "%{http_code}", "http://echo/"],
                    capture_output=True, text=True, timeout=30)
        assert p.stdout == "403", (target, p.stdout)
    assert http_request(sb, "client", "http://echo/public")[0] == 200
    # where requests are policed one by one, a protocol switch (h2c) would escape: refused
    code, _, _ = http_request(sb, "client", "http://echo/public",
                              headers={"connection": "Upgrade", "upgrade": "h2c"})
    assert code == 403, code
    assert http_request(sb, "client", "http://echo/public", headers={"x-user": "mallory"})[0] == 403
    assert http_request(sb, "client", "http://echo/public", headers={"x-user": "alice"})[0] == 200
    with AdminClient(sb.agent_socket("node2")) as c:
        recs = [r for r in c.requests()["records"] if r.get("reporter") == "destination"]
    denied = [r for r in recs if r["response_code"] == 403 and "authz_rule" in r]
    assert [r["authz_rule"] for r in denied if r["path"] == "/admin/x"] == [0]
    assert [r["authz_rule"] for r in denied if r["path"] == "/public"] == [1]
    assert {r["authz_policy"] for r in denied} == {"default/no-admin-from-default"}
    assert any("Upgrade: h2c refused" in r.get("detail", "") for r in recs), recs[-3:]


def test_a_policy_change_ends_a_request_in_flight_it_now_denies(
    sb: Sandbox, policy: Any
) -> None:
    """On a port policed per request, the request in flight when a DENY arrives is cut;
    the next requests meet the new policy."""
    import subprocess

    policy("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: no-delete, namespace: default}
        spec:
          selector: {matchLabels: {app: echo}}
          action: DENY
          rules: [{to: [{operation: {methods: [DELETE]}}]}]
    """)
    slow = sb.popen("client", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                               "http://echo/delay/4"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the request is at the app now
        policy("""
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: no-delete, namespace: default}
            spec:
              selector: {matchLabels: {app: echo}}
              action: DENY
              rules:
              - to: [{operation: {methods: [DELETE]}}]
              - to: [{operation: {paths: ["/delay/*"]}}]
        """)
        out, _ = slow.communicate(timeout=30)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert out != "200", out  # cut, not answered
    assert http_request(sb, "client", "http://echo/delay/0")[0] == 403
    assert http_request(sb, "client", "http://echo/other")[0] == 200


def test_a_policy_change_closes_live_connections_it_now_denies(
    sb: Sandbox, policy: Any
) -> None:
    import subprocess

    denied = sb.popen("client", [PY, TCPCLIENT, "stream", "echo", "9000", "--seconds", "8"],
                      stdout=subprocess.PIPE, text=True)
    other = sb.popen("victim", [PY, TCPCLIENT, "stream", "echo", "9000", "--seconds", "8"],
                     stdout=subprocess.PIPE, text=True)
    try:
        assert denied.stdout is not None and other.stdout is not None
        denied.stdout.readline()  # both streams are flowing
        other.stdout.readline()
        policy("""
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: no-client, namespace: default}
            spec:
              action: DENY
              rules:
              - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
        """)
        d = json.loads(denied.communicate(timeout=60)[0].strip().splitlines()[-1])
        o = json.loads(other.communicate(timeout=60)[0].strip().splitlines()[-1])
    finally:
        for p in (denied, other):
            if p.poll() is None:
                p.kill()
    assert not d["ok"], d  # closed mid-stream
    assert o["ok"], o  # another identity's connection carried on


def test_ip_blocks_see_the_client_pods_address(sb: Sandbox, policy: Any) -> None:
    # through HBONE from node1: the client's address as the tunnel says and its
    # certificate vouches for (docs/policy.md, "Where source.ip comes from")
    policy(f"""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: no-client-ip, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: echo}}}}
          action: DENY
          rules:
          - from: [{{source: {{ipBlocks: ["{sb.pod_ip("client")}/32"]}}}}]
    """)
    assert tcp_echo(sb, "client", "echo")["ok"] == 0
    assert tcp_echo(sb, "victim", "echo")["ok"] == 1  # another address: allowed
    with AdminClient(sb.agent_socket("node2")) as c:
        recs = [r for r in c.requests()["records"] if r["protocol"] == "TCP"]
    assert recs and recs[-1]["authz_policy"] == "default/no-client-ip", recs[-1:]
    assert recs[-1]["source_workload"] == "client", recs[-1]
