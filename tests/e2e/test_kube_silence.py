"""An API server that vanishes without a FIN or RST (its node gone, a partition, a load
balancer that forgot the flow) fails the agent's watch within its TCP keepalive's time,
not at the watch's timeoutSeconds: the test API server listens in a netns of its own
across a veth, and a DROP rule in that netns cuts it off mid-watch. The netns (with its
veth and rule) is removed at the end, even on failure."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cnirig import netns_add, netns_del
from kubeapi import KubeApiServer
from kubeobjects import namespace

from nodeagent.control.kubeclient import KubeClient, Resource, credentials
from nodeagent.sandbox.netlink import run_in_netns

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a netns and iptables"),
]

NAMESPACES = Resource("", "v1", "Namespace", namespaced=False)
HOST_IP, API_IP = "10.253.7.1", "10.253.7.2"
KEEPALIVE = (1, 1, 2)  # gives up after ~3 s of silence
WATCH_TIMEOUT = 300  # what would end a silent watch without keepalive


@pytest.fixture
def api_elsewhere() -> Iterator[tuple[KubeApiServer, str]]:
    """The test API server on API_IP in a netns of its own, reached over a veth."""
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"na-kst-{tag}", f"kst0{tag}", f"kst1{tag}"
    netns_add(ns)
    try:
        subprocess.run(["ip", "link", "add", here, "type", "veth", "peer", "name", there,
                        "netns", ns], check=True)  # fmt: skip
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/30", "dev", here], check=True)
        subprocess.run(["ip", "link", "set", here, "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{API_IP}/30", "dev", there], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", there, "up"], check=True)

        def listen(host: str, port: int) -> socket.socket:
            return run_in_netns(ns, lambda: socket.create_server((host, port)))

        with KubeApiServer(host=API_IP, listen=listen) as api:
            api.create(namespace("default"))
            yield api, ns
    finally:
        netns_del(ns)  # takes the veth pair and the rule with it
        subprocess.run(["ip", "link", "del", here], check=False, capture_output=True)


def test_a_watch_on_a_vanished_api_server_fails_within_its_keepalive(
    api_elsewhere: tuple[KubeApiServer, str], tmp_path: Path
) -> None:
    api, ns = api_elsewhere
    client = KubeClient(credentials(api.kubeconfig(tmp_path / "kc")), keepalive=KEEPALIVE)

    async def go() -> tuple[list[str], float, BaseException | None]:
        _, rv = await client.list(NAMESPACES)
        seen: list[str] = []
        cut_at = 0.0
        try:
            async with asyncio.timeout(30):
                async for kind, obj in client.watch(NAMESPACES, rv, timeout_seconds=WATCH_TIMEOUT):
                    if kind == "BOOKMARK":
                        continue
                    seen.append(obj["metadata"]["name"])
                    # the watch is live: now the server's end goes silent
                    subprocess.run(["ip", "netns", "exec", ns, "iptables", "-I", "INPUT",
                                    "-p", "tcp", "--dport", str(api.port), "-j", "DROP"],
                                   check=True)  # fmt: skip
                    cut_at = time.monotonic()
        except TimeoutError as e:
            return seen, time.monotonic() - cut_at, e
        return seen, time.monotonic() - cut_at, None

    async def main() -> tuple[list[str], float, BaseException | None]:
        task = asyncio.create_task(go())
        await asyncio.to_thread(api.wait_watches, "namespaces")
        await asyncio.to_thread(api.create, namespace("live"))
        return await task

    seen, after, error = asyncio.run(main())
    assert seen == ["live"]
    assert error is not None and error.errno is not None, f"not ended by keepalive: {error!r}"
    assert "keepalive" in str(error), error
    assert after < 15, f"the silent server was noticed only after {after:.1f}s"
