"""Discord in trouble: REST 5xx and 429 for longer than discord.py retries, the gateway
dropped while a job finishes, an interaction token that expires during an outage.

The real discord.py client and bot against the fake Discord with a fault injected
(:meth:`FakeDiscord.fail`, :meth:`FakeDiscord.drop_gateway`), the embedded worker
on the tiny model. Each ends with the job run once and its result shown once.
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from itertools import pairwise

from bot.retries import RetryPolicy
from storage.models import Generation, GenerationStatus
from tests.fake_discord import ALICE, Call, FakeDiscord, Fault, Interaction
from tests.test_bot import Harness, await_queued, harness

__all__ = ["harness"]

S = GenerationStatus
FAST = RetryPolicy(first=0.02, longest=0.1, give_up_after=30.0)
DISCORD_PY_TRIES = 5  # how often discord.py itself sends one request at most


def carries_result(call: Call, generation_id: int) -> bool:
    """Whether ``call`` sent a generation's result (its image is named after it)."""
    name = f"imagine-{generation_id}"
    return call.method == "PATCH" and any(file.rsplit(".", 1)[0] == name for file, _ in call.files)


def result_calls(fake: FakeDiscord, generation_id: int) -> list[Call]:
    return [call for call in fake.calls if carries_result(call, generation_id)]


def result_calls_of(fault: Fault, generation_id: int) -> list[Call]:
    """The tries at a generation's result that ``fault`` answered."""
    return [call for call in fault.answered if carries_result(call, generation_id)]


async def held_generation(harness: Harness, prompt: str = "a boat --steps 2") -> Interaction:
    """A submitted generation shown as queued; the worker is not running yet."""
    await harness.start_bot()
    interaction = await harness.imagine(prompt)
    await harness.fake.wait_for(lambda: await_queued(harness.fake, interaction), what="queued")
    return interaction


async def row(harness: Harness, generation_id: int) -> Generation:
    return next(g for g in await harness.generations() if g.id == generation_id)


async def assert_delivered_once(
    harness: Harness, interaction: Interaction, generation_id: int
) -> Call:
    """The job ran once, one edit carried its result, one message shows it."""
    message = await harness.result(interaction)
    fake = harness.fake
    [delivered] = [call for call in result_calls(fake, generation_id) if call.status < 300]
    assert len(message["attachments"]) == 1
    headline = re.compile(rf"· #{generation_id}(?!\d)")
    showing = [m for m in fake.messages.values() if headline.search(m["content"])]
    assert showing == [message]
    generation = await row(harness, generation_id)
    assert generation.status is S.SUCCEEDED and generation.attempts == 1
    assert len(generation.images) == 4
    assert generation.finished_at is not None and generation.delivered_at is not None
    assert generation.delivered_at >= generation.finished_at
    return delivered


async def test_a_503_outage_then_429s_on_the_bot_token_route_end_in_one_post(
    harness: Harness,
) -> None:
    harness.services.retries = FAST
    harness.services.token_lifetime = timedelta(0)  # the bot-token route: no 503 retry there
    interaction = await held_generation(harness)
    [generation] = await harness.generations()
    fake = harness.fake
    outage = fake.fail(503, "/channels/")
    await harness.start_worker()
    await fake.wait_for(
        lambda: len(result_calls_of(outage, generation.id)) > DISCORD_PY_TRIES,
        what="the result refused more often than discord.py tries",
    )
    assert (await row(harness, generation.id)).delivered_at is None
    # Then 429s from in front of the API (no Via): discord.py gives them straight to us.
    limited = fake.fail(429, "/channels/", retry_after=0.2, via=False)
    outage.heal()
    await fake.wait_for(lambda: len(result_calls_of(limited, generation.id)) >= 3, what="429s")
    limited.heal()
    delivered = await assert_delivered_once(harness, interaction, generation.id)
    assert "/channels/" in delivered.path
    assert all(call.status == 503 for call in result_calls_of(outage, generation.id))
    assert min(waited(result_calls_of(limited, generation.id))) >= 0.19  # its retry_after


def waited(calls: list[Call]) -> list[float]:
    """Seconds between one call and the next."""
    return [later.at - earlier.at for earlier, later in pairwise(calls)]


async def test_429s_past_discord_py_retries_are_waited_out_and_post_once(
    harness: Harness,
) -> None:
    harness.services.retries = FAST
    interaction = await held_generation(harness)
    [generation] = await harness.generations()
    limited = harness.fake.fail(429, "/webhooks/", method="PATCH", retry_after=0.05)
    await harness.start_worker()
    await harness.fake.wait_for(
        lambda: len(result_calls_of(limited, generation.id)) > 2 * DISCORD_PY_TRIES,
        what="the result rate limited past two rounds of discord.py's tries",
    )
    limited.heal()
    delivered = await assert_delivered_once(harness, interaction, generation.id)
    assert "/webhooks/" in delivered.path  # a 429 is no reason to leave the interaction
    gaps = waited(result_calls_of(limited, generation.id))
    assert min(gaps) >= 0.045, gaps  # retry_after was honoured, by discord.py and by us


async def test_a_token_that_expires_during_an_outage_falls_back_to_the_bot_token(
    harness: Harness,
) -> None:
    harness.services.retries = FAST
    harness.services.progress_interval = 3600  # no progress edits: the result goes first
    interaction = await held_generation(harness)
    [generation] = await harness.generations()
    fake = harness.fake
    webhooks_down = fake.fail(503, "/webhooks/")
    channels_down = fake.fail(503, "/channels/")
    await harness.start_worker()
    await fake.wait_for(lambda: result_calls_of(webhooks_down, generation.id), what="a 503")
    fake.expire(interaction)  # discord.py sleeps a second before its next try
    webhooks_down.heal()
    await fake.wait_for(
        lambda: len(result_calls_of(channels_down, generation.id)) >= 3,
        what="the bot-token route refused too",
    )
    channels_down.heal()
    delivered = await assert_delivered_once(harness, interaction, generation.id)
    assert "/channels/" in delivered.path
    expired = [c for c in result_calls(fake, generation.id) if c.status == 401]
    assert expired and all("/webhooks/" in call.path for call in expired)


async def gave_up_while_discord_was_down(
    harness: Harness, *, session_lost: bool = False
) -> tuple[Interaction, int]:
    """A generation that finished while REST answered 503 and the gateway was down,
    whose delivery gave up; REST is back, the gateway still down."""
    harness.services.retries = RetryPolicy(first=0.02, longest=0.05, give_up_after=0.3)
    harness.services.token_lifetime = timedelta(0)
    fake = harness.fake
    interaction = await held_generation(harness)
    [generation] = await harness.generations()
    outage = fake.fail(503)
    await fake.drop_gateway(4000, session_lost=session_lost)
    await harness.start_worker()
    await fake.wait_for(lambda: result_calls_of(outage, generation.id), what="a refused result")
    assert harness.bot is not None
    await harness.bot.delivery.idle()  # it gave up
    gave_up = await row(harness, generation.id)
    assert gave_up.status is S.SUCCEEDED and gave_up.delivered_at is None
    outage.heal()
    return interaction, generation.id


async def test_results_finished_while_the_gateway_was_down_are_delivered_after_resume(
    harness: Harness,
) -> None:
    fake = harness.fake
    first, generation_id = await gave_up_while_discord_was_down(harness)
    second = await harness.imagine("a lighthouse --steps 2")  # sent while the bot is away
    fake.restore_gateway()
    await fake.wait_for(lambda: fake.resumes == 1, what="the resume")
    await assert_delivered_once(harness, first, generation_id)
    _, later = await harness.generations()
    await assert_delivered_once(harness, second, later.id)  # replayed on RESUME
    assert fake.identifies == 1  # resumed, not a new session


async def test_a_new_session_after_a_lost_one_delivers_what_gave_up(harness: Harness) -> None:
    fake = harness.fake
    interaction, generation_id = await gave_up_while_discord_was_down(harness, session_lost=True)
    fake.restore_gateway()
    await fake.wait_for(lambda: fake.identifies == 2, what="a new session")
    await assert_delivered_once(harness, interaction, generation_id)
    assert fake.resumes == 1


async def delivered(harness: Harness, number: int) -> Generation:
    """The ``number``-th generation (from 1), once its result is delivered."""
    for _ in range(600):
        made = await harness.generations()
        if len(made) >= number and made[number - 1].delivered_at is not None:
            return made[number - 1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"generation number {number} was not delivered within 60 s")


async def test_a_result_whose_message_refuses_edits_goes_elsewhere_once(
    harness: Harness,
) -> None:
    """A message deleted while its job waited: the result is posted anew in the channel.
    A channel the bot lost, or a private result past its token: a direct message. A
    member who refuses those: recorded as delivered all the same, for /show."""
    harness.services.retries = FAST
    fake = harness.fake
    deleted = await held_generation(harness, "a boat --steps 2")
    assert deleted.original_id is not None
    fake.delete_message(deleted.original_id)  # by its member, say
    await harness.start_worker()
    first = await delivered(harness, 1)
    [posted] = [m for m in fake.messages.values() if f"· #{first.id}" in m["content"]]
    assert posted["attachments"] and fake.buttons(int(posted["id"]))
    assert f"<@{ALICE['id']}>" in posted["content"]

    harness.services.token_lifetime = timedelta(0)  # the channel route from now on
    fake.channel_forbidden = True
    await harness.imagine("a lighthouse --steps 2")
    second = await delivered(harness, 2)
    fake.channel_forbidden = False
    [dm] = fake.direct_messages(ALICE)
    assert dm["content"].startswith("Your result could not be shown where you asked for it")
    assert f"#{second.id}" in dm["content"] and dm["attachments"] and fake.buttons(int(dm["id"]))

    settings = await fake.slash("settings", subcommand="set", options={"private": True})
    await fake.wait_for(lambda: settings.responses, what="the settings' answer")
    private = await harness.imagine("a secret garden --steps 2")
    third = await delivered(harness, 3)
    assert third.private
    [_, dm] = fake.direct_messages(ALICE)
    assert f"#{third.id}" in dm["content"] and dm["attachments"]
    assert private.original_id is not None and private.original_id not in fake.deleted

    fake.dms_refused.add(int(ALICE["id"]))
    await harness.imagine("a hidden harbour --steps 2")
    await delivered(harness, 4)  # recorded all the same: /show finds it
    assert len(fake.direct_messages(ALICE)) == 2
    assert [g.attempts for g in await harness.generations()] == [1, 1, 1, 1]
