"""Creating generations, reading them back, and moving them through their lifecycle.

Functions take an :class:`AsyncSession` so that callers decide the transaction
(a submission writes the row and its job in one).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, cast

from sqlalchemy import (
    CTE,
    FromClause,
    Select,
    Table,
    Update,
    bindparam,
    false,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from storage.database import Database, insert_or_ignore
from storage.errors import IllegalTransition, NotFound
from storage.models import (
    MAX_ID,
    Base,
    Generation,
    GenerationKind,
    GenerationStatus,
    GenerationStyle,
    Image,
    User,
    utcnow,
)
from storage.precompiled import Precompiled, detached
from storage.recipe import Recipe

S = GenerationStatus


class Anyone(enum.Enum):
    """A move of a row whoever holds it (a user's cancel of a queued job, a claim)."""

    ANYONE = "anyone"


ANYONE = Anyone.ANYONE

CANCEL_CHANNEL = "imagine_cancels"  # PostgreSQL: NOTIFY'd with a running generation's id

# Which status each status may move to. running → queued is a re-queue after
# a worker died; failed and cancelled are final, like succeeded.
ALLOWED_TRANSITIONS: dict[GenerationStatus, frozenset[GenerationStatus]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


@dataclass(frozen=True)
class Origin:
    """Where in Discord a generation was asked for, so its result can be delivered."""

    guild_id: int | None = None
    channel_id: int | None = None
    message_id: int | None = None
    interaction_token: str | None = None
    interaction_at: datetime | None = None


@dataclass(frozen=True)
class NewImage:
    index: int
    seed: int
    width: int
    height: int
    blob_key: str
    sha256: str


async def ensure_user(session: AsyncSession, user_id: int) -> User:
    user = await session.get(User, user_id)
    if user is not None:
        return user
    # A new member's first commands may arrive together: each transaction finds no row,
    # and a plain INSERT in all but one would fail on the key (the member saw silence).
    await session.execute(
        insert_or_ignore(
            session.get_bind().dialect.name,
            User,
            {"id": user_id, "settings": {}, "created_at": utcnow()},
            [User.id],
        )
    )
    user = await session.get(User, user_id)
    if user is None:  # cannot happen: the row is ours or a committed one
        raise NotFound(f"User {user_id} could not be recorded.")
    return user


async def lock_user(session: AsyncSession, user_id: int) -> None:
    """Record the user if new and hold their row until the transaction ends, in one round
    trip: what a user may do next that depends on what they did before (their queued
    limit) is then decided one transaction at a time, and each sees the one before."""
    dialect = session.get_bind().dialect.name
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(User).values(
        id=user_id, settings={}, created_at=utcnow()
    )
    # A conflict locks the row it met, also when the WHERE leaves it unchanged (no new
    # row version is written); a new row is ours until we commit.
    await session.execute(
        insert.on_conflict_do_update(
            index_elements=[User.id], set_={"settings": insert.excluded.settings}, where=false()
        )
    )


async def create_generation(
    session: AsyncSession,
    *,
    kind: GenerationKind,
    recipe: Recipe,
    requester_id: int,
    origin: Origin | None = None,
    parent_image_id: int | None = None,
    priority: int = 0,
    private: bool = False,
    nsfw: bool = False,
    requester_known: bool = False,
) -> Generation:
    """Insert a queued generation (and its requester, if new, unless ``requester_known``:
    recorded in this transaction already); returns it with its id."""
    if not requester_known:
        await ensure_user(session, requester_id)
    origin = origin or Origin()
    generation = Generation(
        kind=kind,
        recipe=recipe,
        model=recipe.model,
        requester_id=requester_id,
        parent_image_id=parent_image_id,
        guild_id=origin.guild_id,
        channel_id=origin.channel_id,
        message_id=origin.message_id,
        interaction_token=origin.interaction_token,
        interaction_at=origin.interaction_at,
        status=S.QUEUED,
        priority=priority,
        private=private,
        nsfw=nsfw,
        attempts=0,
        queued_at=utcnow(),
        styles=[GenerationStyle(style_name=s.name, weight=s.weight) for s in recipe.styles],
        images=[],
    )
    session.add(generation)
    await session.flush()
    return generation


def check_id(what: str, row_id: int) -> None:
    """Ids come from text anyone can craft (a button's ``custom_id``, a command's
    argument): one past the 64-bit keys names nothing, and gets the same sentence as any
    other unknown id instead of the driver's ``OverflowError``."""
    if not 0 < row_id <= MAX_ID:
        raise NotFound(f"There is no {what} {row_id}; check the id.")


# One round trip: the row joined to its few images and styles (at most a grid's images
# times a recipe's styles rows), where selectinload would take three. Built once: a
# worker reads a generation twice per job, and building the statement costs more than
# running it.
_GET_GENERATION = (
    select(Generation)
    .where(Generation.id == bindparam("generation_id"))
    .options(joinedload(Generation.images), joinedload(Generation.styles))
    .execution_options(populate_existing=True)
)


async def get_generation(session: AsyncSession, generation_id: int) -> Generation:
    """The generation with its images; :class:`NotFound` with a sentence if absent."""
    check_id("generation", generation_id)
    result = await session.execute(_GET_GENERATION, {"generation_id": generation_id})
    generation = result.unique().scalar_one_or_none()
    if generation is None:
        raise NotFound(f"There is no generation {generation_id}; check the id.")
    return generation


async def get_image(session: AsyncSession, image_id: int) -> Image:
    check_id("image", image_id)
    image = await session.get(Image, image_id)
    if image is None:
        raise NotFound(f"There is no image {image_id}; check the id.")
    return image


async def transition(
    session: AsyncSession,
    generation_id: int,
    target: GenerationStatus,
    *,
    worker_name: str | None = None,
    error: str | None = None,
    recipe: Recipe | None = None,
    owner: str | Anyone | None = ANYONE,
) -> Generation:
    """Move a generation to ``target``, or raise :class:`IllegalTransition`; ``recipe``
    replaces the row's in the same statement (the engine's completed one).

    The move is one conditional UPDATE, so two workers racing for the same row
    cannot both win: the loser sees the winner's status and gets the exception.
    With ``owner``, a running row moves only while that worker still holds it
    (``None``: no named worker): a worker taken for dead, whose row a sweep re-queued
    and another worker may have claimed, can neither end it nor re-queue it.
    """
    now = utcnow()
    parameters: dict[str, object] = {"generation_id": generation_id, "now": now}
    if worker_name is not None:
        parameters["worker_name"] = worker_name
    if owner is not ANYONE:
        parameters["owner"] = owner
    if error is not None:
        parameters["error"] = error
    if recipe is not None:
        parameters["recipe"] = recipe
    result = await session.execute(
        transition_statement(target, tuple(sorted(parameters))), parameters
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        await refuse_transition(session, generation_id, target, owner)
    return await get_generation(session, generation_id)


async def transition_in_one_statement(
    database: Database,
    statement: Select[Any],
    parameters: dict[str, object],
    target: GenerationStatus,
) -> Generation:
    """Run ``statement`` (the move of generation ``parameters["generation_id"]`` to
    ``target``, with more work in its ``WITH``, selecting :func:`returned_rows`) on an
    autocommit connection: one round trip, atomic by itself; returns the row with its
    images and styles. Raises as :func:`transition` does when the row did not move.

    It runs often (a worker's claim and success), so it is compiled once and its rows are
    made into objects here, without the ORM's per-execution work."""
    async with database.autocommit() as connection:
        rows = await _precompiled(statement, connection.dialect).fetch(connection, parameters)
    if not rows:
        owner = cast("str | None", parameters["owner"]) if "owner" in parameters else ANYONE
        async with database.autocommit_session() as session:
            await refuse_transition(session, cast(int, parameters["generation_id"]), target, owner)
    return _generation_from_rows(rows)


@functools.cache
def _precompiled(statement: Select[Any], dialect: Dialect) -> Precompiled:
    return Precompiled(statement, dialect)


def _part(prefix: str, model: type[Base]) -> tuple[str, type[Base], list[str], list[str]]:
    table = cast(Table, model.__table__)
    return prefix, model, [c.key for c in table.c], [c.key for c in table.primary_key]


# What transition_in_one_statement selects: its prefix, model, columns and primary key.
_PARTS = (_part("g_", Generation), _part("i_", Image), _part("s_", GenerationStyle))


def returned_rows(generation: FromClause, images: FromClause, work: CTE) -> Select[Any]:
    """What :func:`transition_in_one_statement`'s statement selects: the ``generation``
    row (a CTE returning it) outer-joined with its ``images`` (the table, or a CTE
    returning their rows) and its styles, with the statement's other ``work`` in its
    ``WITH``."""
    styles = cast(Table, GenerationStyle.__table__)
    columns = [
        source.c[key].label(prefix + key)
        for (prefix, _, keys, _), source in zip(_PARTS, (generation, images, styles), strict=True)
        for key in keys
    ]
    return (
        select(*columns)
        .select_from(
            generation.outerjoin(images, images.c.generation_id == generation.c.id).outerjoin(
                styles, styles.c.generation_id == generation.c.id
            )
        )
        .add_cte(work)
    )


def _generation_from_rows(rows: list[dict[str, Any]]) -> Generation:
    """The generation in ``rows`` (one per image and style, outer-joined), as a session
    loads it with its images (in order) and styles, then detached."""
    found: list[dict[tuple[object, ...], dict[str, Any]]] = [{}, {}, {}]
    for row in rows:
        for (prefix, _, keys, primary_key), seen in zip(_PARTS, found, strict=True):
            identity = tuple(row[prefix + key] for key in primary_key)
            if identity[0] is not None and identity not in seen:
                seen[identity] = {key: row[prefix + key] for key in keys}
    generation_values, image_values, style_values = (list(seen.values()) for seen in found)
    images = [detached(Image, values) for values in sorted(image_values, key=_by_index)]
    styles = [detached(GenerationStyle, values) for values in style_values]
    generation = detached(Generation, generation_values[0], images=images, styles=styles)
    for child in (*images, *styles):
        set_committed_value(child, "generation", generation)
    return generation


def _by_index(values: dict[str, Any]) -> int:
    return cast(int, values["index"])


async def refuse_transition(
    session: AsyncSession,
    generation_id: int,
    target: GenerationStatus,
    owner: str | Anyone | None = ANYONE,
) -> NoReturn:
    """Raise why the generation could not move to ``target`` (its status, or its absence;
    for a move by ``owner``, the worker that holds the row instead)."""
    row = (
        await session.execute(
            select(Generation.status, Generation.worker_name).where(Generation.id == generation_id)
        )
    ).one_or_none()
    if row is None:
        raise NotFound(f"There is no generation {generation_id}; check the id.")
    current, holder = row
    state = current.value
    if owner is not ANYONE and current is S.RUNNING and holder != owner:
        state = f"running on worker {holder}" if holder else "running on no named worker"
    raise IllegalTransition(generation_id, state, target.value)


@functools.cache
def transition_statement(target: GenerationStatus, parameters: tuple[str, ...]) -> Update:
    """The conditional UPDATE of :func:`transition`, with these bound parameters; built
    once for each, as building it costs more than running it."""
    table = cast(Table, Generation.__table__)
    sources = [s for s, targets in ALLOWED_TRANSITIONS.items() if target in targets]
    values: dict[str, object] = {"status": target}
    if target is S.RUNNING:
        values |= {
            "started_at": bindparam("now", type_=table.c.started_at.type),
            "attempts": table.c.attempts + 1,
            "worker_name": bindparam("worker_name", type_=table.c.worker_name.type)
            if "worker_name" in parameters
            else None,
            "finished_at": None,
        }
    elif target is S.QUEUED:
        values |= {"worker_name": None, "started_at": None}
    else:
        values["finished_at"] = bindparam("now", type_=table.c.finished_at.type)
    for optional in ("error", "recipe"):
        if optional in parameters:
            values[optional] = bindparam(optional, type_=table.c[optional].type)
    statement = (
        update(table)
        .where(table.c.id == bindparam("generation_id"), table.c.status.in_(sources))
        .values(**values)
    )
    if "owner" in parameters:  # NULL-safe: IS on SQLite, IS NOT DISTINCT FROM on PostgreSQL
        owner = bindparam("owner", type_=table.c.worker_name.type)
        statement = statement.where(table.c.worker_name.is_not_distinct_from(owner))
    return statement


async def image_is_private(session: AsyncSession, image_id: int) -> bool:
    """Whether the image belongs to a private generation (answered only to its requester)."""
    private = await session.scalar(
        select(Generation.private)
        .join(Image, Image.generation_id == Generation.id)
        .where(Image.id == image_id)
    )
    return bool(private)


async def add_images(
    session: AsyncSession, generation_id: int, images: Iterable[NewImage]
) -> list[Image]:
    rows = [
        Image(
            generation_id=generation_id,
            index=image.index,
            seed=image.seed,
            width=image.width,
            height=image.height,
            blob_key=image.blob_key,
            sha256=image.sha256,
            created_at=utcnow(),
        )
        for image in images
    ]
    session.add_all(rows)
    await session.flush()
    return rows


async def record_grid(session: AsyncSession, generation_id: int, blob_key: str) -> None:
    """Record the stored grid of a generation's images, unless it has one already."""
    await session.execute(
        update(Generation)
        .where(Generation.id == generation_id, Generation.grid_blob_key.is_(None))
        .values(grid_blob_key=blob_key)
        .execution_options(synchronize_session=False)
    )


async def mark_delivered(session: AsyncSession, generation_id: int) -> bool:
    """Set ``delivered_at`` once; ``False`` when it was already delivered."""
    result = await session.execute(
        update(Generation)
        .where(Generation.id == generation_id, Generation.delivered_at.is_(None))
        .values(delivered_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def recent_generations(
    session: AsyncSession,
    requester_id: int,
    *,
    limit: int = 10,
    statuses: Sequence[GenerationStatus] | None = None,
) -> list[Generation]:
    """A user's newest generations first."""
    query = (
        select(Generation)
        .where(Generation.requester_id == requester_id)
        .options(selectinload(Generation.images))
        .order_by(Generation.queued_at.desc(), Generation.id.desc())
        .limit(limit)
    )
    if statuses is not None:
        query = query.where(Generation.status.in_(list(statuses)))
    return list(await session.scalars(query))


async def count_by_status(session: AsyncSession, requester_id: int) -> dict[GenerationStatus, int]:
    rows = await session.execute(
        select(Generation.status, func.count())
        .where(Generation.requester_id == requester_id)
        .group_by(Generation.status)
    )
    return {status: count for status, count in rows.all()}


async def request_cancel(session: AsyncSession, generation_id: int) -> Generation:
    """Cancel a generation: a queued one at once, a running one by flagging it for its worker.

    A finished generation is returned unchanged.
    """
    generation = await get_generation(session, generation_id)
    if generation.status is S.QUEUED:
        try:  # only while no worker holds it: a queued row has none
            return await transition(session, generation_id, S.CANCELLED, owner=None)
        except IllegalTransition:  # a worker claimed it meanwhile: flag it below
            generation = await get_generation(session, generation_id)
    if generation.status is S.RUNNING:
        await session.execute(
            update(Generation)
            .where(Generation.id == generation_id, Generation.cancel_requested_at.is_(None))
            .values(cancel_requested_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if session.get_bind().dialect.name == "postgresql":
            # Workers LISTEN for this and stop at the next step; they also poll the flag.
            await session.execute(
                text("SELECT pg_notify(:channel, :id)"),
                {"channel": CANCEL_CHANNEL, "id": str(generation_id)},
            )
        generation = await get_generation(session, generation_id)
    return generation


async def cancel_requested(session: AsyncSession, generation_id: int) -> bool:
    requested = await session.scalar(
        select(Generation.cancel_requested_at).where(Generation.id == generation_id)
    )
    return requested is not None
