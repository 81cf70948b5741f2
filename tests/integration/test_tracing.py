"""Spans over OTLP through the real proxies of two nodes on loopback (real HBONE, real
mTLS), received by a real gRPC OTLP receiver of the test's own: the client and server
spans of one request and their parents, Telemetry's sampling percentage and an incoming
sampled flag, a stalled or absent collector that costs the requests nothing and whose
dropped spans are counted; and the Telemetry kind turning access-log lines off and
filtering them."""

from __future__ import annotations

import asyncio
import time

from otlp_receiver import OtlpReceiver, Received
from test_proxy_loopback import (
    DENY_CLIENT,
    SERVER_IP,
    SERVICE_IP,
    TCP_PORT,
    Rig,
    closed_without_data,
    eventually,
    round_trip,
    run,
)

from nodeagent.proxy.spanexport import SpanExport
from nodeagent.telemetry.metrics import Metrics

SAMPLE_ALL = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - randomSamplingPercentage: 100
    customTags:
      team: {literal: {value: payments}}
      tenant: {header: {name: x-tenant, defaultValue: none}}
"""
SAMPLE_NONE = SAMPLE_ALL.replace("randomSamplingPercentage: 100", "randomSamplingPercentage: 0")

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"


def rig_exporting(endpoint: str, **kw: float) -> type[Rig]:
    class Exporting(Rig):
        spans = staticmethod(
            lambda m: SpanExport.otlp(endpoint, m.registry, delay_ms=50, **kw)
        )

    return Exporting


async def get(rig: Rig, path: str, headers: str = "") -> tuple[int, bytes]:
    """One HTTP/1.1 request from the client pod to the echo service's port 80."""
    r, w = await rig.connect((SERVICE_IP, 80))
    w.write(f"GET {path} HTTP/1.1\r\nhost: echo\r\n{headers}connection: close\r\n\r\n".encode())
    data = await r.read()
    w.close()
    status = int(data.split(b" ", 2)[1])
    return status, data


async def header_app(seen: list[dict[str, str]], status: int = 200) -> asyncio.Server:
    """An app that keeps each request's headers and answers ``status``."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while head := await r.readuntil(b"\r\n\r\n"):
                lines = head.decode().split("\r\n")[1:]
                fields = (x.partition(":") for x in lines)
                seen.append({k.lower(): v.strip() for k, _, v in fields if k})
                code = 500 if b"/fail" in head.split(b" ", 2)[1] else status
                w.write(b"HTTP/1.1 %d X\r\ncontent-length: 2\r\n\r\nok" % code)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def use_header_app(rig: Rig, seen: list[dict[str, str]]) -> asyncio.Server:
    app = await header_app(seen)
    rig.net.apps[(SERVER_IP, 8080)] = app.sockets[0].getsockname()[:2]
    return app


def by_kind(spans: list[Received], kind: str) -> list[Received]:
    return [s for s in spans if s.kind == kind]


def test_one_request_gives_a_client_and_a_server_span_with_the_right_parents() -> None:
    with OtlpReceiver() as receiver:

        async def body(rig: Rig) -> None:
            rig.apply(SAMPLE_ALL)
            seen: list[dict[str, str]] = []
            app = await use_header_app(rig, seen)
            status, _ = await get(rig, "/hello?x=1", "x-tenant: acme\r\n")
            app.close()
            assert status == 200
            await eventually(lambda: len(receiver.spans()) >= 2, "two spans")
            spans = receiver.spans()
            (client,) = by_kind(spans, "CLIENT")
            (server,) = by_kind(spans, "SERVER")
            # one trace: the client's span is the root, the server's its child, and the
            # app's traceparent names the server's span as its parent
            assert client.parent_id == ""
            assert server.trace_id == client.trace_id
            assert server.parent_id == client.span_id
            assert seen[0]["traceparent"] == f"00-{client.trace_id}-{server.span_id}-01"
            assert client.service == "client.default"
            assert server.service == "echo.default"
            assert client.name == server.name == "echo.default.svc.cluster.local:80/*"
            a = client.attributes
            assert a["http.method"] == "GET"
            assert a["http.url"] == "http://echo/hello?x=1"
            assert a["http.status_code"] == "200"
            assert a["response_flags"] == "-"
            assert a["upstream_cluster"] == "outbound|80||echo.default.svc.cluster.local"
            assert a["component"] == "proxy"
            assert a["istio.canonical_service"] == "client"
            assert a["istio.namespace"] == "default"
            assert a["istio.mesh_id"] == "cluster.local"
            assert a["node_id"].startswith("sidecar~10.244.1.10~client.default~")
            assert a["peer.address"] == "127.0.0.1"  # the caller as the listener saw it
            assert a["team"] == "payments" and a["tenant"] == "acme"
            assert server.attributes["istio.canonical_service"] == "echo"
            assert server.attributes["http.status_code"] == "200"
            assert server.start_ns >= client.start_ns and server.end_ns <= client.end_ns
            # the access log carries the span's trace id
            rec = rig.proxies["node1"].access_log.recent[-1]
            assert rec["trace_id"] == client.trace_id

        run(True, body, rig_exporting(receiver.endpoint))


def test_an_incoming_sampled_flag_decides_over_the_percentage() -> None:
    with OtlpReceiver() as receiver:

        async def body(rig: Rig) -> None:
            rig.apply(SAMPLE_NONE)
            seen: list[dict[str, str]] = []
            app = await use_header_app(rig, seen)
            for _ in range(5):  # 0%: no spans, the trace context still goes on
                assert (await get(rig, "/none"))[0] == 200
            sampled = f"traceparent: 00-{TRACE}-{APP_SPAN}-01\r\n"
            assert (await get(rig, "/sampled", sampled))[0] == 200
            await eventually(lambda: len(receiver.spans()) >= 2, "the sampled request's spans")
            rig.apply(SAMPLE_ALL)
            unsampled = f"traceparent: 00-{TRACE}-{APP_SPAN}-00\r\n"
            assert (await get(rig, "/unsampled", unsampled))[0] == 200
            await asyncio.sleep(0.3)
            app.close()
            spans = receiver.spans()
            assert len(spans) == 2, spans
            (client,) = by_kind(spans, "CLIENT")
            assert (client.trace_id, client.parent_id) == (TRACE, APP_SPAN)
            assert client.attributes["http.url"] == "http://echo/sampled"
            assert len(seen) == 7
            assert all(h["traceparent"].endswith("-00") for h in seen[:5])
            assert seen[6]["traceparent"] == f"00-{TRACE}-{APP_SPAN}-00"

        run(True, body, rig_exporting(receiver.endpoint))


def test_span_reporting_disabled_sends_no_spans_but_propagates_the_decision() -> None:
    with OtlpReceiver() as receiver:

        async def body(rig: Rig) -> None:
            quiet = "disableSpanReporting: true\n    randomSamplingPercentage: 100"
            rig.apply(SAMPLE_ALL.replace("randomSamplingPercentage: 100", quiet))
            seen: list[dict[str, str]] = []
            app = await use_header_app(rig, seen)
            assert (await get(rig, "/quiet"))[0] == 200
            await asyncio.sleep(0.3)
            app.close()
            assert receiver.spans() == []
            assert seen[0]["traceparent"].endswith("-01")
            # no SERVER span to make: the server's node relayed the request as bytes
            assert rig.proxies["node1"].access_log.recent[-1]["path"] == "/quiet"
            assert not rig.proxies["node2"].access_log.recent

        run(True, body, rig_exporting(receiver.endpoint))


def _dropped(m: Metrics) -> float:
    return m.registry.get_sample_value("nodeagent_spans_dropped_total") or 0.0


def _requests_unhindered(endpoint: str) -> None:
    async def body(rig: Rig) -> None:
        rig.apply(SAMPLE_ALL)
        started = time.monotonic()
        for i in range(40):
            assert (await get(rig, f"/r{i}"))[0] == 200
        took = time.monotonic() - started
        # 40 requests on loopback take well under a second; an export in the way
        # (5 s timeout) would take seconds each
        assert took < 4.0, took
        assert _dropped(rig.metrics["node1"]) > 0
        assert _dropped(rig.metrics["node2"]) > 0

    run(True, body, rig_exporting(endpoint, max_queue_size=4))


def test_a_stalled_collector_costs_requests_nothing_and_drops_are_counted() -> None:
    with OtlpReceiver(stalled=True) as receiver:
        _requests_unhindered(receiver.endpoint)
        assert receiver.exports >= 1


def test_an_absent_collector_costs_requests_nothing_and_drops_are_counted() -> None:
    with OtlpReceiver() as receiver:
        endpoint = receiver.endpoint
    _requests_unhindered(endpoint)  # nothing listens there any more


ACCESS_OFF = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: quiet, namespace: default}
spec:
  selector: {matchLabels: {app: APP}}
  accessLogging:
  - disabled: true
"""

ONLY_5XX = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: errors-only, namespace: default}
spec:
  accessLogging:
  - filter: {expression: "response.code >= 500"}
"""


def test_telemetry_turns_one_workloads_access_log_off_and_filters_them() -> None:
    async def body(rig: Rig) -> None:
        seen: list[dict[str, str]] = []
        app = await use_header_app(rig, seen)
        log = rig.proxies["node1"].access_log.recent  # the client's lines (reporter source)
        assert (await get(rig, "/before"))[0] == 200
        rig.apply(ACCESS_OFF.replace("APP", "echo"))  # another workload's: no change here
        assert (await get(rig, "/other-off"))[0] == 200
        rig.apply(ACCESS_OFF.replace("APP", "client"))  # the client's lines stop
        assert (await get(rig, "/off"))[0] == 200
        assert [r["path"] for r in log] == ["/before", "/other-off"]
        rig.apply(ONLY_5XX)  # the namespace keeps only 5xx lines (the client's on again)
        assert (await get(rig, "/ok"))[0] == 200
        assert (await get(rig, "/fail"))[0] == 500
        app.close()
        assert [r["path"] for r in log] == ["/before", "/other-off", "/fail"]
        assert log[-1]["response_code"] == 500

    run(True, body)


ONLY_PLAINTEXT = ONLY_5XX.replace("response.code >= 500", "!connection.mtls")


def test_telemetry_turns_connection_lines_off_and_filters_them_hot() -> None:
    async def body(rig: Rig) -> None:
        out = rig.proxies["node1"].access_log.recent_connections  # the client's side
        inn = rig.proxies["node2"].access_log.recent_connections  # the server's side

        async def connection(tag: bytes) -> None:
            r, w = await rig.connect((SERVICE_IP, TCP_PORT))
            assert (await round_trip(r, w, tag))[1] == len(tag)

        async def lines(want_out: int, want_in: int) -> None:
            await eventually(lambda: len(inn) == want_in, f"{want_in} lines on node2")
            await asyncio.sleep(0.1)  # (a line that should not come has had its time)
            assert (len(out), len(inn)) == (want_out, want_in)

        await connection(b"before")
        await lines(1, 1)
        rig.apply(ACCESS_OFF.replace("APP", "client"))  # the client's lines stop
        await connection(b"client-off")
        await lines(1, 2)
        rig.apply(ACCESS_OFF.replace("APP", "echo"))  # the server's instead
        await connection(b"server-off")
        await eventually(lambda: len(out) == 2, "node1's line")
        await lines(2, 2)
        rig.apply(ONLY_PLAINTEXT)  # mutual TLS connections filtered out on both sides
        await connection(b"mtls")
        await asyncio.sleep(0.3)
        assert (len(out), len(inn)) == (2, 2)
        rig.apply(ONLY_5XX.replace("response.code >= 500", "connection.mtls"))
        await connection(b"mtls-kept")
        await eventually(lambda: len(out) == 3, "node1's line")
        await lines(3, 3)
        assert out[-1]["bytes_sent"] == inn[-1]["bytes_sent"] == len(b"mtls-kept")
        assert out[0]["bytes_sent"] == len(b"before")
        assert [r["bytes_sent"] for r in inn] == [6, 10, 9]

    run(True, body)


def test_a_tcp_connection_at_l4_gets_a_span_on_each_node() -> None:
    with OtlpReceiver() as receiver:

        async def body(rig: Rig) -> None:
            rig.apply(SAMPLE_ALL)
            r, w = await rig.connect((SERVICE_IP, TCP_PORT))
            _, size = await round_trip(r, w, b"x" * 5000)
            assert size == 5000
            await eventually(lambda: len(receiver.spans()) >= 2, "the connection's spans")
            spans = receiver.spans()
            (client,) = by_kind(spans, "CLIENT")
            (server,) = by_kind(spans, "SERVER")
            assert client.name == "tcp echo.default.svc.cluster.local"
            assert server.name in ("tcp echo.default.svc.cluster.local", "tcp server.default")
            assert (client.service, server.service) == ("client.default", "echo.default")
            assert client.attributes["bytes_sent"] == "5000"
            assert client.attributes["connection_security_policy"] == "mutual_tls"
            assert client.attributes["istio.canonical_service"] == "client"
            assert client.attributes["upstream_cluster"] == "echo.default.svc.cluster.local"
            assert server.attributes["bytes_received"] == "5000"
            assert client.end_ns > client.start_ns
            # one trace: the CONNECT carried the client's span as the server's parent
            assert client.parent_id == ""
            assert (server.trace_id, server.parent_id) == (client.trace_id, client.span_id)
            assert client.start_ns <= server.start_ns

        run(True, body, rig_exporting(receiver.endpoint))


CLIENT_UNSAMPLED = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: client-none, namespace: default}
spec:
  selector: {matchLabels: {app: client}}
  tracing:
  - randomSamplingPercentage: 0
"""


def test_the_callers_decision_on_an_l4_connection_holds_at_the_destination() -> None:
    with OtlpReceiver() as receiver:

        async def body(rig: Rig) -> None:
            # the server's workload samples 100%, the client's 0%: the client's node
            # decides, its CONNECT says "not sampled", and the server's node follows
            rig.apply(SAMPLE_ALL + "---" + CLIENT_UNSAMPLED)
            for _ in range(5):
                r, w = await rig.connect((SERVICE_IP, TCP_PORT))
                assert (await round_trip(r, w, b"quiet"))[1] == 5
            started = rig.metrics["node2"].registry.get_sample_value
            await asyncio.sleep(0.3)
            assert receiver.spans() == []
            assert started("nodeagent_spans_started_total") == 0
            rig.apply(SAMPLE_ALL)  # hot: the client's connections are sampled again
            r, w = await rig.connect((SERVICE_IP, TCP_PORT))
            assert (await round_trip(r, w, b"traced"))[1] == 6
            await eventually(lambda: len(receiver.spans()) >= 2, "the connection's spans")
            (client,) = by_kind(receiver.spans(), "CLIENT")
            (server,) = by_kind(receiver.spans(), "SERVER")
            assert server.parent_id == client.span_id
            # refused by the destination's policy: the caller's span says so, alone
            rig.apply(SAMPLE_ALL + "---" + DENY_CLIENT)
            assert await closed_without_data(*await rig.connect((SERVICE_IP, TCP_PORT)))
            await eventually(lambda: len(receiver.spans()) >= 3, "the refused one's span")
            await asyncio.sleep(0.2)
            refused = receiver.spans()[2:]
            assert [s.kind for s in refused] == ["CLIENT"]
            assert refused[0].attributes["error"] == "true"
            assert refused[0].parent_id == ""

        run(True, body, rig_exporting(receiver.endpoint))


def test_sampling_percentages_of_100_and_0_give_all_and_no_spans() -> None:
    with OtlpReceiver() as receiver:

        async def body(rig: Rig) -> None:
            rig.apply(SAMPLE_ALL)
            for i in range(5):
                assert (await get(rig, f"/all{i}"))[0] == 200
            await eventually(lambda: len(receiver.spans()) >= 10, "ten spans")
            rig.apply(SAMPLE_NONE)
            for i in range(20):
                assert (await get(rig, f"/none{i}"))[0] == 200
            await asyncio.sleep(0.3)
            spans = receiver.spans()
            assert len(spans) == 10
            paths = sorted(s.attributes["http.url"] for s in by_kind(spans, "CLIENT"))
            assert paths == [f"http://echo/all{i}" for i in range(5)]
            assert len({s.trace_id for s in spans}) == 5  # one trace per request

        run(True, body, rig_exporting(receiver.endpoint))


ANSWERS = (
    SAMPLE_ALL
    + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo]
  http:
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: echo}}]
  - match: [{uri: {prefix: /ok}}, {uri: {prefix: /denied}}, {uri: {prefix: /limited}}]
    route: [{destination: {host: echo}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-denied, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/denied"]}}]
---
apiVersion: nodeagent.io/v1alpha1
kind: LocalRateLimit
metadata: {name: one, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  http:
    tokenBucket: {maxTokens: 1, tokensPerFill: 1, fillInterval: 1h}
"""
)


def test_answers_the_proxies_give_themselves_still_have_their_spans() -> None:
    with OtlpReceiver() as receiver:

        async def body(rig: Rig) -> None:
            rig.apply(ANSWERS)
            seen: list[dict[str, str]] = []
            app = await use_header_app(rig, seen)
            want = {"/ok": 200, "/denied": 403, "/limited": 429, "/abort": 418, "/none": 404}
            for path, status in want.items():
                assert (await get(rig, path))[0] == status, path
            app.close()
            assert len(seen) == 1  # only /ok reached the app
            await eventually(lambda: len(receiver.spans()) >= 8, "eight spans")
            await asyncio.sleep(0.2)

            def of(kind: str) -> dict[str, Received]:
                spans = receiver.spans()
                return {s.attributes["http.url"][11:]: s for s in by_kind(spans, kind)}

            client, server = of("CLIENT"), of("SERVER")
            # every request has its caller's span, with the code and flag the client got
            assert {p: s.attributes["http.status_code"] for p, s in client.items()} == {
                p: str(c) for p, c in want.items()
            }
            flags = {p: s.attributes["response_flags"] for p, s in client.items()}
            assert (flags["/abort"], flags["/none"]) == ("FI", "NR")
            # the destination's own answers are its SERVER spans, children of those
            assert set(server) == {"/ok", "/denied", "/limited"}
            assert server["/denied"].attributes["http.status_code"] == "403"
            assert server["/limited"].attributes["http.status_code"] == "429"
            assert server["/limited"].attributes["response_flags"] == "RL"
            for p, s in server.items():
                assert s.parent_id == client[p].span_id
            for p in ("/abort", "/none"):  # answered on the caller's node: Istio's attributes
                a = client[p].attributes
                assert a["istio.canonical_service"] == "client" and a["http.method"] == "GET"
                assert a["upstream_cluster"] == "-"
                assert client[p].name == "echo.default.svc.cluster.local:80/*"
                assert client[p].parent_id == ""
            assert "error" not in client["/abort"].attributes  # (as Envoy: 5xx only)
            # the access log's trace id is the span's, also where no upstream was asked
            recs = {r["path"]: r for r in rig.proxies["node1"].access_log.recent}
            assert recs["/none"]["trace_id"] == client["/none"].trace_id
            # the caller's identity denied outright by the destination's policy
            rig.apply(SAMPLE_ALL + "---" + DENY_CLIENT)
            assert (await get(rig, "/ok/again"))[0] == 403
            await eventually(lambda: "/ok/again" in of("CLIENT"), "the denied one's span")
            denied = of("CLIENT")["/ok/again"].attributes
            assert denied["http.status_code"] == "403"

        run(True, body, rig_exporting(receiver.endpoint))
