"""The client address an HBONE CONNECT claims (``forwarded: for=``): what the receiving
proxy accepts as one IP address, and what it refuses so that a peer cannot make its
address unknown to ``ipBlocks``; and the header the sending proxy writes."""

from __future__ import annotations

import pytest

from nodeagent.model import Labels, Pod
from nodeagent.proxy.inbound import _normal_ip, forwarded_for
from nodeagent.proxy.outbound import _headers


@pytest.mark.parametrize(
    ("value", "ip"),
    [
        ("for=10.0.0.1", "10.0.0.1"),
        ("For=10.0.0.1", "10.0.0.1"),
        ('for="10.0.0.1:4711"', "10.0.0.1"),
        ("proto=http;for=10.0.0.1;by=10.0.0.9", "10.0.0.1"),
        ('for="[2001:db8::1]"', "2001:db8::1"),
        ('for="[2001:DB8:0::1]:4711"', "2001:db8::1"),
        ("for=[2001:db8::1]", "2001:db8::1"),
        ("for=2001:db8::1", "2001:db8::1"),
        ("proto=http", None),
    ],
)
def test_one_ip_address_is_read(value: str, ip: str | None) -> None:
    assert forwarded_for({"forwarded": value}) == ip


def test_no_header_claims_nothing() -> None:
    assert forwarded_for({}) is None


@pytest.mark.parametrize(
    "value",
    [
        "for=not-an-ip",
        "for=unknown",
        'for="_hidden"',
        "for=",
        'for=""',
        "for=10.0.0.1, for=10.0.0.2",
        "for=10.0.0.1;for=10.0.0.2",
        "for=10.0.0.256",
        "for=10.0.0.1:http",
        'for="[2001:db8::1"',
        'for="[2001:db8::1]x"',
        "for=10.0.0.1/8",
        "for= 10.0.0.1 x",
    ],
)
def test_anything_else_is_an_error_naming_the_value(value: str) -> None:
    with pytest.raises(ValueError, match="forwarded"):
        forwarded_for({"forwarded": value})


def test_a_client_address_is_parsed_once_and_a_bad_one_refused_every_time() -> None:
    before = _normal_ip.cache_info()
    for _ in range(3):  # one client pod's connections: the same claim each time
        assert forwarded_for({"forwarded": 'for="10.9.8.7:4711"'}) == "10.9.8.7"
        with pytest.raises(ValueError, match="forwarded"):
            forwarded_for({"forwarded": "for=10.9.8.777"})
    after = _normal_ip.cache_info()
    assert after.misses - before.misses == 4  # the good one once, the bad one each time
    assert after.hits - before.hits == 2


def pod() -> Pod:
    return Pod(namespace="default", name="web", node_name="node1", service_account="web",
               labels=Labels.of({"app": "web"}), pod_ip="10.244.1.2")  # fmt: skip


@pytest.mark.parametrize("ip", ["10.244.1.2", "2001:db8::7"])
def test_what_the_sender_writes_the_receiver_reads(ip: str) -> None:
    assert forwarded_for(_headers(pod(), ip)) == ip


@pytest.mark.parametrize("ip", ["", "?"])
def test_an_unknown_client_address_is_not_claimed(ip: str) -> None:
    assert "forwarded" not in _headers(pod(), ip)
