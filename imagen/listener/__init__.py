"""`imagen listen`: claim pending jobs and forward them to Dramatiq (docs/architecture.md).

One job per module: `service.Listener` wakes on LISTEN or the safety poll and
reconnects; `claimer.Claimer` claims fair batches and forwards them;
`gate.InFlightGate` paces the claimer at the in-flight cap (plain arithmetic);
`rescuer.Rescuer` rescues expired leases and sweeps ended jobs' images. The
database is reached only through `imagen.store`; the actors are never imported.
"""

from imagen.listener.gate import SATURATED_POLL, SATURATED_POLL_MAX, InFlightGate
from imagen.listener.metrics import ListenerStats
from imagen.listener.service import CHANNEL, Listener, run_listener
from imagen.store.notify import HEALTH_SQL, LISTEN_SQL

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
