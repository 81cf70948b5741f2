"""The admission of a new TCP connection (``InboundPolicy.admit_connection``): a policy
change applies from the next connection on, rate limits still count every connection,
and what is remembered per snapshot stays bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.control.files import load_directory
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy import admission
from nodeagent.proxy.admission import InboundPolicy

WEB = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {nodeName: node1, containers: [{name: main, ports: [{containerPort: 8080}]}]}
status: {podIP: 10.244.1.2}
"""
DENY_CLIENT = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-client, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {ipBlocks: [10.244.9.9]}}]}]
"""
LIMIT = """
---
apiVersion: nodeagent.io/v1alpha1
kind: LocalRateLimit
metadata: {name: web-connections, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  ports: [8080]
  tcp:
    tokenBucket: {maxTokens: 2, tokensPerFill: 1, fillInterval: 1h}
"""


def snapshot(tmp_path: Path, text: str) -> MeshSnapshot:
    (tmp_path / "mesh.yaml").write_text(text)
    return load_directory(tmp_path).snapshot


def admitted(policy: InboundPolicy, snap: MeshSnapshot, source_ip: str) -> bool:
    pod = snap.pod_by_key["default/web"]
    return policy.admit_connection(snap, pod, 8080, None, source_ip).allowed


def test_a_policy_change_applies_to_the_next_connection(tmp_path: Path) -> None:
    open_ = snapshot(tmp_path, WEB)
    denying = snapshot(tmp_path, WEB + DENY_CLIENT)
    current = [open_]
    policy = InboundPolicy(lambda: current[0])
    assert admitted(policy, open_, "10.244.9.9") and admitted(policy, open_, "10.244.9.9")
    current[0] = denying
    adm = policy.admit_connection(
        denying, denying.pod_by_key["default/web"], 8080, None, "10.244.9.9"
    )
    assert not adm.allowed and adm.flag == "RBAC"
    assert adm.deciding() == ("default/no-client", 0)
    assert admitted(policy, denying, "10.244.9.8")
    assert admitted(policy, snapshot(tmp_path, WEB), "10.244.9.9")


def test_a_connection_rate_limit_counts_every_connection(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, WEB + LIMIT)
    policy = InboundPolicy(lambda: snap)
    policy.on_snapshot(snap)
    got = [admitted(policy, snap, "10.244.9.9") for _ in range(3)]
    assert got == [True, True, False]


def test_admissions_remembered_stay_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission, "L4_KEPT", 3)
    snap = snapshot(tmp_path, WEB + DENY_CLIENT)
    policy = InboundPolicy(lambda: snap)
    for i in range(10):
        assert admitted(policy, snap, f"10.244.8.{i}")
        assert len(policy._l4.get(snap)) <= 3
    assert not admitted(policy, snap, "10.244.9.9")
