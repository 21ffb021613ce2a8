"""Exit codes and one-line errors of every command, as an operator (and systemd) sees them.

78 means the configuration can never work as it is (the units do not restart on it:
RestartPreventExitStatus=78); 75 means a retry may help (a server that is down).
Each case runs the real CLI, or `dramatiq imagen.actors`, in a subprocess.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import psycopg
import pytest

from imagen.cli import EXIT_CONFIG, EXIT_TEMPFAIL
from imagen.devtools.servers import free_port
from tests.cli import clean_env, explain, run_imagen
from tests.waiting import wait_until

MIGRATE_HINT = "run `imagen db migrate`"


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line (a listener's log lines may come before it), with no traceback."""
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("imagen:")]
    assert len(lines) == 1, explain(result)
    assert "Traceback" not in result.stderr + result.stdout, explain(result)
    return lines[0]


def with_db(url: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)


def with_user(url: str, user: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["user"] = user
    return psycopg.conninfo.make_conninfo(**info)


def down_url() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"


def imagen(tmp_path: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"IMAGEN_LISTENER_METRICS_PORT": "0", "IMAGEN_WORKER_METRICS": "false"}
    return run_imagen(*args, env=clean_env(**base, **env), cwd=tmp_path, timeout=timeout)


@pytest.mark.parametrize(
    "args",
    [
        ("listen",),
        ("jobs", "ls"),
        ("jobs", "stats"),
        ("smoke", "--timeout", "1"),
        ("web", "--port", str(free_port())),
    ],
    ids=["listen", "jobs-ls", "jobs-stats", "smoke", "web"],
)
def test_an_unmigrated_database_exits_78_with_the_migrate_hint(
    fresh_db_url: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    result = imagen(tmp_path, *args, IMAGEN_DATABASE_URL=fresh_db_url, timeout=30)

    assert result.returncode == EXIT_CONFIG, explain(result)
    assert one_line(result).endswith(MIGRATE_HINT), explain(result)


@pytest.mark.parametrize("database", ["unmigrated", "down"])
def test_generate_sync_checks_the_database_before_generating(
    fresh_db_url: str, tmp_path: Path, database: str
) -> None:
    """No image is made (with a real backend: paid for) when it could not be synced."""
    url = fresh_db_url if database == "unmigrated" else down_url()
    owner = "00000000-0000-4000-8000-000000000001"
    result = imagen(tmp_path, "generate", "a cat", "--sync", "--owner", owner, "--out", "out",
                    IMAGEN_DATABASE_URL=url, IMAGEN_STORAGE_DIR=str(tmp_path / "storage"),
                    IMAGEN_USAGE_SPOOL_DIR=str(tmp_path / "spool"))  # fmt: skip

    assert result.returncode == (EXIT_CONFIG if database == "unmigrated" else EXIT_TEMPFAIL), explain(result)
    line = one_line(result)
    assert line.endswith(MIGRATE_HINT if database == "unmigrated" else "(temporary failure; try again later)")
    assert not list(tmp_path.glob("out/*.png")), "nothing was generated"


@pytest.mark.parametrize(
    "args", [("presets",), ("generate", "a cat", "--out", "out")], ids=["presets", "generate"]
)
@pytest.mark.parametrize("problem", ["missing", "malformed"])
def test_a_bad_presets_file_is_configuration_exit_78(
    tmp_path: Path, args: tuple[str, ...], problem: str
) -> None:
    presets = tmp_path / "presets.toml"
    if problem == "malformed":
        presets.write_text("[presets.a\nprefix = 'x'\n")
    result = imagen(tmp_path, *args, IMAGEN_PRESETS_FILE=str(presets))

    assert result.returncode == EXIT_CONFIG, explain(result)
    assert one_line(result).startswith(f"imagen: presets file {presets}"), explain(result)


def test_workers_with_a_bad_presets_file_exit_78_naming_it(
    db_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Not every job failing with it: a restart cannot fix the file, so systemd does not restart."""
    missing = tmp_path / "presets.toml"
    env = clean_env(IMAGEN_DATABASE_URL=db_url, IMAGEN_REDIS_URL=redis_url, IMAGEN_WORKER_METRICS="0",
                    IMAGEN_PRESETS_FILE=str(missing))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "dramatiq", "imagen.actors", "-p", "1", "-t", "1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == EXIT_CONFIG, explain(result)
    assert f"imagen.actors: presets file {missing} does not exist" in result.stderr, explain(result)


def test_workers_on_an_unmigrated_database_exit_78_with_the_migrate_hint(
    fresh_db_url: str, redis_url: str, tmp_path: Path
) -> None:
    env = clean_env(IMAGEN_DATABASE_URL=fresh_db_url, IMAGEN_REDIS_URL=redis_url, IMAGEN_WORKER_METRICS="0")
    result = subprocess.run(
        [sys.executable, "-m", "dramatiq", "imagen.actors", "-p", "1", "-t", "1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == EXIT_CONFIG, explain(result)
    assert f"imagen.actors: the database has no imagen schema: {MIGRATE_HINT}" in result.stderr


@pytest.mark.parametrize(
    "args", [("listen",), ("jobs", "ls"), ("db", "status")], ids=["listen", "ls", "status"]
)
@pytest.mark.parametrize("wrong", ["database", "role"])
def test_an_unknown_database_or_role_exits_78_naming_it(
    db_url: str, tmp_path: Path, args: tuple[str, ...], wrong: str
) -> None:
    url = with_db(db_url, "no_such_db") if wrong == "database" else with_user(db_url, "no_such_role")

    result = imagen(tmp_path, *args, IMAGEN_DATABASE_URL=url, timeout=30)

    assert result.returncode == EXIT_CONFIG, explain(result)
    line = one_line(result)
    assert f"unknown {wrong}" in line and "IMAGEN_DATABASE_URL" in line, line


@pytest.mark.parametrize(
    "args",
    [("listen",), ("jobs", "ls"), ("db", "migrate"), ("smoke",)],
    ids=["listen", "ls", "migrate", "smoke"],
)
def test_a_malformed_database_url_exits_78(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = imagen(tmp_path, *args, IMAGEN_DATABASE_URL="host=127.0.0.1 port")

    assert result.returncode == EXIT_CONFIG, explain(result)
    assert one_line(result).startswith("imagen: IMAGEN_DATABASE_URL is not a valid connection string")


def test_a_malformed_redis_url_exits_78(tmp_path: Path) -> None:
    result = imagen(tmp_path, "listen", IMAGEN_DATABASE_URL=down_url(), IMAGEN_REDIS_URL="localhost:6379")

    assert result.returncode == EXIT_CONFIG, explain(result)
    assert "IMAGEN_REDIS_URL" in one_line(result)


@pytest.mark.parametrize(
    "args",
    [("db", "migrate"), ("db", "status"), ("jobs", "ls"), ("smoke",)],
    ids=["migrate", "status", "ls", "smoke"],
)
def test_a_database_server_that_is_down_exits_75_in_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = imagen(tmp_path, *args, IMAGEN_DATABASE_URL=down_url())

    assert result.returncode == EXIT_TEMPFAIL, explain(result)
    line = one_line(result)
    assert line.startswith("imagen: database error: ") and "Connection refused" in line, line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("generate", "a fox", "--backend", "nope"), "unknown backend 'nope'"),
        (("generate", "a fox", "--preset", "nope"), "unknown preset 'nope'"),
        (("generate", "a fox", "--backend", "openai"), "no API key; set OPENAI_API_KEY"),
        (("generate", "a fox", "--backend", "gemini"), "no API key; set GEMINI_API_KEY"),
    ],
    ids=["backend", "preset", "openai-key", "gemini-key"],
)
def test_unknown_backends_presets_and_missing_keys_exit_78(
    tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    result = imagen(tmp_path, *args, "--out", str(tmp_path / "out"))

    assert result.returncode == EXIT_CONFIG, explain(result)
    assert says in one_line(result)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_a_listener_that_never_connected_says_it_cannot_connect(tmp_path: Path) -> None:
    log = tmp_path / "listener.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imagen", "listen"],
            env=clean_env(IMAGEN_DATABASE_URL=down_url(), IMAGEN_LISTENER_METRICS_PORT="0"),
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: log.read_text().count("cannot connect") >= 2, timeout=30, message=log.read_text)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    text = log.read_text()
    assert code == 0, text
    assert "listener cannot connect to the database" in text
    assert "lost its database connection" not in text


def test_workers_with_redis_down_log_one_line_per_retry_interval(db_url: str, tmp_path: Path) -> None:
    """Dramatiq's six consumers each logged CRITICAL plus INFO on every restart: 12 lines a tick."""
    log = tmp_path / "workers.log"
    env = clean_env(
        IMAGEN_DATABASE_URL=db_url,
        IMAGEN_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        IMAGEN_WORKER_METRICS="0",
        dramatiq_restart_delay="500",
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "imagen.actors", "-p", "1", "-t", "1"],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: log.read_text().count("redis unreachable") >= 4, timeout=60, message=log.read_text)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    lines = log.read_text().splitlines()
    outage = [line for line in lines if "redis unreachable" in line]
    assert not [line for line in lines if "CRITICAL" in line or "Restarting consumer" in line], lines
    assert all("ERROR" in line and "retry every 0.5s" in line for line in outage), outage
    # One line per 0.5 s interval for the whole process, not one per consumer (six) per interval.
    stamps = [datetime.strptime(" ".join(line.split(" ")[:2]), "%Y-%m-%d %H:%M:%S,%f") for line in outage]
    gaps = [(later - earlier).total_seconds() for earlier, later in pairwise(stamps)]
    assert min(gaps) >= 0.4, outage


@pytest.mark.parametrize(
    "args",
    [("generate", " \t "), ("jobs", "submit", " \t ", "--owner", "aaaaaaaa-0000-4000-8000-000000000001"),
     ("smoke", "--prompt", " \t ")],
    ids=["generate", "jobs-submit", "smoke"],
)  # fmt: skip
def test_a_blank_prompt_reads_the_same_on_every_path(
    db_url: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    result = imagen(tmp_path, *args, IMAGEN_DATABASE_URL=db_url)

    assert result.returncode == 2, explain(result)
    assert result.stderr.strip().splitlines()[
        -1
    ] == "Error: Invalid value for 'PROMPT': the prompt must not be blank" or (
        result.stderr.strip().splitlines()[-1]
        == "Error: Invalid value for '--prompt': the prompt must not be blank"
    ), explain(result)
    assert "jobs_prompt_check" not in result.stderr


def test_listen_takes_database_url_like_the_db_commands(fresh_db_url: str, tmp_path: Path) -> None:
    for args in (
        ("listen", "--database-url", fresh_db_url),
        ("db", "status", "--database-url", fresh_db_url),
    ):
        result = imagen(tmp_path, *args)  # IMAGEN_DATABASE_URL is not set
        assert result.returncode in (EXIT_CONFIG, 1), explain(result)
        assert one_line(result).endswith(MIGRATE_HINT) or "run `imagen db migrate`" in result.stderr
    assert "--database-url" in imagen(tmp_path, "listen", "--help").stdout
