"""What the listener counts: `ListenerStats` (tests and logs) and its Prometheus metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

log = logging.getLogger("imagen.listener")


@dataclass
class ListenerStats:
    """Counters the listener keeps; exported as Prometheus metrics and used by tests."""

    claims: int = 0
    forward_failures: int = 0
    rescued: int = 0
    gave_up: int = 0
    swept: int = 0
    reconnects: int = 0
    mode: str = "starting"


class Metrics:
    """Prometheus metrics for the listener, created only when a port is configured.

    They go into `registry` (the process's default one unless a test passes its own) and are
    served on `addr:port` (port 0: one the system picks, `server.server_port`).
    """

    def __init__(self, port: int, addr: str, *, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

        registry = registry or REGISTRY
        self.claims = Counter(
            "imagen_listener_claims", "Jobs claimed and forwarded to Dramatiq", registry=registry
        )
        self.forward_failures = Counter(
            "imagen_listener_forward_failures", "Claims put back after a failed forward", registry=registry
        )
        self.rescues = Counter(
            "imagen_listener_rescues", "Expired leases rescued", ["outcome"], registry=registry
        )
        self.reconnects = Counter(
            "imagen_listener_reconnects", "Database reconnects of the listener", registry=registry
        )
        self.swept = Counter(
            "imagen_listener_swept_images",
            "Failed or cancelled jobs whose images row or object the sweep removed",
            registry=registry,
        )
        self.pickup = Histogram(
            "imagen_listener_pickup_seconds",
            "Pending (INSERT, or back to pending after a retry or rescue) to claim latency",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.mode = Gauge("imagen_listener_mode", "1 for the current mode", ["mode"], registry=registry)
        self.server: WSGIServer | None = None
        try:
            self.server, _ = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            log.warning("metrics: cannot listen on %s:%s (%s); metrics disabled", addr, port, exc)

    def close(self) -> None:
        """Stop serving (the process's exit does it for `imagen listen`; tests call this)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def set_mode(self, mode: str) -> None:
        for name in ("listening", "reconnecting", "stopping"):
            self.mode.labels(name).set(1 if name == mode else 0)
