"""Who may talk to the dashboard, and how an action proves it came from its own page.

Three checks, all in one ASGI middleware so no route can forget them:

- the token (IMAGEN_WEB_TOKEN), when one is set, on every request, static files
  included: an `Authorization: Bearer` header, or the cookie a browser gets by
  opening any page once with `?token=...` (the address is then reloaded without it);
- without a token the app is only for this machine: the Host header must name the
  loopback (a page on another site that rebinds its DNS name to 127.0.0.1 is refused);
- a POST must carry the page's CSRF token in its form, and its Origin, when the
  browser sends one, must be this server.

It must never compare a secret with `==` (timing), put one in a log line or an
error page, or let a GET change anything.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKEN_COOKIE = "imagen_web_token"
CSRF_FIELD = "csrf"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


@dataclass
class Guard:
    """The settings the middleware enforces; `csrf_token` is fresh per process."""

    token: str | None
    image_origins: tuple[str, ...] = ()
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def headers(self) -> dict[str, str]:
        """Sent with every response: scripts only from this server, no framing (the buttons), no sniffing."""
        images = " ".join(["'self'", "data:", *self.image_origins])
        return {
            "Content-Security-Policy": (
                f"default-src 'self'; img-src {images}; style-src 'self' 'unsafe-inline'; "
                "script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
        }

    def token_ok(self, given: str | None) -> bool:
        if self.token is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def csrf_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf_token.encode())


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _refuse(status: int, message: str, *, login: bool = False) -> Response:
    form = (
        '<form method="get"><label>Token <input type="password" name="token" autofocus></label> '
        "<button>Open</button></form>"
        if login
        else ""
    )
    body = (
        "<!doctype html><html><head><meta charset=utf-8><title>imagen web</title></head>"
        f"<body><h1>imagen web</h1><p>{message}</p>{form}</body></html>"
    )
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


class GuardMiddleware:
    """Enforces `Guard` on every HTTP request before any route runs."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        refusal = await self._check(request)
        if refusal is not None:
            await refusal(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.guard.headers().items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _check(self, request: Request) -> Response | None:
        guard = self.guard
        if guard.token is None:
            if _host_name(request.headers.get("host", "")).lower() not in LOOPBACK_HOSTS:
                return _refuse(403, "This dashboard serves only this machine (Host must be localhost).")
        else:
            bearer = request.headers.get("authorization", "")
            given = bearer[7:] if bearer.lower().startswith("bearer ") else request.cookies.get(TOKEN_COOKIE)
            if not guard.token_ok(given):
                in_query = request.query_params.get("token")
                if in_query is not None and request.method == "GET" and guard.token_ok(in_query):
                    return _login(request, in_query)
                return _refuse(401, "This dashboard needs its token (IMAGEN_WEB_TOKEN).", login=True)
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                return _refuse(403, "Refused: the request came from another site.")
        return None


def _login(request: Request, token: str) -> Response:
    """Remember the token in a cookie and reload the address without it."""
    query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
    target = request.url.path + (f"?{query}" if query else "")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        TOKEN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=7 * 86_400,
    )
    return response


async def check_csrf(request: Request, guard: Guard) -> Response | None:
    """None when the POST's form carries this process's CSRF token; a 403 page otherwise."""
    form = await request.form()
    given = form.get(CSRF_FIELD)
    if not guard.csrf_ok(given if isinstance(given, str) else None):
        return _refuse(
            403, "Refused: the form is stale or did not come from this dashboard; reload the page."
        )
    return None
