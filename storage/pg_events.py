"""Job events across processes on PostgreSQL: LISTEN/NOTIFY, plus a sweep.

:class:`PostgresEventBus` is the scaled mode's :class:`~storage.events.EventBus`.

Workers on any machine ``NOTIFY`` each event; the bot ``LISTEN``s. A NOTIFY
payload is limited to 8000 bytes, so a progress event's preview JPEG is sent
base64-encoded when it fits, re-encoded smaller when it does not, and left out
only when even a small one would not fit. Notifications sent while a listener is
reconnecting are lost, so the listener also sweeps the table for finished,
undelivered generations and replays their final event; consumers mark
delivery with :func:`~storage.generations.mark_delivered`, which succeeds once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
from collections.abc import AsyncGenerator, Callable
from datetime import timedelta

import asyncpg
from pydantic import TypeAdapter
from sqlalchemy.engine import URL

from storage.database import Database, is_outage
from storage.events import JobEvent, JobProgress, final_events_since
from storage.generations import CANCEL_CHANNEL
from storage.models import utcnow

log = logging.getLogger(__name__)

CHANNEL = "imagine_events"
_EVENT = TypeAdapter[JobEvent](JobEvent)


def _dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


CONNECT_TIMEOUT = 10.0  # seconds; a server that is starting may accept and then stall
NOTIFY_LIMIT = 8000  # bytes in a NOTIFY payload, PostgreSQL's default


def encode(event: JobEvent) -> str:
    payload = event.model_dump(mode="json", exclude={"preview"})
    wire = json.dumps(payload, separators=(",", ":"))
    if isinstance(event, JobProgress) and event.preview:
        room = (NOTIFY_LIMIT - len(wire) - 32) * 3 // 4  # what base64 leaves of the rest
        preview = fit_preview(event.preview, room)
        if preview is not None:
            payload["preview_b64"] = base64.b64encode(preview).decode()
            wire = json.dumps(payload, separators=(",", ":"))
    return wire


def decode(payload: str) -> JobEvent:
    data = json.loads(payload)
    preview = data.pop("preview_b64", None)
    if preview is not None:
        data["preview"] = base64.b64decode(preview)
    return _EVENT.validate_python(data)


def fit_preview(jpeg: bytes, limit: int) -> bytes | None:
    """The preview itself if it has at most ``limit`` bytes, else a smaller JPEG, or None."""
    if len(jpeg) <= limit:
        return jpeg
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpeg)) as opened:
            image = opened.convert("RGB")
    except OSError:
        return None
    while min(image.size) >= 16:
        for quality in (70, 50, 35):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            if buffer.tell() <= limit:
                return buffer.getvalue()
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4))
    return None


class Notifier:
    """The worker's side: one connection that NOTIFYs events in order."""

    def __init__(self, url: URL) -> None:
        self.url = url
        self._connection: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def send(self, event: JobEvent) -> None:
        async with self._lock:
            if self._connection is None or self._connection.is_closed():
                self._connection = await asyncpg.connect(_dsn(self.url), timeout=CONNECT_TIMEOUT)
            try:
                await self._connection.execute("SELECT pg_notify($1, $2)", CHANNEL, encode(event))
            except BaseException:
                # A restart may leave the connection looking open; the next event opens a new one.
                self._connection.terminate()
                self._connection = None
                raise

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


async def listen_forever(
    url: URL,
    channel: str,
    on_notify: Callable[..., None],
    on_listening: Callable[[], None] | None = None,
) -> None:
    """LISTEN on ``channel`` until cancelled, reconnecting when the connection drops (the
    server restarted, or is down for a while). ``on_listening`` is called each time the
    LISTEN is in place again: what was sent while nobody listened is lost."""
    while True:
        try:
            connection = await asyncpg.connect(_dsn(url), timeout=CONNECT_TIMEOUT)
            closed = asyncio.Event()
            connection.add_termination_listener(lambda _c, closed=closed: closed.set())
            try:
                await connection.add_listener(channel, on_notify)
                if on_listening is not None:
                    on_listening()
                await closed.wait()
            finally:
                connection.terminate()
            log.warning("listener on %s lost its connection; reconnecting", channel)
        except Exception as exc:  # asyncpg raises OSError, PostgresError and InterfaceError
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            log.warning("listener on %s cannot connect (%s); retrying in 1 s", channel, exc)
            await asyncio.sleep(1)


async def listen_for_cancels(url: URL, on_cancel: Callable[[int], object]) -> None:
    """Call ``on_cancel(generation_id)`` for every cancel of a running generation that any
    process requests (:func:`storage.generations.request_cancel` NOTIFYs it)."""

    def on_notify(_connection: object, _pid: int, _channel: str, payload: str) -> None:
        if payload.isdigit():
            on_cancel(int(payload))

    await listen_forever(url, CANCEL_CHANNEL, on_notify)


async def listen(
    database: Database, *, sweep_seconds: float = 5.0, lookback: timedelta = timedelta(minutes=15)
) -> AsyncGenerator[JobEvent]:
    """Every event any worker sends, reconnecting as needed; final events may repeat."""
    inbox: asyncio.Queue[JobEvent] = asyncio.Queue()
    swept_from = utcnow() - lookback

    def on_notify(_connection: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            inbox.put_nowait(decode(payload))
        except ValueError:
            log.warning("ignored a malformed event: %.200s", payload)

    sweep_now = asyncio.Event()

    async def keep_sweeping() -> None:
        nonlocal swept_from
        while True:
            sweep_now.clear()
            started = utcnow()
            try:
                for event in await final_events_since(database, swept_from):
                    inbox.put_nowait(event)
            except Exception as exc:  # the next sweep starts as far back
                if is_outage(exc):
                    log.warning("could not sweep for finished generations (%s); will retry", exc)
                else:  # never the end of the sweeps: a result whose NOTIFY was lost needs them
                    log.exception("the sweep for finished generations failed; will retry")
            else:
                swept_from = started - timedelta(seconds=sweep_seconds)  # overlap: no gap
            # asyncio.wait, not wait_for: on 3.11 wait_for may swallow a cancel that races
            # its timeout, and this loop would never end.
            waking = asyncio.ensure_future(sweep_now.wait())
            try:
                await asyncio.wait({waking}, timeout=sweep_seconds)
            finally:
                waking.cancel()

    tasks = [
        # Every (re)connection sweeps at once: results finished during an outage arrive now.
        asyncio.create_task(listen_forever(database.url, CHANNEL, on_notify, sweep_now.set)),
        asyncio.create_task(keep_sweeping()),
    ]
    try:
        while True:
            yield await inbox.get()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class PostgresEventBus:
    """Events between processes: :meth:`publish` NOTIFYs (in order, off the caller's
    path), :meth:`subscribe` LISTENs and sweeps for final events a listener missed."""

    def __init__(self, database: Database, *, sweep_seconds: float = 5.0) -> None:
        self.database = database
        self.sweep_seconds = sweep_seconds
        self._notifier = Notifier(database.url)
        self._sending: set[asyncio.Task[None]] = set()

    def publish(self, event: JobEvent) -> None:
        task = asyncio.get_running_loop().create_task(self._send(event))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, event: JobEvent) -> None:
        try:
            await self._notifier.send(event)
        except Exception:  # the subscribers' sweep makes up for a lost final event
            log.exception("could not NOTIFY %s of generation %s", event.kind, event.generation_id)

    def subscribe(self) -> AsyncGenerator[JobEvent]:
        return listen(self.database, sweep_seconds=self.sweep_seconds)

    async def close(self) -> None:
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        await self._notifier.close()
