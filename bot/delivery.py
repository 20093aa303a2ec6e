"""From job events to Discord messages: queued, progress with previews, the result.

Each generation owns one message, recorded on its row (channel, message id,
interaction token and when it was issued). Progress edits are throttled to one
per ``progress_interval`` and dropped while one is in flight or Discord refuses
it; the final edit waits for them and happens once: ``delivered_at`` is set
after it. While Discord is down or rate limits us the final edit is tried again
(see :mod:`bot.retries`); editing a message twice shows the same thing, so a try
that Discord took without our hearing back does no harm. One that still fails
after ``give_up_after`` stays undelivered: a sweep delivers such results, and what
finished while the bot was away, at start and whenever the gateway comes back
(:meth:`ImagineBot.on_resumed`). While the interaction
token is fresh the message is edited through the interaction webhook; after
``token_lifetime`` (Discord's tokens live 15 minutes) or if the webhook refuses,
through the channel with the bot token. A result whose message cannot be edited at all
(deleted, in a channel the bot may no longer use, or private with an expired token) is
posted anew in the channel or, failing that, sent to its member by direct message; if
neither can be sent it is recorded as delivered all the same (``/show`` still finds it),
so that no sweep tries it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import discord

from bot.retries import GaveUp, transient, with_retries
from bot.services import Services
from bot.uploads import Upload, fit_upload
from bot.views import grid_view, image_view, retry_view
from storage.database import is_outage
from storage.events import JobEvent, JobProgress, JobStarted, final_events_since
from storage.gallery import like_count
from storage.generations import get_generation, mark_delivered
from storage.models import Generation, GenerationKind, GenerationStatus, Image, utcnow
from storage.scheduling import QueuePosition

S = GenerationStatus
log = logging.getLogger(__name__)
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
MAX_CONTENT = 2000
SWEEP_LOOKBACK = timedelta(days=1)
DELIVERIES_AT_ONCE = 6
FINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})


@dataclass
class Rendered:
    """A message to send or edit to: text, at most one image, buttons."""

    content: str
    upload: Upload | None = None
    view: discord.ui.View | None = None

    def files(self) -> list[discord.File]:
        if self.upload is None:
            return []
        return [discord.File(io.BytesIO(self.upload.data), filename=self.upload.filename)]


def headline(generation: Generation) -> str:
    recipe = generation.recipe
    prompt = recipe.prompt if len(recipe.prompt) <= 300 else recipe.prompt[:297] + "..."
    what = {
        GenerationKind.VARIATION: f" · variations of image {generation.parent_image_id}",
        GenerationKind.UPSCALE: f" · upscaled {recipe.scale or 2}× from image "
        f"{generation.parent_image_id}",
        GenerationKind.REROLL: " · reroll",
        GenerationKind.REMIX: " · remix",
        GenerationKind.OUTPAINT: f" · {recipe.outpaint.action if recipe.outpaint else 'outpaint'}"
        f" of image {generation.parent_image_id}",
    }.get(generation.kind, "")
    text = (
        f"**{prompt}** — <@{generation.requester_id}>{what} · `--seed {recipe.seed}` · "
        f"{recipe.width}×{recipe.height} · #{generation.id}"
    )
    return text[:MAX_CONTENT]


def _queued(generation: Generation, where: QueuePosition) -> Rendered:
    if where.status is not S.QUEUED:
        return Rendered(f"🎨 {headline(generation)}\nstarting…")
    return Rendered(
        f"⏳ {headline(generation)}\nqueued #{where.position}, "
        f"about {max(1, round(where.estimated_wait_seconds))} s"
    )


class Delivery:
    def __init__(self, client: discord.Client, services: Services) -> None:
        self.client = client
        self.services = services
        self.upload_limits: dict[int, int] = {}  # generation id → its interaction's limit
        self._locks: dict[int, asyncio.Lock] = {}
        self._last_edit: dict[int, float] = {}
        # The newest preview not shown yet: previews come as events of their own, beside
        # the step events, and an edit that coalesces them away shows it next time.
        self._previews: dict[int, bytes] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._finals: set[int] = set()  # generations whose final edit is pending
        self._unreachable: set[int] = set()  # generations whose message refuses edits
        self._working = asyncio.Semaphore(DELIVERIES_AT_ONCE)

    # -- the event loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver what finished while away, then every event as it comes."""
        # Subscribed before the sweep: what finishes while it runs is not lost.
        events = self.services.events.subscribe()
        try:
            await self.sweep()
            async for event in events:
                self.handle(event)
        finally:
            await events.aclose()

    async def sweep(self) -> None:
        """Deliver every result of the last day that is not delivered yet."""
        for event in await final_events_since(self.services.database, utcnow() - SWEEP_LOOKBACK):
            self.handle(event)

    def handle(self, event: JobEvent) -> None:
        generation_id = event.generation_id
        if isinstance(event, JobStarted | JobProgress):
            if isinstance(event, JobProgress) and event.preview:
                self._previews[generation_id] = event.preview
            lock = self._lock(generation_id)
            since = time.monotonic() - self._last_edit.get(generation_id, 0.0)
            if generation_id in self._unreachable:
                return  # its result goes elsewhere: see _final
            if lock.locked() or since < self.services.progress_interval:
                return  # coalesced: the next one shows newer progress anyway
            self._last_edit[generation_id] = time.monotonic()  # also while it waits its turn
            self._spawn(self._progress(event))
        elif generation_id not in self._finals:
            self._finals.add(generation_id)
            self._spawn(self._final(generation_id))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(self._in_turn(coroutine))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def _in_turn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        # Deliveries at once are bounded: a burst of events waits here rather than for
        # more database connections than the pool has (which fails after its timeout).
        async with self._working:
            await coroutine

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        if isinstance(error, GaveUp):
            log.error("%s; it is sent when the bot reconnects to Discord or restarts", error)
        else:
            log.error("delivery failed", exc_info=error)

    async def idle(self) -> None:
        """Wait until no delivery is in flight (for tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _lock(self, generation_id: int) -> asyncio.Lock:
        return self._locks.setdefault(generation_id, asyncio.Lock())

    async def _load(self, generation_id: int) -> Generation:
        async with self.services.database.session() as session:
            return await get_generation(session, generation_id)

    async def _progress(self, event: JobStarted | JobProgress) -> None:
        async with self._lock(event.generation_id):
            self._last_edit[event.generation_id] = time.monotonic()
            generation = await self._load(event.generation_id)
            if generation.status is not S.RUNNING or generation.message_id is None:
                return
            if isinstance(event, JobStarted):
                rendered = Rendered(f"🎨 {headline(generation)}\nstarting…")
            else:
                percent = round(100 * event.step / max(event.total, 1))
                rendered = Rendered(
                    f"🎨 {headline(generation)}\n{percent}% ({event.step}/{event.total})"
                )
                preview = self._previews.pop(event.generation_id, None) or event.preview
                if preview:
                    rendered.upload = Upload(preview, f"preview-{generation.id}.jpg")
            await self._edit_or_drop(generation, rendered, "progress")

    async def _edit_or_drop(self, generation: Generation, rendered: Rendered, what: str) -> None:
        """An edit that a later one supersedes: not worth waiting for Discord."""
        try:
            await self.edit(generation, rendered)
        except Exception as error:
            if transient(error):
                log.info("%s edit of generation %d dropped: %s", what, generation.id, error)
                return
            if not isinstance(error, discord.HTTPException):
                raise
            # The message is gone or the bot may no longer edit it: no later progress edit
            # can succeed, and the result finds another way (see _final).
            self._unreachable.add(generation.id)
            log.info(
                "generation %d's message refuses edits (HTTP %s); its result goes elsewhere",
                generation.id,
                error.status,
            )

    async def _final(self, generation_id: int) -> None:
        try:
            async with self._lock(generation_id):
                generation = await self._load(generation_id)
                # Delivered already (a replayed event) or nowhere to go: nothing to do, but
                # nothing to keep either.
                if generation.delivered_at is None and generation.message_id is not None:
                    rendered = await self.render(generation, self._limit(generation_id))
                    try:
                        await with_retries(
                            self.services.retries,
                            lambda: self.edit(generation, rendered),
                            f"the result of generation {generation_id}",
                        )
                    except discord.HTTPException as refused:  # not transient: see with_retries
                        await self._deliver_elsewhere(generation, rendered, refused)
                    await self._mark_delivered(generation_id)
        finally:
            self._finals.discard(generation_id)
        self._forget(generation_id)

    async def _deliver_elsewhere(
        self, generation: Generation, rendered: Rendered, refused: discord.HTTPException
    ) -> None:
        """The result, when its message refused the edit for good (HTTP 4xx): a new message
        in the channel (not for a private result), else a direct message to its member;
        transient errors propagate, so that a later sweep tries again."""
        why = {403: "I may no longer post there", 404: "its message is gone"}.get(
            refused.status, f"Discord refused the edit (HTTP {refused.status})"
        )
        log.warning(
            "the result of generation %d cannot be edited into its message (%s): %s",
            generation.id,
            why,
            refused,
        )
        if not generation.private:
            channel = self.client.get_partial_messageable(generation.channel_id or 0)
            try:
                await channel.send(
                    content=rendered.content,
                    files=rendered.files(),
                    view=rendered.view or discord.utils.MISSING,
                    allowed_mentions=discord.AllowedMentions(users=True),
                )
                return
            except discord.HTTPException as error:
                if transient(error):
                    raise
                log.warning(
                    "generation %d: a new message was refused too: %s", generation.id, error
                )
        if self._limit(generation.id) > DEFAULT_UPLOAD_LIMIT:  # a direct message's own limit
            rendered = await self.render(generation, DEFAULT_UPLOAD_LIMIT)
        intro = f"Your result could not be shown where you asked for it ({why}), so here it is:\n"
        try:
            user = self.client.get_user(generation.requester_id) or await self.client.fetch_user(
                generation.requester_id
            )
            await user.send(
                content=(intro + rendered.content)[:MAX_CONTENT],
                files=rendered.files(),
                view=rendered.view or discord.utils.MISSING,
            )
        except discord.HTTPException as error:
            if transient(error):
                raise
            log.warning(
                "generation %d cannot be delivered (%s; a direct message was refused: %s); "
                "its member can still post it with /show %d",
                generation.id,
                why,
                error,
                generation.id,
            )

    def _forget(self, generation_id: int) -> None:
        self._unreachable.discard(generation_id)
        self._locks.pop(generation_id, None)
        self._last_edit.pop(generation_id, None)
        self._previews.pop(generation_id, None)
        self.upload_limits.pop(generation_id, None)

    async def _mark_delivered(self, generation_id: int) -> None:
        """Record the delivery that was just made. A database that went away since the edit
        is waited for: otherwise the sweep would post the result a second time."""
        while True:
            try:
                async with self.services.database.session() as session:
                    await mark_delivered(session, generation_id)
                return
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.warning(
                    "generation %s is delivered; recording it waits for the database", generation_id
                )
                await self.services.database.wait_until_back()

    @contextlib.asynccontextmanager
    async def place_in_line(
        self, generation: Generation, upload_limit: int | None = None
    ) -> AsyncIterator[Rendered | None]:
        """A just-submitted generation's message showing its place in line, read now (in
        the caller's turn for database work) and shown by :meth:`show_queued` before the
        block ends. Its lock is held until then, so that an edit for a later state
        (progress, the result) waits for it. ``None``: nothing to show (no message, an edit
        for a later state under way or done, or no answer from the database)."""
        if upload_limit is not None:
            self.upload_limits[generation.id] = upload_limit
        lock = self._lock(generation.id)
        if generation.message_id is None or lock.locked():
            yield None
            return
        async with lock:
            where = await self._place(generation.id)
            if where is not None and where.status is S.QUEUED:
                yield _queued(generation, where)
                return
        # Running or finished: those events edit it. One that finished and was delivered
        # already keeps nothing here.
        if where is not None and where.status in FINAL and generation.id not in self._finals:
            self._forget(generation.id)
        yield None

    async def _place(self, generation_id: int) -> QueuePosition | None:
        try:
            return await self.services.queue.position(generation_id)
        except Exception as exc:  # queued all the same: its result edits the message later
            if not is_outage(exc):
                raise
            return None

    async def show_queued(self, generation: Generation, queued: Rendered) -> None:
        """Edit a just-submitted generation's message to ``queued`` (from
        :meth:`place_in_line`, inside its block)."""
        self._last_edit[generation.id] = time.monotonic()
        await self._edit_or_drop(generation, queued, "queued")

    def _limit(self, generation_id: int) -> int:
        return self.upload_limits.get(generation_id, DEFAULT_UPLOAD_LIMIT)

    # -- what a message shows ----------------------------------------------------------------

    async def queued(self, generation: Generation) -> Rendered:
        return _queued(generation, await self.services.queue.position(generation.id))

    async def render(self, generation: Generation, limit: int) -> Rendered:
        """The finished generation: its grid or image with buttons, or why it did not finish."""
        if generation.status is S.FAILED:
            reason = generation.error or "no reason was recorded"
            return Rendered(
                f"❌ {headline(generation)}\nfailed: {reason[:1000]}", view=retry_view(generation)
            )
        if generation.status is S.CANCELLED:
            return Rendered(f"🚫 {headline(generation)}\ncancelled")
        if generation.status is not S.SUCCEEDED:
            return await self.queued(generation)
        images = sorted(generation.images, key=lambda image: image.index)
        if len(images) == 1:
            return await self.render_image(generation, images[0], limit)
        grid = await self.services.blobs.get(await self._grid_key(generation))
        upload = await asyncio.to_thread(fit_upload, grid, f"imagine-{generation.id}", limit)
        return Rendered(headline(generation), upload, grid_view(generation))

    async def _grid_key(self, generation: Generation) -> str:
        if generation.grid_blob_key is not None:
            return generation.grid_blob_key
        # Finished before the worker stored grids: composed once (PIL only), then stored.
        from generation.grid import stored_grid_key

        return await stored_grid_key(self.services.database, self.services.blobs, generation)

    async def render_image(self, generation: Generation, image: Image, limit: int) -> Rendered:
        data = await self.services.blobs.get(image.blob_key)
        upload = await asyncio.to_thread(
            fit_upload, data, f"imagine-{generation.id}-{image.index + 1}", limit
        )
        async with self.services.database.session() as session:
            likes = await like_count(session, image.id)
        number = (
            f" · image {image.index + 1} of #{generation.id}" if len(generation.images) > 1 else ""
        )
        content = f"{headline(generation)}{number}"[:MAX_CONTENT]
        return Rendered(content, upload, image_view(image, likes))

    # -- how a message is edited -------------------------------------------------------------

    def _token_fresh(self, generation: Generation) -> bool:
        if not generation.interaction_token or generation.interaction_at is None:
            return False
        return utcnow() - generation.interaction_at < self.services.token_lifetime

    async def edit(self, generation: Generation, rendered: Rendered) -> None:
        assert generation.message_id is not None and generation.channel_id is not None
        view = rendered.view
        if self._token_fresh(generation) and self.client.application_id is not None:
            assert generation.interaction_token is not None
            webhook = discord.Webhook.partial(
                self.client.application_id, generation.interaction_token, client=self.client
            )
            try:
                await webhook.edit_message(
                    generation.message_id,
                    content=rendered.content,
                    attachments=rendered.files(),
                    view=view,
                )
                return
            except (discord.NotFound, discord.Forbidden) as exc:
                log.info("webhook edit refused (%s); editing through the channel", exc.status)
            except discord.HTTPException as exc:
                if exc.status != 401:
                    raise
                log.info("interaction token expired; editing through the channel")
        channel = self.client.get_partial_messageable(generation.channel_id)
        await channel.get_partial_message(generation.message_id).edit(
            content=rendered.content, attachments=rendered.files(), view=view
        )
