"""A loopback HTTP server for tests: fixed routes, started and stopped by a fixture (never left running)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Route = tuple[int, bytes, str] | Callable[[bytes], tuple[int, bytes, str]]


@contextmanager
def serve(routes: dict[str, Route], log: list[tuple[str, str, str | None]] | None = None) -> Iterator[str]:
    """Serve `routes` (path -> (status, body, content type), or a function of the request body).

    `log`, when given, receives (method, path, Range header) for every request.
    """

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body_in: bytes) -> None:
            if log is not None:
                log.append((self.command, self.path, self.headers.get("Range")))
            route = routes.get(self.path.split("?")[0])
            status, body, ctype = (404, b"not found", "text/plain") if route is None else (
                route(body_in) if callable(route) else route)
            rng = self.headers.get("Range")
            if rng and status == 200 and rng.startswith("bytes="):
                start, _, end = rng[6:].partition("-")
                first, last = int(start), min(int(end) if end else len(body) - 1, len(body) - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(body)}")
                body = body[first:last + 1]
            else:
                self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(b"")

        def do_HEAD(self) -> None:
            self._answer(b"")

        def do_POST(self) -> None:
            self._answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def json_route(doc: Any) -> tuple[int, bytes, str]:
    """A 200 JSON answer."""
    return 200, json.dumps(doc).encode(), "application/json"
