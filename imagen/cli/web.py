"""`imagen web`: serve the operator dashboard (parse, check the bind, run uvicorn)."""

from __future__ import annotations

import click

from imagen.cli.exits import handle_errors
from imagen.config import load_settings


@click.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="address to bind; beyond loopback needs IMAGEN_WEB_TOKEN",
)
@click.option("--port", type=click.IntRange(1, 65535), default=9400, show_default=True)
@click.option("--read-only", is_flag=True, help="hide the retry and cancel buttons and refuse the actions")
@click.option(
    "--refresh",
    type=click.FloatRange(min=0.2, max=60),
    default=1.0,
    show_default=True,
    help="seconds between the browser's refreshes of live pages",
)
@handle_errors
def web(host: str, port: int, read_only: bool, refresh: float) -> None:
    """Serve the operator dashboard: live jobs, their images, health.

    Binds 127.0.0.1 by default: open it from another machine through an SSH
    tunnel (docs/operations.md). Any other --host needs IMAGEN_WEB_TOKEN, which
    every request must then carry (open the page once as /?token=...). With a
    token set, loopback binds require it too.
    """
    import uvicorn

    from imagen.web import WebOptions, create_app

    settings = load_settings()
    token = settings.web_token.get_secret_value() if settings.web_token else None
    options = WebOptions(host=host, port=port, read_only=read_only, refresh_seconds=refresh)
    app = create_app(settings, options, token=token)
    from imagen.db import check_schema, connect

    # A wrong URL, a server that is down or a schema never migrated fails here, in one line
    # (75 or 78), not on the first page.
    with connect(settings.require_database_url(), connect_timeout=10) as conn:
        check_schema(conn)
    shown = f"[{host}]" if ":" in host else host
    notes = [n for n, on in (("read-only", read_only), ("token required", token is not None)) if on]
    click.echo(f"imagen web: http://{shown}:{port}/" + (f" ({', '.join(notes)})" if notes else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False)
