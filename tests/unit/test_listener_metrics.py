"""The listener's Prometheus endpoint, scraped over HTTP as Prometheus does (docs/operations.md)."""

from __future__ import annotations

import logging
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from imagen.config import load_settings
from imagen.listener.metrics import Metrics
from imagen.listener.service import Listener

ROOT = Path(__file__).resolve().parents[2]
# Linux routes all of 127/8 to the loopback: an address of its own shows what a server binds.
ADDR = "127.0.0.2"
HELP = {
    "imagen_listener_claims": "Jobs claimed and forwarded to Dramatiq",
    "imagen_listener_forward_failures": "Claims put back after a failed forward",
    "imagen_listener_rescues": "Expired leases rescued",
    "imagen_listener_reconnects": "Database reconnects of the listener",
    "imagen_listener_swept_images": "Failed or cancelled jobs whose images row or object the sweep removed",
    "imagen_listener_pickup_seconds": "Pending (INSERT, or back to pending after a retry or rescue) to claim latency",
    "imagen_listener_mode": "1 for the current mode",
}


def free_port(addr: str = ADDR) -> int:
    with socket.socket() as sock:
        sock.bind((addr, 0))
        return int(sock.getsockname()[1])


def scrape(port: int, addr: str = ADDR) -> str:
    with urllib.request.urlopen(f"http://{addr}:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def documented() -> dict[str, str]:
    """{metric: type} from the listener's table in docs/operations.md."""
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("Listener metrics (`imagen/listener/metrics.py`):", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `(imagen_listener_\w+)(?:\{[^`]*\})?` \| (\w+) \|", table, re.MULTILINE)
    return {name.removesuffix("_total"): kind for name, kind in rows}


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    served = Metrics(free_port(), ADDR, registry=CollectorRegistry())
    try:
        yield served
    finally:
        served.close()


def test_the_endpoint_serves_each_documented_metric_with_its_type_and_help(metrics: Metrics) -> None:
    assert metrics.server is not None
    families = {
        f.name: (f.type, f.documentation)
        for f in text_string_to_metric_families(scrape(metrics.server.server_port))
        if not f.name.endswith("_created")  # each counter's start time, which the text format lists apart
    }

    assert families == {name: (kind, HELP[name]) for name, kind in documented().items()}


def test_the_counters_show_what_the_listener_did(metrics: Metrics) -> None:
    assert metrics.server is not None
    metrics.claims.inc(3)
    metrics.forward_failures.inc(2)
    metrics.rescues.labels("requeued").inc()
    metrics.rescues.labels("failed").inc(4)
    metrics.reconnects.inc()
    metrics.swept.inc(5)

    values = samples(scrape(metrics.server.server_port))

    assert values[("imagen_listener_claims_total", ())] == 3
    assert values[("imagen_listener_forward_failures_total", ())] == 2
    assert values[("imagen_listener_rescues_total", (("outcome", "requeued"),))] == 1
    assert values[("imagen_listener_rescues_total", (("outcome", "failed"),))] == 4
    assert values[("imagen_listener_reconnects_total", ())] == 1
    assert values[("imagen_listener_swept_images_total", ())] == 5


def test_pickup_latency_is_bucketed_from_a_millisecond_to_thirty_seconds(metrics: Metrics) -> None:
    assert metrics.server is not None
    for seconds in (0.0005, 0.003, 0.7, 45.0):
        metrics.pickup.observe(seconds)

    values = samples(scrape(metrics.server.server_port))

    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in values.items()
        if name == "imagen_listener_pickup_seconds_bucket"
    }
    bounds = ["0.001", "0.002", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0"]
    assert list(buckets) == [*bounds, "10.0", "30.0", "+Inf"]
    counts = {le: buckets[le] for le in ("0.001", "0.002", "0.005", "0.5", "1.0", "30.0", "+Inf")}
    assert counts == {"0.001": 1, "0.002": 1, "0.005": 2, "0.5": 2, "1.0": 3, "30.0": 3, "+Inf": 4}


@pytest.mark.parametrize("mode", ["listening", "reconnecting", "stopping"])
def test_the_mode_gauge_shows_one_for_the_current_mode_only(metrics: Metrics, mode: str) -> None:
    assert metrics.server is not None
    metrics.set_mode("listening")
    metrics.set_mode(mode)

    values = samples(scrape(metrics.server.server_port))

    modes = {
        dict(labels)["mode"]: v for (name, labels), v in values.items() if name == "imagen_listener_mode"
    }
    assert modes == {m: (1.0 if m == mode else 0.0) for m in ("listening", "reconnecting", "stopping")}


def test_the_endpoint_listens_only_on_the_configured_address(metrics: Metrics) -> None:
    assert metrics.server is not None
    port = metrics.server.server_port

    assert "imagen_listener_claims_total" in scrape(port, ADDR)
    with pytest.raises(urllib.error.URLError):
        scrape(port, "127.0.0.1")


def test_a_closed_endpoint_stops_answering() -> None:
    metrics = Metrics(free_port(), ADDR, registry=CollectorRegistry())
    assert metrics.server is not None
    port = metrics.server.server_port
    scrape(port)

    metrics.close()

    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_a_port_in_use_disables_the_endpoint_with_a_warning_and_the_counters_still_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="imagen.listener")
    with socket.socket() as taken:
        taken.bind((ADDR, 0))
        taken.listen()
        port = taken.getsockname()[1]

        metrics = Metrics(port, ADDR, registry=CollectorRegistry())
        metrics.claims.inc()
        metrics.set_mode("listening")
        metrics.close()

    assert metrics.server is None
    (message,) = [r.getMessage() for r in caplog.records if r.name == "imagen.listener"]
    assert re.fullmatch(
        rf"metrics: cannot listen on {ADDR}:{port} \(\[Errno \d+\] Address already in use\); metrics disabled",
        message,
    )


def listener(tmp_path: Path, **settings: object) -> Listener:
    metrics_port = settings.pop("metrics_port", None)
    return Listener(
        load_settings(storage_dir=tmp_path, metrics_addr=ADDR, **settings),
        broker=object(),
        metrics_port=metrics_port,  # type: ignore[arg-type]
        open_notifier=lambda: None,  # type: ignore[arg-type,return-value]
        open_store=lambda: None,  # type: ignore[arg-type,return-value]
        registry=CollectorRegistry(),
    )


def test_the_listener_serves_its_metrics_on_the_configured_address_and_port(tmp_path: Path) -> None:
    port = free_port()
    unit = listener(tmp_path, listener_metrics_port=port)
    try:
        assert "imagen_listener_claims_total 0.0" in scrape(port)
        with pytest.raises(urllib.error.URLError):
            scrape(port, "127.0.0.1")
    finally:
        assert unit.metrics is not None
        unit.metrics.close()


def test_a_port_passed_to_the_listener_wins_over_the_settings_and_zero_disables_the_endpoint(
    tmp_path: Path,
) -> None:
    configured, passed = free_port(), free_port()
    unit = listener(tmp_path, listener_metrics_port=configured, metrics_port=passed)
    try:
        assert "imagen_listener_mode" in scrape(passed)
        with pytest.raises(urllib.error.URLError):
            scrape(configured)
    finally:
        assert unit.metrics is not None
        unit.metrics.close()

    assert listener(tmp_path, listener_metrics_port=configured, metrics_port=0).metrics is None
    with pytest.raises(urllib.error.URLError):
        scrape(configured)
