"""Fault injection for tests with real processes: an S3 proxy that can go away or refuse writes.

``S3FaultProxy`` forwards HTTP to a real S3 server (moto). ``cut()`` closes its port, so clients
get "connection refused" as from a crashed or unreachable store; ``restore()`` opens it again on
the same port. ``refuse_puts(prefix)`` answers 403 AccessDenied to PUTs of keys under a prefix,
as MinIO does under a read-only policy."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import threading
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
        self._server: http.server.ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def settings(self) -> StorageSettings:
        return StorageSettings(
            endpoint=f"http://127.0.0.1:{self.port}",
            access_key=self.upstream.access_key,
            secret_key=self.upstream.secret_key,
        )

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

            def refused(self) -> bool:
                prefix = proxy.refused_prefix
                return (
                    self.command == "PUT"
                    and prefix is not None
                    and (urlsplit(self.path).path.startswith(prefix))
                )

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

    restore = start
    stop = cut

    def refuse_puts(self, prefix: str | None) -> None:
        """``/<bucket>/<key prefix>``; None: accept every write again."""
        self.refused_prefix = prefix


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    target = ""

    def refused(self) -> bool:
        return False

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.refused():
            self._reply(403, {"Content-Type": "application/xml"}, ACCESS_DENIED)
            return
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
