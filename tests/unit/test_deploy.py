"""The cluster install in ``deploy/daemonset/``: every manifest is valid Kubernetes (1.30
and 1.33 schemas, strict), the kustomization installs every file, every container's command
line parses with nodeagent's own parser, every path the agent uses is mounted, the
ClusterRoles grant exactly what is watched, and the LocalRateLimit CRD has the shape the
agent accepts."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from nodeagent.cli import build_parser
from nodeagent.config import AgentSettings
from nodeagent.control import ratelimit
from nodeagent.control.registry import KINDS
from nodeagent.control.schema import INT, STR, ListOf, MapOf, Obj, Scalar, Shape

ROOT = Path(__file__).resolve().parents[2]
DIR = ROOT / "deploy" / "daemonset"
KUBE_VERSIONS = ("1.30", "1.33")
NAMESPACE = "nodeagent-system"

# Command lines whose flags are not on main yet: the test turns red when the flag lands,
# and the marker must go.
NOT_ON_MAIN: dict[str, str] = {}


def kustomization() -> dict[str, Any]:
    doc = yaml.safe_load((DIR / "kustomization.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def manifest_files() -> list[Path]:
    return [DIR / r for r in kustomization()["resources"]]


def documents() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (f, d) for f in manifest_files() for d in yaml.safe_load_all(f.read_text()) if d
    ]


def find(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [
        d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name
    ]
    return doc


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    spec = find(kind, name)["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def workload_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(id "Kind/name/container", pod spec, container) of every container installed."""
    out = []
    for _, d in documents():
        if d["kind"] in ("DaemonSet", "Deployment"):
            spec = d["spec"]["template"]["spec"]
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                out.append((f"{d['kind']}/{d['metadata']['name']}/{c['name']}", spec, c))
    return out


def command_line(c: dict[str, Any]) -> list[str]:
    argv = [*c.get("command", []), *c.get("args", [])]
    assert argv[0] == "nodeagent", argv
    return argv[1:]


def all_flags(argv: list[str]) -> dict[str, list[str]]:
    """Each ``--name=value`` and ``--name value``, without the parser (whose flags may
    not all be on main yet)."""
    out: dict[str, list[str]] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            out.setdefault(name, []).append(
                value if eq else argv[i + 1] if i + 1 < len(argv) else ""
            )
    return out


def flags(argv: list[str]) -> dict[str, str]:
    """Each flag's last value."""
    return {k: v[-1] for k, v in all_flags(argv).items()}


def container(wid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    ((spec, c),) = [(s, c) for i, s, c in workload_containers() if i == wid]
    return spec, c


def mounted_volume(spec: dict[str, Any], c: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume of ``c`` that ``path`` lies in (the deepest mount)."""
    mounts = [
        m for m in c.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is not mounted in {c['name']}"
    m = max(mounts, key=lambda m: len(m["mountPath"]))
    (vol,) = [v for v in spec["volumes"] if v["name"] == m["name"]]
    assert isinstance(vol, dict)
    return vol


# --- schemas and the kustomization ------------------------------------------------------


def test_the_kustomization_installs_every_manifest_in_the_directory() -> None:
    k = kustomization()
    assert k["kind"] == "Kustomization"
    listed = set(k["resources"])
    present = {p.name for p in DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert {d["kind"] for _, d in documents()} >= {
        "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
        "CustomResourceDefinition", "Deployment", "Service", "DaemonSet",
    }
    for _, d in documents():  # everything namespaced lives in the one namespace
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding",
                             "CustomResourceDefinition"):
            # but the right to read Istio's MeshConfig, which lives in the root namespace
            root = d["metadata"]["name"] == "nodeagent-meshconfig"
            want = "istio-system" if root else NAMESPACE
            assert d["metadata"]["namespace"] == want, d["metadata"]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", [p.name for p in manifest_files()])
def test_every_manifest_is_valid_kubernetes(name: str, version: str) -> None:
    docs = [d for d in yaml.safe_load_all((DIR / name).read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_rejects_a_misspelled_field() -> None:
    doc = copy.deepcopy(find("DaemonSet", "nodeagent"))
    doc["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_output_is_valid_kubernetes() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(DIR)], capture_output=True, text=True, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert len(docs) == len(documents())
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


# --- command lines ----------------------------------------------------------------------


def _command_params() -> list[Any]:
    out = []
    for wid, _, _ in workload_containers():
        marks = []
        if wid in NOT_ON_MAIN:
            reason = f"not on main yet: {NOT_ON_MAIN[wid]}"
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        out.append(pytest.param(wid, id=wid, marks=marks))
    return out


@pytest.mark.parametrize("wid", _command_params())
def test_every_command_line_parses_with_nodeagents_parser(wid: str) -> None:
    _, c = container(wid)
    argv = command_line(c)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"{wid}: nodeagent {' '.join(argv)} does not parse") from e
    if argv[0] == "run":
        assert args.node == "$(NODE_NAME)" and args.source == "kubernetes"


def test_every_variable_a_command_line_uses_is_set() -> None:
    for wid, _, c in workload_containers():
        env = {e["name"] for e in c.get("env", [])}
        for var in re.findall(r"\$\((\w+)\)", " ".join(command_line(c))):
            assert var in env, f"{wid} uses $({var}) but does not set it"
    (node,) = [e for e in container("DaemonSet/nodeagent/nodeagent")[1]["env"]
               if e["name"] == "NODE_NAME"]
    assert node["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


# --- the agent's DaemonSet --------------------------------------------------------------


def test_every_path_the_agent_uses_is_mounted_from_the_host() -> None:
    spec, c = container("DaemonSet/nodeagent/nodeagent")
    assert spec["hostNetwork"] is True and c["securityContext"]["privileged"] is True
    f = flags(command_line(c))
    for path in (f["--bpf-pin-dir"], f["--state-dir"], f["--socket"], f["--pods"],
                 "/sys/fs/cgroup", "/lib/modules", "/usr/src", "/var/run/netns"):
        assert "hostPath" in mounted_volume(spec, c, path), path
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"  # pins outlive us
    assert mounts["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    assert mounted_volume(spec, c, f["--trust-bundle"])["configMap"]["name"]


def test_the_agent_asks_the_ca_service_with_a_token_for_the_cas_audience() -> None:
    spec, agent = container("DaemonSet/nodeagent/nodeagent")
    _, ca = container("Deployment/nodeagent-ca/ca")
    fa, fc = flags(command_line(agent)), flags(command_line(ca))
    svc = find("Service", "nodeagent-ca")
    (port,) = svc["spec"]["ports"]
    assert fa["--ca-addr"] == f"nodeagent-ca.{NAMESPACE}.svc:{port['port']}"
    assert fc["--listen"].rsplit(":", 1)[1] == str(port["targetPort"])
    assert svc["spec"]["selector"].items() <= find(
        "Deployment", "nodeagent-ca")["spec"]["template"]["metadata"]["labels"].items()
    token = mounted_volume(spec, agent, fa["--ca-token-file"])
    (src,) = token["projected"]["sources"]
    assert src["serviceAccountToken"]["audience"] == fc["--audience"] == "nodeagent-ca"
    assert fa["--ca-token-file"].endswith("/" + src["serviceAccountToken"]["path"])
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"  # the Service name resolves
    # The CA's own certificate names the host the agents dial; it serves the agents' account.
    assert fa["--ca-addr"].rsplit(":", 1)[0] in all_flags(command_line(ca))["--tls-name"]
    assert fc["--agent-service-account"] == f"{NAMESPACE}/{spec['serviceAccountName']}"


def test_the_ca_pod_is_never_captured() -> None:
    labels = find("Deployment", "nodeagent-ca")["spec"]["template"]["metadata"]["labels"]
    assert labels["istio.io/dataplane-mode"] == "none"


def test_the_cni_installer_writes_to_the_hosts_cni_directories() -> None:
    spec, c = container("DaemonSet/nodeagent/install-cni")
    assert [i["name"] for i in spec["initContainers"]] == ["install-cni"]
    f = flags(command_line(c))
    assert mounted_volume(spec, c, f["--bin-dir"])["hostPath"]["path"] == "/opt/cni/bin"
    assert mounted_volume(spec, c, f["--conf-dir"])["hostPath"]["path"] == "/etc/cni/net.d"
    agent_spec, agent_c = container("DaemonSet/nodeagent/nodeagent")
    agent = flags(command_line(agent_c))
    assert f["--socket"] == agent["--socket"]
    assert f["--agent-pid-file"] == agent["--pid-file"]
    # the launcher runs the image's interpreter inside the agent's mount namespace
    venv = re.search(r"ENV PATH=(/\S+?)/bin:", (DIR / "Containerfile").read_text())
    assert venv and f["--python"] == f"{venv[1]}/bin/python"
    # The launcher on the node reads the pid file at the host's path, and the plugin finds
    # the socket in the agent's mounts: both paths are the same on the host and inside.
    for path in (agent["--socket"], agent["--pid-file"]):
        host = mounted_volume(agent_spec, agent_c, path)["hostPath"]["path"]
        assert path.startswith(host + "/"), path
    assert agent_spec["hostPID"] is True  # the pid the launcher enters is the host's


def test_readiness_is_the_agents_ready_endpoint() -> None:
    _, c = container("DaemonSet/nodeagent/nodeagent")
    probe = c["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz/ready", AgentSettings.ready_port)


def test_the_documented_checks_reach_the_agents_socket() -> None:
    socket = flags(command_line(container("DaemonSet/nodeagent/nodeagent")[1]))["--socket"]
    for doc in (DIR / "README.md", ROOT / "docs" / "kubernetes.md"):
        found = re.findall(r"kubectl -n (\S+) exec ds/nodeagent -- (nodeagent ctl [^`#\n]+)",
                           doc.read_text())
        commands = set()
        for namespace, cmd in found:
            args = build_parser().parse_args(cmd.split()[1:])
            assert namespace == NAMESPACE and args.socket == socket, (doc, cmd)
            commands.add(args.ctl_command)
        assert "status" in commands, doc


def test_the_documented_cni_uninstall_undoes_the_init_containers_install() -> None:
    text = (ROOT / "docs" / "kubernetes.md").read_text().replace("\\\n", " ")
    (cmd,) = re.findall(r"-- nodeagent (cni install --uninstall[^\n]+)", text)
    args = build_parser().parse_args(cmd.split())
    install = flags(command_line(container("DaemonSet/nodeagent/install-cni")[1]))
    assert args.uninstall is True
    assert (args.bin_dir, args.conf_dir) == (install["--bin-dir"], install["--conf-dir"])
    spec, agent = container("DaemonSet/nodeagent/nodeagent")
    for path in (args.bin_dir, args.conf_dir):
        assert "hostPath" in mounted_volume(spec, agent, path)


# --- RBAC -------------------------------------------------------------------------------


def _grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no names, no URLs
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                out.setdefault((g, r), set()).update(rule["verbs"])
    return out


def _plural(kind: str) -> str:
    k = kind.lower()
    return k[:-1] + "ies" if k.endswith("y") else k + "s"


def test_the_agent_may_only_read_what_it_watches() -> None:
    grants = _grants(find("ClusterRole", "nodeagent"))
    served = {(k.api_versions[0].rpartition("/")[0], _plural(k.kind)) for k in KINDS}
    served.discard(("", "configmaps"))  # only Istio's, in the root namespace: below
    watched = served | {("discovery.k8s.io", "endpointslices"), ("", "namespaces")}
    assert set(grants) == watched
    for verbs in grants.values():
        assert verbs == {"get", "list", "watch"}


def test_the_agent_may_read_one_configmap_istios_meshconfig() -> None:
    role = find("Role", "nodeagent-meshconfig")
    assert role["metadata"]["namespace"] == "istio-system"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["istio"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = find("RoleBinding", "nodeagent-meshconfig")
    assert binding["roleRef"]["name"] == "nodeagent-meshconfig"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "nodeagent", "namespace": "nodeagent-system"}
    ]
    assert find("Namespace", "istio-system")


def test_the_ca_may_only_review_tokens_and_see_pods_and_workload_entries() -> None:
    assert _grants(find("ClusterRole", "nodeagent-ca")) == {
        ("authentication.k8s.io", "tokenreviews"): {"create"},
        ("", "pods"): {"list"},  # the pods of the asking node, listed (and kept 5 s)
        # the entries naming the asking node (nodeagent.io/node): a VM's identity
        ("networking.istio.io", "workloadentries"): {"get", "list", "watch"},
    }


def test_each_workload_runs_as_the_account_its_role_is_bound_to() -> None:
    for kind, name in (("DaemonSet", "nodeagent"), ("Deployment", "nodeagent-ca")):
        account = pod_spec(kind, name)["serviceAccountName"]
        find("ServiceAccount", account)
        binding = find("ClusterRoleBinding", account)
        assert binding["roleRef"]["name"] == account
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ]


# --- the LocalRateLimit CRD -------------------------------------------------------------


def _from_shape(shape: Shape) -> Any:
    if isinstance(shape, Obj):
        props = {k: _from_shape(v) for k, v in shape.fields.items()}
        return ("object", props, sorted(shape.required))
    if isinstance(shape, ListOf):
        return ("array", _from_shape(shape.item))
    if isinstance(shape, MapOf):
        return ("map", _from_shape(shape.value))
    assert isinstance(shape, Scalar) and shape in (STR, INT), shape
    return shape.name


def _from_crd(schema: dict[str, Any]) -> Any:
    t = schema["type"]
    if t == "object" and "additionalProperties" in schema:
        return ("map", _from_crd(schema["additionalProperties"]))
    if t == "object":
        props = {k: _from_crd(v) for k, v in schema.get("properties", {}).items()}
        return ("object", props, sorted(schema.get("required", [])))
    if t == "array":
        return ("array", _from_crd(schema["items"]))
    return t


def crd() -> dict[str, Any]:
    return find("CustomResourceDefinition", "localratelimits.nodeagent.io")


def crd_schema() -> dict[str, Any]:
    (version,) = crd()["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    assert isinstance(schema, dict)
    return schema


def test_the_crd_serves_the_kind_the_agent_reads() -> None:
    spec = crd()["spec"]
    (version,) = spec["versions"]
    assert f"{spec['group']}/{version['name']}" == ratelimit.API_VERSION
    assert spec["names"]["kind"] == ratelimit.LOCAL_RATE_LIMIT_KIND.kind
    assert spec["names"]["plural"] == _plural(spec["names"]["kind"])
    assert spec["scope"] == "Namespaced" and version["served"] and version["storage"]


def test_the_crd_schema_has_the_shape_the_agent_accepts() -> None:
    ours = ratelimit.LOCAL_RATE_LIMIT.fields["spec"]
    assert _from_crd(crd_schema()["properties"]["spec"]) == _from_shape(ours)


def test_the_documented_rate_limits_are_accepted_by_the_crd() -> None:
    texts = [(ROOT / "docs" / "policy.md").read_text(),
             *(p.read_text() for p in (ROOT / "examples").rglob("*.yaml"))]
    blocks = [b for t in texts for b in re.findall(r"```yaml\n(.*?)```", t, re.S) or [t]]
    objs = [d for b in blocks for d in yaml.safe_load_all(b)
            if isinstance(d, dict) and d.get("kind") == "LocalRateLimit"]
    assert objs
    check = jsonschema.Draft7Validator(crd_schema())
    for obj in objs:
        check.validate(obj)
    bad = copy.deepcopy(objs[0])
    bad["spec"]["quotas"] = [{"window": "week", "limit": 1}]
    assert not check.is_valid(bad)


# --- upgrades ---------------------------------------------------------------------------


def test_a_rolling_update_starts_the_new_agent_before_the_old_one_stops() -> None:
    ds = find("DaemonSet", "nodeagent")
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    spec, _ = container("DaemonSet/nodeagent/nodeagent")
    # on hostNetwork a declared port is a host port: the surge pod would never schedule
    assert spec["hostNetwork"] is True
    assert all("ports" not in x for x in [*spec.get("initContainers", []), *spec["containers"]])


def test_both_agents_of_an_upgrade_meet_at_the_hand_over_socket_on_the_host() -> None:
    spec, c = container("DaemonSet/nodeagent/nodeagent")
    args = build_parser().parse_args(command_line(c))
    settings = AgentSettings.from_args(args)
    assert settings.handover
    vol = mounted_volume(spec, c, str(settings.handover_path))
    assert vol["hostPath"]["type"] == "DirectoryOrCreate"  # both pods see the same file
    # a container that exited after handing over would be restarted and take over back
    assert settings.after_handover == "wait"
    # the old pod's SIGTERM comes during its drain: the grace period covers the drain
    assert spec["terminationGracePeriodSeconds"] > settings.drain_seconds
