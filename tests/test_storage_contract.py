"""Repository contract: the same tests against SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from storage import gallery
from storage.database import Database
from storage.errors import IllegalTransition, NotFound
from storage.generations import (
    NewImage,
    Origin,
    add_images,
    count_by_status,
    create_generation,
    ensure_user,
    get_generation,
    mark_delivered,
    recent_generations,
    record_grid,
    transition,
)
from storage.models import Generation, GenerationKind, GenerationStatus, Image, Like, User
from storage.recipe import Recipe, StyleRef

S = GenerationStatus
ALICE, BOB, CAROL = 111111111111111111, 222222222222222222, 333333333333333333


def make_recipe(prompt: str = "a lighthouse at dusk", **changes: object) -> Recipe:
    values: dict[str, object] = {
        "model": "tiny",
        "prompt": prompt,
        "seed": 42,
        "width": 512,
        "height": 512,
        "steps": 20,
        "guidance": 7.0,
    }
    values.update(changes)
    return Recipe.model_validate(values)


def fake_image(index: int, seed: int) -> NewImage:
    key = f"{index:02x}{seed:062x}"[:64]
    return NewImage(index=index, seed=seed, width=512, height=512, blob_key=key, sha256=key)


async def finished_generation(
    database: Database,
    requester: int,
    *,
    prompt: str = "a lighthouse",
    styles: tuple[StyleRef, ...] = (),
    count: int = 4,
) -> Generation:
    async with database.session() as session:
        generation = await create_generation(
            session,
            kind=GenerationKind.IMAGINE,
            recipe=make_recipe(prompt, styles=styles, count=count),
            requester_id=requester,
        )
        await transition(session, generation.id, S.RUNNING, worker_name="w1")
        await add_images(
            session,
            generation.id,
            [fake_image(i, 42 + i + generation.id * 10) for i in range(count)],
        )
        return await transition(session, generation.id, S.SUCCEEDED)


async def test_create_and_get_generation_round_trips_every_field(database: Database) -> None:
    recipe = make_recipe(
        negative_prompt="people, text",
        styles=(StyleRef(name="watercolor", weight=0.8, sha256="ab" * 32),),
        versions={"diffusers": "0.42.1", "torch": "2.13.0"},
        aspect_ratio="3:2",
        width=624,
        height=416,
    )
    at = datetime(2026, 11, 22, 12, 30, 15, 123456, tzinfo=UTC)
    origin = Origin(
        guild_id=999999999999999999,
        channel_id=888888888888888888,
        message_id=777777777777777777,
        interaction_token="tok" * 30,
        interaction_at=at,
    )
    async with database.session() as session:
        created = await create_generation(
            session, kind=GenerationKind.IMAGINE, recipe=recipe, requester_id=ALICE, origin=origin
        )
        generation_id = created.id
    async with database.session() as session:
        generation = await get_generation(session, generation_id)
        assert generation.recipe == recipe
        assert generation.kind is GenerationKind.IMAGINE
        assert generation.status is S.QUEUED
        assert generation.requester_id == ALICE
        assert generation.guild_id == origin.guild_id
        assert generation.channel_id == origin.channel_id
        assert generation.message_id == origin.message_id
        assert generation.interaction_token == origin.interaction_token
        assert generation.interaction_at == at
        assert generation.queued_at.tzinfo is not None
        assert generation.attempts == 0
        assert [(s.style_name, s.weight) for s in generation.styles] == [("watercolor", 0.8)]
        assert await session.get(User, ALICE) is not None


async def test_get_missing_generation_says_which(database: Database) -> None:
    async with database.session() as session:
        with pytest.raises(NotFound, match="no generation 424242"):
            await get_generation(session, 424242)


async def test_lifecycle_records_worker_attempts_and_times(database: Database) -> None:
    async with database.session() as session:
        generation = await create_generation(
            session, kind=GenerationKind.IMAGINE, recipe=make_recipe(), requester_id=ALICE
        )
        running = await transition(session, generation.id, S.RUNNING, worker_name="gpu-0")
        assert running.status is S.RUNNING
        assert running.worker_name == "gpu-0"
        assert running.attempts == 1
        assert running.started_at is not None
        done = await transition(session, generation.id, S.SUCCEEDED)
        assert done.finished_at is not None
        assert done.finished_at >= done.started_at >= done.queued_at  # type: ignore[operator]


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([S.RUNNING, S.SUCCEEDED], S.RUNNING),
        ([S.RUNNING, S.SUCCEEDED], S.QUEUED),
        ([S.RUNNING, S.FAILED], S.SUCCEEDED),
        ([S.CANCELLED], S.RUNNING),
        ([], S.SUCCEEDED),
        ([], S.QUEUED),
    ],
)
async def test_illegal_transitions_are_refused_and_change_nothing(
    database: Database, path: list[GenerationStatus], illegal: GenerationStatus
) -> None:
    async with database.session() as session:
        generation = await create_generation(
            session, kind=GenerationKind.IMAGINE, recipe=make_recipe(), requester_id=ALICE
        )
        for status in path:
            await transition(session, generation.id, status)
        before = (await get_generation(session, generation.id)).status
        with pytest.raises(IllegalTransition) as refused:
            await transition(session, generation.id, illegal)
        assert refused.value.current == before.value
        assert refused.value.target == illegal.value
        assert f"cannot become {illegal.value}" in str(refused.value)
        assert (await get_generation(session, generation.id)).status is before


async def test_transition_of_missing_generation_is_not_found(database: Database) -> None:
    async with database.session() as session:
        with pytest.raises(NotFound):
            await transition(session, 987654, S.RUNNING)


async def test_running_job_can_be_requeued_and_counts_attempts(database: Database) -> None:
    async with database.session() as session:
        generation = await create_generation(
            session, kind=GenerationKind.IMAGINE, recipe=make_recipe(), requester_id=ALICE
        )
        await transition(session, generation.id, S.RUNNING, worker_name="dead")
        requeued = await transition(session, generation.id, S.QUEUED)
        assert requeued.worker_name is None and requeued.started_at is None
        again = await transition(session, generation.id, S.RUNNING, worker_name="alive")
        assert again.attempts == 2


async def test_only_one_of_two_racing_claims_wins(database: Database) -> None:
    async with database.session() as session:
        generation = await create_generation(
            session, kind=GenerationKind.IMAGINE, recipe=make_recipe(), requester_id=ALICE
        )

    async def claim(worker: str) -> str:
        try:
            async with database.session() as session:
                await transition(session, generation.id, S.RUNNING, worker_name=worker)
            return "won"
        except IllegalTransition:
            return "lost"

    results = await asyncio.gather(claim("a"), claim("b"))
    assert sorted(results) == ["lost", "won"]


async def test_images_belong_to_their_generation_in_grid_order(database: Database) -> None:
    generation = await finished_generation(database, ALICE, count=4)
    async with database.session() as session:
        loaded = await get_generation(session, generation.id)
        assert [image.index for image in loaded.images] == [0, 1, 2, 3]
        assert all(image.created_at.tzinfo is not None for image in loaded.images)


async def test_a_grid_is_recorded_once(database: Database) -> None:
    generation = await finished_generation(database, ALICE)
    assert generation.grid_blob_key is None
    async with database.session() as session:
        await record_grid(session, generation.id, "ab" * 32)
    async with database.session() as session:
        await record_grid(session, generation.id, "cd" * 32)  # a second writer changes nothing
    async with database.session() as session:
        assert (await get_generation(session, generation.id)).grid_blob_key == "ab" * 32


async def test_delivered_at_is_set_exactly_once(database: Database) -> None:
    generation = await finished_generation(database, ALICE)
    async with database.session() as session:
        assert await mark_delivered(session, generation.id) is True
    async with database.session() as session:
        assert await mark_delivered(session, generation.id) is False
        first = (await get_generation(session, generation.id)).delivered_at
        assert first is not None


async def test_recent_generations_newest_first_and_only_the_users(database: Database) -> None:
    ids = []
    for prompt in ("one", "two", "three"):
        ids.append((await finished_generation(database, ALICE, prompt=prompt)).id)
    await finished_generation(database, BOB, prompt="bob's")
    async with database.session() as session:
        recent = await recent_generations(session, ALICE, limit=2)
        assert [g.id for g in recent] == [ids[2], ids[1]]
        assert all(g.requester_id == ALICE for g in recent)
        counts = await count_by_status(session, ALICE)
        assert counts == {S.SUCCEEDED: 3}


async def test_like_is_idempotent_and_counted(database: Database) -> None:
    generation = await finished_generation(database, ALICE)
    image_id = generation.images[0].id
    async with database.session() as session:
        assert await gallery.like(session, BOB, image_id) == 1
        assert await gallery.like(session, BOB, image_id) == 1
        assert await gallery.like(session, CAROL, image_id) == 2
    async with database.session() as session:
        assert await gallery.unlike(session, BOB, image_id) == 1
        assert await gallery.unlike(session, BOB, image_id) == 1
        assert await gallery.has_liked(session, CAROL, image_id)
        assert not await gallery.has_liked(session, BOB, image_id)


async def test_toggling_a_like_twice_returns_to_the_start(database: Database) -> None:
    generation = await finished_generation(database, ALICE)
    image_id = generation.images[1].id
    async with database.session() as session:
        assert await gallery.toggle_like(session, BOB, image_id) == (True, 1)
    async with database.session() as session:
        assert await gallery.toggle_like(session, BOB, image_id) == (False, 0)


async def _stored_and_counted(database: Database, image_id: int) -> tuple[int, int]:
    async with database.session() as session:
        stored = await session.scalar(select(Image.like_count).where(Image.id == image_id))
        rows = await session.scalar(
            select(func.count()).select_from(Like).where(Like.image_id == image_id)
        )
    return int(stored or 0), int(rows or 0)


async def test_concurrent_likes_and_unlikes_keep_the_stored_count_exact(
    database: Database,
) -> None:
    generation = await finished_generation(database, ALICE)
    image_id = generation.images[0].id
    async with database.session() as session:
        for user in (BOB, CAROL):
            await ensure_user(session, user)

    async def each_in_its_own_transaction(change: Any, user: int) -> int:
        async with database.session() as session:
            return int(await change(session, user, image_id))

    # Bob's double click counts once; Carol and Alice like at the same moment.
    likes = [(gallery.like, BOB), (gallery.like, BOB), (gallery.like, CAROL), (gallery.like, ALICE)]
    await asyncio.gather(*(each_in_its_own_transaction(*args) for args in likes))
    assert await _stored_and_counted(database, image_id) == (3, 3)
    unlikes = [(gallery.unlike, BOB), (gallery.unlike, BOB), (gallery.unlike, CAROL)]
    await asyncio.gather(*(each_in_its_own_transaction(*args) for args in unlikes))
    assert await _stored_and_counted(database, image_id) == (1, 1)


async def test_liking_a_missing_image_is_not_found(database: Database) -> None:
    async with database.session() as session:
        with pytest.raises(NotFound, match="no image"):
            await gallery.like(session, BOB, 999999)


async def test_gallery_top_orders_by_likes_and_filters_by_style(database: Database) -> None:
    watercolor = (StyleRef(name="watercolor", weight=1.0),)
    plain = await finished_generation(database, ALICE, prompt="plain")
    styled = await finished_generation(database, ALICE, prompt="wet", styles=watercolor)
    favourite = styled.images[2].id
    runner_up = styled.images[0].id
    async with database.session() as session:
        for user in (BOB, CAROL):
            await gallery.like(session, user, favourite)
        await gallery.like(session, BOB, runner_up)
        await gallery.like(session, BOB, plain.images[0].id)
        await gallery.like(session, CAROL, plain.images[0].id)
        await gallery.like(session, ALICE, plain.images[0].id)

    async with database.session() as session:
        page = await gallery.gallery_page(session, style="watercolor", page_size=3)
        assert [e.image.id for e in page.entries][:2] == [favourite, runner_up]
        assert [e.like_count for e in page.entries] == [2, 1, 0]
        assert {e.prompt for e in page.entries} == {"wet"}
        assert page.has_next is True
        everyone = await gallery.gallery_page(session, page_size=1)
        assert everyone.entries[0].image.id == plain.images[0].id
        assert everyone.entries[0].like_count == 3
        assert everyone.entries[0].requester_id == ALICE


async def test_gallery_pages_cover_every_image_once(database: Database) -> None:
    for prompt in ("a", "b", "c"):
        await finished_generation(database, ALICE, prompt=prompt)
    seen: list[int] = []
    async with database.session() as session:
        for sort in (gallery.GallerySort.NEW, gallery.GallerySort.TOP):
            seen.clear()
            page_number = 0
            while True:
                page = await gallery.gallery_page(session, sort=sort, page=page_number, page_size=5)
                seen.extend(entry.image.id for entry in page.entries)
                if not page.has_next:
                    break
                page_number += 1
            all_ids = set(await session.scalars(select(Image.id)))
            assert sorted(seen) == sorted(all_ids) and len(seen) == 12


async def test_gallery_new_is_newest_first_and_respects_since(database: Database) -> None:
    old = await finished_generation(database, ALICE, prompt="old")
    new = await finished_generation(database, ALICE, prompt="new")
    async with database.session() as session:
        page = await gallery.gallery_page(session, sort=gallery.GallerySort.NEW, page_size=25)
        assert page.entries[0].generation_id == new.id
        assert page.entries[-1].generation_id == old.id
        future = datetime.now(UTC) + timedelta(days=1)
        assert (await gallery.gallery_page(session, since=future)).entries == []


async def test_gallery_hides_unfinished_generations(database: Database) -> None:
    async with database.session() as session:
        generation = await create_generation(
            session, kind=GenerationKind.IMAGINE, recipe=make_recipe(), requester_id=ALICE
        )
        await transition(session, generation.id, S.RUNNING)
        await add_images(session, generation.id, [fake_image(0, 1)])
    async with database.session() as session:
        assert (await gallery.gallery_page(session)).entries == []


async def test_a_failed_transaction_leaves_nothing_behind(database: Database) -> None:
    with pytest.raises(RuntimeError):
        async with database.session() as session:
            await create_generation(
                session, kind=GenerationKind.IMAGINE, recipe=make_recipe(), requester_id=ALICE
            )
            raise RuntimeError("crash before commit")
    async with database.session() as session:
        assert list(await session.scalars(select(Generation))) == []


async def test_a_new_member_s_first_commands_at_once_both_find_their_user_row(
    database: Database,
) -> None:
    """Two first commands of a new member, each in its own transaction: neither fails on
    the other's row (on PostgreSQL both used to insert it, and one died on the key)."""
    newcomer = 7_000_000_000_000_001

    async def first_command() -> int:
        async with database.session() as session:
            user = await ensure_user(session, newcomer)
            await asyncio.sleep(0.05)  # both transactions open at once
            return user.id

    assert await asyncio.gather(*(first_command() for _ in range(4))) == [newcomer] * 4
    async with database.session() as session:
        assert await session.scalar(select(func.count()).select_from(User)) >= 1
        assert await session.get(User, newcomer) is not None
