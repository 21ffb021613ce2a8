"""`imagen jobs ...`: operator commands on imagen.jobs."""

from __future__ import annotations

import click


@click.group()
def jobs() -> None:
    """Inspect and steer jobs in IMAGEN_DATABASE_URL."""
