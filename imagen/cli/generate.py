"""`imagen generate`: one prompt to image files, optionally synced to storage."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import click

from imagen.cli.exits import handle_errors
from imagen.cli.options import check_blank_prompt, round_times
from imagen.config import Settings, load_settings
from imagen.errors import TransientError

T = TypeVar("T")
RETRIES = 3
SEEDED_BACKENDS = ("mock", "gemini")  # openai has no seed: drawing one would only print a warning


@contextmanager
def progress(label: str, enabled: bool) -> Iterator[None]:
    """An elapsed-time line on stderr while the provider works (terminals only)."""
    if not enabled:
        yield
        return
    stop = threading.Event()
    started = time.monotonic()
    frames = "|/-\\"

    def spin() -> None:
        i = 0
        while not stop.wait(0.1):
            click.echo(f"\r{frames[i % 4]} {label} {time.monotonic() - started:5.1f}s", err=True, nl=False)
            i += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        click.echo("\r\033[K", err=True, nl=False)


def with_retries(call: Callable[[], T], *, quiet: bool) -> T:
    """Retry transient provider failures a few times with exponential backoff (honouring retry-after)."""
    for attempt in range(RETRIES):
        try:
            return call()
        except TransientError as exc:
            if attempt == RETRIES - 1:
                raise
            delay = min(exc.retry_after or 2.0**attempt, 30.0)
            if not quiet:
                click.echo(f"imagen: {exc}; retrying in {delay:.0f}s", err=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _usage_sink(settings: Settings, out_dir: Path, sync: bool) -> Any:
    """JSONL next to the images (or IMAGEN_USAGE_LOG); also imagen.usage when syncing to the database."""
    from imagen.usage import DatabaseSink, JsonlSink, MultiSink
    from imagen.usage_spool import UsageSpool

    jsonl = JsonlSink(settings.usage_log or out_dir / "usage.jsonl")
    if sync and settings.database_url:
        # A row the database did not take waits in the host's spool for the workers to write it.
        spool = UsageSpool(settings.usage_spool_dir)
        return MultiSink(jsonl, DatabaseSink.from_url(settings.database_url, spool=spool))
    return jsonl


@click.command()
@click.argument("prompt", callback=check_blank_prompt)
@click.option(
    "--backend", "-b", help="mock, gemini (alias google) or openai  [default: IMAGEN_BACKEND or mock]"
)
@click.option("--model", "-m", help="provider model id  [default: the backend's configured model]")
@click.option(
    "-n", "--count", "count", type=click.IntRange(1, 10), default=1, show_default=True, help="images to make"
)
@click.option("--size", help="WxH, e.g. 1024x768")
@click.option("--aspect", "aspect", help="aspect ratio W:H, e.g. 16:9 (instead of --size)")
@click.option(
    "--preset",
    "-p",
    help="a prompt preset (built-in or from IMAGEN_PRESETS_FILE; `imagen presets` lists them)",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**31 - 1),
    help="seed (honoured by mock and gemini)  [default: random for those, recorded in the sidecar]",
)
@click.option("--negative", help="negative prompt (where the backend supports one)")
@click.option(
    "--quality",
    type=click.Choice(["auto", "low", "medium", "high", "xhigh", "max"]),
    help="openai image quality, its main cost lever  [default: IMAGEN_OPENAI_QUALITY or auto]",
)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    help="output folder  [default: IMAGEN_OUTPUT_DIR or ./out]",
)
@click.option("--sync", is_flag=True, help="also upload to storage and insert an imagen.images row")
@click.option("--owner", type=click.UUID, help="owner user id for --sync  [default: IMAGEN_OWNER_USER_ID]")
@click.option(
    "--ownerless", is_flag=True, help="with --sync and no owner: store an image no user owns (path cli/...)"
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
@handle_errors
def generate(
    prompt: str, backend: str | None, model: str | None, count: int, size: str | None, aspect: str | None,
    preset: str | None, seed: int | None, negative: str | None, quality: str | None, out: Path | None, sync: bool,
    owner: UUID | None, ownerless: bool, as_json: bool,
) -> None:  # fmt: skip
    """Generate images for PROMPT and write them (with JSON sidecars) to the output folder.

    Works with no configuration on the mock backend; `imagen presets` lists the
    presets for --preset. A transient provider error
    is tried up to 3 times in all, with backoff; usage is appended to
    IMAGEN_USAGE_LOG (default OUT/usage.jsonl), and with --sync also to
    imagen.usage. --sync checks the storage settings and that the database
    answers and is migrated before generating.
    """
    from imagen.backends import canonical_name
    from imagen.backends.sizes import parse_aspect, parse_size
    from imagen.errors import InvalidRequest
    from imagen.params import GenerateSpec
    from imagen.pipeline import generate as run

    settings = load_settings()
    if size and aspect:
        raise click.UsageError("give --size or --aspect, not both")
    try:
        parsed_size = parse_size(size) if size else None
        if aspect:
            parse_aspect(aspect)
    except InvalidRequest as exc:
        raise click.BadParameter(str(exc)) from None
    out_dir = out or settings.output_dir
    chosen = canonical_name(backend or settings.backend)
    if seed is None and chosen in SEEDED_BACKENDS:
        seed = random.randrange(2**31)  # recorded in each sidecar, so any image can be drawn again
    spec = GenerateSpec(
        prompt=prompt, backend=backend, model=model, n=count, size=parsed_size, aspect_ratio=aspect,
        preset=preset, seed=seed, negative_prompt=negative, quality=quality,
    )  # fmt: skip
    owner_id = owner or settings.owner_user_id
    if sync and owner_id is None and not ownerless:
        # As `jobs submit`: an image row nobody owns is visible to no user of the UI.
        raise click.UsageError(
            "--sync needs an owner: give --owner UUID or set IMAGEN_OWNER_USER_ID"
            " (or --ownerless for an image no user owns)"
        )
    if sync:
        # Refuse before paying for a generation that could not be synced: the storage settings,
        # and a database that answers and is migrated (78 or 75 in one line, as other commands).
        from imagen.db import preflight
        from imagen.storage import open_storage

        problem = preflight(settings.require_database_url())
        if problem is not None:
            raise problem
        open_storage(settings)
    interactive = sys.stderr.isatty() and not as_json
    sink = _usage_sink(settings, out_dir, sync)
    label = f"generating with {backend or settings.backend}"
    with progress(label, interactive):
        result = with_retries(
            lambda: run(spec, settings, sink=sink, out_dir=out_dir, owner_user_id=owner_id), quiet=as_json
        )
    synced: list[dict[str, Any]] = []
    if sync:
        from imagen.sync import sync_generation

        for item in sync_generation(settings, result, owner_id):
            synced.append({"image_id": str(item.image_id), "bucket": item.bucket, "path": item.path})
            click.echo(f"synced {item.bucket}/{item.path} (image {item.image_id})", err=True)
    if as_json:
        payload = {
            "backend": result.backend,
            "model": result.model,
            "prompt": result.prompt,
            "preset": result.preset,
            "seed": result.seed,
            "images": [
                {
                    "path": str(w.path),
                    "sidecar": str(w.sidecar),
                    "width": w.image.width,
                    "height": w.image.height,
                    "mime": w.image.mime,
                    "seed": w.image.seed,
                }
                for w in result.written
            ],
            "usage": result.usage.to_json(),
            "warnings": result.warnings,
            "synced": synced,
        }
        click.echo(json.dumps(round_times(payload), indent=2))
        return
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    for written in result.written:
        click.echo(str(written.path))
    cost, basis = result.usage.cost_usd, result.usage.cost_basis or ""
    priced = f", est. ${cost:.4f}" if cost else (f", cost unknown ({basis})" if cost is None else "")
    click.echo(
        f"{len(result.written)} image(s) from {result.backend}/{result.model} in "
        f"{result.usage.latency_ms / 1000:.2f}s{priced}",
        err=True,
    )
