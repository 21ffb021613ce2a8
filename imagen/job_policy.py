"""The operator's policy for what a job's params may choose, checked before any provider call.

A job row is written by a signed-in user, so its params are hostile input
(docs/security.md): without a policy any user could pick a backend or model the
operator never offered (and the bill that goes with it), the mock's test options
(`delay_ms` holds a worker thread), an OpenAI quality that multiplies the price
of every image, or a size that costs a worker hundreds of megabytes. The policy comes from settings only; the CLI (`imagen generate`) is
the operator's own tool and does not apply it. A refusal is an InvalidRequest
(permanent: the job fails at once) whose text names the setting to change, and
an error never lists a choice the policy does not allow.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagen.backends import canonical_name
from imagen.config import Settings
from imagen.errors import ConfigError, InvalidRequest
from imagen.params import QUALITIES

TEST_OPTIONS = ("delay_ms", "fail")
# The largest size a job can ask a real provider for: OpenAI's gpt-image-2 custom sizes go up
# to 3840x2160; Gemini takes an aspect ratio and a resolution, never a pixel size.
DEFAULT_MAX_PIXELS = 3840 * 2160
# Backends whose bill depends on the model: a job names only models the operator listed.
BILLED_BY_MODEL = ("gemini", "openai")
# Backends whose bill depends on params.quality (others ignore it, with a warning).
BILLED_BY_QUALITY = ("openai",)
ANY = "*"


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in (text or "").split(",") if part.strip()))


@dataclass(frozen=True)
class JobPolicy:
    """What a job may choose: backends, models per backend, OpenAI qualities, test options, pixels per image."""

    backends: tuple[str, ...]
    # Per backend billed by model: the models a job may name (ANY: every model); a job
    # that names none gets the backend's configured model, which is always allowed.
    models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # The params.quality values a job may name for the backends in BILLED_BY_QUALITY (ANY: every
    # one); a job that names none gets IMAGEN_OPENAI_QUALITY, which is always allowed.
    qualities: tuple[str, ...] = (ANY,)
    test_options: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_settings(cls, settings: Settings) -> JobPolicy:
        """The policy in `settings`; ConfigError naming the variable when a backend is unknown."""
        names = _names(settings.job_backends) or (settings.backend,)
        try:
            backends = tuple(dict.fromkeys(canonical_name(name) for name in names))
        except InvalidRequest as exc:
            raise ConfigError(f"IMAGEN_JOB_BACKENDS: {exc}") from None
        configured = {"gemini": settings.gemini_model, "openai": settings.openai_model}
        if settings.model and canonical_name(settings.backend) in configured:
            configured[canonical_name(settings.backend)] = settings.model
        listed = {"gemini": settings.job_gemini_models, "openai": settings.job_openai_models}
        models = {key: _names(listed[key]) or (configured[key],) for key in BILLED_BY_MODEL}
        qualities = _names(settings.job_openai_qualities) or (settings.openai_quality,)
        wrong = [name for name in qualities if name not in (*QUALITIES, ANY)]
        if wrong:
            raise ConfigError(
                f"IMAGEN_JOB_OPENAI_QUALITIES: unknown quality {wrong[0][:20]!r}; use {', '.join(QUALITIES)} or *"
            )
        return cls(
            backends=backends,
            models=models,
            qualities=qualities,
            test_options=settings.job_test_options,
            max_pixels=settings.max_pixels,
        )

    def allowed_keys(self, known: Collection[str]) -> tuple[str, ...]:
        """The params keys a job may use: `known` without the test options when they are off."""
        return tuple(key for key in known if self.test_options or key not in TEST_OPTIONS)

    def check_keys(self, params: Mapping[str, Any]) -> None:
        """Refuse the mock's test options unless the operator turned them on."""
        used = [key for key in TEST_OPTIONS if key in params]
        if used and not self.test_options:
            raise InvalidRequest(
                f"params {', '.join(used)} are test options, off on this server"
                " (the operator can set IMAGEN_JOB_TEST_OPTIONS=true)"
            )

    def check_backend(self, name: str) -> str:
        """The canonical name of a backend a job may use; refused otherwise, listing only the allowed ones."""
        allowed = ", ".join(self.backends)
        try:
            key = canonical_name(name)
        except InvalidRequest:
            raise InvalidRequest(f"unknown backend {name[:40]!r}; jobs may use: {allowed}") from None
        if key not in self.backends:
            raise InvalidRequest(
                f"backend {key!r} is not offered for jobs on this server; jobs may use: {allowed}"
                " (the operator can add it to IMAGEN_JOB_BACKENDS)"
            )
        return key

    def check_model(self, backend: str, model: str | None) -> None:
        allowed = self.models.get(backend)
        if model is None or allowed is None or ANY in allowed or model in allowed:
            return
        raise InvalidRequest(
            f"model {model[:100]!r} is not offered for {backend} jobs on this server; jobs may use:"
            f" {', '.join(allowed)} (the operator can add it to IMAGEN_JOB_{backend.upper()}_MODELS)"
        )

    def quality_choices(self) -> tuple[str, ...]:
        """The qualities a job's error may list: only those allowed."""
        return QUALITIES if ANY in self.qualities else tuple(q for q in QUALITIES if q in self.qualities)

    def check_quality(self, backend: str, quality: str | None) -> None:
        """Refuse a quality the operator does not offer, on a backend that bills by it."""
        if quality is None or backend not in BILLED_BY_QUALITY or ANY in self.qualities:
            return
        if quality not in self.qualities:
            raise InvalidRequest(
                f"quality {quality!r} is not offered for {backend} jobs on this server; jobs may use:"
                f" {', '.join(self.quality_choices())} (the operator can add it to IMAGEN_JOB_OPENAI_QUALITIES)"
            )

    def check_size(
        self, backend: str, size: tuple[int, int] | None, allowed: Collection[tuple[int, int]] | None
    ) -> None:
        """Bound the pixels a job may ask for, and, where the backend lists them, its sizes."""
        if size is None:
            return
        width, height = size
        if width * height > self.max_pixels:
            raise InvalidRequest(
                f"size {width}x{height} is {width * height} pixels, more than this server allows for a job"
                f" ({self.max_pixels}; the operator can raise IMAGEN_MAX_PIXELS)"
            )
        if allowed is not None and size not in allowed:
            shown = ", ".join(f"{w}x{h}" for w, h in allowed if w * h <= self.max_pixels)
            raise InvalidRequest(f"size {width}x{height} is not one {backend} makes; allowed: {shown}")


def check_generation(policy: JobPolicy, backend: Any, spec: Any) -> None:
    """Check a resolved spec (presets applied) against the policy, before the provider is called.

    A backend may list the sizes it makes (`allowed_sizes(model)` returning a collection of
    (width, height), or None for any size within the pixel bound); see docs/security.md.
    """
    policy.check_backend(backend.name)
    policy.check_model(backend.name, spec.model)
    policy.check_quality(backend.name, spec.quality)
    if spec.options:
        policy.check_keys(spec.options)
    sizes = getattr(backend, "allowed_sizes", None)
    allowed = sizes(spec.model or backend.default_model()) if callable(sizes) else None
    policy.check_size(backend.name, spec.size, allowed)
