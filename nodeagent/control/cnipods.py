"""The pods a CNI plugin hands the agent (``PodHandoff``): ADD records where the pod
lives in the pod runtime file, has the config source reload now and answers once the
proxy has captured the pod; DEL drops the entry and waits for the capture to go; CHECK
reads the capture state.

What it needs of the agent comes in as callables (the source's ``reload_now``, the
serving snapshot, a capture pass, the local pods' states), so it imports no proxy code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nodeagent.control.runtime import load_runtimes, set_runtime
from nodeagent.errors import ConfigError, LocalStateError
from nodeagent.model.objects import DATAPLANE_MODE_LABEL, PodRuntime
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.status import CniAnswer, CniPod

log = logging.getLogger("nodeagent.cni")

DEFAULT_TIMEOUT = 10.0
"""How long ADD waits for the pod to show up in the config and be captured."""
POLL = 0.1
"""How often a waiting ADD or DEL looks again."""
CAPTURE_EVERY = 1.0
"""A failing capture is tried again at most this often while ADD waits."""
RELEASE_TIMEOUT = 5.0


class CniPods:
    """The agent's ``PodHandoff``; one call at a time changes the runtime file."""

    def __init__(
        self,
        node: str,
        runtime_file: Path,
        reload_now: Callable[[], Awaitable[object]],
        snapshot: Callable[[], MeshSnapshot],
        capture: Callable[[], Awaitable[None]],
        pod_states: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self.node = node
        self.runtime_file = runtime_file
        self._reload_now = reload_now
        self._snapshot = snapshot
        self._capture = capture
        self._pod_states = pod_states
        self._lock = asyncio.Lock()

    def _state(self, key: str) -> dict[str, Any] | None:
        return next((p for p in self._pod_states() if p.get("key") == key), None)

    async def _write(self, key: str, runtime: PodRuntime | None) -> PodRuntime | None:
        loop = asyncio.get_running_loop()
        try:
            async with self._lock:
                return await loop.run_in_executor(
                    None, set_runtime, self.runtime_file, key, runtime
                )
        except (ConfigError, OSError) as e:
            raise LocalStateError(
                f"cannot update the pod runtime file {self.runtime_file}: {e}"
            ) from e

    def _runtime(self, pod: CniPod) -> PodRuntime:
        ip = next((a for a in pod.ips if ":" not in a), pod.ips[0] if pod.ips else "")
        if not ip:
            raise LocalStateError(f"pod {pod.key}: no IP address given (the chain's prevResult)")
        if not pod.netns:
            raise LocalStateError(f"pod {pod.key}: no network namespace given (CNI_NETNS)")
        return PodRuntime(key=pod.key, ip=ip, node=self.node, netns=pod.netns, cgroup=pod.cgroup)

    def _placed(self, snap: MeshSnapshot, pod: CniPod) -> CniAnswer | None:
        """The answer when the snapshot's pod rules the pod out, else None."""
        found = snap.pod_by_key.get(pod.key)
        if found is None:
            return None
        if not found.in_mesh:
            if found.labels.get(DATAPLANE_MODE_LABEL) == "none":
                why = f"not captured (opted out): label {DATAPLANE_MODE_LABEL}=none"
            else:
                why = (
                    f"not captured: namespace {found.namespace} is not in the mesh "
                    f"(label it {DATAPLANE_MODE_LABEL}=ambient)"
                )
            return CniAnswer(False, why)
        if found.node_name != self.node:
            raise LocalStateError(
                f"pod {pod.key} is placed on node {found.node_name!r} in the config, but this "
                f"agent serves node {self.node!r}"
            )
        return None

    async def add(self, pod: CniPod, timeout: float) -> CniAnswer:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout > 0 else DEFAULT_TIMEOUT)
        rt = self._runtime(pod)
        early = self._placed(self._snapshot(), pod)
        if early is not None:
            log.info("CNI ADD %s: %s", pod.key, early.state)
            return early
        await self._write(pod.key, rt)
        await self._reload_now()
        last_capture = 0.0
        state = "pending: the pod is not in the agent's config yet"
        while True:
            snap = self._snapshot()
            ruled = self._placed(snap, pod)
            if ruled is not None:  # the config caught up and rules the pod out
                await self._write(pod.key, None)
                await self._reload_now()
                log.info("CNI ADD %s: %s", pod.key, ruled.state)
                return ruled
            if pod.key in snap.pod_by_key and snap.runtimes.get(pod.key) == rt:
                now = loop.time()
                if now - last_capture >= CAPTURE_EVERY:
                    last_capture = now
                    await self._capture()
                current = self._state(pod.key)
                if current is not None and current.get("capture") == "ready":
                    mode = str(current.get("mode") or "")
                    log.info("CNI ADD %s: captured (%s) in %s", pod.key, mode, rt.netns)
                    return CniAnswer(True, "ready", mode)
                if current is not None:
                    state = str(current.get("capture") or state)
            if loop.time() >= deadline:
                raise LocalStateError(self._not_captured(pod, state, timeout))
            await asyncio.sleep(POLL)

    def _not_captured(self, pod: CniPod, state: str, timeout: float) -> str:
        took = timeout if timeout > 0 else DEFAULT_TIMEOUT
        if state.startswith("pending"):
            return (
                f"pod {pod.key} is not in the agent's config after {took:g}s (node "
                f"{self.node}): the agent captures only pods its config source holds"
            )
        return f"pod {pod.key} is not captured after {took:g}s: {state}"

    async def remove(self, pod: CniPod) -> bool:
        try:
            held = load_runtimes(self.runtime_file).get(pod.key)
        except ConfigError as e:
            raise LocalStateError(str(e)) from e
        if held is None:
            return False
        if pod.netns and held.netns != pod.netns:
            # a DEL of an older sandbox of the same pod: the entry is the new one's
            log.info("CNI DEL %s: netns %s is not the pod's (%s)", pod.key, pod.netns, held.netns)
            return False
        await self._write(pod.key, None)
        await self._reload_now()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELEASE_TIMEOUT
        while self._state(pod.key) is not None:
            if loop.time() >= deadline:
                raise LocalStateError(
                    f"pod {pod.key}: its capture is still in place {RELEASE_TIMEOUT:g}s after "
                    "its runtime entry was dropped"
                )
            await self._capture()
            await asyncio.sleep(POLL)
        log.info("CNI DEL %s: released", pod.key)
        return True

    async def check(self, pod: CniPod) -> CniAnswer:
        ruled = self._placed(self._snapshot(), pod)
        if ruled is not None:
            return ruled
        current = self._state(pod.key)
        if current is None:
            return CniAnswer(False, "unknown: the agent holds no capture for this pod")
        if pod.netns and current.get("netns") != pod.netns:
            return CniAnswer(
                False, f"captured in another netns ({current.get('netns')}), not {pod.netns}"
            )
        state = str(current.get("capture") or "unknown")
        return CniAnswer(state == "ready", state, str(current.get("mode") or ""))
