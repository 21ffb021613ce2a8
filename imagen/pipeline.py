"""generate(spec) -> images + usage: presets, backend, usage sink, local writer.

The one generation path: `imagen generate` and the generation actor both call
`generate`, so a job and a CLI run with the same inputs behave the same. It
never retries (the CLI and Dramatiq own retry policy) and never touches the
database or Redis itself; callers pass the usage sink.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from imagen import interrupts
from imagen.backends import canonical_name, get_backend
from imagen.backends.base import Backend, GeneratedImage, ImageRequest, Usage
from imagen.config import Settings
from imagen.errors import ImagenError, InvalidRequest
from imagen.params import GenerateSpec
from imagen.usage import UsageRecord, UsageSink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """What one `generate` call produced and recorded."""

    images: list[GeneratedImage]
    backend: str
    model: str
    prompt: str
    negative_prompt: str | None
    preset: str | None
    seed: int | None
    params: dict[str, Any]
    usage: UsageRecord
    warnings: list[str] = field(default_factory=list)
    written: list[Any] = field(default_factory=list)


def seed_for_job(job_id: UUID) -> int:
    """A stable seed for a job that named none, so a rerun draws the same image."""
    return int.from_bytes(hashlib.sha256(job_id.bytes).digest()[:4], "big") & 0x7FFFFFFF


def _cost(usage: Usage) -> tuple[float | None, str | None]:
    """The cost estimate and its basis (why it is None, when it is)."""
    from imagen.prices import price_usage

    try:
        estimate = price_usage(usage)
    except Exception:  # a price-table problem must not lose an image
        log.exception("usage: could not estimate cost for %s/%s", usage.backend, usage.model)
        return None, "unpriced: the price table could not be read (see the worker log)"
    return estimate.usd, estimate.basis


def _record(usage: Usage, owner_user_id: UUID | None, job_id: UUID | None, call_id: UUID) -> UsageRecord:
    cost, basis = _cost(usage)
    return UsageRecord.from_usage(
        usage, cost_usd=cost, cost_basis=basis, owner_user_id=owner_user_id, job_id=job_id, call_id=call_id
    )


def resolve_spec(
    spec: GenerateSpec, settings: Settings, presets: Any = None
) -> tuple[GenerateSpec, str | None]:
    """Apply the preset (its params are defaults; explicit values win) and the configured backend."""
    from imagen.backends.sizes import parse_size
    from imagen.presets import apply_preset, load_presets

    if presets is None:
        presets = load_presets(settings.presets_file)
    applied = apply_preset(presets, spec.preset, spec.prompt, spec.negative_prompt)
    defaults = applied.defaults
    size, aspect = spec.size, spec.aspect_ratio
    if size is None and aspect is None:
        if defaults.get("size"):
            size = parse_size(str(defaults["size"]))
        elif defaults.get("aspect_ratio"):
            aspect = str(defaults["aspect_ratio"])
    backend = canonical_name(spec.backend or defaults.get("backend") or settings.backend)
    if spec.options and backend != "mock":
        raise InvalidRequest(f"params {', '.join(sorted(spec.options))} only apply to the mock backend")
    resolved = replace(
        spec,
        prompt=applied.prompt,
        negative_prompt=applied.negative_prompt,
        backend=backend,
        model=spec.model
        or defaults.get("model")
        or (settings.model if backend == canonical_name(settings.backend) else None),
        size=size,
        aspect_ratio=aspect,
        seed=spec.seed if spec.seed is not None else defaults.get("seed"),
    )
    return resolved, applied.name


def generate(
    spec: GenerateSpec,
    settings: Settings,
    *,
    sink: UsageSink,
    out_dir: Path | None = None,
    owner_user_id: UUID | None = None,
    job_id: UUID | None = None,
    presets: Any = None,
    backends: dict[str, Backend] | None = None,
    check: Callable[[Backend, GenerateSpec], None] | None = None,
) -> Generation:
    """Run one generation; record usage (failed calls too); write local copies when out_dir is given.

    `backends` caches backend instances across calls (the actors keep one per
    process, so provider SDK clients and their connections are reused). `check`
    sees the backend and the resolved spec (presets applied) before the provider
    is called: the stages pass the operator's job policy (imagen.job_policy).
    The provider call goes through `interrupts.call`, so a stage can abandon it.
    Raises TransientError or PermanentError subclasses from `imagen.errors`.
    """
    resolved, preset_name = resolve_spec(spec, settings, presets)
    assert resolved.backend is not None
    if backends is None:
        backend = get_backend(resolved.backend, settings)
    else:
        if resolved.backend not in backends:
            backends[resolved.backend] = get_backend(resolved.backend, settings)
        backend = backends[resolved.backend]
    if check is not None:
        check(backend, resolved)
    # The call's id exists before the call: whatever happens after the answer, its usage row is
    # written under this id, so writing it again (a lost reply, a spool replay) adds no second row.
    call_id = uuid4()
    request = ImageRequest(
        prompt=resolved.prompt,
        negative_prompt=resolved.negative_prompt,
        n=resolved.n,
        size=resolved.size,
        aspect_ratio=resolved.aspect_ratio,
        seed=resolved.seed,
        model=resolved.model,
        quality=resolved.quality,
        timeout_s=settings.provider_timeout,
        options=dict(resolved.options),
        call_id=str(call_id),
    )
    model = resolved.model or backend.default_model()
    started = time.monotonic()
    try:
        if getattr(backend, "interruptible", False):
            result = backend.generate(request)
        else:
            result = interrupts.call(lambda: backend.generate(request))
    except ImagenError as exc:
        failed = getattr(exc, "usage", None) or Usage(
            backend=backend.name, model=model, latency_ms=(time.monotonic() - started) * 1000
        )
        failed = replace(failed, ok=False, error=failed.error or f"{type(exc).__name__}: {exc}")
        sink.record(_record(failed, owner_user_id, job_id, call_id))
        raise
    record = _record(result.usage, owner_user_id, job_id, call_id)
    sink.record(record)
    params: dict[str, Any] = {
        "size": f"{resolved.size[0]}x{resolved.size[1]}" if resolved.size else None,
        "aspect_ratio": resolved.aspect_ratio,
        "seed": resolved.seed,
        "negative_prompt": resolved.negative_prompt,
        "quality": resolved.quality,
        "n": resolved.n,
        **dict(resolved.options),
    }
    params = {k: v for k, v in params.items() if v is not None}
    generation = Generation(
        images=result.images,
        backend=backend.name,
        model=result.model or model,
        prompt=resolved.prompt,
        negative_prompt=resolved.negative_prompt,
        preset=preset_name,
        seed=resolved.seed,
        params=params,
        usage=record,
        warnings=list(result.warnings),
    )
    if out_dir is not None:
        from imagen.writer import write_images

        written = write_images(
            out_dir,
            result.images,
            prompt=resolved.prompt,
            preset=preset_name,
            params=params,
            backend=backend.name,
            model=generation.model,
            usage=record.to_json(),
            created_at=datetime.now(UTC),
            job_id=str(job_id) if job_id else None,
            name_hint=spec.prompt,
        )
        generation = replace(generation, written=written)
    return generation
