"""A loopback OpenAI-compatible chat-completions server for testing `pipeline.curation.vlm` without a real model.

It can be scripted to fail (429, 5xx, hangs, malformed replies, wrong key), records every request and
answers a caption derived from the request, so tests can check which text went with which image.
"""

from __future__ import annotations

import base64
import collections
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Action:
    """How the server answers one request; build with the helpers below."""

    kind: str  # ok | status | hang | not_json | no_choices | empty_content
    status: int = 200
    retry_after: str | None = None
    body: str | None = None
    echo_auth: bool = False
    delay_s: float = 0.0


def ok(delay_s: float = 0.0) -> Action:
    """A normal caption, after `delay_s` seconds."""
    return Action("ok", delay_s=delay_s)


def status(code: int, retry_after: str | None = None, body: str | None = None, echo_auth: bool = False) -> Action:
    """An error status with a JSON error body (or `body`), an optional Retry-After, optionally echoing the key."""
    return Action("status", status=code, retry_after=retry_after, body=body, echo_auth=echo_auth)


def hang(seconds: float = 5.0) -> Action:
    """Say nothing for `seconds` (cut short when the server stops), then answer normally."""
    return Action("hang", delay_s=seconds)


def not_json() -> Action:
    """200 with an HTML body."""
    return Action("not_json")


def no_choices() -> Action:
    """200 with JSON that has no `choices`."""
    return Action("no_choices")


def empty_content() -> Action:
    """200 with a whitespace-only caption."""
    return Action("empty_content")


def expected_caption(model: str, image: bytes, mime: str, prompt: str) -> str:
    """The (stripped) caption the server gives for this model, image and prompt text."""
    return f"{model} saw a {len(image)}-byte {mime} image. Prompt: {prompt}"


@dataclass(frozen=True)
class Recorded:
    """One request as received."""

    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None when the body was not JSON
    at: float  # time.monotonic() on arrival

    @property
    def prompt(self) -> str | None:
        """The text part of the user message."""
        parts = _user_parts(self.body)
        return next((p["text"] for p in parts if p.get("type") == "text"), None)

    @property
    def image_url(self) -> str | None:
        """The data URL of the image part."""
        parts = _user_parts(self.body)
        return next((p["image_url"]["url"] for p in parts if p.get("type") == "image_url"), None)

    @property
    def image(self) -> tuple[str, bytes] | None:
        """(mime, bytes) decoded from the image data URL."""
        url = self.image_url
        if url is None or not url.startswith("data:"):
            return None
        head, _, data = url[5:].partition(",")
        return head.split(";")[0], base64.b64decode(data)


def _user_parts(body: Any) -> list[dict[str, Any]]:
    try:
        content = body["messages"][-1]["content"]
    except (KeyError, IndexError, TypeError):
        return []
    return [p for p in content if isinstance(p, dict)] if isinstance(content, list) else []


@dataclass
class VlmServer:
    """State of a running server: the script, what it received and the most requests it had at once."""

    base_url: str = ""
    api_key: str | None = None  # when set, requests need `Authorization: Bearer <api_key>`
    default: Action = field(default_factory=ok)  # answer once the scripts are used up
    requests: list[Recorded] = field(default_factory=list)
    max_in_flight: int = 0
    _queue: collections.deque[Action] = field(default_factory=collections.deque)
    _per_image: dict[bytes, collections.deque[Action]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _in_flight: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def script(self, *actions: Action) -> None:
        """Answer the next requests (any image) with `actions`, in order."""
        with self._lock:
            self._queue.extend(actions)

    def script_image(self, image: bytes, *actions: Action) -> None:
        """Answer the next requests for this exact image with `actions`, before the shared script."""
        with self._lock:
            self._per_image.setdefault(image, collections.deque()).extend(actions)

    def calls(self) -> int:
        """How many requests arrived."""
        with self._lock:
            return len(self.requests)

    def _enter(self, rec: Recorded) -> Action:
        with self._lock:
            self.requests.append(rec)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            img = rec.image
            own = self._per_image.get(img[1]) if img else None
            if own:
                return own.popleft()
            return self._queue.popleft() if self._queue else self.default

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins handler threads, so nothing outlives the test
    block_on_close = True


@contextmanager
def vlm_server(api_key: str | None = None) -> Iterator[VlmServer]:
    """Run a server on 127.0.0.1 (a free port) for the `with` block; it always shuts down."""
    state = VlmServer(api_key=api_key)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            headers = {k.lower(): v for k, v in self.headers.items()}
            if self.path != PATH:
                self._send(404, b"not found", "text/plain")
                return
            action = state._enter(Recorded(self.path, headers, body, time.monotonic()))
            try:
                self._act(action, headers, body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout) before the answer
            finally:
                state._leave()

        def _act(self, action: Action, headers: dict[str, str], body: Any) -> None:
            auth = headers.get("authorization")
            if state.api_key is not None and auth != f"Bearer {state.api_key}":
                error = {"error": {"message": f"Incorrect API key provided: {auth}", "code": "invalid_api_key"}}
                self._send(401, json.dumps(error).encode(), "application/json")
                return
            if body is None:
                self._send(400, b'{"error": {"message": "body is not JSON"}}', "application/json")
                return
            if action.kind in ("ok", "hang") and action.delay_s:
                state._stop.wait(action.delay_s)
            if action.kind == "status":
                message = action.body if action.body is not None else json.dumps(
                    {"error": {"message": f"scripted {action.status}" + (f" for {auth}" if action.echo_auth else "")}})
                extra = {"Retry-After": action.retry_after} if action.retry_after is not None else {}
                self._send(action.status, message.encode(), "application/json", extra)
            elif action.kind == "not_json":
                self._send(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
            elif action.kind == "no_choices":
                self._send(200, json.dumps({"id": "x", "object": "chat.completion"}).encode(), "application/json")
            else:
                text = "  \n " if action.kind == "empty_content" else self._caption(body)
                reply = {"id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"),
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}]}
                self._send(200, json.dumps(reply).encode(), "application/json")

        def _caption(self, body: Any) -> str:
            rec = Recorded(self.path, {}, body, 0.0)
            mime, image = rec.image or ("none", b"")
            return f"  {expected_caption(str(body.get('model')), image, mime, rec.prompt or '')}\n"

        def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        state._stop.set()
        server.shutdown()
        server.server_close()
        thread.join()
