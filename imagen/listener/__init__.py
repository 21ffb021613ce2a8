"""`imagen listen`: claim pending jobs and forward them to Dramatiq (docs/architecture.md).

`service.Listener` runs the notifier, claimer, rescuer and sweep on its two
connections; `gate.InFlightGate` is the claimer's pacing at the in-flight cap,
plain arithmetic. The listener never imports the actors.
"""

from imagen.listener.gate import SATURATED_POLL, SATURATED_POLL_MAX, InFlightGate
from imagen.listener.service import CHANNEL, Listener, ListenerStats, run_listener

__all__ = [
    "CHANNEL",
    "SATURATED_POLL",
    "SATURATED_POLL_MAX",
    "InFlightGate",
    "Listener",
    "ListenerStats",
    "run_listener",
]
