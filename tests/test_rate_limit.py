"""Per-member rate limits: the limiter's arithmetic, the setting, and refusals in Discord."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.rate_limit import BUSY, RateLimiter, Turns, too_fast
from storage.errors import ConfigError
from storage.models import GenerationKind
from storage.settings import Settings, load_settings, parse_rate
from tests.fake_discord import ALICE, BOB, Interaction
from tests.test_bot import Harness, harness

__all__ = ["harness"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the limiter --------------------------------------------------------------------------------


def test_a_burst_up_to_the_limit_passes_and_the_next_is_told_when_to_retry() -> None:
    clock = Clock()
    limiter = RateLimiter(3, 60, clock)
    assert [limiter.try_acquire(1) for _ in range(3)] == [0, 0, 0]
    clock.now += 12
    assert limiter.try_acquire(1) == pytest.approx(48)
    assert limiter.try_acquire(2) == 0  # another member is not held back
    clock.now += 48
    assert limiter.try_acquire(1) == 0


def test_idle_members_are_forgotten() -> None:
    clock = Clock()
    limiter = RateLimiter(2, 100, clock)
    for member in range(5000):
        clock.now += 0.125
        limiter.try_acquire(member)
    assert len(limiter) == 800  # those seen in the last 100 s
    clock.now += 100
    limiter.try_acquire(1)
    assert len(limiter) == 1


events = st.lists(
    st.tuples(st.integers(0, 3), st.floats(0, 5, allow_nan=False)), min_size=1, max_size=80
)


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 4), window=st.floats(0.5, 8), events=events)
def test_the_limit_holds_in_every_window_and_refuses_nothing_it_could_allow(
    count: int, window: float, events: list[tuple[int, float]]
) -> None:
    clock = Clock()
    limiter = RateLimiter(count, window, clock)
    accepted: dict[int, list[float]] = {}
    for member, gap in events:
        clock.now += gap
        now = clock.now
        recent = [t for t in accepted.get(member, []) if t + window - now > 0]
        wait = limiter.try_acquire(member)
        if len(recent) < count:
            assert wait == 0
            accepted.setdefault(member, []).append(now)
        else:
            # Refused: told exactly when the oldest command in the window leaves it.
            assert wait == pytest.approx(min(recent) + window - now)
            assert 0 < wait <= window
        remembered = {m for m, times in accepted.items() if times[-1] + window - now > 0}
        assert len(limiter) == len(remembered)
    for times in accepted.values():
        for start in times:
            assert sum(1 for t in times if start <= t < start + window) <= count


def test_the_sentence_says_when_to_try_again() -> None:
    assert too_fast(11.2) == "You're going too fast: try again in 12 seconds."
    assert too_fast(0.3) == "You're going too fast: try again in 1 second."


# -- the setting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [("10/60", (10, 60.0)), (" 3 / 1.5 ", (3, 1.5)), ("off", None), ("0", None), ("0/60", None)],
)
def test_the_setting_reads_commands_per_seconds_or_off(
    text: str, rate: tuple[int, float] | None
) -> None:
    assert parse_rate(text) == rate
    limiter = RateLimiter.from_settings(Settings(rate_limit=text))
    assert (None if limiter is None else (limiter.count, limiter.window)) == rate


@pytest.mark.parametrize("text", ["ten a minute", "10/0", "10/-5", "/60"])
def test_a_bad_setting_is_refused_with_a_sentence(text: str) -> None:
    with pytest.raises(ConfigError, match=r"rate_limit \(IMAGINE_RATE_LIMIT\) is invalid.*10/60"):
        load_settings(rate_limit=text)


# -- in Discord -------------------------------------------------------------------------------


async def queued(harness: Harness, interaction: Interaction) -> None:
    def shown() -> bool:
        message = harness.fake.original(interaction)
        return message is not None and "queued" in message["content"]

    await harness.fake.wait_for(shown, what="the queued message")


async def test_a_member_over_the_limit_is_refused_before_anything_is_queued(
    harness: Harness,
) -> None:
    fake = harness.fake
    harness.services.settings = harness.services.settings.model_copy(update={"rate_limit": "3/60"})
    await harness.start_worker()
    await harness.start_bot()

    grid = await harness.result(await harness.imagine("a boat --steps 1 --seed 11"))
    await harness.stop_worker()  # one grid to click on is all this needs
    grid_id = int(grid["id"])
    await queued(harness, await harness.press(grid, "🔄"))  # a button counts: 2 of 3
    single = await harness.result(await fake.click(grid_id, fake.button(grid_id, "U1")))  # 3 of 3

    too_many = [
        await harness.imagine("another boat"),
        await fake.click(grid_id, fake.button(grid_id, "V2")),
        await harness.press(single, "Upscale 2×"),
    ]
    for interaction in too_many:
        said = await fake.wait_for(lambda i=interaction: fake.said_privately(i), what="a refusal")
        seconds = re.fullmatch(r"You're going too fast: try again in (\d+) seconds?\.", said)
        assert seconds is not None and 1 <= int(seconds[1]) <= 60, said
        assert interaction.response_type == 4  # refused as the first response, not deferred
    await queued(harness, await harness.imagine("bob's boat", by=BOB))  # per member

    rows = await harness.generations()
    assert [(row.kind, row.requester_id) for row in rows] == [
        (GenerationKind.IMAGINE, int(ALICE["id"])),
        (GenerationKind.REROLL, int(ALICE["id"])),
        (GenerationKind.IMAGINE, int(BOB["id"])),
    ]


# -- the line of commands waiting their turn ---------------------------------------------------


async def test_turns_count_who_waits_and_say_when_the_line_is_full() -> None:
    turns = Turns(at_once=1, most_waiting=2)
    async with turns:
        waiters = [asyncio.create_task(turns.__aenter__()) for _ in range(2)]
        await asyncio.sleep(0)
        assert turns.waiting == 2 and turns.full
    await waiters[0]  # its turn came when the first left
    assert turns.waiting == 1 and not turns.full
    await turns.__aexit__(None, None, None)
    await waiters[1]
    await turns.__aexit__(None, None, None)
    assert turns.waiting == 0


async def test_a_command_is_refused_while_the_line_is_full_and_queued_after(
    harness: Harness,
) -> None:
    fake = harness.fake
    bot = await harness.start_bot()
    bot.submitting = Turns(at_once=1, most_waiting=1)
    async with bot.submitting:  # every turn taken: the first command waits in line
        waiting = await harness.imagine("a boat in line")
        await fake.wait_for(lambda: bot.submitting.full, what="the first command in line")
        refused = await harness.imagine("one more boat", by=BOB)
        said = await fake.wait_for(lambda: fake.said_privately(refused), what="a refusal")
        assert said == BUSY
        assert refused.response_type == 4  # refused as the first response, not deferred
    await queued(harness, waiting)  # the line moves on
    await queued(harness, await harness.imagine("bob tries again", by=BOB))
    rows = await harness.generations()
    assert [row.requester_id for row in rows] == [int(ALICE["id"]), int(BOB["id"])]
