"""Bad input through the real pipeline: odd prompts and params end done or failed, readably.

About a hundred seeded-random jobs, inserted the way the UI inserts them (role
`authenticated`, PostgREST's claims): unicode of every plane, huge and negative
numbers, nested objects, SQL fragments, path traversal, format strings, keys
nobody documented. Each must end done, or failed with a short error a person can
read, and neither process may die. Inputs PostgreSQL refuses at INSERT (blank or
over-long prompts, NUL characters) never become jobs and are counted apart.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from imagen import jobs
from tests.reliability.harness import Harness

pytestmark = pytest.mark.slow

SEED = 20_260_107
MAX_ERROR = 1000

ODD_TEXT = [
    "'; DROP TABLE imagen.jobs; --", "$$; SELECT pg_sleep(60); $$", "\\'; DELETE FROM imagen.images; --",
    "../../../../etc/passwd", "..\\..\\windows\\system32", "/etc/shadow", "%2e%2e%2f%2e%2e%2fetc", "~/.ssh/id_rsa",
    "{job_id} {0} %s %d %(x)s ${HOME} `id`", "<script>alert(1)</script>", "\u202eevil.png", "a\u0301\u0302\u0303",
    "\u200b\u200c\u200d", "🦙🔥" * 20, "\U0001d56c\U0001d591\U0001d595\U0001d58d\U0001d586", "中文提示词", "مرحبا", "\x1c\x1d", "line\nbreak\r\nand\ttab",
    "null \\u0000 escaped", "NaN", "Infinity", "-0", "1e400", "x" * 4000, "\U0010fffd", "\ufeffbom",
]  # fmt: skip
ODD_NUMBERS: list[Any] = [
    0,
    -1,
    1,
    2**31 - 1,
    2**31,
    -(2**31),
    2**63,
    10**30,
    -(10**100),
    1.5,
    -0.0,
    1e300,
    1e-300,
    42.0,
    7,
]
ODD_KEYS = ["__proto__", "constructor", "../x", "'; --", "", " ", "size ", "SIZE", "🦙", "a.b", "params"]


def _text(rng: random.Random, max_len: int = 60) -> str:
    """Random text from many Unicode planes (no NUL, no surrogates: PostgreSQL text holds neither)."""
    ranges = [
        (0x20, 0x7E),
        (0xA0, 0x24F),
        (0x370, 0x3FF),
        (0x590, 0x6FF),
        (0x4E00, 0x4FFF),
        (0x1F300, 0x1F64F),
    ]
    chars = []
    for _ in range(rng.randrange(1, max_len)):
        low, high = rng.choice(ranges)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(ODD_TEXT)
    if kind == 1:
        return rng.choice(ODD_NUMBERS)
    if kind == 2:
        return rng.choice([None, True, False])
    if kind in (3, 4):
        return _text(rng)
    if kind == 5:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_text(rng, 10): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _params(rng: random.Random) -> dict[str, Any]:
    """Valid params around an odd prompt, a real provider on a dead port, a simulated failure, or chaos."""
    mode = rng.random()
    if mode < 0.3:
        valid = {"size": rng.choice(["16x16", "48x32", "256x128"]), "seed": rng.randrange(2**31)}
        if rng.random() < 0.5:
            valid["preset"] = rng.choice(["cinematic", "pixel-art", "watercolor"])
        if rng.random() < 0.3:
            valid["negative_prompt"] = rng.choice(ODD_TEXT)
        return valid
    if mode < 0.45:
        return {
            "backend": rng.choice(["openai", "gemini", "google"]),
            "model": rng.choice([_text(rng), None]),
        }
    if mode < 0.55:
        return {"size": "16x16", "fail": rng.choice(["transient", "permanent"])}
    choices: dict[str, Callable[[], Any]] = {
        "backend": lambda: rng.choice(["mock", "MOCK ", "google", "gemini", "openai", "dalle", "", 7, None]),
        "size": lambda: rng.choice(
            ["16x16", "64x48", "4096x16", "15x15", "4097x10", "0x0", "1e3x1", "32X32 "]
        ),
        "aspect_ratio": lambda: rng.choice(["16:9", "1:8", "9:1", "0:1", "1:0", "999:1", "a:b"]),
        "preset": lambda: rng.choice(["cinematic", "pixel-art", "../presets", "nope", " "]),
        "seed": lambda: _value(rng) if rng.random() < 0.5 else rng.choice(ODD_NUMBERS),
        "model": lambda: _value(rng),
        "negative_prompt": lambda: rng.choice([*ODD_TEXT, _text(rng, 300)]),
        # Small delays only: a valid delay_ms is a real sleep, up to ten minutes.
        "delay_ms": lambda: rng.choice([0, 5, 50, -1, 600_001, "10", 1.5, 10**30]),
        "fail": lambda: rng.choice(["transient", "permanent", "sometimes", 1, None, ["transient"]]),
    }
    params: dict[str, Any] = {}
    for key in rng.sample(sorted(choices), rng.randrange(0, 5)):
        params[key] = choices[key]()
    if rng.random() < 0.25:
        params[rng.choice([*ODD_KEYS, _text(rng, 20)])] = _value(rng)
    if "size" not in params and "aspect_ratio" not in params and rng.random() < 0.8:
        params["size"] = "32x32"  # most jobs small: the mock's default is 1024x1024
    return params


def odd_jobs(count: int, seed: int = SEED) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        prompt = rng.choice([rng.choice(ODD_TEXT), _text(rng), f"{_text(rng, 20)} {rng.choice(ODD_TEXT)}"])
        made.append((prompt, _params(rng)))
    made += [("", {}), ("   ", {}), ("x" * 4001, {}), ("nul\x00byte", {}), ("ok", {"v": "nul\x00"})]
    return made


def test_odd_prompts_and_params_end_done_or_failed_readably(harness: Callable[..., Harness]) -> None:
    h = harness(max_attempts=3, stage_retries=2)
    h.set_env(OPENAI_API_KEY="not-a-real-key", GEMINI_API_KEY="not-a-real-key")
    workers = h.start_workers(1, threads=8)
    listener = h.start_listener()
    inserted: list[uuid.UUID] = []
    refused: list[str] = []
    with psycopg.connect(h.db_url, autocommit=True) as conn:
        for prompt, params in odd_jobs(100):
            try:
                inserted.append(jobs.submit_job(conn, uuid.uuid4(), prompt, params))
            except (psycopg.DataError, psycopg.IntegrityError, ValueError) as exc:
                refused.append(type(exc).__name__)
    assert len(inserted) >= 95, refused
    h.wait_terminal(inserted, 120)
    rows = h.query("SELECT status, error, prompt, params FROM imagen.jobs WHERE id = ANY(%s)", inserted)
    unreadable = [
        (status, error)
        for status, error, _prompt, _params in rows
        if status == "failed"
        and (
            not (error or "").strip() or "Traceback" in error or 'File "' in error or len(error) >= MAX_ERROR
        )
    ]
    assert not unreadable, unreadable[:5]
    assert {status for status, *_ in rows} <= {"done", "failed"}
    h.figures.update(
        inserted=len(inserted), refused_at_insert=len(refused),
        longest_error=max((len(e or "") for _s, e, *_ in rows), default=0),
        tracebacks_in_logs=h.all_log_text().count("Traceback"),
    )  # fmt: skip
    figures = h.finish(deadline=30, expect_all_done=False)
    assert figures["done"] >= 10 and figures["failed"] >= 10, figures
    assert workers.alive() and listener.alive(), "a bad job took a process down"


def _submit_raw(h: Harness, prompt: str, params_json: str) -> uuid.UUID:
    """Insert as the UI would, with params given as JSON text (Python could not even build some)."""
    owner = uuid.uuid4()
    with psycopg.connect(h.db_url) as conn:
        conn.execute("SET LOCAL ROLE authenticated")
        conn.execute(
            "SELECT set_config('request.jwt.claims', json_build_object('sub', %s::text)::text, true)",
            (owner,),
        )
        row = conn.execute(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, params) VALUES (%s, %s, %s::jsonb) RETURNING id",
            (owner, prompt, params_json),
        ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


@pytest.mark.parametrize(
    "params_json",
    ['{"seed": ' + "[" * 1500 + "]" * 1500 + "}", '{"seed": 1e5000}'],
    ids=["nested-1500-deep", "number-5001-digits"],
)
def test_params_python_cannot_load_fail_the_job_at_once(
    harness: Callable[..., Harness], params_json: str
) -> None:
    h = harness(max_attempts=1, stage_retries=1)
    workers = h.start_workers(1, threads=2)
    h.start_listener()
    job_id = _submit_raw(h, "a cat", params_json)
    h.wait_terminal([job_id], 30)
    query = "SELECT status, attempt, error FROM imagen.jobs WHERE id = %s"
    status, attempt, error = h.query(query, job_id)[0]
    h.finish(deadline=5, expect_all_done=False)
    assert workers.alive()
    assert status == "failed" and attempt == 1 and "params" in error, error
    assert "gave up" not in error, error


def test_error_text_for_many_long_unknown_keys_stays_short(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.start_workers(1, threads=2)
    h.start_listener()
    params = {f"key-{i}-" + "k" * 300: 1 for i in range(12)}
    with psycopg.connect(h.db_url, autocommit=True) as conn:
        job_id = jobs.submit_job(conn, uuid.uuid4(), "a cat", params)
    h.wait_terminal([job_id], 30)
    error = h.scalar("SELECT error FROM imagen.jobs WHERE id = %s", job_id)
    h.finish(deadline=5, expect_all_done=False)
    assert error.startswith("generation failed: unknown params key(s)")
    assert len(error) < MAX_ERROR, f"{len(error)} characters"
