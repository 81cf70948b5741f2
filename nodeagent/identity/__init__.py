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
VM_DIR = "/etc/nodeagent"
"""Where a VM keeps what ``nodeagent vm join`` writes (``nodeagent.service`` reads
``nodeagent.env`` there)."""
VM_ENTRY_FILE = "workloadentry.yaml"
VM_TOKEN_FILE = "token"
VM_ROOT_CERT_FILE = "root-cert.pem"
VM_ENV_FILE = "nodeagent.env"
