"""The dashboard's pages, the fragments the browser polls, the two actions, and images.

Handlers parse the request, call `imagen.jobs_admin` or `imagen.web.queries` in
a worker thread (psycopg here is synchronous), and render a template. Full pages
and the fragments they poll share one template each, so a refreshed fragment is
exactly what a reload would show.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from imagen import jobs_admin
from imagen.errors import StorageError
from imagen.web import charts, queries
from imagen.web.app import WebState
from imagen.web.redis_queues import queue_depths
from imagen.web.security import check_csrf

MAX_TEXT = 200
ACTIVE = ("pending", "running")


@dataclass(frozen=True)
class Filters:
    """The index page's filters, as given in the query string; `problem` says what was ignored."""

    status: str | None = None
    owner: UUID | None = None
    text: str | None = None
    problem: str | None = None

    @classmethod
    def parse(cls, params: Any) -> Filters:
        problems = []
        status = (params.get("status") or "").strip().lower() or None
        if status is not None and status not in jobs_admin.STATUSES:
            problems.append(f"status {status!r} is not one of {', '.join(jobs_admin.STATUSES)}")
            status = None
        owner_text = (params.get("owner") or "").strip()
        owner = None
        if owner_text:
            try:
                owner = UUID(owner_text)
            except ValueError:
                problems.append(f"owner {owner_text[:40]!r} is not a user id (a UUID)")
        text = (params.get("q") or "").strip()[:MAX_TEXT] or None
        return cls(status, owner, text, "; ".join(problems) or None)

    def query(self) -> dict[str, str]:
        """The filters as query parameters, for the polled fragment's address."""
        out = {}
        if self.status:
            out["status"] = self.status
        if self.owner:
            out["owner"] = str(self.owner)
        if self.text:
            out["q"] = self.text
        return out


def _state(request: Request) -> WebState:
    state: WebState = request.app.state.web
    return state


def _render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    response = _state(request).templates.TemplateResponse(request, name, context, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    return response


def _jobs_context(state: WebState, filters: Filters) -> dict[str, Any]:
    with state.store() as store:
        rows = jobs_admin.list_jobs(
            store,
            statuses=(filters.status,) if filters.status else (),
            owner=filters.owner,
            text=filters.text,
            limit=state.options.page_size,
        )
        counts = queries.capped_counts(store)
    return {"jobs": rows, "counts": counts, "filters": filters, "now": datetime.now(UTC)}


async def index(request: Request) -> Response:
    state = _state(request)
    filters = Filters.parse(request.query_params)
    if filters.text:
        try:
            return RedirectResponse(f"/jobs/{UUID(filters.text)}", status_code=303)
        except ValueError:
            pass
    context = await run_in_threadpool(_jobs_context, state, filters)
    return _render(request, "index.html", context)


async def jobs_fragment(request: Request) -> Response:
    context = await run_in_threadpool(_jobs_context, _state(request), Filters.parse(request.query_params))
    return _render(request, "_jobs.html", context)


@dataclass(frozen=True)
class Segment:
    """A stretch of the timeline bar: what the job was doing, for how long, as a share of the whole."""

    name: str
    seconds: float
    percent: float


_SEGMENT_NAMES = {"created": "pending"}


def timeline_bar(detail: jobs_admin.JobDetail, now: datetime) -> list[Segment]:
    """Stretches between the timeline's events; a job still active runs on until `now`."""
    events = detail.timeline
    spans: list[tuple[str, float]] = []
    for here, after in itertools.pairwise(events):
        spans.append((_SEGMENT_NAMES.get(here.event, here.event), (after.at - here.at).total_seconds()))
    if events and detail.job["status"] in ACTIVE:
        last = events[-1]
        spans.append((_SEGMENT_NAMES.get(last.event, last.event), max((now - last.at).total_seconds(), 0)))
    total = sum(seconds for _, seconds in spans) or 1.0
    return [Segment(name, seconds, 100 * seconds / total) for name, seconds in spans]


def _job_context(state: WebState, job_id: UUID) -> dict[str, Any]:
    with state.store() as store:
        detail = jobs_admin.job_detail(store, job_id)
    now = datetime.now(UTC)
    costs = [use["cost_usd"] for use in detail.usage if use["cost_usd"] is not None]
    return {
        "detail": detail,
        "job": detail.job,
        "segments": timeline_bar(detail, now),
        "total_cost": sum(costs) if costs else None,
        "active": detail.job["status"] in ACTIVE,
        "now": now,
    }


async def _job_response(
    request: Request, template: str, message: str | None = None, status: int = 200
) -> Response:
    try:
        job_id = UUID(request.path_params["job_id"])
    except ValueError:
        return PlainTextResponse("not a job id", status_code=404)
    try:
        context = await run_in_threadpool(_job_context, _state(request), job_id)
    except jobs_admin.JobNotFound as exc:
        return PlainTextResponse(str(exc), status_code=404)
    context["message"] = message
    return _render(request, template, context, status)


async def job_page(request: Request) -> Response:
    return await _job_response(request, "job.html", request.query_params.get("message"))


async def job_fragment(request: Request) -> Response:
    return await _job_response(request, "_job.html")


def _act(state: WebState, action: str, job_id: UUID) -> str:
    with state.store() as store:
        if action == "retry":
            was = jobs_admin.retry(store, job_id)
            return f"{was} -> pending"
        was = jobs_admin.cancel(store, job_id)
        note = " (it stops at its next stage boundary)" if was == "running" else ""
        return f"{was} -> cancelled{note}"


async def job_action(request: Request) -> Response:
    """POST /jobs/{id}/retry or /cancel: what `imagen jobs retry/cancel` do, through the same functions."""
    state = _state(request)
    if state.options.read_only:
        return PlainTextResponse("imagen web runs --read-only: actions are refused", status_code=403)
    refusal = await check_csrf(request, state.guard)
    if refusal is not None:
        return refusal
    try:
        job_id = UUID(request.path_params["job_id"])
    except ValueError:
        return PlainTextResponse("not a job id", status_code=404)
    action = request.path_params["action"]
    if action not in ("retry", "cancel"):
        return PlainTextResponse(f"no action {action[:20]!r}: retry or cancel", status_code=404)
    try:
        outcome = await run_in_threadpool(_act, state, action, job_id)
    except jobs_admin.JobNotFound as exc:
        return PlainTextResponse(str(exc), status_code=404)
    except jobs_admin.JobStateError as exc:
        return await _job_response(request, "job.html", str(exc), status=409)
    from urllib.parse import quote

    return RedirectResponse(f"/jobs/{job_id}?message={quote(outcome)}", status_code=303)


async def image(request: Request) -> Response:
    """GET /images/{id} and /images/{id}/thumb: local bytes, or a redirect to a signed URL."""
    state = _state(request)
    try:
        image_id = UUID(request.path_params["image_id"])
    except ValueError:
        return PlainTextResponse("not an image id", status_code=404)

    def load() -> dict[str, Any] | None:
        with state.store() as store:
            return queries.image_row(store, image_id)

    row = await run_in_threadpool(load)
    if row is None:
        return PlainTextResponse(f"no image {image_id}", status_code=404)
    thumb = request.url.path.endswith("/thumb")
    try:
        if not state.images.is_local:
            url = await run_in_threadpool(state.images.signed_url, row)
            return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})
        if thumb:
            data = await run_in_threadpool(state.images.thumbnail, row)
            return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})
        path = await run_in_threadpool(state.images.local_file, row)
    except StorageError as exc:
        return PlainTextResponse(str(exc), status_code=404)
    data = await run_in_threadpool(path.read_bytes)
    return Response(data, media_type=row["mime"], headers={"Cache-Control": "private, max-age=60"})


def _health_context(state: WebState) -> dict[str, Any]:
    with state.store() as store:
        health = queries.health(store)
    redis_error = None
    try:
        depths = queue_depths(state.settings.redis_url)
    except Exception as exc:
        depths = []
        redis_error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    slots = 60
    start = health.start
    by_minute = {bucket.minute: bucket for bucket in health.minutes}
    minutes = [by_minute.get(start + timedelta(minutes=i)) if start else None for i in range(slots)]

    def series(attr: str) -> list[Any]:
        return [getattr(b, attr) if b is not None else None for b in minutes]

    def counts(attr: str) -> list[int]:
        return [getattr(b, attr) if b is not None else 0 for b in minutes]

    throughput = charts.bar_chart(
        "jobs finished per minute",
        [("done", "#2f9e44", counts("done")), ("failed", "#e03131", counts("failed"))],
        start,
    )
    latency = charts.line_chart(
        "latency per minute (done jobs)",
        [
            charts.Series("pickup p50", "#1971c2", series("pickup_p50")),
            charts.Series("total p50", "#f08c00", series("total_p50")),
            charts.Series("total p95", "#c2255c", series("total_p95")),
        ],
        start,
    )
    return {
        "health": health,
        "depths": depths,
        "redis_error": redis_error,
        "throughput_chart": throughput,
        "latency_chart": latency,
        "now": datetime.now(UTC),
    }


async def health_page(request: Request) -> Response:
    context = await run_in_threadpool(_health_context, _state(request))
    return _render(request, "health.html", context)


async def health_fragment(request: Request) -> Response:
    context = await run_in_threadpool(_health_context, _state(request))
    return _render(request, "_health.html", context)


ROUTES = [
    Route("/", index),
    Route("/fragments/jobs", jobs_fragment),
    Route("/jobs/{job_id}", job_page),
    Route("/fragments/jobs/{job_id}", job_fragment),
    Route("/jobs/{job_id}/{action:str}", job_action, methods=["POST"]),
    Route("/images/{image_id}", image),
    Route("/images/{image_id}/thumb", image),
    Route("/health", health_page),
    Route("/fragments/health", health_fragment),
]
