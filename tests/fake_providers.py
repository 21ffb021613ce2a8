"""A loopback HTTP server that speaks whatever JSON a test scripts, for provider contract tests.

Each SDK is pointed at it through its base URL, so the tests exercise the real
client, the real wire format and the real error parsing without a network or a
mocked transport. It records every request (method, path, headers, JSON body)
and replays scripted responses in order; it must never listen beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

# Variables either SDK (or httpx2's proxy support) reads from the environment; tests clear
# them so a developer's real keys, hosts or proxies never leak into a contract test.
PROVIDER_ENV_VARS = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_GEMINI_BASE_URL",
    "GOOGLE_VERTEX_BASE_URL",
    "GOOGLE_GENAI_API_VERSION",
    "GOOGLE_GENAI_USE_ENTERPRISE",
    "GOOGLE_GENAI_USE_VERTEXAI",
    "GOOGLE_CLOUD_PROJECT",
    "GOOGLE_CLOUD_LOCATION",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


def isolate_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every provider/proxy variable for the test's duration."""
    for name in PROVIDER_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def png_bytes(width: int = 64, height: int = 48, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A real, small PNG rendered with Pillow."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def png_b64(width: int = 64, height: int = 48) -> str:
    return base64.b64encode(png_bytes(width, height)).decode("ascii")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it; header names are lower-case."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass(frozen=True)
class ScriptedResponse:
    """What to answer: status, JSON body, extra headers and an optional delay before answering."""

    status: int = 200
    body: Any = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


class FakeProvider:
    """A ThreadingHTTPServer on 127.0.0.1 that replays scripted responses in order."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._script: deque[ScriptedResponse] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # A short poll interval keeps shutdown (one per test) from costing the default 0.5 s.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="fake-provider",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def reply(self, *responses: ScriptedResponse) -> None:
        """Queue responses; each request takes the next one (a 599 once the script runs out)."""
        with self._lock:
            self._script.extend(responses)

    def _next(self, request: RecordedRequest) -> ScriptedResponse:
        with self._lock:
            self.requests.append(request)
            if self._script:
                return self._script.popleft()
        return ScriptedResponse(599, {"error": {"message": "fake provider: no scripted response left"}})

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                recorded = RecordedRequest(
                    method=self.command,
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                scripted = provider._next(recorded)
                if scripted.delay_s:
                    # Closing the server releases a slow answer early, so teardown never waits.
                    provider._closing.wait(scripted.delay_s)
                payload = json.dumps(scripted.body).encode()
                try:
                    self.send_response(scripted.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for name, value in scripted.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test); nothing to answer

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def start(self) -> FakeProvider:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def fake_provider() -> Iterator[FakeProvider]:
    """A started FakeProvider, shut down afterwards."""
    server = FakeProvider().start()
    try:
        yield server
    finally:
        server.close()
