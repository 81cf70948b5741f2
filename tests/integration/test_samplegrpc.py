"""The sample app's gRPC echo service (``nodeagent.samples.samplegrpc``) on loopback.

The four call kinds, metadata echo and ``fail_code`` against an in-process server; the
service inside ``nodeagent sample-app --grpc-port`` as a real process; and the
``python -m nodeagent.samples.samplegrpc client`` command as a subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodeagent.samples import sample_pb2 as pb
from nodeagent.samples import samplegrpc
from nodeagent.samples.common import AppSettings, ServedCounter, pattern_bytes

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"^listening (http|tcp-echo|grpc) (\S+):(\d+)", re.MULTILINE)

pytestmark = pytest.mark.timeout(120)

SETTINGS = AppSettings(
    pod="echo-v2-7d9f", namespace="shop", node="node2", service="echo", version="v2"
)


@pytest.fixture
def target() -> Iterator[str]:
    """An in-process Echo server on an ephemeral loopback port."""
    server = samplegrpc.start_server("127.0.0.1", 0, SETTINGS, ServedCounter())
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace=0)


def rpc_error(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.Call:
    e = excinfo.value
    assert isinstance(e, grpc.Call)
    return e


# --------------------------------------------------------------------------- the four calls


def test_unary_names_the_pod_and_echoes_metadata(target: str) -> None:
    metadata = [("x-test", "hello"), ("x-multi", "a"), ("x-multi", "b"), ("x-id-bin", b"\x00\x01")]
    reply = samplegrpc.call_unary(target, "héllo", metadata, payload=b"\x00\xff" * 10)
    assert (reply.pod, reply.namespace, reply.node) == ("echo-v2-7d9f", "shop", "node2")
    assert (reply.service, reply.version, reply.method) == ("echo", "v2", "Unary")
    assert (reply.text, reply.sequence, reply.count) == ("héllo", 1, 1)
    assert reply.payload == b"\x00\xff" * 10
    assert reply.bytes == len("héllo".encode()) + 20
    assert reply.metadata["x-test"] == "hello"
    assert reply.metadata["x-multi"] == "a, b"
    assert base64.b64decode(reply.metadata["x-id-bin"]) == b"\x00\x01"
    assert "user-agent" in reply.metadata
    # A mapping works too, and every call counts once.
    again = samplegrpc.call_unary(target, metadata={"k": "v"})
    assert again.metadata["k"] == "v"
    assert again.served == reply.served + 1


def test_unary_large_payload_arrives_intact(target: str) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    reply = samplegrpc.call_unary(target, payload=payload)
    assert hashlib.sha256(reply.payload).digest() == hashlib.sha256(payload).digest()


def test_server_stream_sends_count_replies(target: str) -> None:
    replies = samplegrpc.call_server_stream(target, "tick", 5, {"x-test": "s"})
    assert [r.sequence for r in replies] == [1, 2, 3, 4, 5]
    assert {(r.method, r.text, r.metadata["x-test"]) for r in replies} == {
        ("ServerStream", "tick", "s")
    }
    assert len({r.served for r in replies}) == 1  # one call, counted once
    assert samplegrpc.call_server_stream(target, "none", 0) == []


def test_client_stream_aggregates_count_and_bytes(target: str) -> None:
    requests: list[str | pb.EchoRequest] = ["a", "bb", pb.EchoRequest(text="ccc", payload=b"1234")]
    reply = samplegrpc.call_client_stream(target, requests, {"x-test": "c"})
    assert (reply.method, reply.count, reply.bytes, reply.text) == ("ClientStream", 3, 10, "ccc")
    assert (reply.sequence, reply.metadata["x-test"]) == (1, "c")
    empty = samplegrpc.call_client_stream(target, [])
    assert (empty.count, empty.bytes) == (0, 0)


def test_bidi_echoes_each_message_before_the_next_is_sent(target: str) -> None:
    with samplegrpc.BidiSession(target, {"x-test": "b"}) as bidi:
        for i in range(1, 6):
            bidi.send(f"m{i}")
            reply = bidi.recv()  # answered while the call stays open for more
            assert (reply.method, reply.text, reply.sequence) == ("Bidi", f"m{i}", i)
            assert reply.metadata["x-test"] == "b"
        bidi.send(pb.EchoRequest(text="big", payload=b"p" * 100_000))
        assert bidi.recv().payload == b"p" * 100_000
        bidi.close_send()
        with pytest.raises(EOFError):
            bidi.recv()


def test_bidi_streamed_all_at_once(target: str) -> None:
    replies = samplegrpc.call_bidi(target, [f"t{i}" for i in range(50)])
    assert [r.text for r in replies] == [f"t{i}" for i in range(50)]
    assert [r.sequence for r in replies] == list(range(1, 51))


# --------------------------------------------------------------------------- fail_code


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL]
)
def test_unary_fail_code(target: str, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        samplegrpc.call_unary(target, "x", fail_code=code.value[0])
    e = rpc_error(excinfo)
    assert e.code() == code
    assert "echo-v2-7d9f" in (e.details() or "")  # says which endpoint failed


def test_fail_code_out_of_range_is_invalid(target: str) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        samplegrpc.call_unary(target, fail_code=17)
    assert rpc_error(excinfo).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_server_stream_fails_after_its_replies(target: str) -> None:
    request = pb.EchoRequest(text="s", count=2, fail_code=14)
    got: list[int] = []
    with pytest.raises(grpc.RpcError) as excinfo:
        for reply in samplegrpc.iter_server_stream(target, request):
            got.append(reply.sequence)
    assert got == [1, 2]
    assert rpc_error(excinfo).code() == grpc.StatusCode.UNAVAILABLE


def test_client_stream_fail_code(target: str) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        samplegrpc.call_client_stream(target, ["a", pb.EchoRequest(fail_code=8), "c"])
    assert rpc_error(excinfo).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bidi_fail_code_after_earlier_echoes(target: str) -> None:
    with samplegrpc.BidiSession(target) as bidi:
        bidi.send("ok")
        assert bidi.recv().text == "ok"
        bidi.send(pb.EchoRequest(text="boom", fail_code=14))
        with pytest.raises(grpc.RpcError) as excinfo:
            bidi.recv()
    assert rpc_error(excinfo).code() == grpc.StatusCode.UNAVAILABLE


def test_delay_past_the_deadline(target: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as excinfo:
        samplegrpc.call_unary(target, delay_ms=5000, timeout=0.3)
    assert rpc_error(excinfo).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 3
    t0 = time.monotonic()
    assert samplegrpc.call_unary(target, "slow", delay_ms=200).text == "slow"
    assert time.monotonic() - t0 >= 0.2


# --------------------------------------------------------------------------- in sample-app


def start_sample_app(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "app.log"
    cmd = [sys.executable, "-m", "nodeagent.samples.sampleapp"]
    cmd += ["--host", "127.0.0.1", "--port", "0"]
    env = {**os.environ, "POD_NAME": "reviews-v3-1", "POD_NAMESPACE": "default"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
    return proc, log


def wait_listening(proc: subprocess.Popen[bytes], log: Path, want: int) -> dict[str, int]:
    deadline = time.monotonic() + 30
    while True:
        text = log.read_text(errors="replace")
        found = LISTENING.findall(text)
        if len(found) >= want:
            return {kind: int(port) for kind, _, port in found}
        if proc.poll() is not None:
            pytest.fail(f"sample-app exited with {proc.returncode}:\n{text}")
        if time.monotonic() > deadline:
            pytest.fail(f"sample-app did not start listening:\n{text}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_sample_app_serves_grpc_next_to_http(tmp_path: Path) -> None:
    proc, log = start_sample_app(
        tmp_path, "--service", "reviews", "--version", "v3", "--grpc-port", "0"
    )
    try:
        ports = wait_listening(proc, log, 2)
        target = f"127.0.0.1:{ports['grpc']}"
        reply = samplegrpc.call_unary(target, "hi", {"x-request-id": "r1"})
        assert (reply.pod, reply.namespace, reply.service, reply.version) == (
            "reviews-v3-1",
            "default",
            "reviews",
            "v3",
        )
        assert reply.metadata["x-request-id"] == "r1"
        # HTTP and gRPC share one "served" counter.
        conn = http.client.HTTPConnection("127.0.0.1", ports["http"], timeout=30)
        try:
            conn.request("GET", "/")
            doc: dict[str, Any] = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        assert (doc["service"], doc["served"]) == ("reviews", reply.served + 1)
        assert samplegrpc.call_unary(target).served == reply.served + 2
        with samplegrpc.BidiSession(target) as bidi:  # streaming calls work in the app too
            bidi.send("x")
            assert bidi.recv().text == "x"
    finally:
        rc = stop(proc)
    text = log.read_text()
    assert rc == 0, text
    assert re.search(r"^listening grpc 127\.0\.0\.1:\d+ service=reviews/v3$", text, re.M), text
    line = r" reviews/v3 GRPC /nodeagent\.sample\.Echo/Unary OK [\d.]+ms$"
    assert re.search(line, text, re.MULTILINE), text
    assert "sample-app stopped" in text


def test_sample_app_grpc_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, log = start_sample_app(tmp_path, "--grpc-port", str(port))
        try:
            rc = proc.wait(timeout=30)
        finally:
            stop(proc)
    assert rc == 1
    assert "cannot listen" in log.read_text()


# --------------------------------------------------------------------------- client CLI


def client(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodeagent.samples.samplegrpc", "client", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_cli_unary_prints_one_json_line(target: str) -> None:
    res = client("--target", target, "--text", "hi", "--metadata", "X-A=1", "b=2=3")
    assert res.returncode == 0, res.stderr
    (doc,) = json_lines(res.stdout)
    assert (doc["pod"], doc["version"], doc["method"], doc["text"]) == (
        "echo-v2-7d9f",
        "v2",
        "Unary",
        "hi",
    )
    assert (doc["metadata"]["x-a"], doc["metadata"]["b"]) == ("1", "2=3")
    assert doc["sequence"] == 1
    assert doc["payload_bytes"] == 0


@pytest.mark.parametrize(
    ("method", "kind", "lines"),
    [
        ("server-stream", "ServerStream", 3),
        ("client-stream", "ClientStream", 1),
        ("bidi", "Bidi", 3),
    ],
)
def test_cli_streaming_methods(target: str, method: str, kind: str, lines: int) -> None:
    args = ["--method", method, "--count", "3", "--text", "t", "--payload-bytes", "1000"]
    res = client("--target", target, *args)
    assert res.returncode == 0, res.stderr
    docs = json_lines(res.stdout)
    assert len(docs) == lines
    assert {d["method"] for d in docs} == {kind}
    if method == "client-stream":
        assert (docs[0]["count"], docs[0]["bytes"]) == (3, 3 * 1001)
    else:
        assert [d["sequence"] for d in docs] == [1, 2, 3]
        digest = hashlib.sha256(pattern_bytes(1000)).hexdigest()
        assert {(d["payload_bytes"], d["payload_sha256"]) for d in docs} == {(1000, digest)}


def test_cli_error_exits_with_the_status(target: str) -> None:
    res = client("--target", target, "--fail-code", "14")
    assert res.returncode == 14
    assert res.stdout == ""
    err = json.loads(res.stderr.strip().splitlines()[-1])["error"]
    assert (err["code"], err["value"]) == ("UNAVAILABLE", 14)
    assert "fail_code 14" in err["details"]
    # A stream prints the replies it got before the failure.
    res = client(
        "--target", target, "--method", "server-stream", "--count", "2", "--fail-code", "10"
    )
    assert res.returncode == 10  # ABORTED
    assert [d["sequence"] for d in json_lines(res.stdout)] == [1, 2]


def test_cli_unreachable_target() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = client("--target", f"127.0.0.1:{port}", "--timeout", "5")
    assert res.returncode == 14, res.stderr  # UNAVAILABLE
    assert json.loads(res.stderr.strip().splitlines()[-1])["error"]["code"] == "UNAVAILABLE"


@pytest.mark.parametrize("new_connection", [False, True])
def test_cli_repeat_prints_a_summary(target: str, new_connection: bool) -> None:
    extra = ["--new-connection"] if new_connection else []
    res = client("--target", target, "--repeat", "25", *extra)
    assert res.returncode == 0, res.stderr
    (summary,) = json_lines(res.stdout)
    assert summary == {
        "calls": 25,
        "ok": 25,
        "errors": {},
        "pods": {"echo-v2-7d9f": 25},
        "versions": {"v2": 25},
    }


def test_cli_repeat_counts_errors(target: str) -> None:
    res = client("--target", target, "--repeat", "4", "--fail-code", "14")
    assert res.returncode == 1
    (summary,) = json_lines(res.stdout)
    assert (summary["ok"], summary["errors"], summary["pods"]) == (0, {"UNAVAILABLE": 4}, {})


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "bidi", "--repeat", "3"],
        ["--new-connection"],
        ["--metadata", "novalue"],
        ["--count", "-1"],
    ],
)
def test_cli_rejects_bad_arguments(target: str, args: list[str]) -> None:
    res = client("--target", target, *args)
    assert res.returncode == 2
    assert res.stdout == ""
