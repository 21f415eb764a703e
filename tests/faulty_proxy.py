"""A fault-injecting HTTP reverse proxy in front of the real S3 server (a test double).

It forwards requests byte-for-byte (the Host header included, so SigV4 signatures still
verify) and can, on demand: answer the next N requests (or those `fail_when` picks) with an
error status, delay every
request, cut the body of the next GET after some bytes (a connection reset mid-stream), or
rewrite the body of the server's answers (`rewrite`: (method, path, body) -> new body or None).
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FaultyProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.lock = threading.Lock()
        self.fail_remaining = 0
        self.fail_status = 503
        self.truncate_remaining = 0
        self.truncate_after = 0
        self.delay = 0.0
        self.rewrite: Callable[[str, str, bytes], bytes | None] | None = None
        self.fail_when: Callable[[str, str], bool] | None = None  # (method, path) -> answer with fail_status
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.faults_served = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:  # trailers end with an empty line
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                headers = {k: v for k, v in self.headers.items()}
                with proxy.lock:
                    proxy.requests.append((self.command, self.path, headers))
                    fail = proxy.fail_remaining > 0
                    if fail:
                        proxy.fail_remaining -= 1
                    elif proxy.fail_when is not None and proxy.fail_when(self.command, self.path):
                        fail = True
                    if fail:
                        proxy.faults_served += 1
                    truncate = self.command == "GET" and "list-type" not in self.path and proxy.truncate_remaining > 0
                    if truncate:
                        proxy.truncate_remaining -= 1
                        proxy.faults_served += 1
                if proxy.delay:
                    time.sleep(proxy.delay)
                if fail:
                    payload = b"<Error><Code>SlowDown</Code><Message>injected fault</Message></Error>"
                    self.send_response(proxy.fail_status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    conn.putheader(key, value)
                conn.endheaders()
                if body:
                    conn.send(body)
                response = conn.getresponse()
                data = response.read()
                rewrite = proxy.rewrite
                if rewrite is not None and self.command != "HEAD":
                    changed = rewrite(self.command, self.path, data)
                    if changed is not None:
                        with proxy.lock:
                            proxy.faults_served += 1
                        data = changed
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() == "content-length" and self.command != "HEAD":
                        value = str(len(data))
                    if key.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    # A cut stream: the headers promise the whole body, the socket closes early.
                    self.wfile.write(data[: proxy.truncate_after] if truncate else data)
                conn.close()

            def _handle_quietly(self) -> None:
                try:
                    self._handle()
                except (ConnectionError, OSError, http.client.HTTPException):
                    pass  # a client killed mid-request (the tests do that on purpose)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle_quietly

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail_next(self, count: int, status: int = 503) -> None:
        with self.lock:
            self.fail_remaining, self.fail_status = count, status

    def cut_next_get(self, after_bytes: int, count: int = 1) -> None:
        with self.lock:
            self.truncate_remaining, self.truncate_after = count, after_bytes

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
