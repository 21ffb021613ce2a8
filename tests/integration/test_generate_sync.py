"""`imagen generate --sync`: the CLI uploads through the same storage code and records the images row."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg

from tests.cli import clean_env, run_imagen
from tests.fake_storage import DEFAULT_BUCKET, DEFAULT_KEY, fake_storage


def test_generate_sync_uploads_and_inserts_row_owned_by_the_fallback_owner(
    db_url: str, tmp_path: Path
) -> None:
    owner = uuid.uuid4()
    with fake_storage() as storage:
        env = clean_env(
            IMAGEN_DATABASE_URL=db_url, SUPABASE_URL=storage.url, SUPABASE_SERVICE_ROLE_KEY=DEFAULT_KEY,
            IMAGEN_OWNER_USER_ID=str(owner),
        )  # fmt: skip
        result = run_imagen(
            "generate", "a synced fox", "--size", "64x64", "--seed", "3", "--sync", "--out", "out",
            env=env, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        (key,) = storage.objects
        assert key[0] == DEFAULT_BUCKET and key[1].startswith(f"{owner}/cli-") and key[1].endswith(".png")
    assert f"synced {DEFAULT_BUCKET}/{key[1]}" in result.stderr
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT owner_user_id, job_id, bucket, path, width, height FROM imagen.images"
        ).fetchall()
        usage = conn.execute("SELECT owner_user_id, backend, ok FROM imagen.usage").fetchall()
    assert rows == [(owner, None, DEFAULT_BUCKET, key[1], 64, 64)]
    assert usage == [(owner, "mock", True)]


def test_generate_sync_owner_option_overrides_the_fallback_and_local_storage_works(
    db_url: str, tmp_path: Path
) -> None:
    fallback, explicit = uuid.uuid4(), uuid.uuid4()
    env = clean_env(
        IMAGEN_DATABASE_URL=db_url,
        IMAGEN_STORAGE_DIR=str(tmp_path / "storage"),
        IMAGEN_OWNER_USER_ID=str(fallback),
    )
    result = run_imagen(
        "generate", "a local fox", "--size", "32x32", "--sync", "--owner", str(explicit), "--json",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    import json

    payload = json.loads(result.stdout)
    (synced,) = payload["synced"]
    assert synced["path"].startswith(f"{explicit}/")
    assert (tmp_path / "storage" / synced["bucket"] / synced["path"]).is_file()
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT id::text, owner_user_id FROM imagen.images").fetchall() == [
            (synced["image_id"], explicit)
        ]


def test_generate_sync_without_database_is_a_one_line_config_error(tmp_path: Path) -> None:
    result = run_imagen(
        "generate", "a fox", "--size", "32x32", "--sync", "--ownerless", env=clean_env(), cwd=tmp_path
    )
    assert result.returncode == 78
    assert result.stderr.strip().startswith("imagen: IMAGEN_DATABASE_URL is not set")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists(), "nothing generated when the sync could not happen"


def test_generate_sync_without_an_owner_refuses_before_generating(db_url: str, tmp_path: Path) -> None:
    result = run_imagen(
        "generate",
        "a fox",
        "--size",
        "32x32",
        "--sync",
        env=clean_env(IMAGEN_DATABASE_URL=db_url),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "--sync needs an owner: give --owner UUID or set IMAGEN_OWNER_USER_ID" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing generated when the sync could not be owned"
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM imagen.images").fetchone() == (0,)


def test_gemini_generate_sync_writes_a_usage_row_with_a_plausible_cost_and_its_basis(
    db_url: str, tmp_path: Path
) -> None:
    import base64

    from tests.fake_providers import ScriptedResponse, fake_provider, png_bytes

    part = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png_bytes(64, 64)).decode()}}
    body = {
        "candidates": [{"content": {"role": "model", "parts": [part]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 1290, "totalTokenCount": 1297},
        "modelVersion": "gemini-2.5-flash-image",
    }
    with fake_provider() as provider:
        provider.reply(ScriptedResponse(body=body))
        env = clean_env(
            IMAGEN_DATABASE_URL=db_url, IMAGEN_STORAGE_DIR=str(tmp_path / "storage"),
            IMAGEN_OWNER_USER_ID=str(uuid.uuid4()), GEMINI_API_KEY="AIza-test", GOOGLE_GEMINI_BASE_URL=provider.url,
            NO_PROXY="127.0.0.1,localhost",
        )  # fmt: skip
        result = run_imagen("generate", "a fox", "--backend", "gemini", "--sync", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with psycopg.connect(db_url) as conn:
        ((backend, model, cost, basis),) = conn.execute(
            "SELECT backend, model, cost_usd, cost_basis FROM imagen.usage"
        ).fetchall()
    assert (backend, model) == ("gemini", "gemini-2.5-flash-image")
    assert 0.038 < float(cost) < 0.04
    assert "gemini-2.5-flash-image as of" in basis
