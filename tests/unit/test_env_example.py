""".env.example documents every variable imagen reads, with the defaults the code really has."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from imagen.config import Settings, env_name

EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"
ENTRY = re.compile(r"^(?P<inactive>#?)(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$")
# Read outside Settings: by the google-genai SDK (and imagen.backends.gemini), and by Dramatiq itself.
EXTRA = {
    "GOOGLE_GENAI_USE_ENTERPRISE",
    "dramatiq_worker_timeout",
    "dramatiq_prom_port",
    "dramatiq_prom_host",
    "dramatiq_prom_db",
    "dramatiq_queue_prefetch",
    "dramatiq_restart_delay",
}


def entries() -> dict[str, tuple[bool, str, str]]:
    """name -> (active, value, the comment line above it)."""
    lines = EXAMPLE.read_text().splitlines()
    found: dict[str, tuple[bool, str, str]] = {}
    for index, line in enumerate(lines):
        match = ENTRY.match(line)
        if match:
            assert match["name"] not in found, f"{match['name']} is listed twice"
            above = lines[index - 1] if index else ""
            found[match["name"]] = (not match["inactive"], match["value"], above)
    return found


def is_secret(field: str) -> bool:
    annotation: Any = Settings.model_fields[field].annotation
    return SecretStr in getattr(annotation, "__args__", (annotation,))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    names = {env_name(f) for f in Settings.model_fields} | {"GOOGLE_API_KEY", "IMAGEN_SUPABASE_URL"}
    for name in list(os.environ):
        if name.startswith("IMAGEN_") or name in names:
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_settings_field_has_an_entry() -> None:
    listed = entries()
    missing = [env_name(f) for f in Settings.model_fields if env_name(f) not in listed]
    assert missing == [], f".env.example lacks {missing}"


def test_the_extra_variables_are_listed_and_nothing_unknown_is() -> None:
    listed = set(entries())
    known = {env_name(f) for f in Settings.model_fields} | EXTRA
    assert EXTRA - listed == set(), "Dramatiq and SDK variables missing"
    assert listed - known == set(), "entries imagen does not read (a typo?)"


def test_every_entry_has_a_one_line_comment_above_it() -> None:
    for name, (_, _, above) in entries().items():
        assert above.startswith("# ") and len(above) > 10, f"{name} has no comment line above it"


def test_secrets_and_unset_settings_are_shown_empty() -> None:
    listed = entries()
    for field, info in Settings.model_fields.items():
        name = env_name(field)
        if is_secret(field) or (info.default is None and info.default_factory is None):
            assert listed[name][1] == "", f"{name} should be empty in the example"


def test_shown_defaults_are_the_code_defaults(clean_env: pytest.MonkeyPatch) -> None:
    listed = entries()
    checked = 0
    for field, info in Settings.model_fields.items():
        if info.default is None or info.default_factory is not None:
            continue
        name = env_name(field)
        clean_env.setenv(name, listed[name][1])
        parsed = getattr(Settings(_env_file=None), field)  # type: ignore[call-arg]
        clean_env.delenv(name)
        assert parsed == info.default, f"{name}={listed[name][1]} but the default is {info.default!r}"
        checked += 1
    assert checked >= 20


def test_dramatiq_defaults_match_the_installed_dramatiq() -> None:
    import dramatiq.worker

    listed = entries()
    for name, constant in (
        ("dramatiq_worker_timeout", "WORKER_TIMEOUT"),
        ("dramatiq_queue_prefetch", "QUEUE_PREFETCH"),
        ("dramatiq_restart_delay", "CONSUMER_RESTART_DELAY"),
    ):
        if name in os.environ:
            continue  # the constant was read from the environment at import
        assert int(listed[name][1]) == getattr(dramatiq.worker, constant), name


def test_the_example_loads_as_an_env_file(clean_env: pytest.MonkeyPatch) -> None:
    """Copied as is, it gives the defaults (no empty value that breaks validation) and no secret."""
    settings = Settings(_env_file=EXAMPLE)  # type: ignore[call-arg]
    assert settings.database_url == ""
    assert settings.supabase_service_role_key is None and settings.openai_api_key is None
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    active = [name for name, (is_active, _, _) in entries().items() if is_active]
    assert active == ["IMAGEN_DATABASE_URL"]
