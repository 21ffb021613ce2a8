"""Builds the dashboard's Starlette app: settings, a small connection pool, templates, routes.

The app holds no state of its own beyond a connection pool and a thumbnail
cache: every page is read from the database when asked for, so several
dashboards (or a restarted one) always agree with `imagen jobs`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from imagen.config import Settings
from imagen.errors import ConfigError
from imagen.web.images import ImageSource
from imagen.web.security import CSRF_FIELD, Guard, GuardMiddleware

if TYPE_CHECKING:
    from imagen.store import PostgresJobStore

HERE = Path(__file__).parent
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class WebOptions:
    """How `imagen web` was started."""

    host: str = "127.0.0.1"
    port: int = 9400
    read_only: bool = False
    refresh_seconds: float = 1.0
    page_size: int = 50
    database_timeout: float = 10.0


@dataclass
class WebState:
    """What every route needs, on `request.app.state.web`."""

    settings: Settings
    options: WebOptions
    guard: Guard
    templates: Jinja2Templates
    images: ImageSource
    pool: Any = field(default=None)

    @contextmanager
    def store(self) -> Iterator[PostgresJobStore]:
        """The job store on one pooled autocommit connection, for one request's reads and writes."""
        from imagen.store import PostgresJobStore

        with self.pool.connection() as conn:
            yield PostgresJobStore(lambda: nullcontext(conn))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse a bind beyond this machine without a token, and a token too short to be one."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"IMAGEN_WEB_TOKEN is too short: use at least {MIN_TOKEN_LENGTH} random characters "
            "(for example the output of `openssl rand -hex 24`)"
        )
    if not is_loopback(host) and token is None:
        raise ConfigError(
            f"imagen web --host {host} would serve other machines: set IMAGEN_WEB_TOKEN "
            "(every request must then carry it), or bind 127.0.0.1 and use an SSH tunnel"
        )


def _templates(state_guard: Guard, options: WebOptions) -> Jinja2Templates:
    from imagen.web import format as fmt

    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters.update(duration=fmt.duration, when=fmt.when, short=fmt.short, count=fmt.count)
    env.globals.update(
        csrf_field=CSRF_FIELD,
        csrf_token=state_guard.csrf_token,
        read_only=options.read_only,
        refresh_ms=int(options.refresh_seconds * 1000),
        now=lambda: datetime.now(UTC),
    )
    return templates


async def _unavailable(request: Request, exc: Exception) -> Response:
    """The database or pool failed: one line and 503, never a traceback page (and never a password)."""
    kind = type(exc).__module__.split(".")[0]
    if kind not in ("psycopg", "psycopg_pool"):
        return PlainTextResponse("internal error: see imagen web's log", status_code=500)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return PlainTextResponse(f"database unavailable: {first}", status_code=503)


def create_app(
    settings: Settings, options: WebOptions | None = None, *, token: str | None = None
) -> Starlette:
    """The dashboard over `settings.database_url`; `token`, when given, is required on every request."""
    from imagen.web import routes

    options = options or WebOptions()
    check_bind(options.host, token)
    database_url = settings.require_database_url()
    origins: tuple[str, ...] = ()
    if settings.storage_kind == "supabase" and settings.supabase_url:
        parts = urlsplit(settings.supabase_url)
        origins = (f"{parts.scheme}://{parts.netloc}",)
    guard = Guard(token=token, image_origins=origins)
    state = WebState(
        settings=settings,
        options=options,
        guard=guard,
        templates=_templates(guard, options),
        images=ImageSource(settings),
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        from psycopg_pool import ConnectionPool

        state.pool = ConnectionPool(
            database_url,
            min_size=1,
            max_size=4,
            kwargs={"autocommit": True, "application_name": "imagen-web", "connect_timeout": 10},
            open=True,
            timeout=options.database_timeout,
            check=ConnectionPool.check_connection,
        )
        try:
            yield
        finally:
            state.pool.close()

    app = Starlette(
        routes=[
            *routes.ROUTES,
            Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
        ],
        middleware=[Middleware(GuardMiddleware, guard=guard)],
        exception_handlers={Exception: _unavailable},
        lifespan=lifespan,
    )
    app.state.web = state
    return app


__all__ = ["WebOptions", "WebState", "check_bind", "create_app", "is_loopback"]
