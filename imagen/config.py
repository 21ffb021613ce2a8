"""The one place that reads the environment and `.env`: typed, validated settings.

Every other module receives a `Settings` object (or calls `load_settings`); none
reads `os.environ` for imagen's own variables. A bad value becomes a one-line
`ConfigError` naming the variable, never a traceback. Secrets are `SecretStr`
so they never print in a repr, a log line or an error.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal
from uuid import UUID

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from imagen.errors import ConfigError, ImagenError


def _data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "imagen"


def _default_storage_dir() -> Path:
    return _data_dir() / "storage"


def _default_usage_spool_dir() -> Path:
    return _data_dir() / "usage-spool"


class Settings(BaseSettings):
    """imagen's configuration; field names map to `IMAGEN_<NAME>` unless aliased."""

    model_config = SettingsConfigDict(
        env_prefix="IMAGEN_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    # repr=False: connection strings may carry passwords.
    database_url: str | None = Field(
        default=None, repr=False, description="session connection for the pipeline"
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    backend: str = "mock"
    model: str | None = None
    storage: Literal["local", "supabase"] | None = None
    storage_dir: Path = Field(default_factory=_default_storage_dir)
    output_dir: Path = Path("./out")
    keep_local_copy: bool = True
    supabase_url: str | None = Field(
        default=None, validation_alias=AliasChoices("SUPABASE_URL", "IMAGEN_SUPABASE_URL")
    )
    supabase_service_role_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("SUPABASE_SERVICE_ROLE_KEY", "IMAGEN_SUPABASE_SERVICE_ROLE_KEY"),
    )
    bucket: str = "imagen"
    owner_user_id: UUID | None = None
    poll_interval: float = Field(default=5.0, gt=0)
    lease_seconds: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    claim_batch: int = Field(default=100, ge=1, le=10_000)
    max_in_flight: int = Field(default=256, ge=1)
    handoff_ttl: int = Field(default=3600, ge=10)
    chain_stages: bool = True
    stage_retries: int = Field(default=4, ge=0)
    retry_min_backoff_ms: int = Field(default=1000, ge=1)
    retry_max_backoff_ms: int = Field(default=60_000, ge=1)
    generate_time_limit: float = Field(default=360.0, gt=0, description="seconds")
    provider_timeout: float = Field(default=300.0, gt=0)
    retry_timeouts: bool = False
    # What a job's params may choose (imagen/job_policy.py, docs/security.md).
    job_backends: str | None = None
    job_gemini_models: str | None = None
    job_openai_models: str | None = None
    job_openai_qualities: str | None = None
    job_test_options: bool = False
    max_pixels: int = Field(default=3840 * 2160, ge=256)
    # Seconds a provider call or simulated delay in progress may still run after SIGTERM.
    shutdown_grace: float = Field(default=60.0, ge=0)
    usage_log: Path | None = None
    # Usage records the database did not take yet wait here (imagen.usage_spool); shared by a host's processes.
    usage_spool_dir: Path = Field(default_factory=_default_usage_spool_dir)
    # The mock backend appends one line per call here (tests count provider calls with it); off when unset.
    mock_call_log: Path | None = None
    presets_file: Path | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    listener_metrics_port: int = Field(default=9300, ge=0, le=65535)
    metrics_addr: str = "127.0.0.1"
    worker_metrics: bool = True
    web_token: SecretStr | None = Field(default=None, description="imagen web: required on every request")
    gemini_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("GOOGLE_API_KEY", "GEMINI_API_KEY")
    )
    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(default=None, validation_alias="OPENAI_BASE_URL")
    gemini_base_url: str | None = Field(default=None, validation_alias="GOOGLE_GEMINI_BASE_URL")
    gemini_api_version: str | None = Field(default=None, validation_alias="GOOGLE_GENAI_API_VERSION")
    gemini_model: str = "gemini-2.5-flash-image"
    openai_model: str = "gpt-image-2.5-flare"
    openai_quality: Literal["auto", "low", "medium", "high", "xhigh", "max"] = "auto"
    backend_concurrency: str = Field(default="", description="provider calls in flight: openai=4,google=8")
    backend_rpm: str = Field(default="", description="provider calls started per minute: openai=60")
    throttle_max_wait: float = Field(default=900.0, gt=0, description="seconds")
    owner_daily_images: int | None = Field(default=None, ge=0)
    owner_daily_cost_usd: float | None = Field(default=None, ge=0)

    @field_validator("backend")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a URL like redis://host:6379/0 (or rediss://, unix://)")
        return value

    @field_validator("backend_concurrency", "backend_rpm")
    @classmethod
    def _caps(cls, value: str) -> str:
        parse_caps(value)  # a bad list fails at start-up, naming the variable
        return value

    @field_validator("owner_daily_images", "owner_daily_cost_usd", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @cached_property
    def concurrency_caps(self) -> dict[str, int]:
        """IMAGEN_BACKEND_CONCURRENCY as {'openai': 4, 'openai/gpt-image-2': 2}."""
        return parse_caps(self.backend_concurrency)

    @cached_property
    def rpm_caps(self) -> dict[str, int]:
        """IMAGEN_BACKEND_RPM as {'openai': 60}."""
        return parse_caps(self.backend_rpm)

    @field_validator("supabase_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _provider_call_ends_within_the_stage(self) -> Settings:
        # A provider call must time out inside the generation stage's time limit, so the stage
        # ends by its own limit with a clear error rather than by Dramatiq interrupting it.
        if self.provider_timeout >= self.generate_time_limit:
            raise ValueError(
                f"IMAGEN_PROVIDER_TIMEOUT ({self.provider_timeout:g} s) must be below"
                f" IMAGEN_GENERATE_TIME_LIMIT ({self.generate_time_limit:g} s)"
            )
        return self

    @cached_property
    def storage_kind(self) -> Literal["local", "supabase"]:
        """Local unless told otherwise or Supabase is configured."""
        if self.storage:
            return self.storage
        return "supabase" if self.supabase_url else "local"

    def require_database_url(self) -> str:
        """The pipeline cannot run without a database; say so in one line."""
        if not self.database_url:
            raise ConfigError(
                "IMAGEN_DATABASE_URL is not set: give a PostgreSQL session connection string "
                "(postgresql://user@host:5432/db), not a transaction pooler"
            )
        return self.database_url


def parse_caps(text: str) -> dict[str, int]:
    """'openai=4, google/gemini-2.5-flash-image=2' -> {'openai': 4, 'gemini/gemini-2.5-flash-image': 2}.

    A key is a backend (google and gemini are one) or backend/model; values are whole numbers >= 1.
    """
    if not text.strip():
        return {}
    from imagen.backends import canonical_name

    caps: dict[str, int] = {}
    for item in text.replace(";", ",").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        backend, slash, model = key.strip().partition("/")
        try:
            number = int(value.strip()) if sep else 0
            name = canonical_name(backend) + (f"/{model.strip()}" if slash and model.strip() else "")
        except (ValueError, ImagenError):
            number, name = 0, ""
        if number < 1 or not name or (slash and not model.strip()):
            raise ValueError(f"{item.strip()!r} is not backend=N or backend/model=N with N >= 1")
        caps[name] = number
    return caps


_ENV_NAMES = {
    "supabase_url": "SUPABASE_URL",
    "supabase_service_role_key": "SUPABASE_SERVICE_ROLE_KEY",
    "gemini_api_key": "GEMINI_API_KEY",
    "openai_api_key": "OPENAI_API_KEY",
    "openai_base_url": "OPENAI_BASE_URL",
    "gemini_base_url": "GOOGLE_GEMINI_BASE_URL",
    "gemini_api_version": "GOOGLE_GENAI_API_VERSION",
}


def env_name(field: str) -> str:
    """The environment variable an operator sets for a settings field."""
    return _ENV_NAMES.get(field, f"IMAGEN_{field.upper()}")


def load_settings(**overrides: object) -> Settings:
    """Read settings, turning validation errors into one readable ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            if not err["loc"]:
                # A rule across settings (model_validator): its message names the variables.
                problems.append(str(err["msg"]).removeprefix("Value error, "))
                continue
            loc = str(err["loc"][0])
            name = env_name(loc) if loc in Settings.model_fields else loc
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("bad configuration: " + "; ".join(problems)) from None
