"""End to end: the span tree of one request through bookinfo (sleep → productpage →
reviews → ratings) across both sandbox nodes, as a tracing backend receives it.

Both agents run with ``--otlp-endpoint`` naming an OTLP/gRPC receiver this test runs on
the sandbox's fabric (a real gRPC server, the ``opentelemetry-proto`` messages), and a
mesh-wide Telemetry samples every request. One request from sleep must give one trace in
which each hop has a CLIENT span on the caller's node and a SERVER span on the callee's,
each SERVER span the child of its CLIENT span, and each CLIENT span the child of the
SERVER span of the workload that made the call (the sample app forwards ``traceparent``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshops import http_status
from otlp_receiver import OtlpReceiver, Received

from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.netlink import run_in_netns
from nodeagent.sandbox.topology import FABRIC_BRIDGE, FABRIC_NETNS

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

RECEIVER_IP = "10.250.0.252"
"""The test's OTLP receiver, on the fabric bridge (every node netns reaches it)."""
AGENT_ARGS = ("--otlp-endpoint", f"{RECEIVER_IP}:4317")
REDIRECT_MODES = ("iptables",)
BOOKINFO = Path(__file__).parents[2] / "examples" / "bookinfo"

TRACE_ALL = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - randomSamplingPercentage: 100
---
# reviews v2 calls ratings: every request goes there
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets: [{name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v2}}]}]
"""


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bookinfo")
    for f in BOOKINFO.glob("*.yaml"):
        shutil.copy(f, d / f.name)
    (d / "tracing.yaml").write_text(TRACE_ALL)
    return d


@pytest.fixture(scope="module")
def receiver(sb: Sandbox) -> Iterator[OtlpReceiver]:
    subprocess.run(
        ["ip", "-n", FABRIC_NETNS, "addr", "add", f"{RECEIVER_IP}/24", "dev", FABRIC_BRIDGE],
        check=False,  # already there from an earlier mode
    )
    r = run_in_netns(FABRIC_NETNS, lambda: OtlpReceiver(host=RECEIVER_IP, port=4317))
    with r:
        yield r


def _one(spans: list[Received], kind: str, service: str) -> Received:
    found = [s for s in spans if s.kind == kind and s.service == service]
    assert len(found) == 1, (kind, service, spans)
    return found[0]


def test_the_span_tree_of_one_bookinfo_request_spans_both_nodes(
    receiver: OtlpReceiver, sb: Sandbox
) -> None:
    assert http_status(sb, "sleep", "http://productpage:9080/")[0] == 200
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(receiver.spans()) < 8:
        time.sleep(0.1)
    time.sleep(1.5)  # stragglers (one export per node and second)
    spans = receiver.spans()
    (trace,) = {s.trace_id for s in spans if s.parent_id == ""}
    spans = [s for s in spans if s.trace_id == trace]
    # sleep → productpage (both on node1)
    c_pp = _one(spans, "CLIENT", "sleep.default")
    s_pp = _one(spans, "SERVER", "productpage.default")
    assert c_pp.parent_id == "" and s_pp.parent_id == c_pp.span_id
    # productpage (node1) → reviews v2 (node2)
    c_rv = [s for s in spans if s.kind == "CLIENT" and "reviews" in s.name]
    assert len(c_rv) == 1 and c_rv[0].service == "productpage.default"
    assert c_rv[0].parent_id == s_pp.span_id
    s_rv = _one(spans, "SERVER", "reviews.default")
    assert s_rv.parent_id == c_rv[0].span_id
    assert s_rv.attributes["node_id"].split("~")[2] == "reviews-v2.default"
    # reviews v2 (node2) → ratings (node1)
    c_ra = [s for s in spans if s.kind == "CLIENT" and "ratings" in s.name]
    assert len(c_ra) == 1 and c_ra[0].service == "reviews.default"
    assert c_ra[0].parent_id == s_rv.span_id
    s_ra = _one(spans, "SERVER", "ratings.default")
    assert s_ra.parent_id == c_ra[0].span_id
    assert s_ra.attributes["http.status_code"] == "200"
    assert s_ra.attributes["istio.canonical_service"] == "ratings"
    # and details, productpage's other call
    s_dt = _one(spans, "SERVER", "details.default")
    c_dt = next(s for s in spans if s.span_id == s_dt.parent_id)
    assert c_dt.kind == "CLIENT" and c_dt.parent_id == s_pp.span_id
