"""`imagen db migrate|status`."""

from __future__ import annotations

import json

import click

from imagen.cli.exits import fail, handle_errors
from imagen.config import load_settings


@click.group()
def db() -> None:
    """Apply and inspect the schema in IMAGEN_DATABASE_URL."""


@db.command()
@click.option("--database-url", envvar="IMAGEN_DATABASE_URL", help="overrides IMAGEN_DATABASE_URL")
@handle_errors
def migrate(database_url: str | None) -> None:
    """Apply the pending sql/ migrations (safe to run twice; refuses changed ones).

    On plain PostgreSQL the Supabase shim (roles, auth.uid()) is applied first,
    only where auth.uid() does not exist.
    """
    from imagen import db as database

    url = database_url or load_settings().require_database_url()
    database.migrate(url, echo=lambda line: click.echo(line))


@db.command()
@click.option("--database-url", envvar="IMAGEN_DATABASE_URL", help="overrides IMAGEN_DATABASE_URL")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def status(database_url: str | None, as_json: bool) -> None:
    """Show each migration: applied (when), pending, changed or missing. Exit 1 unless all applied."""
    from imagen import db as database

    url = database_url or load_settings().require_database_url()
    rows = database.status(url)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "state": r.state,
                        "checksum": r.checksum,
                        "applied_at": r.applied_at.isoformat() if r.applied_at else None,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
    else:
        for r in rows:
            when = r.applied_at.strftime("%Y-%m-%d %H:%M:%S %Z") if r.applied_at else ""
            click.echo(f"{r.state:<8} {r.name:<32} {r.checksum[:12]}  {when}".rstrip())
    if any(r.state != "applied" for r in rows):
        fail("the schema is not up to date: run `imagen db migrate`")
