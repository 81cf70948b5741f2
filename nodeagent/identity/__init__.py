"""Workload identity: the mesh CA, certificate signing requests, the per-agent certificate
store with rotation, and the TLS contexts built from them.

The defaults below are shared by the CA, its client and the CLI; they live here, with no
imports, so that ``nodeagent --help`` does not load gRPC or the Kubernetes client.
"""

DEFAULT_SERVING_NAMES = (
    "nodeagent-ca.nodeagent-system.svc",
    "nodeagent-ca.nodeagent-system.svc.cluster.local",
)
"""The DNS names of the CA's serving certificate: the manifests' Service ``nodeagent-ca``
in the namespace ``nodeagent-system``."""
DEFAULT_AUDIENCE = "nodeagent-ca"
"""The audience of the agents' projected ServiceAccount tokens."""
DEFAULT_AGENT_SERVICE_ACCOUNT = "nodeagent-system/nodeagent"
"""The ServiceAccount the agents (the DaemonSet) run as: NAMESPACE/NAME."""
