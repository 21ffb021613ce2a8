"""The generation stage on the in-memory store: what it logs, what it passes the provider call,
how a throttled job waits, and when its time limit stops a call.

Time is the context's clock (`StageContext.clock`), moved by the test's provider: a call
that "takes 80 s" takes microseconds. The provider is the mock backend, or a stand-in
under the mock's name placed in the context's backend cache. The same stage against
PostgreSQL and Redis is tests/integration/test_stages.py's and test_admission.py's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from dramatiq.middleware import CurrentMessage

from imagen import interrupts
from imagen.admission import Deferred
from imagen.backends.base import GeneratedImage, ImageRequest, ImageResult, Usage
from imagen.backends.mock import MODEL, MockBackend
from imagen.broker import (
    FINALIZE_QUEUE,
    GENERATE_ACTOR,
    GENERATE_QUEUE,
    SYNC_ACTOR,
    SYNC_QUEUE,
    stage_message,
)
from imagen.errors import RateLimited
from imagen.pipeline import seed_for_job
from imagen.stages import StageContext, run_generate
from imagen.stages.lease import Heartbeater
from imagen.store import InMemoryJobStore
from tests.integration.conftest import RecordingBroker
from tests.stage_context import MOCK, OWNER, claimed
from tests.unit.test_stage_lease import START, Ticks
from tests.unit.test_stage_logic import make_ctx

PRESETS = """
[presets.poster]
description = "A poster"
prefix = "poster art"
[presets.poster.params]
size = "16x16"

[presets.mural]
description = "A wall"
prefix = "mural"
[presets.mural.params]
size = "32x32"
"""


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class MessageBroker(RecordingBroker):
    """Keeps the messages themselves too: their kwargs, options and delays."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[Any] = []

    def enqueue(self, message: Any, *, delay: int | None = None) -> Any:
        self.messages.append(message)
        return super().enqueue(message, delay=delay)


class Provider(MockBackend):
    """The mock under its own name, with a hook that runs during the call (time passing, an error)."""

    def __init__(self, during: Any = None, error: BaseException | None = None) -> None:
        super().__init__()
        self.during = during
        self.error = error
        self.calls = 0

    def generate(self, request: ImageRequest) -> ImageResult:
        self.calls += 1
        if self.during is not None:
            self.during()
        if self.error is not None:
            raise self.error
        return super().generate(request)


class LargeImage(MockBackend):
    """Answers a large image (by its size; the bytes are few)."""

    def __init__(self, width: int, height: int) -> None:
        super().__init__()
        self.size = (width, height)

    def generate(self, request: ImageRequest) -> ImageResult:
        image = GeneratedImage(data=b"\x89PNG", mime="image/png", width=self.size[0], height=self.size[1])
        return ImageResult(images=[image], usage=Usage(backend="mock", model=MODEL, images=1), model=MODEL)


@pytest.fixture
def store() -> InMemoryJobStore:
    return InMemoryJobStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def context(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock, *, chained: bool = False, **settings: Any
) -> StageContext:
    ctx = make_ctx(store, tmp_path, **settings)
    ctx.clock = clock
    ctx.broker = MessageBroker()
    if chained:
        ctx.chain_for_worker(None)
    return ctx


@pytest.fixture
def ctx(store: InMemoryJobStore, tmp_path: Path, clock: Clock) -> StageContext:
    return context(store, tmp_path, clock)


@pytest.fixture(autouse=True)
def _transitions(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="imagen.jobs")
    caplog.set_level(logging.DEBUG, logger="imagen.stages")


def logged(caplog: pytest.LogCaptureFixture, logger: str = "imagen.jobs") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def job(store: InMemoryJobStore, job_id: str) -> dict[str, Any]:
    row = store.get_job(job_id)
    assert row is not None
    return row


def handed_meta(ctx: StageContext, job_id: str) -> Any:
    handed = ctx.handoff.get(job_id, 1)
    assert handed is not None, "the image went to the sync stage"
    return handed.meta


def test_the_log_follows_a_generation_from_its_start_to_its_hand_off(
    ctx: StageContext, store: InMemoryJobStore, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = claimed(store)

    run_generate(ctx, job_id, 1)

    assert logged(caplog) == [
        f"job {job_id} attempt=1 stage=generating started",
        f"job {job_id} attempt=1 stage=generating generated backend=mock model={MODEL}",
    ]
    row = job(store, job_id)
    assert row["stage"] == "generating" and "generating" in row["stage_times"], (
        "imagen jobs show says where it is"
    )
    (message,) = ctx.broker.messages
    assert (message.actor_name, message.queue_name, message.args) == (SYNC_ACTOR, SYNC_QUEUE, (job_id, 1))
    assert ctx.broker.delays == [None], "the sync stage takes it at once"
    meta = handed_meta(ctx, job_id)
    assert (meta.backend, meta.model, meta.mime, meta.width, meta.height) == (
        "mock",
        MODEL,
        "image/png",
        16,
        16,
    )


def test_a_generation_message_for_a_cancelled_job_is_dropped_with_the_reason_logged(
    ctx: StageContext, store: InMemoryJobStore, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = claimed(store)
    assert store.cancel_job(job_id)

    run_generate(ctx, job_id, 1)

    assert logged(caplog) == [
        f"job {job_id} attempt=1 stage=generating dropped reason=job is cancelled at attempt 1"
    ]


def test_a_job_without_a_seed_gets_its_own_so_a_rerun_draws_the_same_image(
    ctx: StageContext, store: InMemoryJobStore
) -> None:
    unseeded, seeded = claimed(store), claimed(store, {**MOCK, "seed": 7})

    run_generate(ctx, unseeded, 1)
    run_generate(ctx, seeded, 1)

    assert handed_meta(ctx, unseeded).params["seed"] == seed_for_job(UUID(unseeded))
    assert handed_meta(ctx, seeded).params["seed"] == 7


def test_the_usage_row_names_the_owner_and_the_job(ctx: StageContext, store: InMemoryJobStore) -> None:
    job_id = claimed(store)

    run_generate(ctx, job_id, 1)

    ((_, usage),) = store.usage.items()
    assert (usage.owner_user_id, usage.job_id, usage.ok) == (OWNER, UUID(job_id), True)


@pytest.mark.parametrize("keep", [True, False])
def test_a_local_copy_is_kept_under_the_jobs_folder_only_when_asked(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock, keep: bool
) -> None:
    ctx = context(store, tmp_path, clock, keep_local_copy=keep)
    job_id = claimed(store)

    run_generate(ctx, job_id, 1)

    out = tmp_path / "out"
    written = (
        sorted(p.relative_to(out).parts[0] for p in out.rglob("*") if p.is_file()) if out.exists() else []
    )
    assert set(written) == ({"jobs"} if keep else set())
    assert len(written) >= keep


def test_the_presets_file_is_read_once_per_worker_not_per_job(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock
) -> None:
    presets = tmp_path / "presets.toml"
    presets.write_text(PRESETS)
    ctx = context(store, tmp_path, clock, presets_file=presets)
    first, second = (
        claimed(store, {"backend": "mock", "preset": "poster"}),
        claimed(store, {"backend": "mock", "preset": "poster"}),
    )

    run_generate(ctx, first, 1)
    presets.unlink()  # an operator editing the file: workers see it after a restart
    run_generate(ctx, second, 1)

    for job_id in (first, second):
        meta = handed_meta(ctx, job_id)
        assert (meta.preset, meta.prompt, meta.width) == ("poster", "poster art, a cat", 16)


def test_test_options_are_refused_on_a_server_that_turned_them_off(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock
) -> None:
    ctx = context(store, tmp_path, clock, job_test_options=False)
    job_id = claimed(store, {**MOCK, "delay_ms": 1})

    run_generate(ctx, job_id, 1)

    row = job(store, job_id)
    assert (row["status"], row["error"]) == (
        "failed",
        "generation failed: params delay_ms are test options, off on this server"
        " (the operator can set IMAGEN_JOB_TEST_OPTIONS=true)",
    )
    assert store.usage == {}, "the provider was never called"


def test_a_preset_cannot_take_a_job_past_the_servers_pixel_limit(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock
) -> None:
    presets = tmp_path / "presets.toml"
    presets.write_text(PRESETS)
    ctx = context(store, tmp_path, clock, presets_file=presets, max_pixels=256)
    job_id = claimed(store, {"backend": "mock", "preset": "mural"})

    run_generate(ctx, job_id, 1)

    row = job(store, job_id)
    assert (row["status"], row["error"]) == (
        "failed",
        "generation failed: size 32x32 is 1024 pixels, more than this server allows for a job"
        " (256; the operator can raise IMAGEN_MAX_PIXELS)",
    )
    assert store.usage == {}, "the provider was never called"


def test_a_quota_refusal_is_logged_with_the_job_and_its_attempt(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = context(store, tmp_path, clock, owner_daily_images=0)
    job_id = claimed(store)

    run_generate(ctx, job_id, 1)

    quota = [line for line in logged(caplog) if "quota_refused" in line]
    assert quota == [
        f"job {job_id} attempt=1 stage=generating quota_refused owner_user_id={OWNER} kind=images"
    ]


@pytest.mark.parametrize("chained", [False, True])
def test_a_throttled_job_is_sent_again_after_the_wait_and_keeps_the_failed_calls_usage_row(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture, chained: bool
) -> None:
    ctx = context(store, tmp_path, clock, chained=chained)
    ctx.backends["mock"] = Provider(error=RateLimited("429 Too Many Requests"))
    job_id = claimed(store)

    run_generate(ctx, job_id, 1)

    (message,) = ctx.broker.messages
    (delay,) = ctx.broker.delays
    assert (message.actor_name, message.queue_name, message.args) == (
        GENERATE_ACTOR,
        GENERATE_QUEUE,
        (job_id, 1),
    )
    assert 2000 <= delay <= 2500, "the provider's pause (2 s without advice) and a little spread"
    assert message.kwargs["throttled_s"] == pytest.approx(delay / 1000, abs=0.002), "the wait counts"
    assert job(store, job_id)["status"] == "running", "no try used, not failed"
    ((_, usage),) = store.usage.items()
    assert (usage.ok, usage.error) == (False, "RateLimited: 429 Too Many Requests")
    again = round(delay / 1000, 1)
    assert logged(caplog)[-1] == (
        f"job {job_id} attempt=1 stage=generating throttled reason=provider answered 429"
        f" again_in_s={again} waited_s={again}"
    )


def test_a_job_the_provider_kept_waiting_past_the_limit_fails_saying_how_long(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock
) -> None:
    ctx = context(store, tmp_path, clock, throttle_max_wait=60)
    ctx.backends["mock"] = Provider(error=RateLimited("429 Too Many Requests"))
    job_id = claimed(store)

    run_generate(ctx, job_id, 1, throttled_s=60.2)

    row = job(store, job_id)
    assert (row["status"], row["error"]) == (
        "failed",
        "generation failed: provider rate limit: waited 60 s (IMAGEN_THROTTLE_MAX_WAIT=60);"
        " last answer: 429 Too Many Requests",
    )
    assert ctx.broker.sent == []


def test_a_job_waiting_for_our_own_cap_is_sent_again_without_counting_the_wait(
    ctx: StageContext, store: InMemoryJobStore, caplog: pytest.LogCaptureFixture
) -> None:
    ctx.backends["mock"] = Provider(error=Deferred(3.0, "concurrency cap", provider_wait=False, waited_s=4.0))
    job_id = claimed(store)

    run_generate(ctx, job_id, 1, throttled_s=12.5)

    (message,) = ctx.broker.messages
    assert (message.actor_name, message.args, message.kwargs) == (
        GENERATE_ACTOR,
        (job_id, 1),
        {"throttled_s": 12.5},
    )
    assert ctx.broker.delays == [3000]
    assert store.usage == {}, "the provider was never called"
    assert logged(caplog, "imagen.stages") == [f"job {job_id} waits 3.0 s for room: concurrency cap"]
    assert not [line for line in logged(caplog) if "throttled" in line]


def test_a_throttled_generation_message_goes_again_with_its_retry_count(
    ctx: StageContext, store: InMemoryJobStore
) -> None:
    # A copy of the message: the Retries middleware's count stays, so waiting costs no try.
    ctx.backends["mock"] = Provider(error=RateLimited("429 Too Many Requests"))
    job_id = claimed(store)
    current = stage_message(GENERATE_ACTOR, GENERATE_QUEUE, job_id, 1).copy(options={"retries": 2})
    token = CurrentMessage._MESSAGE.set(current)
    try:
        run_generate(ctx, job_id, 1)
    finally:
        CurrentMessage._MESSAGE.reset(token)

    (message,) = ctx.broker.messages
    assert (message.message_id, message.options["retries"]) == (current.message_id, 2)
    assert (message.queue_name, message.args, list(message.kwargs)) == (
        GENERATE_QUEUE,
        (job_id, 1),
        ["throttled_s"],
    )


def test_a_throttled_job_from_another_stages_message_gets_a_generation_message_of_its_own(
    ctx: StageContext, store: InMemoryJobStore
) -> None:
    # The sync stage regenerating a lost hand-off runs the generation in its own message.
    ctx.backends["mock"] = Provider(error=RateLimited("429 Too Many Requests"))
    job_id = claimed(store)
    current = stage_message(SYNC_ACTOR, "imagen-sync", job_id, 1).copy(options={"retries": 3})
    token = CurrentMessage._MESSAGE.set(current)
    try:
        run_generate(ctx, job_id, 1)
    finally:
        CurrentMessage._MESSAGE.reset(token)

    (message,) = ctx.broker.messages
    assert (message.actor_name, message.queue_name, message.args) == (
        GENERATE_ACTOR,
        GENERATE_QUEUE,
        (job_id, 1),
    )
    assert message.message_id != current.message_id and "retries" not in message.options


def test_a_call_is_stopped_at_the_stages_limit_counted_from_the_messages_start(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock
) -> None:
    ctx = context(store, tmp_path, clock, generate_time_limit=100, provider_timeout=50)
    begin_stage = store.begin_stage

    def slow_begin(*args: Any) -> Any:
        clock.now += 10  # the message's first write waited on a busy database
        return begin_stage(*args)

    waits: list[float] = []

    def call() -> None:
        clock.now = START + 97.9
        interrupts.sleep(0)  # not yet: 2 s before Dramatiq's limit is ours
        waits.append(clock.now - START)
        clock.now = START + 98
        interrupts.sleep(0)
        waits.append(clock.now - START)

    store.begin_stage = slow_begin  # type: ignore[method-assign]
    ctx.backends["mock"] = Provider(during=call)
    job_id = claimed(store)

    with pytest.raises(interrupts.CallAbandoned):
        run_generate(ctx, job_id, 1)

    assert waits == [pytest.approx(97.9)], "the call went on until the limit, and no further"
    row = job(store, job_id)
    assert (row["status"], row["last_error"]) == (
        "running",
        "generation: stopped at the stage's time limit (100 s, IMAGEN_GENERATE_TIME_LIMIT)",
    )


def test_a_job_cancelled_during_its_call_ends_the_call_at_the_next_check(
    store: InMemoryJobStore, tmp_path: Path
) -> None:
    ticks = Ticks()
    ctx = context(store, tmp_path, Clock())
    ctx.clock = ticks.clock
    ctx.heartbeater = Heartbeater(store, 600, clock=ticks.clock, wait=ticks.wait)
    job_id = claimed(store)

    def cancelled_meanwhile() -> None:
        ticks.step(3)
        interrupts.sleep(0)  # still the job's: the call goes on
        assert store.cancel_job(job_id)
        ticks.step()
        interrupts.sleep(0)

    ctx.backends["mock"] = Provider(during=cancelled_meanwhile)

    run_generate(ctx, job_id, 1)

    assert job(store, job_id)["status"] == "cancelled"
    ((_, usage),) = store.usage.items()
    assert usage.error == "JobGone: the job was cancelled or taken over while its call ran"
    assert ctx.broker.sent == [] and ctx.handoff.get(job_id, 1) is None


@pytest.mark.parametrize(("call_s", "chained"), [(80, True), (80.5, False)])
def test_a_chained_generation_uploads_itself_only_with_a_sync_stages_limit_left(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock, call_s: float, chained: bool
) -> None:
    ctx = context(store, tmp_path, clock, chained=True, generate_time_limit=200, provider_timeout=50)

    def slow() -> None:
        clock.now += call_s

    ctx.backends["mock"] = Provider(during=slow)
    job_id = claimed(store)

    run_generate(ctx, job_id, 1)

    if chained:
        assert job(store, job_id)["status"] == "done" and ctx.broker.sent == []
    else:
        assert job(store, job_id)["status"] == "running"
        assert ctx.broker.sent == [(SYNC_ACTOR, (job_id, 1))], "120 s left is the sync stage's whole limit"
    assert len(store.usage) == 1


def test_a_chained_job_writes_its_usage_row_with_the_statement_that_ends_it(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock
) -> None:
    # One commit fewer per job (imagen.usage.HeldSink); the row is there all the same.
    ctx = context(store, tmp_path, clock, chained=True)
    on_its_own: list[Any] = []
    record_usage = store.record_usage

    def recording(record: Any) -> Any:
        on_its_own.append(record)
        return record_usage(record)

    store.record_usage = recording  # type: ignore[method-assign]
    job_id = claimed(store)

    run_generate(ctx, job_id, 1)

    assert job(store, job_id)["status"] == "done" and len(store.usage) == 1
    assert on_its_own == []


@pytest.mark.parametrize(
    ("size", "trimmed"), [((2048, 1024), True), ((1024, 1024), False), ((1024, 2048), True)]
)
def test_a_worker_hands_memory_back_after_a_large_image(
    ctx: StageContext,
    store: InMemoryJobStore,
    monkeypatch: pytest.MonkeyPatch,
    size: tuple[int, int],
    trimmed: bool,
) -> None:
    trims: list[int] = []
    monkeypatch.setattr("imagen.stages.context._malloc_trim", lambda: trims.append(1))
    ctx.backends["mock"] = LargeImage(*size)
    job_id = claimed(store)

    run_generate(ctx, job_id, 1)
    ctx.release_memory()
    ctx.release_memory()

    assert trims == ([1] if trimmed else [])


def test_an_unknown_param_is_refused_listing_only_the_params_this_server_allows(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock
) -> None:
    ctx = context(store, tmp_path, clock, job_test_options=False)
    job_id = claimed(store, {**MOCK, "colour": "red"})

    run_generate(ctx, job_id, 1)

    row = job(store, job_id)
    assert row["status"] == "failed"
    assert row["error"].startswith("generation failed: unknown params key(s): colour; allowed: ")
    allowed = row["error"].split("allowed: ")[1].split(", ")
    assert "size" in allowed and "delay_ms" not in allowed and "fail" not in allowed, (
        "no test option advertised"
    )


def test_a_chained_job_refused_by_the_provider_fails_with_its_usage_row_written(
    store: InMemoryJobStore, tmp_path: Path, clock: Clock
) -> None:
    ctx = context(store, tmp_path, clock, chained=True)
    job_id = claimed(store, {**MOCK, "fail": "permanent"})

    run_generate(ctx, job_id, 1)

    row = job(store, job_id)
    assert (row["status"], row["error"]) == (
        "failed",
        "generation failed: mock backend: simulated permanent failure (prompt refused)",
    )
    ((_, usage),) = store.usage.items()
    assert (usage.ok, usage.job_id) == (False, UUID(job_id)), "a refused call is billed: its row is kept"


@pytest.mark.parametrize(
    ("setting", "queues", "chains"),
    [
        (True, None, True),  # a worker on every queue
        (True, {GENERATE_QUEUE, SYNC_QUEUE, FINALIZE_QUEUE}, True),
        (True, {GENERATE_QUEUE, SYNC_QUEUE}, False),  # the finalize stage runs elsewhere
        (True, {GENERATE_QUEUE}, False),
        (False, None, False),  # IMAGEN_CHAIN_STAGES=false
    ],
)
def test_stages_chain_only_when_allowed_and_the_worker_takes_every_stages_queue(
    store: InMemoryJobStore,
    tmp_path: Path,
    clock: Clock,
    setting: bool,
    queues: set[str] | None,
    chains: bool,
) -> None:
    ctx = context(store, tmp_path, clock, chain_stages=setting)
    ctx.chain_for_worker(queues)
    job_id = claimed(store)

    run_generate(ctx, job_id, 1)

    assert job(store, job_id)["status"] == ("done" if chains else "running")
    assert ctx.broker.sent == ([] if chains else [(SYNC_ACTOR, (job_id, 1))])
