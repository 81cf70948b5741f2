"""Runs inside a sandbox pod: N HTTP/1.1 requests on keep-alive connections, then one
JSON summary line (what a user would tally by hand with curl in a loop).

    httpclient.py URL [-n N] [-c CONNS] [-H 'name: value']... [--method M] [--body-bytes B]
                  [--new-conn]

Summary: ``{"n", "statuses": {code: count}, "versions": {v: count}, "pods": {pod: count},
"flags": {flag: count}, "max_s", "min_s", "errors": [..first few..]}``. ``versions`` and
``pods`` come from the sample app's JSON answer; ``flags`` from the proxy's
``x-nodeagent-response-flag`` header on answers the proxy made itself.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("-n", type=int, default=1)
    ap.add_argument("-c", type=int, default=1)
    ap.add_argument("-H", action="append", default=[])
    ap.add_argument("--method", default="GET")
    ap.add_argument("--body-bytes", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=15)
    ap.add_argument("--new-conn", action="store_true", help="one connection per request")
    a = ap.parse_args()
    u = urlsplit(a.url)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    headers = dict(h.split(":", 1) for h in a.H)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    body = bytes(i % 251 for i in range(a.body_bytes)) if a.body_bytes else None
    lock = threading.Lock()
    out: dict[str, Any] = {
        "n": 0, "statuses": Counter(), "versions": Counter(), "pods": Counter(),
        "flags": Counter(), "max_s": 0.0, "min_s": 1e9, "errors": [], "digests": Counter(),
    }
    per_conn = [a.n // a.c + (1 if i < a.n % a.c else 0) for i in range(a.c)]

    def worker(count: int) -> None:
        conn: http.client.HTTPConnection | None = None
        for _ in range(count):
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(u.hostname or "", u.port or 80,
                                                      timeout=a.timeout)
                conn.request(a.method, path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                status = r.status
                flag = r.getheader("x-nodeagent-response-flag")
                if a.new_conn or r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:
                with lock:
                    out["n"] += 1
                    out["statuses"]["error"] += 1
                    if len(out["errors"]) < 5:
                        out["errors"].append(repr(e))
                if conn is not None:
                    conn.close()
                conn = None
                continue
            dt = time.monotonic() - t0
            doc: dict[str, Any] = {}
            with contextlib.suppress(ValueError):
                doc = json.loads(data)
            with lock:
                out["n"] += 1
                out["statuses"][str(status)] += 1
                out["max_s"] = max(out["max_s"], dt)
                out["min_s"] = min(out["min_s"], dt)
                if isinstance(doc, dict):
                    if "version" in doc:
                        out["versions"][str(doc["version"])] += 1
                    if "pod" in doc:
                        out["pods"][str(doc["pod"])] += 1
                    if "body_sha256" in doc:
                        out["digests"][str(doc["body_sha256"])] += 1
                if flag:
                    out["flags"][flag] += 1
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in per_conn]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
