"""Logging: one line per job transition with job_id, attempt and stage as fields.

Text by default; JSON lines when IMAGEN_LOG_FORMAT=json, so journald or a log
shipper can index the fields. Prompts are logged only at debug level and
secrets never: nothing here formats settings.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

TRANSITIONS = logging.getLogger("imagen.jobs")
_FIELDS = (
    "job_id",
    "attempt",
    "stage",
    "event",
    "status",
    "owner_user_id",
    "error",
    "elapsed_ms",
    "image_id",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the standard fields plus any job fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = str(value) if not isinstance(value, int | float | bool) else value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


class BrokerOutageFilter(logging.Filter):
    """Dramatiq's consumers, one per queue and delay queue, each log a CRITICAL line and an INFO line
    on every restart while Redis is down: a dozen lines every 3 s in a worker. This keeps one line
    per restart interval for the whole process, saying what is wrong and that it is retried."""

    CONSUMER = "dramatiq.worker.ConsumerThread"

    def __init__(self, interval: float | None = None) -> None:
        super().__init__()
        if interval is None:
            from dramatiq.worker import CONSUMER_RESTART_DELAY_SECS  # dramatiq_restart_delay

            interval = float(CONSUMER_RESTART_DELAY_SECS)
        self.interval = interval
        self._last = -math.inf
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.CONSUMER):
            return True
        message = record.getMessage()
        if message.startswith("Restarting consumer in"):
            return False
        if not message.startswith("Consumer encountered a connection error"):
            return True
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval * 0.9:
                return False
            self._last = now
        detail = message.partition(":")[2].strip()
        record.name = "dramatiq.worker"
        record.msg, record.args = (
            "redis unreachable (%s); the consumers retry every %.1fs",
            (
                detail,
                self.interval,
            ),
        )
        record.levelno, record.levelname = logging.ERROR, "ERROR"
        return True


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Set the root handler's format; keeps existing handlers (dramatiq installs its own)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    outage = BrokerOutageFilter()
    for handler in root.handlers:
        handler.setFormatter(formatter)
        for old in [f for f in handler.filters if isinstance(f, BrokerOutageFilter)]:
            handler.removeFilter(old)
        handler.addFilter(outage)
    root.setLevel(level.upper())
    # httpx logs every request at info (each upload to Supabase Storage): one line a job for nothing.
    if root.level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)


# A job's steps inside a worker are debug lines: at info a job is one line where it is claimed and
# one where it ends (done, failed), plus any retry, drop or rescue. At hundreds of jobs a second,
# five lines a job would be most of a worker's logging work and crowd journald's rate limit.
_LEVELS = {
    "started": logging.DEBUG,
    "generated": logging.DEBUG,
    "synced": logging.DEBUG,
    "failed": logging.WARNING,
    "dropped": logging.WARNING,
    "rescued": logging.WARNING,
    "swept": logging.WARNING,
}


def transition(event: str, job_id: object, attempt: int, stage: str | None = None, **fields: Any) -> None:
    """Log one job transition; the message repeats the key fields for plain-text readers."""
    level = _LEVELS.get(event, logging.INFO)
    if not TRANSITIONS.isEnabledFor(level):
        return
    extra = {"event": event, "job_id": str(job_id), "attempt": attempt, "stage": stage, **fields}
    details = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    TRANSITIONS.log(
        level,
        "job %s attempt=%s stage=%s %s%s",
        job_id,
        attempt,
        stage or "-",
        event,
        f" {details}" if details else "",
        extra=extra,
    )
