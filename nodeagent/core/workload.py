"""What Istio's telemetry calls a pod: its workload, app, version, canonical service and
revision, and cluster (``peer_meta``), derived from the pod's name and labels by Istio's
rules. Pure: the metrics' ``source_*``/``destination_*`` labels and the logs read it.

Istio names a pod's workload after its controller (``GetDeployMetaFromPod``): a
ReplicaSet's pod after the Deployment (the ReplicaSet's name less its
``pod-template-hash``), a Job's after the Job (a CronJob's Job after the CronJob), any
other controller's after the controller, a bare pod after itself. The model keeps no
owner references, so the controller is read from the labels its controller stamps on
every pod it makes (``pod-template-hash``, ``job-name``, ``controller-revision-hash`` with
``statefulset.kubernetes.io/pod-name``) and the name they are part of; the label
``service.istio.io/workload-name`` overrides, as in Istio.
"""

from __future__ import annotations

from typing import NamedTuple

from nodeagent.model.objects import Pod

CLUSTER_ID = "Kubernetes"
"""Istio's default cluster id (``values.global.multiCluster.clusterName``)."""
UNKNOWN = "unknown"

WORKLOAD_NAME_LABEL = "service.istio.io/workload-name"
CANONICAL_NAME_LABEL = "service.istio.io/canonical-name"
CANONICAL_REVISION_LABEL = "service.istio.io/canonical-revision"
APP_LABELS = ("app", "app.kubernetes.io/name")
"""The ``*_app`` label's sources, in order."""
VERSION_LABELS = ("version", "app.kubernetes.io/version")
"""The ``*_version`` label's sources, in order."""
CANONICAL_SERVICE_LABELS = (CANONICAL_NAME_LABEL, "app.kubernetes.io/name", "app")
"""Istio's order for the canonical service (then the workload name)."""
CANONICAL_REVISION_LABELS = (CANONICAL_REVISION_LABEL, "app.kubernetes.io/version", "version")
"""Istio's order for the canonical revision (then ``latest``)."""


class PeerMeta(NamedTuple):
    """One side of a connection as Istio's metrics label it."""

    workload: str
    namespace: str
    app: str
    version: str
    canonical_service: str
    canonical_revision: str
    cluster: str


UNKNOWN_PEER = PeerMeta(UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)
"""A peer the mesh does not know (a client outside it, a passthrough destination)."""


def _first(pod: Pod, keys: tuple[str, ...]) -> str:
    for k in keys:
        v = pod.labels.get(k)
        if v:
            return v
    return ""


def workload_name(pod: Pod) -> str:
    """The name of ``pod``'s workload, as Istio derives it (module docstring)."""
    labels = pod.labels
    name = pod.name
    override = labels.get(WORKLOAD_NAME_LABEL)
    if override:
        return override
    if pod.kind != "Pod":
        return name
    template = labels.get("pod-template-hash")
    if template:  # Deployment → ReplicaSet "<deployment>-<hash>" → pod "<rs>-<suffix>"
        cut = name.rfind(f"-{template}-")
        if cut > 0:
            return name[:cut]
        if name.endswith(f"-{template}"):
            return name[: -len(template) - 1]
        return name
    job = labels.get("job-name")
    if job:  # a CronJob's Job is "<cronjob>-<minutes since the epoch>"
        base, _, stamp = job.rpartition("-")
        return base if base and stamp.isdigit() and len(stamp) >= 8 else job
    if labels.get("controller-revision-hash"):
        if labels.get("statefulset.kubernetes.io/pod-name") == name:  # "<sts>-<ordinal>"
            base, _, ordinal = name.rpartition("-")
            return base if base and ordinal.isdigit() else name
        base, _, suffix = name.rpartition("-")  # a DaemonSet's "<ds>-<5 random>"
        return base if base and len(suffix) == 5 else name
    return name


def peer_meta(pod: Pod | None) -> PeerMeta:
    """``pod`` as Istio's labels name it: canonical service from
    ``service.istio.io/canonical-name``, else ``app.kubernetes.io/name``, else ``app``,
    else the workload name; canonical revision from
    ``service.istio.io/canonical-revision``, else ``app.kubernetes.io/version``, else
    ``version``, else ``latest``; app and version ``unknown`` when not labelled."""
    if pod is None:
        return UNKNOWN_PEER
    workload = workload_name(pod)
    app = _first(pod, APP_LABELS)
    version = _first(pod, VERSION_LABELS)
    return PeerMeta(
        workload=workload,
        namespace=pod.namespace,
        app=app or UNKNOWN,
        version=version or UNKNOWN,
        canonical_service=_first(pod, CANONICAL_SERVICE_LABELS) or workload,
        canonical_revision=_first(pod, CANONICAL_REVISION_LABELS) or "latest",
        cluster=CLUSTER_ID,
    )
