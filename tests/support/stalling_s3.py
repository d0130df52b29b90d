"""An HTTP proxy in front of the test S3 server that never answers some reads, like a stalled store.

Every request is forwarded to the server as it came, except GETs whose path contains `stall`:
those are held open, unanswered, until the proxy stops (then the connection just closes). A
reader pointed at the proxy (AWS_ENDPOINT_URL) sees a GET that never returns, as from an
object store or gateway that stopped sending mid-request.

    with StallingS3Proxy(server.endpoint, stall="stall") as proxy:
        env AWS_ENDPOINT_URL=proxy.endpoint ... reading s3://bucket/a/stall.jpg hangs; a/ok.jpg works

Requests with a chunked body are not supported (the readers under test only GET and HEAD).
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Headers that belong to one connection, not to the request: never forwarded either way.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


class StallingS3Proxy:
    """A threaded proxy on a free 127.0.0.1 port; `held` counts the GETs it is holding or held."""

    def __init__(self, upstream: str, stall: str = "stall"):
        target = urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port
        self.stall = stall
        self.held = 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="stalling-s3", daemon=True)

    def __enter__(self) -> StallingS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Close held requests and stop serving."""
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _hold(self) -> None:
        with self._lock:
            self.held += 1
        self.release.wait()


def _handler_for(proxy: StallingS3Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, format, *args):  # noqa: A002 - quiet test output
            pass

        def _forward(self) -> None:
            if self.command == "GET" and proxy.stall in self.path:
                proxy._hold()
                self.close_connection = True
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
            try:
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        upstream.putheader(name, value)
                upstream.endheaders(body)
                answer = upstream.getresponse()
                data = answer.read()
            finally:
                upstream.close()
            self.send_response(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            if self.command != "HEAD" or answer.getheader("Content-Length") is None:
                self.send_header("Content-Length", str(len(data)))
            else:
                self.send_header("Content-Length", answer.getheader("Content-Length"))  # HEAD: the object's size
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    return Handler
