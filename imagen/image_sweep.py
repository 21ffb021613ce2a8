"""No image for a job that is not done: discard a failed or cancelled job's images row and object.

Whatever ended the job (the owner's cancel, a permanent error, retries or
attempts exhausted) and whatever was lost on the way (a finalize message with
Redis, a worker killed between its upload and its images row), the job must not
keep an `imagen.images` row or an object at its path. `discard_ended` removes
both while it holds the job's row lock, and only if the job is failed or
cancelled at that moment: an operator retry waits for the lock, so its new
attempt uploads after the delete, never before it, and a done or running job
(a newer attempt writes the very same path) is never touched. The stages call
it when their fence fails; the listener's sweep (`sweep_ended`) calls it for
every job that ended since it was last swept. Both are idempotent: deleting a
missing row or object is nothing.
"""

from __future__ import annotations

import logging
from uuid import UUID

from imagen.errors import ImagenError
from imagen.jobs import Conn
from imagen.logs import transition
from imagen.storage import EXTENSIONS, Storage, job_object_path
from imagen.store.queries import QUERIES
from imagen.store.rows import Discarded

log = logging.getLogger(__name__)

# The statements are in imagen/store/queries.sql, with why each is written as it is.
LOCK_ENDED = QUERIES["lock_ended"]
DELETE_IMAGE = QUERIES["delete_image"]
PATHS_IN_USE = QUERIES["paths_in_use"]
MARK_SWEPT = QUERIES["mark_swept"]
UNSWEPT = QUERIES["unswept"]


def discard_ended(conn: Conn, job_id: UUID | str, storage: Storage) -> Discarded | None:
    """Remove a failed or cancelled job's images row and the objects at its path, under its row lock.

    None when the job is not failed or cancelled (done, running, pending, gone): nothing is
    touched. A storage error rolls the row delete back too (and propagates), so the next
    try finds both as they were. On an autocommit connection with no transaction open.
    """
    with conn.transaction():
        row = conn.execute(LOCK_ENDED, {"id": job_id}).fetchone()
        if row is None:
            return None
        status, owner, attempt = row
        deleted = conn.execute(DELETE_IMAGE, {"id": job_id, "owner": owner}).fetchall()
        # Every path the job's image can have: the row's, and the deterministic one for each
        # type (an upload whose images row was never written leaves no other trace).
        paths = {r[0] for r in deleted} | {job_object_path(owner, UUID(str(job_id)), m) for m in EXTENSIONS}
        in_use = conn.execute(PATHS_IN_USE, {"bucket": storage.bucket, "paths": sorted(paths)}).fetchall()
        paths -= {r[0] for r in in_use}
        objects = [path for path in sorted(paths) if storage.delete(path)]
        conn.execute(MARK_SWEPT, {"id": job_id})
    return Discarded(UUID(str(job_id)), status, attempt, bool(deleted), objects)


def sweep_ended(conn: Conn, storage: Storage, *, limit: int = 100) -> list[Discarded]:
    """Discard the image of up to `limit` jobs that ended failed or cancelled since their last sweep.

    Returns the jobs that had something to remove; each gets a `swept` log line. A job
    whose storage call fails stays unswept (logged) and is tried again at the next sweep.
    """
    found = []
    for (job_id,) in conn.execute(UNSWEPT, {"limit": limit}).fetchall():
        try:
            done = discard_ended(conn, job_id, storage)
        except ImagenError as exc:
            log.warning("sweep: could not remove the image of job %s: %s; will try again", job_id, exc)
            continue
        if done is not None and done.removed_anything:
            transition(
                "swept", job_id, done.attempt, None, status=done.status, images_row=done.row,
                objects=len(done.objects),
            )  # fmt: skip
            found.append(done)
    return found
