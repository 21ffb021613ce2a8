"""`imagen listen`: claim pending jobs and forward them to Dramatiq (docs/architecture.md).

One job per module: `service.Listener` wakes on LISTEN or the safety poll and
reconnects; `claimer.Claimer` claims fair batches and forwards them;
`gate.InFlightGate` paces the claimer at the in-flight cap (plain arithmetic);
`rescuer.Rescuer` rescues expired leases and sweeps ended jobs' images. The
database is reached only through `imagen.store`; the actors are never imported.
The names below load on first use (as in `imagen.store`): importing one of the
logic modules (`imagen.listener.gate`, ...) does not load the composition root
(`service`, which builds the PostgreSQL store), so it loads no psycopg.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imagen.listener.gate import SATURATED_POLL, SATURATED_POLL_MAX, InFlightGate
    from imagen.listener.metrics import ListenerStats
    from imagen.listener.service import CHANNEL, Listener, run_listener
    from imagen.store.notify import HEALTH_SQL, LISTEN_SQL

_WHERE = {
    "SATURATED_POLL": "imagen.listener.gate", "SATURATED_POLL_MAX": "imagen.listener.gate",
    "InFlightGate": "imagen.listener.gate", "ListenerStats": "imagen.listener.metrics",
    "CHANNEL": "imagen.listener.service", "Listener": "imagen.listener.service",
    "run_listener": "imagen.listener.service", "HEALTH_SQL": "imagen.store.notify", "LISTEN_SQL": "imagen.store.notify",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'imagen.listener' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)


__all__ = [
    "CHANNEL",
    "HEALTH_SQL",
    "LISTEN_SQL",
    "SATURATED_POLL",
    "SATURATED_POLL_MAX",
    "InFlightGate",
    "Listener",
    "ListenerStats",
    "run_listener",
]
