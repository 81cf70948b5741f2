"""The fields of Kubernetes' own v1 types that the mesh accepts and ignores: each is
allowed by the API and changes nothing the mesh does for a Pod or a Service (metadata the
API server fills in is ``schema.SERVER_METADATA``). Declared once here, used by the
shapes of ``control.objects``; a unit test checks them against the Kubernetes 1.37 API
types of lightkube-models, so that nothing ``kubectl get -o yaml`` prints is unknown.
"""

from __future__ import annotations

POD_SPEC_IGNORED = frozenset(
    {
        "activeDeadlineSeconds",
        "affinity",
        "automountServiceAccountToken",
        "dnsConfig",
        "dnsPolicy",
        "enableServiceLinks",
        "ephemeralContainers",
        "evictionResponders",
        "hostAliases",
        "hostIPC",
        "hostPID",
        "hostUsers",
        "hostnameOverride",
        "imagePullSecrets",
        "initContainers",
        "nodeSelector",
        "os",
        "overhead",
        "preemptionPolicy",
        "priority",
        "priorityClassName",
        "readinessGates",
        "resourceClaims",
        "resources",
        "restartPolicy",
        "runtimeClassName",
        "schedulerName",
        "schedulingGates",
        "schedulingGroup",
        "securityContext",
        "setHostnameAsFQDN",
        "shareProcessNamespace",
        "terminationGracePeriodSeconds",
        "tolerations",
        "topologySpreadConstraints",
        "volumes",
    }
)
"""``v1 PodSpec`` fields that do not change what the mesh does for the pod."""

CONTAINER_IGNORED = frozenset(
    {
        "envFrom",
        "imagePullPolicy",
        "lifecycle",
        "livenessProbe",
        "readinessProbe",
        "resizePolicy",
        "resources",
        "restartPolicy",
        "restartPolicyRules",
        "securityContext",
        "startupProbe",
        "stdin",
        "stdinOnce",
        "terminationMessagePath",
        "terminationMessagePolicy",
        "tty",
        "volumeDevices",
        "volumeMounts",
        "workingDir",
    }
)
"""``v1 Container`` fields that do not change what the mesh does for the pod."""

POD_STATUS_IGNORED = frozenset(
    {
        "allocatedResources",
        "conditions",
        "containerStatuses",
        "ephemeralContainerStatuses",
        "extendedResourceClaimStatus",
        "hostIP",
        "hostIPs",
        "initContainerStatuses",
        "message",
        "nodeAllocatableResourceClaimStatuses",
        "nominatedNodeName",
        "observedGeneration",
        "podIPs",
        "qosClass",
        "reason",
        "resize",
        "resourceClaimStatuses",
        "resources",
        "startTime",
        "volumeHealth",
    }
)
"""``v1 PodStatus`` fields the agent leaves to kubelet (it reads ``podIP`` and ``phase``)."""

SERVICE_SPEC_IGNORED = frozenset(
    {
        "allocateLoadBalancerNodePorts",
        "clusterIPs",
        "externalIPs",
        "externalName",
        "externalTrafficPolicy",
        "healthCheckNodePort",
        "internalTrafficPolicy",
        "ipFamilies",
        "ipFamilyPolicy",
        "loadBalancerClass",
        "loadBalancerIP",
        "loadBalancerSourceRanges",
        "publishNotReadyAddresses",
        "sessionAffinity",
        "sessionAffinityConfig",
        "trafficDistribution",
    }
)
"""``v1 ServiceSpec`` fields about traffic from outside the cluster, or that the mesh
decides itself (affinity: DestinationRule's consistent hash)."""

NODE_SPEC_IGNORED = frozenset(
    {
        "configSource",
        "externalID",
        "podCIDR",
        "podCIDRs",
        "podPreemptionPolicy",
        "providerID",
        "taints",
        "unschedulable",
    }
)
