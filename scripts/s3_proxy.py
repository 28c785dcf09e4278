"""A slow, counting, throttling HTTP proxy in front of an S3-compatible server, on 127.0.0.1.

What object storage looks like from a training host, made on one machine: every request waits
`--delay-ms LOW HIGH` (uniform) before it is forwarded, the first `--throttle N` GETs of each
object are answered with S3's `503 SlowDown`, and every request is counted, with the bytes served
per object. Tests and scripts/bench_cache.py use it as a context manager:

    with S3Proxy("http://127.0.0.1:5000", delay_s=(0.02, 0.05)) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...
        proxy.gets("bucket/ds/train-000000.tar"), proxy.bytes_served()

or from the shell: python scripts/s3_proxy.py --upstream http://127.0.0.1:5000 --port 5001, where
GET /__stats answers the counts as JSON ({"requests": {"GET bucket/key": n}, "served": {...}}) and
GET /__reset zeroes them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class S3Proxy:
    def __init__(
        self, upstream: str, delay_s: tuple[float, float] = (0.0, 0.0), throttle: int = 0, port: int = 0
    ):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.delay_s, self.throttle = delay_s, throttle
        self.requests: Counter = Counter()  # (method, object path) → requests
        self.served: Counter = Counter()  # object path → body bytes sent for GETs
        self.throttled: Counter = Counter()  # object path → 503s sent
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def gets(self, path: str) -> int:
        """GET requests that reached the server for the object at `path` (bucket/key)."""
        return self.requests[("GET", path.strip("/"))]

    def bytes_served(self, prefix: str = "") -> int:
        return sum(n for p, n in self.served.items() if p.startswith(prefix.strip("/")))

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.served.clear()
            self.throttled.clear()

    def __enter__(self) -> S3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(proxy: S3Proxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as clients use S3

        def log_message(self, *args) -> None:  # counted, not printed
            pass

        def _forward(self) -> None:
            path = urllib.parse.urlsplit(self.path).path.strip("/")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if path in ("__stats", "__reset"):  # the counts, for a proxy run as its own process
                with proxy._lock:
                    stats = {
                        "requests": {f"{m} {p}": n for (m, p), n in proxy.requests.items()},
                        "served": dict(proxy.served),
                    }
                if path == "__reset":
                    proxy.reset()
                self._reply(200, {"Content-Type": "application/json"}, json.dumps(stats).encode())
                return
            low, high = proxy.delay_s
            if high:
                time.sleep(random.uniform(low, high))
            with proxy._lock:
                proxy.requests[(self.command, path)] += 1
                throttle = self.command == "GET" and "/" in path and proxy.throttled[path] < proxy.throttle
                if throttle:
                    proxy.throttled[path] += 1
            if throttle:
                self._reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
                return
            up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            up.request(self.command, self.path, body=body or None, headers=headers)
            resp = up.getresponse()
            data = resp.read()
            up.close()
            if self.command == "GET":
                with proxy._lock:
                    proxy.served[path] += len(data)
            # a HEAD's Content-Length is the object's size, not the length of its (empty) body
            dropped = HOP if self.command == "HEAD" else HOP | {"content-length"}
            out = {k: v for k, v in resp.getheaders() if k.lower() not in dropped}
            self._reply(resp.status, out, data)

        def _reply(self, status: int, headers: dict, data: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True, help="the S3-compatible server, e.g. http://127.0.0.1:5000")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--delay-ms", type=float, nargs=2, default=(20.0, 50.0), metavar=("LOW", "HIGH"))
    p.add_argument("--throttle", type=int, default=0, help="503 SlowDown to the first N GETs of each object")
    args = p.parse_args()
    low, high = args.delay_ms
    with S3Proxy(args.upstream, (low / 1000, high / 1000), args.throttle, args.port) as proxy:
        print(f"proxy on {proxy.url} -> {args.upstream}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
