"""`imagen presets`: the prompt presets `generate --preset` and a job's `preset` param accept."""

from __future__ import annotations

import json

import click

from imagen.cli.exits import handle_errors
from imagen.config import load_settings


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def presets(as_json: bool) -> None:
    """List the presets with their descriptions and default params.

    The built-in ones, plus those in IMAGEN_PRESETS_FILE, which add presets or
    replace built-ins by name.
    """
    from imagen.presets import load_presets

    settings = load_settings()
    found = load_presets(settings.presets_file)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": p.name,
                        "description": p.description,
                        "prefix": p.prefix,
                        "suffix": p.suffix,
                        "negative_prompt": p.negative_prompt,
                        "params": dict(p.params),
                    }
                    for p in sorted(found.values(), key=lambda p: p.name)
                ],
                indent=2,
            )
        )
        return
    width = max((len(name) for name in found), default=0)
    for name in sorted(found):
        preset = found[name]
        defaults = ", ".join(f"{k}={v}" for k, v in sorted(preset.params.items()))
        click.echo(f"{name:<{width}}  {preset.description or '-'}" + (f"  [{defaults}]" if defaults else ""))
