"""Settings: defaults, the .env file, one-line errors naming the variable, and secrets that never print."""

from __future__ import annotations

import os
from pathlib import Path
from uuid import UUID

import pytest

from imagen.config import Settings, env_name, load_settings
from imagen.errors import ConfigError

PREFIXES = ("IMAGEN_", "SUPABASE_", "OPENAI_", "GEMINI_", "GOOGLE_")
SERVICE_KEY = "sb_secret_service-role-key-do-not-print-0123"
OPENAI_KEY = "sk-proj-openai-key-do-not-print-4567"
GEMINI_KEY = "AIzaSy-gemini-key-do-not-print-89ab"
DB_PASSWORD = "db-pass-do-not-print"
REDIS_PASSWORD = "redis-pass-do-not-print"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No imagen or provider variable from the developer's shell, and a cwd with no .env."""
    for name in list(os.environ):
        if name.startswith(PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_URL", "https://project.supabase.co")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("GEMINI_API_KEY", GEMINI_KEY)


def test_defaults_need_no_configuration(tmp_path: Path) -> None:
    settings = load_settings()

    assert settings.backend == "mock"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.poll_interval == 5
    assert settings.lease_seconds == 600
    assert settings.max_attempts == 3
    assert settings.database_url is None
    assert settings.bucket == "imagen"
    assert settings.output_dir == Path("./out")
    assert settings.storage_dir == tmp_path / "xdg" / "imagen" / "storage"
    assert settings.storage_kind == "local"


def test_environment_values_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEN_POLL_INTERVAL", "0.25")
    monkeypatch.setenv("IMAGEN_LEASE_SECONDS", "30")
    monkeypatch.setenv("IMAGEN_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("IMAGEN_BACKEND", "  OpenAI ")
    monkeypatch.setenv("IMAGEN_OWNER_USER_ID", "6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e")

    settings = load_settings()

    assert settings.poll_interval == 0.25
    assert settings.lease_seconds == 30.0
    assert settings.max_attempts == 7
    assert settings.backend == "openai"
    assert settings.owner_user_id == UUID("6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e")


def test_storage_is_supabase_when_supabase_url_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_URL", "https://project.supabase.co/")

    settings = load_settings()

    assert settings.storage_kind == "supabase"
    assert settings.supabase_url == "https://project.supabase.co"


def test_explicit_local_storage_wins_over_supabase_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_URL", "https://project.supabase.co")
    monkeypatch.setenv("IMAGEN_STORAGE", "local")

    assert load_settings().storage_kind == "local"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IMAGEN_POLL_INTERVAL", "abc"),
        ("IMAGEN_POLL_INTERVAL", "0"),
        ("IMAGEN_LEASE_SECONDS", "-5"),
        ("IMAGEN_MAX_ATTEMPTS", "0"),
        ("IMAGEN_MAX_ATTEMPTS", "2.5"),
        ("IMAGEN_STORAGE", "s3"),
        ("IMAGEN_OWNER_USER_ID", "not-a-uuid"),
        ("IMAGEN_LOG_FORMAT", "xml"),
    ],
)
def test_a_bad_value_is_one_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigError) as caught:
        load_settings()

    message = str(caught.value)
    assert variable in message
    assert "\n" not in message
    assert caught.value.is_transient is False


def test_every_bad_value_is_named_in_the_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEN_POLL_INTERVAL", "abc")
    monkeypatch.setenv("IMAGEN_MAX_ATTEMPTS", "none")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert "IMAGEN_POLL_INTERVAL" in str(caught.value)
    assert "IMAGEN_MAX_ATTEMPTS" in str(caught.value)


def test_secrets_never_appear_in_repr_or_str_of_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    set_secrets(monkeypatch)

    settings = load_settings()

    assert settings.supabase_service_role_key is not None
    assert settings.supabase_service_role_key.get_secret_value() == SERVICE_KEY
    for text in (repr(settings), str(settings)):
        for secret in (SERVICE_KEY, OPENAI_KEY, GEMINI_KEY):
            assert secret not in text


def test_connection_string_passwords_never_appear_in_repr_of_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IMAGEN_DATABASE_URL", f"postgresql://imagen:{DB_PASSWORD}@db.local:5432/imagen")
    monkeypatch.setenv("IMAGEN_REDIS_URL", f"redis://:{REDIS_PASSWORD}@redis.local:6379/0")

    text = repr(load_settings())

    assert DB_PASSWORD not in text
    assert REDIS_PASSWORD not in text


@pytest.mark.parametrize(
    ("variable", "value"),
    [("IMAGEN_POLL_INTERVAL", SERVICE_KEY), ("IMAGEN_STORAGE", SERVICE_KEY), ("IMAGEN_MAX_ATTEMPTS", "x")],
)
def test_secrets_never_appear_in_config_errors(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    set_secrets(monkeypatch)
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigError) as caught:
        load_settings()

    for text in (str(caught.value), repr(caught.value)):
        for secret in (SERVICE_KEY, OPENAI_KEY, GEMINI_KEY):
            assert secret not in text


def test_dotenv_in_the_current_directory_is_read(clean_environment: Path) -> None:
    (clean_environment / ".env").write_text(
        "IMAGEN_BACKEND=openai\nIMAGEN_POLL_INTERVAL=2\nOPENAI_API_KEY=sk-from-dotenv-0000\n"
        "SUPABASE_URL=https://dotenv.supabase.co\n",
        encoding="utf-8",
    )

    settings = load_settings()

    assert settings.backend == "openai"
    assert settings.poll_interval == 2
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "sk-from-dotenv-0000"
    assert settings.storage_kind == "supabase"


def test_environment_wins_over_dotenv(clean_environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_environment / ".env").write_text("IMAGEN_POLL_INTERVAL=2\n", encoding="utf-8")
    monkeypatch.setenv("IMAGEN_POLL_INTERVAL", "9")

    assert load_settings().poll_interval == 9


def test_bad_value_in_dotenv_names_the_variable(clean_environment: Path) -> None:
    (clean_environment / ".env").write_text("IMAGEN_LEASE_SECONDS=ten\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="IMAGEN_LEASE_SECONDS"):
        load_settings()


def test_dotenv_outside_the_current_directory_is_not_read(clean_environment: Path) -> None:
    elsewhere = clean_environment / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".env").write_text("IMAGEN_BACKEND=openai\n", encoding="utf-8")

    assert load_settings().backend == "mock"


def test_require_database_url_explains_what_to_set() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings().require_database_url()

    message = str(caught.value)
    assert "IMAGEN_DATABASE_URL" in message
    assert "session" in message
    assert "\n" not in message


def test_require_database_url_returns_the_configured_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEN_DATABASE_URL", "postgresql://imagen@localhost:5432/imagen")

    assert load_settings().require_database_url() == "postgresql://imagen@localhost:5432/imagen"


def test_env_name_maps_fields_to_the_variables_operators_set() -> None:
    assert env_name("poll_interval") == "IMAGEN_POLL_INTERVAL"
    assert env_name("supabase_service_role_key") == "SUPABASE_SERVICE_ROLE_KEY"
    assert env_name("openai_api_key") == "OPENAI_API_KEY"
    assert set(Settings.model_fields) >= {"poll_interval", "supabase_service_role_key"}
