"""The finalize stage and the end of a stage out of retries, on the in-memory store.

What a user or operator notices: the job done with its image linked and one `done` line,
a job that ended meanwhile keeping no image, and a job whose messages ran out of retries
ending failed with text that says which stage gave up, after how many tries, and why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from imagen.broker import FINALIZE_ACTOR, GENERATE_ACTOR, SYNC_ACTOR
from imagen.stages import run_exhausted, run_finalize, run_generate, run_sync
from tests.stage_context import Stages, claimed, job, logged, make_stages, transitions

TIME_LIMIT_TRACEBACK = """Traceback (most recent call last):
  File "/srv/imagen/.venv/lib/python3.11/site-packages/dramatiq/worker.py", line 513, in process_message
    res = actor(*message.args, **message.kwargs)
  File "/srv/imagen/imagen/pipeline.py", line 158, in generate
    result = backend.generate(request)
dramatiq.middleware.time_limit.TimeLimitExceeded

"""


@pytest.fixture
def stages(tmp_path: Path) -> Stages:
    return make_stages(tmp_path)


def synced(stages: Stages) -> tuple[str, str]:
    """A job whose images row is written: (job id, image id), as the finalize message carries them."""
    job_id = claimed(stages.store)
    run_generate(stages.ctx, job_id, 1)
    run_sync(stages.ctx, job_id, 1)
    (image,) = stages.store.images.values()
    return job_id, str(image["id"])


def exhausted(stages: Stages, actor: Any, args: list[Any], retries: Any = None, **options: Any) -> None:
    """The Retries middleware's on_retry_exhausted call: the message as a dict, and its retry info.
    `actor` None leaves out the actor name and the options (a bare message)."""
    message: dict[str, Any] = {"queue_name": "q", "args": args, "kwargs": {}}
    if actor is not None:
        message.update(actor_name=actor, options=options)
    run_exhausted(
        stages.ctx, message, {} if retries is None else {"retries": retries, "max_retries": retries}
    )


def test_finalize_marks_the_job_done_with_its_image_and_logs_one_done_line(
    stages: Stages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagen.jobs")
    job_id, image_id = synced(stages)

    run_finalize(stages.ctx, job_id, 1, image_id)

    row = job(stages.store, job_id)
    assert (row["status"], str(row["image_id"]), row["error"]) == ("done", image_id, None)
    (done,) = transitions(caplog, "done")
    assert logged(done) == {
        "event": "done", "job_id": job_id, "attempt": 1, "stage": "finalizing", "image_id": image_id,
    }  # fmt: skip
    assert done.getMessage() == f"job {job_id} attempt=1 stage=finalizing done image_id={image_id}"


def test_a_finalize_after_the_job_was_cancelled_removes_its_image_and_logs_the_drop(
    stages: Stages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagen.jobs")
    job_id, image_id = synced(stages)
    assert stages.store.cancel_job(job_id)

    run_finalize(stages.ctx, job_id, 1, image_id)

    row = job(stages.store, job_id)
    assert (row["status"], row["image_id"]) == ("cancelled", None)
    assert stages.store.images == {} and stages.objects() == []
    assert transitions(caplog, "done") == []
    (dropped,) = transitions(caplog, "dropped")
    assert logged(dropped) == {
        "event": "dropped", "job_id": job_id, "attempt": 1, "stage": "finalizing",
        "reason": "job is cancelled at attempt 1",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("actor", "stage"),
    [(GENERATE_ACTOR, "generation"), (SYNC_ACTOR, "sync"), (FINALIZE_ACTOR, "finalize"), ("other", "stage")],
)
def test_a_stage_out_of_retries_fails_the_job_naming_the_stage_the_tries_and_its_last_error(
    stages: Stages, caplog: pytest.LogCaptureFixture, actor: str, stage: str
) -> None:
    caplog.set_level(logging.INFO, logger="imagen.jobs")
    job_id = claimed(stages.store)
    assert stages.store.note_transient(job_id, 1, "sync: storage answered 503")

    exhausted(stages, actor, [job_id, 1], retries=4)

    error = f"{stage} gave up after 5 tries: sync: storage answered 503"
    assert (job(stages.store, job_id)["status"], job(stages.store, job_id)["error"]) == ("failed", error)
    (failed,) = transitions(caplog, "failed")
    assert logged(failed) == {
        "event": "failed",
        "job_id": job_id,
        "attempt": 1,
        "stage": stage,
        "error": error,
    }


def test_a_message_without_an_actor_name_or_options_still_fails_its_job(stages: Stages) -> None:
    job_id = claimed(stages.store)

    exhausted(stages, None, [job_id, 1], retries=0)

    assert job(stages.store, job_id)["error"] == "stage gave up after 1 tries: unknown error"


def test_a_stage_that_noted_no_error_fails_with_the_last_line_of_its_traceback(stages: Stages) -> None:
    job_id = claimed(stages.store)  # killed at its time limit: nothing noted on the row

    exhausted(stages, GENERATE_ACTOR, [job_id, 1], retries=2, traceback=TIME_LIMIT_TRACEBACK)

    assert job(stages.store, job_id)["error"] == (
        "generation gave up after 3 tries: dramatiq.middleware.time_limit.TimeLimitExceeded"
    )


@pytest.mark.parametrize("traceback", [None, "", " \n\n  \n"])
def test_a_stage_with_no_error_and_no_traceback_fails_with_unknown_error(
    stages: Stages, traceback: str | None
) -> None:
    job_id = claimed(stages.store)

    exhausted(stages, SYNC_ACTOR, [job_id, 1], retries=1, traceback=traceback)

    assert job(stages.store, job_id)["error"] == "sync gave up after 2 tries: unknown error"


def test_retry_info_without_a_count_counts_one_try(stages: Stages) -> None:
    job_id = claimed(stages.store)
    assert stages.store.note_transient(job_id, 1, "finalize: OperationalError: server closed the connection")

    exhausted(stages, FINALIZE_ACTOR, [job_id, 1])

    assert job(stages.store, job_id)["error"] == (
        "finalize gave up after 1 tries: finalize: OperationalError: server closed the connection"
    )


@pytest.mark.parametrize("args", [[], ["only-a-job-id"]])
def test_a_retry_exhausted_message_without_job_and_attempt_is_logged_and_changes_no_job(
    stages: Stages, caplog: pytest.LogCaptureFixture, args: list[Any]
) -> None:
    caplog.set_level(logging.ERROR, logger="imagen.stages")
    job_id = claimed(stages.store)

    exhausted(stages, GENERATE_ACTOR, args, retries=3)

    assert job(stages.store, job_id)["status"] == "running"
    errors = [r.getMessage() for r in caplog.records if r.name == "imagen.stages"]
    assert errors == [f"retry-exhausted message without (job_id, attempt): {GENERATE_ACTOR!r}"]
