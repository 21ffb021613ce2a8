"""A loopback image provider in the OpenAI wire format that limits its callers like a real one.

`POST /v1/images/generations` answers a real PNG after `latency_s`, but only for
`capacity` calls at once: a call beyond that, or any call while `refuse_until`
is in the future, gets 429 `rate_limit_exceeded` with `Retry-After`. It counts
what a test asserts on: calls, 429s, and the most calls it ever served at once.
The imagen workers reach it through OPENAI_BASE_URL; it listens on 127.0.0.1 only.
It also records when each served call began and ended, for the capped-backend
benchmark (`imagen.devtools.bench.capped`); the admission tests use it too.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


def _png_b64(size: int = 32) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


USAGE = {
    "input_tokens": 12,
    "output_tokens": 196,
    "total_tokens": 208,
    "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
    "output_tokens_details": {"image_tokens": 196, "text_tokens": 0},
}


class CappedProvider:
    """Serves image calls up to `capacity` at once; 429 + Retry-After beyond, or while refusing."""

    def __init__(self, *, capacity: int, latency_s: float = 0.2, retry_after: str = "1") -> None:
        self.capacity = capacity
        self.latency_s = latency_s
        self.retry_after = retry_after
        self.refuse_until = 0.0
        self.in_flight = 0
        self.most_in_flight = 0
        self.calls = 0
        self.served = 0
        self.refused = 0
        self.spans: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self._image = _png_b64()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def refuse_for(self, seconds: float) -> None:
        """Answer every call with 429 for the next `seconds`, as a provider over its limit does."""
        with self.lock:
            self.refuse_until = time.monotonic() + seconds

    def _admit(self) -> float | None:
        """The call's start time when it is served, None when it is refused."""
        with self.lock:
            self.calls += 1
            now = time.monotonic()
            if self.in_flight >= self.capacity or now < self.refuse_until:
                self.refused += 1
                return None
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            return now

    def _done(self, started: float) -> None:
        with self.lock:
            self.in_flight -= 1
            self.served += 1
            self.spans.append((started, time.monotonic()))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                if not self.path.endswith("/images/generations"):
                    self._answer(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
                    return
                started = provider._admit()
                body: dict[str, Any]
                if started is None:
                    body = {
                        "error": {
                            "message": "Rate limit reached for images per minute.",
                            "type": "requests",
                            "code": "rate_limit_exceeded",
                        }
                    }
                    self._answer(429, body, {"retry-after": provider.retry_after})
                    return
                try:
                    time.sleep(provider.latency_s)
                    body = {
                        "created": int(time.time()),
                        "data": [{"b64_json": provider._image}],
                        "usage": USAGE,
                    }
                finally:
                    provider._done(started)
                self._answer(200, body)

            def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                payload = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def start(self) -> CappedProvider:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def capped_provider(**options: Any) -> Iterator[CappedProvider]:
    server = CappedProvider(**options).start()
    try:
        yield server
    finally:
        server.close()
