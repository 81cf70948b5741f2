"""The CNI protocol as ``nodeagent-cni`` speaks it: environment, network config, results
and error objects, and the plugin's answers when no agent is there to ask."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cni import plugin, spec
from nodeagent.cni.spec import CniError

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
        {"name": "veth1", "mac": "aa:bb:cc:dd:ee:02"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/var/run/netns/p"},
    ],
    "ips": [
        {"address": "fd00::5/64", "interface": 2},
        {"address": "10.1.0.1/24", "interface": 0},
        {"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 2},
    ],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}

POD_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc123",
    "CNI_NETNS": "/var/run/netns/p",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_UID=u-1",
}


def conf(version: str = "1.0.0", **extra: Any) -> bytes:
    doc = {"cniVersion": version, "name": "k8s", "type": "nodeagent-cni", **extra}
    return json.dumps(doc).encode()


def test_the_environment_is_read_as_the_spec_names_it() -> None:
    env = spec.parse_env(POD_ENV)
    assert (env.command, env.container_id, env.netns, env.ifname) == (
        "ADD",
        "abc123",
        "/var/run/netns/p",
        "eth0",
    )
    assert env.path == ("/opt/cni/bin", "/usr/lib/cni")
    assert env.pod == ("shop", "cart-1", "u-1")
    assert spec.parse_env({**POD_ENV, "CNI_ARGS": "IgnoreUnknown=1"}).pod is None


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({}, "CNI_COMMAND is not set"),
        ({"CNI_COMMAND": "UPDATE"}, "'UPDATE' is not one of"),
        ({**POD_ENV, "CNI_NETNS": ""}, "ADD needs CNI_NETNS"),
        ({**POD_ENV, "CNI_COMMAND": "DEL", "CNI_CONTAINERID": ""}, "DEL needs CNI_CONTAINERID"),
        ({**POD_ENV, "CNI_ARGS": "K8S_POD_NAME"}, "'K8S_POD_NAME' is not KEY=VALUE"),
    ],
)
def test_a_bad_environment_is_error_4(environ: dict[str, str], says: str) -> None:
    with pytest.raises(CniError) as e:
        spec.parse_env(environ)
    assert e.value.code == spec.INVALID_ENV and says in e.value.msg


def test_del_needs_no_netns() -> None:
    env = spec.parse_env({**POD_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""})
    assert env.command == "DEL" and env.netns == ""


def test_the_network_config_with_our_keys() -> None:
    c = spec.parse_netconf(conf("0.4.0", socket="/s.sock", timeout=3, log_level="DEBUG"))
    assert (c.cni_version, c.name, c.socket, c.timeout, c.log_level) == (
        "0.4.0",
        "k8s",
        "/s.sock",
        3.0,
        "debug",
    )
    defaults = spec.parse_netconf(conf())
    assert (defaults.socket, defaults.timeout, defaults.prev_result) == (
        spec.DEFAULT_SOCKET,
        spec.DEFAULT_TIMEOUT,
        None,
    )


@pytest.mark.parametrize(
    ("data", "code", "says"),
    [
        (b"{not json", spec.DECODE_FAILURE, "not JSON"),
        (b"[]", spec.DECODE_FAILURE, "not a JSON object"),
        (json.dumps({"name": "x"}).encode(), spec.INVALID_CONFIG, "no cniVersion"),
        (conf("0.2.0"), spec.INCOMPATIBLE_VERSION, "cniVersion 0.2.0 is not supported"),
        (conf(timeout="soon"), spec.INVALID_CONFIG, "'timeout' has the wrong type"),
        (conf(timeout=0), spec.INVALID_CONFIG, "'timeout' must be > 0"),
        (conf(socket=True), spec.INVALID_CONFIG, "'socket' has the wrong type"),
        (conf(log_level="loud"), spec.INVALID_CONFIG, "'log_level' 'loud' is not one of"),
        (conf(prevResult=[1]), spec.INVALID_CONFIG, "'prevResult' is not an object"),
    ],
)
def test_a_bad_network_config_names_what_is_wrong(data: bytes, code: int, says: str) -> None:
    with pytest.raises(CniError) as e:
        spec.parse_netconf(data)
    assert e.value.code == code and says in e.value.msg


def test_version_answers_in_the_asked_version() -> None:
    assert spec.version_result("0.3.1") == {
        "cniVersion": "0.3.1",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
    }
    assert spec.version_result("9.9.9")["cniVersion"] == "1.0.0"


def test_add_passes_prev_result_on_in_the_config_version() -> None:
    c = spec.parse_netconf(conf("0.4.0", prevResult={**PREV, "cniVersion": "0.4.0"}))
    assert spec.passed_on(c) == {**PREV, "cniVersion": "0.4.0"}


def test_pod_ips_are_the_sandbox_interface_ones_ipv4_first() -> None:
    assert spec.pod_ips(PREV, "eth0") == ("10.1.0.5", "fd00::5", "10.1.0.1")
    assert spec.pod_ips({"ips": [{"address": "10.2.0.9/16"}]}) == ("10.2.0.9",)
    assert spec.pod_ips(None) == ()


def test_an_error_object_as_the_spec_shapes_it() -> None:
    err = CniError(spec.TRY_AGAIN_LATER, "agent down", "no such socket")
    assert err.to_json("0.4.0") == {
        "cniVersion": "0.4.0",
        "code": 11,
        "msg": "agent down",
        "details": "no such socket",
    }
    assert "details" not in CniError(7, "bad").to_json("1.0.0")


def call(environ: dict[str, str], data: bytes) -> tuple[int, dict[str, Any] | None]:
    out = io.StringIO()
    rc = plugin.main(environ, io.BytesIO(data), out)
    text = out.getvalue().strip()
    return rc, json.loads(text) if text else None


def test_add_without_an_agent_fails_naming_the_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "agent.sock")
    rc, out = call(POD_ENV, conf(socket=sock, prevResult=PREV))
    assert rc == 1 and out is not None
    assert out["code"] == spec.TRY_AGAIN_LATER and out["cniVersion"] == "1.0.0"
    assert sock in out["msg"] and "ADD shop/cart-1" in out["msg"]
    assert "no such socket" in out["details"]


def test_del_without_an_agent_succeeds(tmp_path: Path) -> None:
    environ = {**POD_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}
    assert call(environ, conf(socket=str(tmp_path / "a.sock"))) == (0, None)


@pytest.mark.parametrize(
    ("environ", "data", "code"),
    [
        (POD_ENV, conf(), spec.INVALID_CONFIG),  # chained only: no prevResult
        ({**POD_ENV, "CNI_COMMAND": "CHECK"}, conf("0.3.1", prevResult=PREV), 1),
        ({**POD_ENV, "CNI_COMMAND": "STATUS"}, conf(socket="/nonexistent.sock"), 50),
        ({"CNI_COMMAND": "NOPE"}, conf(), spec.INVALID_ENV),
        (POD_ENV, b"{", spec.DECODE_FAILURE),
    ],
)
def test_plugin_errors_are_json_on_stdout(environ: dict[str, str], data: bytes, code: int) -> None:
    rc, out = call(environ, data)
    assert rc == 1 and out is not None and out["code"] == code, out


def test_a_pod_that_is_not_kubernetes_is_passed_through() -> None:
    environ = {**POD_ENV, "CNI_ARGS": ""}
    rc, out = call(environ, conf("0.4.0", prevResult={**PREV, "cniVersion": "0.4.0"}))
    assert rc == 0 and out == {**PREV, "cniVersion": "0.4.0"}


def test_gc_has_nothing_to_collect() -> None:
    assert call({"CNI_COMMAND": "GC"}, conf()) == (0, None)


def test_the_pod_cgroup_is_found_by_uid(tmp_path: Path) -> None:
    systemd = tmp_path / "kubepods.slice" / "kubepods-burstable.slice"
    (systemd / "kubepods-burstable-pod12ab_34cd.slice" / "cri-containerd-x.scope").mkdir(
        parents=True
    )
    (tmp_path / "kubepods" / "besteffort" / "pod56ef-78ab").mkdir(parents=True)
    assert plugin.find_cgroup("12ab-34cd", str(tmp_path)) == str(
        systemd / "kubepods-burstable-pod12ab_34cd.slice"
    )
    assert plugin.find_cgroup("56ef-78ab", str(tmp_path)).endswith("besteffort/pod56ef-78ab")
    assert plugin.find_cgroup("nope", str(tmp_path)) == ""
    assert plugin.find_cgroup("", str(tmp_path)) == ""
