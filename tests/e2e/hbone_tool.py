"""HBONE probes for the wire tests, run inside a sandbox namespace with ``nsenter``.

- ``probe IP AUTHORITY --cert C --key K --bundle B``: dial ``IP:15008`` with TLS 1.3 and
  a client certificate, send an HTTP/2 CONNECT for AUTHORITY with the ``h2`` library
  driven directly (not our HBONE code), push 64 KiB through, print one JSON line: the
  handshake outcome, the status and whether the bytes came back.
- ``rogue --cert C --key K --bundle B``: an HBONE server on 0.0.0.0:15008 presenting the
  given certificate (to check that clients verify the server's SPIFFE ID).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events


def context(args: argparse.Namespace, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(args.bundle)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def probe(args: argparse.Namespace) -> dict[str, object]:
    payload = os.urandom(65536)
    out: dict[str, object] = {"ok": False}
    try:
        raw = socket.create_connection((args.ip, 15008), timeout=5)
        sock = context(args, server=False).wrap_socket(raw)
    except (OSError, ssl.SSLError) as e:
        out["error"] = f"handshake: {e}"
        return out
    out["handshake"] = "ok"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", args.authority)])
    got = b""
    try:
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + 5
        sent = False
        while time.monotonic() < deadline and len(got) < len(payload):
            data = sock.recv(65536)
            if not data:
                out["error"] = "connection closed by the server"
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    out["status"] = dict(ev.headers).get(b":status", b"").decode()
                    if out["status"] == "200" and not sent:
                        sent = True
                        for i in range(0, len(payload), 16384):
                            conn.send_data(1, payload[i : i + 16384])
                elif isinstance(ev, h2.events.DataReceived):
                    got += ev.data or b""
                    conn.acknowledge_received_data(ev.flow_controlled_length or 0, 1)
                elif isinstance(ev, h2.events.StreamReset):
                    out["error"] = f"stream reset {ev.error_code}"
            sock.sendall(conn.data_to_send())
    except (OSError, ssl.SSLError) as e:
        out["error"] = f"after handshake: {e}"
    out["ok"] = got == payload
    return out


async def rogue(args: argparse.Namespace) -> None:
    from nodeagent.proxy.hbone_server import ConnectRefusal, start_hbone_server

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 15008))
    s.listen(16)
    s.setblocking(False)

    async def refuse(_req: object) -> ConnectRefusal:
        return ConnectRefusal(503, "rogue")

    await start_hbone_server(s, context(args, server=True), refuse)  # type: ignore[arg-type]
    print(json.dumps({"event": "listening"}), flush=True)
    await asyncio.sleep(3600)


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    pr = sub.add_parser("probe")
    pr.add_argument("ip")
    pr.add_argument("authority")
    ro = sub.add_parser("rogue")
    for sp in (pr, ro):
        sp.add_argument("--cert", required=True)
        sp.add_argument("--key", required=True)
        sp.add_argument("--bundle", required=True)
    args = p.parse_args()
    if args.mode == "probe":
        print(json.dumps(probe(args)), flush=True)
    else:
        asyncio.run(rogue(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
