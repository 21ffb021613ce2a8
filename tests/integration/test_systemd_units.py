"""The systemd user units in systemd/: they verify, and say what the operations docs promise.

`systemd-analyze verify` needs the ExecStart binaries to exist, so the units are
copied with `%h/imagen/.venv/bin/` replaced by this virtualenv's bin folder. It
exits 0 even on unknown keys or bad values (it only warns), so the tests also
fail on any warning that names a unit.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imagen.cli import EXIT_CONFIG

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("imagen-listener.service", "imagen-actors.service")
VENV_BIN = "%h/imagen/.venv/bin/"
CHECKOUT = "%h/imagen"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> key -> values (a key may repeat); comments and blank lines skipped."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"directive outside a section: {line}"
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}: expected one value, found {values}"
    return values[0]


def load(name: str) -> Unit:
    return parse_unit((ROOT / "systemd" / name).read_text())


def verify(tmp_path: Path, texts: dict[str, str]) -> list[str]:
    """Run `systemd-analyze verify --user` on the units; return its complaints about them."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):  # CI installs the systemd package: a missing tool there is a broken job
            pytest.fail(
                "systemd-analyze is not installed, and CI must run this test (apt-get install systemd)"
            )
        pytest.skip("systemd-analyze is not installed (CI installs the systemd package)")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    paths = []
    for name, text in texts.items():
        path = tmp_path / name
        path.write_text(text)
        paths.append(str(path))
    # A user manager needs XDG_RUNTIME_DIR; without a login session (CI, containers) give it one.
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    result = subprocess.run(
        [analyze, "verify", "--user", *paths], capture_output=True, text=True, env=env, timeout=60
    )
    output = (result.stdout + result.stderr).splitlines()
    complaints = [line for line in output if any(name in line for name in texts)]
    if result.returncode != 0:
        complaints.append(f"systemd-analyze exited {result.returncode}: {' | '.join(output)}")
    return complaints


def with_real_binaries(name: str) -> str:
    """The unit with ExecStart pointing at this virtualenv's imagen and dramatiq."""
    text = (ROOT / "systemd" / name).read_text()
    assert VENV_BIN in text, f"{name}: ExecStart no longer follows the {VENV_BIN} convention"
    bin_dir = Path(sys.executable).parent
    for tool in ("imagen", "dramatiq"):
        assert (bin_dir / tool).is_file(), f"{bin_dir / tool} is missing: is the package installed?"
    return text.replace(VENV_BIN, f"{bin_dir}/")


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    texts = {name: with_real_binaries(name) for name in UNITS}
    assert verify(tmp_path, texts) == []


def test_verify_check_reports_a_bad_directive(tmp_path: Path) -> None:
    """Guards the check above: a bad value only warns, and must still fail the test."""
    text = with_real_binaries(UNITS[1]).replace("Restart=always", "Restart=sometimes")
    complaints = verify(tmp_path, {UNITS[1]: text})
    assert any("sometimes" in line for line in complaints), complaints


@pytest.mark.parametrize("name", UNITS)
def test_units_restart_always_log_to_the_journal_and_install_for_the_user(name: str) -> None:
    unit = load(name)
    assert one(unit, "Service", "Restart") == "always"
    assert int(one(unit, "Service", "RestartSec")) > 0
    # Bad configuration exits 78 (imagen.cli, and imagen.actors on import): restarting cannot fix it.
    assert one(unit, "Service", "RestartPreventExitStatus") == str(EXIT_CONFIG)
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert one(unit, "Service", "StandardOutput") == "journal"
    assert one(unit, "Service", "StandardError") == "journal"
    assert one(unit, "Service", "SyslogIdentifier") == name.removesuffix(".service")
    assert one(unit, "Install", "WantedBy") == "default.target"
    assert "User" not in unit["Service"], "a user unit runs as its user; User= is for system units"


@pytest.mark.parametrize("name", UNITS)
def test_environment_file_lies_outside_the_repository_and_no_secret_is_in_the_unit(name: str) -> None:
    unit = load(name)
    env_file = one(unit, "Service", "EnvironmentFile")
    assert env_file == "%h/.config/imagen/imagen.env"
    home = Path("/home/operator")
    resolved = Path(env_file.replace("%h", str(home)))
    checkout = Path(CHECKOUT.replace("%h", str(home)))
    assert resolved.is_absolute() and not resolved.is_relative_to(checkout)
    assert all(value.startswith("PYTHONUNBUFFERED=") for value in unit["Service"].get("Environment", []))
    text = (ROOT / "systemd" / name).read_text().lower()
    for secret in ("_key=", "password", "postgresql://", "redis://", "service_role"):
        assert secret not in text, f"{name} mentions {secret!r}: settings belong in the EnvironmentFile"


def test_listener_unit_runs_imagen_listen_and_stops_quickly() -> None:
    unit = load("imagen-listener.service")
    assert shlex.split(one(unit, "Service", "ExecStart")) == [f"{VENV_BIN}imagen", "listen"]
    assert one(unit, "Service", "KillMode") in ("control-group", "mixed")
    assert 5 <= int(one(unit, "Service", "TimeoutStopSec")) <= 60


def test_actors_unit_stops_after_the_worker_shutdown_timeout_with_one_sigterm() -> None:
    from dramatiq.cli import make_argument_parser

    unit = load("imagen-actors.service")
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[0] == f"{VENV_BIN}dramatiq"
    args = make_argument_parser().parse_args(argv[1:])  # the installed dramatiq accepts every flag
    assert args.broker == "imagen.actors"
    assert args.processes >= 1 and args.threads >= 1
    shutdown_seconds = args.worker_shutdown_timeout / 1000
    assert shutdown_seconds == 600
    assert int(one(unit, "Service", "TimeoutStopSec")) > shutdown_seconds
    # Only the master gets SIGTERM and forwards it once: a second SIGTERM kills a dramatiq worker.
    assert one(unit, "Service", "KillMode") == "mixed"
