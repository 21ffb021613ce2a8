"""The usage spool: provider calls whose row the database did not take yet, kept on disk.

A usage record is written to PostgreSQL right after its call (or with the
statement that ends a chained job). When that write fails (a connection
terminated, the server restarting), the record goes here: one file per call,
`{call_id}.json`, written atomically and fsynced, in a folder every imagen
process of the host shares (`IMAGEN_USAGE_SPOOL_DIR`). Each worker process
replays the folder at boot and then every poll interval; a replayed record is
inserted with ON CONFLICT (call_id) DO NOTHING and its file removed, so two
processes replaying the same file, or a file whose write had landed after all,
still leave one row. The spool must never drop a record the database has not
acknowledged: a file goes only after its INSERT committed, or, if the database
refuses the record itself, into `rejected/` for an operator.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from imagen.usage import UsageRecord
from imagen.writer import replace_atomically

log = logging.getLogger(__name__)

REJECTED = "rejected"


class UsageSpool:
    """A folder of usage records waiting for the database."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def put(self, record: UsageRecord) -> bool:
        """Keep `record` on disk until a replay writes it; False (logged) if even that failed."""
        data = json.dumps(record.to_json(), sort_keys=True, default=str).encode()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            replace_atomically(self.folder / f"{record.call_id}.json", data, durable=True, prefix=".spool-")
        except OSError as exc:
            log.error("usage: could not spool call %s to %s: %s", record.call_id, self.folder, exc)
            return False
        return True

    def pending(self) -> list[Path]:
        """The spooled records, oldest first; never a file still being written (those start with a dot)."""
        try:
            files = [p for p in self.folder.iterdir() if p.suffix == ".json" and not p.name.startswith(".")]
        except FileNotFoundError:
            return []
        return sorted(files, key=_mtime)

    def replay(self, connect: Callable[[], AbstractContextManager[Any]]) -> int:
        """Write every spooled record, removing each file once its INSERT committed; returns how many.

        Stops at the first connection failure (the database is still away: the next replay
        tries again). A record the database refuses (bad data, a constraint) moves to
        `rejected/` with an error line, so it is neither lost nor retried forever.
        """
        import psycopg

        from imagen.jobs import execute_once
        from imagen.store.postgres_stages import INSERT_USAGE, usage_params

        written = 0
        files = self.pending()
        if not files:
            return 0
        insert = INSERT_USAGE
        try:
            with connect() as conn:
                for path in files:
                    try:
                        record = UsageRecord.from_json(json.loads(path.read_text()))
                    except FileNotFoundError:
                        continue  # another process replayed it meanwhile
                    except (ValueError, TypeError, KeyError) as exc:
                        self._reject(path, f"unreadable: {exc}")
                        continue
                    try:
                        execute_once(conn, insert, usage_params(record))
                    except (psycopg.OperationalError, psycopg.InterfaceError):
                        raise
                    except psycopg.Error as exc:
                        self._reject(
                            path, str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                        )
                        continue
                    path.unlink(missing_ok=True)
                    written += 1
        except psycopg.Error as exc:
            log.warning("usage: replaying the spool stopped after %d record(s): %s", written, exc)
        if written:
            log.info("usage: wrote %d spooled record(s) to imagen.usage", written)
        return written

    def _reject(self, path: Path, why: str) -> None:
        target = self.folder / REJECTED / path.name
        try:
            target.parent.mkdir(exist_ok=True)
            path.replace(target)
        except OSError as exc:
            log.error("usage: could not move refused record %s aside: %s", path, exc)
            return
        log.error("usage: the database refused spooled record %s (%s); kept in %s", path.name, why, target)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class SpoolReplayer:
    """One thread per worker process: replays the spool at start, then every `interval` seconds.

    An empty spool costs one directory listing per interval; the thread is a daemon, so a
    record it has not replayed when the process stops stays on disk for the next one.
    """

    def __init__(self, spool: UsageSpool, replay: Callable[[UsageSpool], int], interval: float) -> None:
        # `replay` writes the spool's records: the job store's `replay_usage`.
        self.spool = spool
        self.replay = replay
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="imagen-usage-spool", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            try:
                self.replay(self.spool)
            except Exception:  # a bug here must not end the thread: the records stay on disk
                log.exception("usage: replaying the spool failed")
            if self._stop.wait(self.interval):
                return
