"""/gallery through the fake Discord: likes order it, pages go both ways, buttons open images."""

from __future__ import annotations

from typing import Any

from tests.fake_discord import ALICE, BOB
from tests.test_bot import Harness, harness, running

__all__ = ["harness", "running"]


async def like(running: Harness, message: dict[str, Any], by: dict[str, Any]) -> None:
    message_id = int(message["id"])
    like_id = next(
        b["custom_id"] for b in running.fake.buttons(message_id) if ":like" in b["custom_id"]
    )
    click = await running.fake.click(message_id, like_id, by=by)
    await running.fake.wait_for(lambda: click.responses, what="the like")


def caption(message: dict[str, Any]) -> str:
    return str(message["content"])


async def test_the_most_liked_image_comes_first_and_pages_go_both_ways(running: Harness) -> None:
    fake = running.fake
    grid = await running.result(await running.imagine("a lighthouse --steps 2 --seed 3"))
    second = await running.result(await running.press(grid, "U2"))
    third = await running.result(await running.press(grid, "U3"))
    await like(running, second, ALICE)
    await like(running, third, ALICE)
    await like(running, third, BOB)
    [generation] = await running.generations()
    images = {image.index: image.id for image in generation.images}

    page = await running.result(await fake.slash("gallery", options={"sort": "top"}))
    assert f"image {images[2]} of" in caption(page) and "❤️ 2" in caption(page)
    assert len(page["attachments"]) == 1
    labels = [b.get("label") for b in fake.buttons(int(page["id"]))]
    assert labels == ["◀ Previous", "2", "Open", "Next ▶"]
    assert fake.buttons(int(page["id"]))[0].get("disabled") is True

    await running.press(page, "Next ▶")
    await fake.wait_for(lambda: f"image {images[1]} of" in caption(page), what="page 2")
    assert "❤️ 1" in caption(page) and "#2" in caption(page)
    await running.press(page, "◀ Previous")
    await fake.wait_for(lambda: f"image {images[2]} of" in caption(page), what="page 1 again")

    await like(running, page, BOB)  # Bob takes his like back from the gallery
    await fake.wait_for(lambda: "❤️ 1" in caption(page), what="the new count")
    assert [b.get("label") for b in fake.buttons(int(page["id"]))][1] == "1"

    opened = await running.result(await running.press(page, "Open"))
    assert "Vary (Subtle)" in [b.get("label") for b in fake.buttons(int(opened["id"]))]


async def test_an_empty_gallery_says_how_to_fill_it(running: Harness) -> None:
    page = await running.result(await running.fake.slash("gallery", options={"sort": "new"}))
    assert "No images here yet" in caption(page)


async def test_a_deleted_image_leaves_the_gallery_and_keeps_its_record(running: Harness) -> None:
    fake = running.fake
    grid = await running.result(await running.imagine("a lighthouse --steps 2 --seed 3"))
    single = await running.result(await running.press(grid, "U1"))
    await like(running, single, BOB)
    [generation] = await running.generations()
    first = next(image.id for image in generation.images if image.index == 0)
    page = await running.result(await fake.slash("gallery", options={"sort": "top"}))
    assert f"image {first} of" in caption(page) and "❤️ 1" in caption(page)

    await running.press(single, "Delete")  # by its author
    await fake.wait_for(lambda: int(single["id"]) in fake.deleted, what="the deletion")
    page = await running.result(await fake.slash("gallery", options={"sort": "top"}))
    assert f"image {first} of" not in caption(page) and "❤️ 0" in caption(page)

    [generation] = await running.generations()
    [removed] = [image for image in generation.images if image.id == first]
    assert removed.removed_at is not None and removed.removed_by == int(ALICE["id"])
    shown = await running.result(await fake.slash("show", options={"generation": generation.id}))
    assert len(shown["attachments"]) == 1  # the recipe and its grid are kept
