"""``nodeagent-cni``: the CNI plugin, chained after the cluster's own plugins.

A container runtime execs it with ``CNI_COMMAND`` and the network config on stdin. ADD
hands the node agent the new pod (namespace, name, uid, netns, the IPs of the chain's
``prevResult``, its cgroup when found) over the node agent socket and returns
``prevResult`` unchanged once the agent says the pod is captured; when the agent is down
or does not capture the pod in time, ADD fails, so no pod starts uncaptured. DEL has the
agent release the pod, CHECK asks whether it is captured, VERSION names the versions.
The protocol itself is ``spec``; this module owns the calls to the agent.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import IO, Any

from nodeagent.cni import spec
from nodeagent.cni.spec import CniError, Env, NetConf

log = logging.getLogger("nodeagent-cni")

CGROUP_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
"""Where the cgroup v2 hierarchy is mounted (the hybrid layout's first)."""
CGROUP_DEPTH = 5
"""kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice is 3 deep."""
RPC_MARGIN = 5.0
"""The plugin's deadline exceeds the agent's wait by this much, so the agent's own
explanation arrives rather than a bare timeout."""


def find_cgroup(uid: str, root: str = "") -> str:
    """The cgroup v2 directory of the pod ``uid`` (kubelet names it ``pod<uid>``, with
    ``_`` for ``-`` under the systemd driver); empty when none is found."""
    if not uid:
        return ""
    wanted = {f"pod{uid}", f"pod{uid.replace('-', '_')}"}
    roots = (
        [root] if root else [r for r in CGROUP_ROOTS if os.path.exists(f"{r}/cgroup.controllers")]
    )
    for top in roots[:1]:
        for path in _walk(top, CGROUP_DEPTH):
            name = os.path.basename(path)
            if any(w in name for w in wanted):
                return path
    return ""


def _walk(top: str, depth: int) -> Iterator[str]:
    """Directories under ``top``, breadth first, at most ``depth`` deep."""
    level = [top]
    for _ in range(depth):
        below: list[str] = []
        for d in level:
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    yield e.path
                    below.append(e.path)
        level = below


def _pod_message(env: Env, conf: NetConf, cgroup: str) -> Any:
    from nodeagent.admin import nodeagent_pb2 as pb

    pod = env.pod
    assert pod is not None
    return pb.CniPod(
        namespace=pod[0],
        name=pod[1],
        uid=pod[2],
        container_id=env.container_id,
        netns=env.netns,
        ips=list(spec.pod_ips(conf.prev_result, env.ifname)),
        cgroup=cgroup,
    )


def _client(conf: NetConf, deadline: float) -> Any:
    from nodeagent.admin.client import AdminClient

    return AdminClient(conf.socket, timeout=deadline)


def _agent_error(conf: NetConf, what: str, e: Exception) -> CniError:
    """The plugin's error for a failed call: the socket and the reason, always."""
    text = str(e)
    unreachable = "no agent is listening" in text or "did not answer" in text
    if unreachable:
        return CniError(
            spec.TRY_AGAIN_LATER,
            f"nodeagent-cni: {what}: the node agent on {conf.socket} is not reachable; the "
            "pod is not started uncaptured",
            text,
        )
    return CniError(
        spec.NOT_CAPTURED,
        f"nodeagent-cni: {what}: the node agent refused: {text}",
        f"socket {conf.socket}",
    )


def cmd_add(env: Env, conf: NetConf) -> dict[str, Any]:
    from nodeagent.errors import LocalStateError

    pod = env.pod
    if pod is None:  # not a Kubernetes pod: nothing for the mesh to capture
        log.info("ADD %s: no K8S_POD_NAME in CNI_ARGS, left alone", env.container_id)
        return spec.passed_on(conf)
    if conf.prev_result is None:
        raise CniError(
            spec.INVALID_CONFIG,
            "nodeagent-cni is a chained plugin: put it after the plugin that sets up the "
            "pod's interface (there is no prevResult)",
        )
    if not spec.pod_ips(conf.prev_result, env.ifname):
        raise CniError(spec.INVALID_CONFIG, "the prevResult names no IP address for the pod")
    cgroup = find_cgroup(pod[2], conf.cgroup_root)
    msg = _pod_message(env, conf, cgroup)
    log.info(
        "ADD %s/%s netns %s ips %s cgroup %s",
        pod[0],
        pod[1],
        env.netns,
        list(msg.ips),
        cgroup or "-",
    )
    try:
        with _client(conf, conf.timeout + RPC_MARGIN) as client:
            answer = client.cni_add(msg, conf.timeout)
    except LocalStateError as e:
        raise _agent_error(conf, f"ADD {pod[0]}/{pod[1]}", e) from e
    log.info("ADD %s/%s: %s", pod[0], pod[1], answer.state)
    return spec.passed_on(conf)


def cmd_del(env: Env, conf: NetConf) -> None:
    from nodeagent.errors import LocalStateError

    pod = env.pod
    if pod is None:
        return
    msg = _pod_message(env, conf, "")
    try:
        with _client(conf, conf.timeout) as client:
            client.cni_del(msg)
    except LocalStateError as e:
        # DEL must not block a pod's removal: with the agent away there is nothing to
        # release now, and a stale runtime entry captures nothing (the pod is gone)
        log.warning(
            "DEL %s/%s: the node agent on %s did not release it: %s", *pod[:2], conf.socket, e
        )


def cmd_check(env: Env, conf: NetConf) -> None:
    from nodeagent.errors import LocalStateError

    if conf.cni_version in ("0.3.0", "0.3.1"):
        raise CniError(
            spec.INCOMPATIBLE_VERSION,
            f"CHECK is not part of cniVersion {conf.cni_version} (0.4.0 and later)",
        )
    pod = env.pod
    if pod is None:
        return
    if conf.prev_result is None:
        raise CniError(spec.INVALID_CONFIG, "CHECK needs the prevResult of the chain")
    try:
        with _client(conf, conf.timeout) as client:
            answer = client.cni_check(_pod_message(env, conf, ""))
    except LocalStateError as e:
        raise _agent_error(conf, f"CHECK {pod[0]}/{pod[1]}", e) from e
    if not answer.captured and "opted out" not in answer.state:
        raise CniError(
            spec.NOT_CAPTURED,
            f"nodeagent-cni: pod {pod[0]}/{pod[1]} is not captured: {answer.state}",
        )


def cmd_status(conf: NetConf) -> None:
    from nodeagent.errors import LocalStateError

    try:
        with _client(conf, min(conf.timeout, 5.0)) as client:
            client.status()
    except LocalStateError as e:
        raise CniError(
            spec.NOT_AVAILABLE,
            f"nodeagent-cni: the node agent on {conf.socket} is not reachable",
            str(e),
        ) from e


def run(environ: Mapping[str, str], stdin: bytes) -> dict[str, Any] | None:
    """One call: the JSON to print on success (None: print nothing); raises ``CniError``."""
    env = spec.parse_env(environ)
    if env.command == "VERSION":
        return spec.version_result(spec.version_of(stdin))
    conf = spec.parse_netconf(stdin)
    logging.getLogger().setLevel(conf.log_level.upper())
    if env.command == "ADD":
        return cmd_add(env, conf)
    if env.command == "DEL":
        cmd_del(env, conf)
    elif env.command == "CHECK":
        cmd_check(env, conf)
    elif env.command == "STATUS":
        cmd_status(conf)
    # GC: the agent keeps no attachment beyond a pod's runtime entry; nothing to collect
    return None


def main(
    environ: Mapping[str, str] | None = None,
    stdin: IO[bytes] | None = None,
    stdout: IO[str] | None = None,
) -> int:
    """The plugin's process: 0 with the result on stdout, or 1 with the error object."""
    environ = os.environ if environ is None else environ
    out = stdout or sys.stdout
    logging.basicConfig(
        level=logging.WARNING, format="nodeagent-cni %(levelname)s: %(message)s", stream=sys.stderr
    )
    data = b""
    try:
        data = (stdin or sys.stdin.buffer).read()
        result = run(environ, data)
    except CniError as e:
        json.dump(e.to_json(spec.version_of(data)), out)
        out.write("\n")
        return 1
    except Exception as e:  # never a traceback for the runtime to parse
        err = CniError(spec.IO_FAILURE, f"nodeagent-cni failed: {type(e).__name__}: {e}")
        json.dump(err.to_json(spec.version_of(data)), out)
        out.write("\n")
        return 1
    if result is not None:
        json.dump(result, out)
        out.write("\n")
    return 0


__all__ = ["find_cgroup", "main", "run"]
