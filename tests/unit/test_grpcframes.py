"""Counting gRPC messages across arbitrary DATA chunk boundaries."""

from __future__ import annotations

from nodeagent.protocol.grpcframes import GrpcMessages


def message(n: int) -> bytes:
    return b"\x00" + n.to_bytes(4, "big") + b"x" * n


def test_messages_are_counted_however_the_stream_is_cut() -> None:
    stream = b"".join(message(n) for n in (0, 3, 70000, 1, 0, 5))
    for size in (1, 2, 4, 5, 7, 1000, len(stream)):
        m = GrpcMessages()
        for i in range(0, len(stream), size):
            m.feed(stream[i : i + size])
        assert m.count == 6, size


def test_a_message_counts_once_its_prefix_has_arrived() -> None:
    m = GrpcMessages()
    m.feed(message(10)[:4])
    assert m.count == 0
    m.feed(message(10)[4:6])
    assert m.count == 1


def test_a_grpc_status_label_is_a_code_or_unknown() -> None:
    from nodeagent.proxy.l7h2 import _grpc_status

    assert [_grpc_status(v, "") for v in ("0", "14", None, "140", "OK", "1; x")] == [
        "0", "14", "", "unknown", "unknown", "unknown"]
