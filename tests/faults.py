"""Fault injection for tests with real processes: an S3 proxy that can go away or refuse writes.

``S3FaultProxy`` forwards HTTP to the S3 stand-in. ``cut()`` closes its port, so clients
get "connection refused" as from a crashed or unreachable store; ``restore()`` opens it again on
the same port. ``hang()`` keeps accepting connections and reading requests but answers none, as
a store that hangs does, until ``restore()``. ``refuse_puts(prefix)`` answers 403 AccessDenied to
PUTs of keys under a prefix, as MinIO does under a read-only policy.

Requests go upstream with their headers as sent, Host included: the stand-in checks the signature
a client made for the proxy's address. ``behind(identity)`` is an identity's settings through
the proxy."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import threading
import time
from dataclasses import replace
from urllib.parse import urlsplit

from refit.netutil import free_port
from refit.storage import StorageSettings

ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied (refused by the test's fault proxy)</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


class S3FaultProxy:
    def __init__(self, upstream: StorageSettings) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.refused_prefix: str | None = None
        self.slow_reads_of: tuple[str, float] | None = None
        self._server: http.server.ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._answering = threading.Event()  # cleared by hang()
        self._answering.set()

    @property
    def settings(self) -> StorageSettings:
        """The upstream's own identity, through the proxy."""
        return self.behind(self.upstream)

    def behind(self, identity: StorageSettings) -> StorageSettings:
        return replace(identity, endpoint=f"http://127.0.0.1:{self.port}")

    def start(self) -> None:
        if self._server is not None:
            return
        proxy = self

        class Handler(_Forward):
            target = urlsplit(proxy.upstream.endpoint).netloc

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._connections.discard(self.connection)
                super().finish()

            def held(self) -> bool:
                if proxy._answering.is_set():
                    return False
                proxy._answering.wait()
                return True

            def refused(self) -> bool:
                prefix = proxy.refused_prefix
                return (
                    self.command == "PUT"
                    and prefix is not None
                    and (urlsplit(self.path).path.startswith(prefix))
                )

            def delay(self) -> float:
                slow = proxy.slow_reads_of
                if self.command == "GET" and slow and urlsplit(self.path).path.startswith(slow[0]):
                    return slow[1]
                return 0.0

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def cut(self) -> None:
        """Closes the port and every open connection (clients keep idle ones in a pool)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._connections.clear()

    def hang(self) -> None:
        """Accepts connections and reads requests, answers none until ``restore()``."""
        self._answering.clear()

    def restore(self) -> None:
        """Answers again: the port reopens after ``cut()``; requests held by ``hang()`` are
        dropped unanswered (their clients have given up on them by then)."""
        self._answering.set()
        self.start()

    stop = cut

    def refuse_puts(self, prefix: str | None) -> None:
        """``/<bucket>/<key prefix>``; None: accept every write again."""
        self.refused_prefix = prefix

    def slow_reads(self, prefix: str, seconds: float) -> None:
        """Each GET under ``/<bucket>/<key prefix>`` waits ``seconds`` before it is forwarded:
        reads that span a while, so a fault can be timed to meet one."""
        self.slow_reads_of = (prefix, seconds)


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    target = ""

    def refused(self) -> bool:
        return False

    def delay(self) -> float:
        return 0.0

    def held(self) -> bool:
        """True when the request was held unanswered (``hang()``) and must stay so."""
        return False

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.held():
            self.close_connection = True
            return
        if self.refused():
            self._reply(403, {"Content-Type": "application/xml"}, ACCESS_DENIED)
            return
        time.sleep(self.delay())
        upstream = http.client.HTTPConnection(self.target, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            headers = {k: v for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP}
            self._reply(answer.status, headers, data)
        finally:
            upstream.close()

    def _reply(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() != "content-length" or self.command == "HEAD":
                self.send_header(name, value)  # HEAD: the object's length, with no body
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward
