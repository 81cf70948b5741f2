"""``original_dst``: the destination a captured connection was redirected from, read on
the socket's file descriptor (no privileges: a plain loopback connection was not
redirected)."""

from __future__ import annotations

import socket

import pytest

from nodeagent.redirect.sockets import original_dst


def test_a_connection_that_was_not_redirected_has_no_original_destination() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            assert original_dst(accepted) is None
            assert original_dst(client) is None


def test_a_closed_socket_is_an_error_not_a_missing_destination() -> None:
    s = socket.socket()
    s.close()
    with pytest.raises(OSError) as e:
        original_dst(s)
    assert e.value.errno is not None and e.value.strerror
