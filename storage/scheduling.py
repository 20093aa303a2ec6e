"""Fair claiming: which queued generation runs next, and where a generation stands.

The order is round-robin across users: each user's queued jobs are numbered
1, 2, 3... (their *turn*); lower turns go first, and between equal turns the
user who started a job least recently goes first. So if user A queues ten jobs
and then user B one, B's job runs second. Users at their running limit are
skipped. The same order gives positions and waits.

A worker may take several jobs at once (:func:`claim_batch`): the next one and those
right after it in this order that can share its denoising call, stopping at the first
that cannot, so a batch is exactly what the worker would have claimed one after another.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Select, delete, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.errors import IllegalTransition, ImagineError
from storage.generations import get_generation, transition
from storage.models import Generation, GenerationKind, GenerationStatus, Guild, Worker, utcnow

S = GenerationStatus
DEFAULT_JOB_SECONDS = 10.0
RECENT_JOBS = 20
STALE_WORKER = timedelta(seconds=30)  # six missed heartbeats
CLAIM_TRIES = 5  # claims another worker won, before claim_next gives up for now


class QueueFull(ImagineError):
    """A user asked for more jobs than their limits allow."""


@dataclass(frozen=True)
class Limits:
    max_running_per_user: int
    max_queued_per_user: int


@dataclass(frozen=True)
class QueuePosition:
    generation_id: int
    status: GenerationStatus
    position: int  # 1 runs next; 0 when the generation is not waiting
    estimated_wait_seconds: float
    workers: int = 0  # live workers for the generation's model (0: nothing will run it)


def fair_order(
    max_running: int | None = None, model: str | None = None, not_counted: Collection[int] = ()
) -> Select[int]:
    """Ids of queued generations in the order they should run; the running generations in
    ``not_counted`` (a batch being claimed, jobs whose images are being stored) do not
    count against running limits."""
    turn = (
        func.row_number()
        .over(
            partition_by=Generation.requester_id,
            order_by=(Generation.priority.desc(), Generation.queued_at, Generation.id),
        )
        .label("turn")
    )
    waiting = select(
        Generation.id,
        Generation.requester_id,
        Generation.priority,
        Generation.queued_at,
        Generation.guild_id,
        turn,
    ).where(Generation.status == S.QUEUED)
    if model is not None:
        waiting = waiting.where(Generation.model == model)
    queued = waiting.subquery("queued")
    earlier = Generation.__table__.alias("earlier")
    last_start = (
        select(func.max(earlier.c.started_at))
        .where(earlier.c.requester_id == queued.c.requester_id)
        .scalar_subquery()
    )
    query = select(queued.c.id).order_by(
        queued.c.turn,
        last_start.is_not(None),  # users who never ran anything first
        last_start,
        queued.c.priority.desc(),
        queued.c.queued_at,
        queued.c.id,
    )
    if max_running is not None:
        running = (
            select(func.count())
            .select_from(Generation)
            .where(
                Generation.status == S.RUNNING,
                Generation.requester_id == queued.c.requester_id,
                Generation.id.not_in(not_counted),
            )
            .scalar_subquery()
        )
        # A server may set its own running limit for the jobs asked for there.
        allowed = func.coalesce(
            select(Guild.max_running_per_user)
            .where(Guild.id == queued.c.guild_id)
            .scalar_subquery(),
            max_running,
        )
        query = query.where(running < allowed)
    return query


async def claim_next(
    session: AsyncSession,
    worker_name: str,
    limits: Limits,
    model: str | None = None,
    storing: Collection[int] = (),
) -> Generation | None:
    """Move the fairest runnable queued generation to running; ``None`` if there is none.

    With ``model``, only jobs for that base model are considered (a queue per model).
    ``storing``: the worker's jobs whose images are being stored (their engine part is
    done); they do not count against their users' running limits.

    A generation another worker took first is passed over and the order read again (that
    claim may have brought its user to their running limit), so racing workers never run
    the same job.
    """
    order = fair_order(limits.max_running_per_user, model, storing).limit(1)
    for _ in range(CLAIM_TRIES):
        generation_id = await session.scalar(order)
        if generation_id is None:
            return None
        try:
            return await transition(session, generation_id, S.RUNNING, worker_name=worker_name)
        except IllegalTransition:  # another worker claimed it after this read
            continue
    return None  # outrun that often: the worker asks again at its next poll


def batch_key(generation: Generation) -> tuple[object, ...] | None:
    """What generations must share to run in one denoising call (their prompts, negative
    prompts, seeds and counts may differ); ``None`` for one that runs alone: one that
    starts from an image (a variation, an upscale, Zoom Out or Pan, an image prompt) or
    has controls, whose inputs a batched call would have to prove identical."""
    recipe = generation.recipe
    if (
        generation.kind in (GenerationKind.UPSCALE, GenerationKind.OUTPAINT)
        or recipe.source_image_id is not None
        or recipe.init_image is not None
        or recipe.outpaint is not None
        or recipe.strength is not None
        or recipe.controls
    ):
        return None
    return (
        recipe.model,
        recipe.width,
        recipe.height,
        recipe.steps,
        recipe.sampler,
        recipe.guidance,
        tuple((style.name, style.weight) for style in recipe.styles),
        # A server's own style shadows a folder style of the same name.
        generation.guild_id if recipe.styles else None,
        # SDXL encodes no negative prompt as zeros, unlike an empty one, and SD3 and FLUX
        # refuse one: never mix the two.
        bool(recipe.negative_prompt),
    )


def ran_before(generation: Generation, *, claimed: bool) -> bool:
    """Whether ``generation`` was started before (by a worker that crashed or stalled, or
    in a batch with such a job): it then runs alone, so a job that crashes workers is
    found and given up without taking its batch-mates down with it again. ``claimed``:
    whether this claim already counted its attempt."""
    return generation.attempts > (1 if claimed else 0)


async def claim_batch(
    session: AsyncSession,
    worker_name: str,
    limits: Limits,
    model: str,
    max_images: int,
    storing: Collection[int] = (),
) -> list[Generation]:
    """Claim the fairest runnable generation and, while their images fit in
    ``max_images`` and they share its :func:`batch_key`, the ones right after it in the
    fair order; empty if nothing is queued.

    The order is read again after each claim, as a worker claiming one job after another
    would, and the first generation that does not fit ends the batch: a batch never lets
    a job overtake one it would not have overtaken. A generation that ran before
    (:func:`ran_before`) runs alone. Jobs of one batch count as one
    against their user's running limit, and so do jobs being stored (``storing``, as
    :func:`claim_next`).
    """
    first = await claim_next(session, worker_name, limits, model, storing)
    if first is None:
        return []
    batch, key, images = [first], batch_key(first), first.recipe.count
    if ran_before(first, claimed=True):
        key = None  # alone: if it crashed a worker, it takes no other job down again
    while key is not None and images < max_images:
        not_counted = [*storing, *(one.id for one in batch)]
        order = fair_order(limits.max_running_per_user, model, not_counted)
        following = await session.scalar(order.limit(1))
        if following is None:
            break
        candidate = await get_generation(session, following)
        if (
            ran_before(candidate, claimed=False)
            or batch_key(candidate) != key
            or images + candidate.recipe.count > max_images
        ):
            break
        try:
            batch.append(await transition(session, following, S.RUNNING, worker_name=worker_name))
        except IllegalTransition:  # another worker took it: read the order again
            continue
        images += candidate.recipe.count
    return batch


@dataclass(frozen=True)
class UserLoad:
    """What a user has in the queue when they submit a job for ``model``, and the limits
    that apply where they asked (a guild may lower or raise the global ones)."""

    waiting: int  # their queued jobs
    waiting_for_model: int  # of those, the ones for this model
    jobs_so_far: int  # all their jobs ever
    served_for_model: int  # their jobs for this model that started
    max_queued: int
    max_running: int


def _guild_limit(column: Any, guild_id: int | None) -> Any:
    if guild_id is None:
        return literal(None)
    return select(column).where(Guild.id == guild_id).scalar_subquery()


async def user_load(
    session: AsyncSession, requester_id: int, guild_id: int | None, model: str, limits: Limits
) -> UserLoad:
    """:class:`UserLoad` in one round trip."""
    g = Generation
    queued = g.status == S.QUEUED
    for_model = g.model == model
    row = (
        await session.execute(
            select(
                func.count().filter(queued),
                func.count().filter(queued, for_model),
                func.count(),
                func.count().filter(for_model, g.started_at.is_not(None)),
                _guild_limit(Guild.max_queued_per_user, guild_id),
                _guild_limit(Guild.max_running_per_user, guild_id),
            ).where(g.requester_id == requester_id)
        )
    ).one()
    waiting, waiting_for_model, jobs_so_far, served, max_queued, max_running = row
    return UserLoad(
        waiting=int(waiting),
        waiting_for_model=int(waiting_for_model),
        jobs_so_far=int(jobs_so_far),
        served_for_model=int(served),
        max_queued=limits.max_queued_per_user if max_queued is None else int(max_queued),
        # 0 or none: the global limit (as the fair order reads a guild's).
        max_running=int(max_running or limits.max_running_per_user),
    )


def refuse_over_limit(load: UserLoad) -> None:
    """Refuse a submission over the user's queued limit, saying how many wait."""
    waiting, max_queued = load.waiting, load.max_queued
    if waiting >= max_queued:
        jobs = "job is" if waiting == 1 else "jobs are"
        raise QueueFull(
            f"{waiting} of your {jobs} already waiting, the most allowed here is {max_queued}; "
            "wait for one to finish or cancel one with /cancel."
        )


async def recent_job_seconds(session: AsyncSession) -> float:
    """Median-free average duration of the last finished jobs (a default when none)."""
    rows = await session.execute(
        select(Generation.started_at, Generation.finished_at)
        .where(Generation.status == S.SUCCEEDED, Generation.started_at.is_not(None))
        .order_by(Generation.finished_at.desc())
        .limit(RECENT_JOBS)
    )
    durations = [
        (finished - started).total_seconds()
        for started, finished in rows.all()
        if started is not None and finished is not None
    ]
    return sum(durations) / len(durations) if durations else DEFAULT_JOB_SECONDS


def beat_clock(session: AsyncSession) -> Any:
    """What heartbeats are timed by: on PostgreSQL the server's ``now()``, one clock for
    workers on several machines (one whose clock runs behind is not taken for dead); on
    SQLite, one machine's, this process's."""
    if session.get_bind().dialect.name == "postgresql":
        return func.now()
    return utcnow()


async def live_workers(session: AsyncSession, model: str, stale_after: timedelta) -> int:
    """Workers for ``model`` whose last heartbeat is more recent than ``stale_after``."""
    recent = Worker.heartbeat_at >= beat_clock(session) - stale_after
    count = await session.scalar(
        select(func.count()).select_from(Worker).where(Worker.model == model, recent)
    )
    return int(count or 0)


def estimated_wait(position: int, seconds: float, workers: int, running: bool) -> float:
    """Jobs ahead finish ``workers`` at a time; a running one is on average half done."""
    workers = max(1, workers)
    return (position - 1) * seconds / workers + (seconds / 2 if running else 0.0)


async def position_of(
    session: AsyncSession, generation_id: int, stale_seconds: float = STALE_WORKER.total_seconds()
) -> QueuePosition:
    """Where a generation stands: its place in the fair order, an estimated wait, and how
    many live workers can run it."""
    generation = await get_generation(session, generation_id)
    if generation.status is not S.QUEUED:
        return QueuePosition(generation_id, generation.status, 0, 0.0)
    order = list(await session.scalars(fair_order(model=generation.model)))
    if generation_id not in order:  # claimed (or cancelled) since it was read
        generation = await get_generation(session, generation_id)
        return QueuePosition(generation_id, generation.status, 0, 0.0)
    position = order.index(generation_id) + 1
    seconds = await recent_job_seconds(session)
    running = await session.scalar(
        select(func.count())
        .select_from(Generation)
        .where(Generation.status == S.RUNNING, Generation.model == generation.model)
    )
    workers = await live_workers(session, generation.model, timedelta(seconds=stale_seconds))
    wait = estimated_wait(position, seconds, workers, bool(running))
    return QueuePosition(generation_id, S.QUEUED, position, wait, workers)


async def heartbeat(session: AsyncSession, name: str, model: str) -> None:
    """Record that worker ``name`` is alive (creating its row on the first beat)."""
    worker = await session.get(Worker, name)
    now = beat_clock(session)
    if worker is None:
        session.add(Worker(name=name, model=model, started_at=now, heartbeat_at=now))
    else:
        worker.heartbeat_at = now
        worker.model = model
    await session.flush()


async def forget_worker(session: AsyncSession, name: str) -> None:
    """Drop worker ``name``'s heartbeat row: it stopped, holding no job."""
    await session.execute(delete(Worker).where(Worker.name == name))


async def requeue_orphans(
    session: AsyncSession,
    max_attempts: int,
    *,
    stale_after: timedelta = STALE_WORKER,
    own_name: str | None = None,
) -> list[int]:
    """Running rows whose worker is gone: back to queued, or failed after too many tries.
    Returns the ids of the rows this call moved (another worker may move some first).

    A worker is gone when its last heartbeat is older than ``stale_after`` (or it
    never beat). Rows of ``own_name`` are orphans too: that is a restart under the
    same name, and this process holds no job yet.
    """
    alive = select(Worker.name).where(Worker.heartbeat_at >= beat_clock(session) - stale_after)
    if own_name is not None:
        alive = alive.where(Worker.name != own_name)
    orphans = list(
        await session.execute(
            select(Generation.id, Generation.worker_name, Generation.attempts).where(
                Generation.status == S.RUNNING,
                or_(Generation.worker_name.is_(None), Generation.worker_name.not_in(alive)),
            )
        )
    )
    moved = []
    # Each move holds only while the row is still the gone worker's: another sweep may
    # re-queue it first and a live worker claim it, which this one must not undo.
    for generation_id, owner, attempts in orphans:
        try:
            if attempts >= max_attempts:
                await transition(
                    session,
                    generation_id,
                    S.FAILED,
                    error=(
                        f"This job crashed the worker {attempts} times and was "
                        "stopped; try different settings."
                    ),
                    owner=owner,
                )
            else:
                await transition(session, generation_id, S.QUEUED, owner=owner)
        except IllegalTransition:  # it finished meanwhile, or another worker moved it
            continue
        moved.append(generation_id)
    return moved


async def queue_depth(session: AsyncSession, model: str | None = None) -> int:
    query = select(func.count()).select_from(Generation).where(Generation.status == S.QUEUED)
    if model is not None:
        query = query.where(Generation.model == model)
    return int(await session.scalar(query) or 0)
