"""A local fake of Discord: gateway websocket plus the REST routes a bot uses.

The real discord.py client talks to it unmodified once :meth:`FakeDiscord.install`
has pointed ``Route.BASE`` and ``DEFAULT_GATEWAY`` at it (facts in
shared/notes/discord-fake.md). Tests drive it like users would: send a slash
command, click a button, submit a modal, and then read what the bot did from
:attr:`FakeDiscord.calls` and :attr:`FakeDiscord.messages`.

It enforces what matters to a bot's correctness: one initial response per
interaction (40060), unknown interactions (10062), the upload limit (40005),
expired interaction tokens (50027), message ownership on edits and deletes.

Outages are injected explicitly: :meth:`FakeDiscord.fail` makes matching REST
calls answer 5xx or 429 (with the headers Discord sends) until healed, and
:meth:`FakeDiscord.drop_gateway` closes the bot's gateway connection and holds
it down until :meth:`FakeDiscord.restore_gateway`; a RESUME gets the events
dispatched meanwhile, then RESUMED, as Discord does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import discord.gateway
import discord.http
import yarl
from aiohttp import web

EPHEMERAL = 1 << 6
LOADING = 1 << 7
BOT_ID = 900_000_000_000_000_001
GUILD_ID = 900_000_000_000_000_100
OTHER_GUILD_ID = 900_000_000_000_000_101  # a second server the bot is in, seen only in interactions
CHANNEL_ID = 900_000_000_000_000_200
MANAGE_MESSAGES = 1 << 13
MANAGE_GUILD = 1 << 5
ARTISTS_ROLE = 900_000_000_000_000_300


def user(user_id: int, name: str) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name,
        "discriminator": "0",
        "global_name": name.title(),
        "avatar": None,
    }


BOT_USER = {**user(BOT_ID, "imagine"), "bot": True}
ALICE = user(900_000_000_000_001_001, "alice")
BOB = user(900_000_000_000_001_002, "bob")
MOD = user(900_000_000_000_001_003, "mod")


@dataclass
class Call:
    method: str
    path: str
    body: dict[str, Any] | None
    files: list[tuple[str, bytes]]
    at: float
    status: int = 200


@dataclass
class Interaction:
    id: int
    token: str
    type: int
    user: dict[str, Any]
    sent_at: float
    payload: dict[str, Any]
    responses: list[dict[str, Any]] = field(default_factory=list)
    original_id: int | None = None
    followups: list[int] = field(default_factory=list)
    responded_at: float | None = None
    expired: bool = False

    @property
    def response_type(self) -> int | None:
        return self.responses[0]["type"] if self.responses else None


@dataclass
class Fault:
    """Discord answering ``status`` to the REST calls that match, until :meth:`heal`."""

    status: int
    fragment: str = ""
    method: str | None = None
    retry_after: float = 0.05  # what a 429 asks for
    via: bool = True  # discord.py retries a 429 only when it came through Discord's proxy
    answered: list[Call] = field(default_factory=list)
    healed: bool = False

    def matches(self, method: str, path: str) -> bool:
        return (
            not self.healed
            and self.fragment in path
            and (self.method is None or self.method == method)
        )

    def heal(self) -> None:
        self.healed = True

    def response(self) -> web.Response:
        if self.status != 429:
            # What comes back while Discord is down is rarely JSON.
            return web.Response(status=self.status, text=f"{self.status}: upstream unavailable")
        body = {"message": "You are being rate limited.", "retry_after": self.retry_after}
        response = _json({**body, "global": False, "code": 0}, 429)
        response.headers.update(
            {
                "Retry-After": str(math.ceil(self.retry_after)),
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": f"{time.time() + self.retry_after:.3f}",
                "X-RateLimit-Reset-After": f"{self.retry_after:.3f}",
                "X-RateLimit-Bucket": "fake-bucket",
                "X-RateLimit-Scope": "user",
            }
        )
        if self.via:
            response.headers["Via"] = "1.1 google"
        return response


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py compares the content type to exactly "application/json".
    return web.Response(
        body=json.dumps(data).encode(), status=status, content_type="application/json"
    )


def _error(status: int, code: int, message: str) -> web.Response:
    return _json({"code": code, "message": message}, status)


class FakeDiscord:
    def __init__(self, *, attachment_size_limit: int = 10 * 1024 * 1024) -> None:
        self.attachment_size_limit = attachment_size_limit
        self.channel_nsfw = False  # whether the one channel is age-restricted
        self.channel_forbidden = False  # the bot lost its permission to post in the channel
        self.dm_channels: dict[int, int] = {}  # user id -> their direct-message channel
        self.dms_refused: set[int] = set()  # users whose privacy settings refuse the bot's DMs
        self.calls: list[Call] = []
        self.messages: dict[int, dict[str, Any]] = {}
        self.files: dict[int, bytes] = {}
        self.deleted: set[int] = set()
        self.downloads: list[int] = []
        self.redirects: dict[int, str] = {}
        self.chunked: set[int] = set()
        self.interactions: dict[str, Interaction] = {}
        self.commands: list[dict[str, Any]] = []
        self.identifies = 0
        self.resumes = 0
        self.faults: list[Fault] = []
        self._dispatched: list[tuple[int, str]] = []  # (seq, frame), replayed on RESUME
        self._gateway_up = asyncio.Event()
        self._gateway_up.set()
        self._session_lost = False
        self._ids = itertools.count(950_000_000_000_000_000)
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._saved: tuple[str, yarl.URL] | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{id}/{name}", self._attachment)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def install(self) -> None:
        """Point discord.py at this fake (undone by :meth:`uninstall`)."""
        self._saved = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        discord.http.Route.BASE = f"{self.base}/api/v10"
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(
            f"ws://127.0.0.1:{self.port}/gateway"
        )

    def uninstall(self) -> None:
        if self._saved is not None:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._saved
            self._saved = None

    async def stop(self) -> None:
        self._gateway_up.set()  # let held connections finish
        for socket in list(self._sockets):
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what tests do -----------------------------------------------------------------------

    async def slash(
        self,
        name: str,
        *,
        by: dict[str, Any] = ALICE,
        permissions: int = 0,
        roles: tuple[int, ...] = (),
        options: dict[str, Any] | None = None,
        subcommand: str | None = None,
        resolved: dict[str, Any] | None = None,
        guild_id: int | None = GUILD_ID,
    ) -> Interaction:
        """``guild_id``: the server it is typed in; ``None`` for a direct message."""
        command = next((c for c in self.commands if c["name"] == name), None)
        assert command is not None, f"/{name} was not synced; synced: {self.command_names()}"
        given = [
            {"name": key, "type": _option_type(value), "value": _option_value(value)}
            for key, value in (options or {}).items()
            if value is not None
        ]
        if subcommand is not None:
            given = [{"name": subcommand, "type": 1, "options": given}]
        data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1, "options": given}
        if resolved:
            data["resolved"] = resolved
        return await self.interact(
            2, data, by=by, permissions=permissions, roles=roles, guild_id=guild_id
        )

    def role_option(self, role_id: int = ARTISTS_ROLE) -> tuple[dict[str, Any], dict[str, Any]]:
        """(option value, resolved data) for a role option."""
        role = {"id": str(role_id), "name": "artists", "permissions": "0", "position": 1}
        return {"__role__": str(role_id)}, {"roles": {str(role_id): role}}

    def attachment_option(
        self, filename: str, data: bytes, *, size: int | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """(option value, resolved data) for a file uploaded with a slash command; the bot
        downloads it from :meth:`attachment_url`. ``size``: the size Discord declares, if
        it should differ from the data's."""
        attachment_id = next(self._ids)
        self.files[attachment_id] = data
        url = self.attachment_url(attachment_id, filename)
        attachment = {
            "id": str(attachment_id),
            "filename": filename,
            "size": len(data) if size is None else size,
            "url": url,
            "proxy_url": url,
            "content_type": _content_type(filename),
        }
        return {"__attachment__": str(attachment_id)}, {
            "attachments": {str(attachment_id): attachment}
        }

    def attachment_url(self, attachment_id: int, filename: str) -> str:
        return f"{self.base}/attachments/{attachment_id}/{filename}"

    def upload(self, filename: str, data: bytes, *, chunked: bool = False) -> str:
        """A file as if posted in the channel earlier: the URL it is served at (``chunked``:
        sent without a Content-Length, as a stream)."""
        attachment_id = next(self._ids)
        self.files[attachment_id] = data
        if chunked:
            self.chunked.add(attachment_id)
        return self.attachment_url(attachment_id, filename)

    def redirect(self, target: str) -> str:
        """A URL of this fake that answers with a redirect to ``target``."""
        redirect_id = next(self._ids)
        self.redirects[redirect_id] = target
        return f"{self.base}/attachments/{redirect_id}/moved.png"

    async def autocomplete(
        self,
        name: str,
        focused: str,
        typed: str,
        *,
        by: dict[str, Any] = ALICE,
        subcommand: str | None = None,
        **others: Any,
    ) -> list[dict[str, Any]]:
        command = next(c for c in self.commands if c["name"] == name)
        options = [{"name": k, "type": _option_type(v), "value": v} for k, v in others.items()]
        options.append({"name": focused, "type": 3, "value": typed, "focused": True})
        if subcommand is not None:
            options = [{"name": subcommand, "type": 1, "options": options}]
        data = {"id": command["id"], "name": name, "type": 1, "options": options}
        interaction = await self.interact(4, data, by=by)
        await self.wait_for(lambda: interaction.responses, what="an autocomplete answer")
        choices: list[dict[str, Any]] = interaction.responses[0]["data"]["choices"]
        return choices

    async def click(
        self,
        message_id: int,
        custom_id: str,
        *,
        by: dict[str, Any] = ALICE,
        permissions: int = 0,
        guild_id: int | None = GUILD_ID,
    ) -> Interaction:
        message = self.messages[message_id]
        assert custom_id in [b["custom_id"] for b in self.buttons(message_id)], custom_id
        data = {"custom_id": custom_id, "component_type": 2}
        return await self.interact(
            3, data, by=by, permissions=permissions, message=message, guild_id=guild_id
        )

    async def submit_modal(
        self,
        custom_id: str,
        values: dict[str, str],
        *,
        by: dict[str, Any] = ALICE,
        message_id: int | None = None,
    ) -> Interaction:
        rows = [
            {"type": 1, "components": [{"type": 4, "custom_id": key, "value": value}]}
            for key, value in values.items()
        ]
        data = {"custom_id": custom_id, "components": rows}
        message = self.messages[message_id] if message_id is not None else None
        return await self.interact(5, data, by=by, message=message)

    async def interact(
        self,
        kind: int,
        data: dict[str, Any],
        *,
        by: dict[str, Any],
        permissions: int = 0,
        roles: tuple[int, ...] = (),
        message: dict[str, Any] | None = None,
        guild_id: int | None = GUILD_ID,
    ) -> Interaction:
        interaction_id = next(self._ids)
        token = f"token-{interaction_id}"
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(BOT_ID),
            "type": kind,
            "token": token,
            "version": 1,
            "attachment_size_limit": self.attachment_size_limit,
            "app_permissions": str((1 << 53) - 1),
            "locale": "en-US",
            "entitlements": [],
            "data": data,
        }
        if guild_id is None:  # a direct message: a user, not a member, and no permissions
            dm = self.dm_channels.setdefault(int(by["id"]), next(self._ids))
            payload.update(channel_id=str(dm), channel={"id": str(dm), "type": 1}, user=by)
        else:
            channel = self.channel()
            if guild_id != GUILD_ID:
                channel = {**channel, "id": str(CHANNEL_ID + 1), "guild_id": str(guild_id)}
            payload.update(
                guild_id=str(guild_id),
                channel_id=channel["id"],
                channel=channel,
                guild_locale="en-US",
                member={
                    "user": by,
                    "roles": [str(role) for role in roles],
                    "flags": 0,
                    "permissions": str(permissions),
                    "joined_at": "2024-01-01T00:00:00+00:00",
                },
            )
        if message is not None:
            payload["message"] = message
        interaction = Interaction(interaction_id, token, kind, by, time.perf_counter(), payload)
        self.interactions[token] = interaction
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction

    def delete_message(self, message_id: int) -> None:
        """Delete a message as a member or moderator would, in Discord's own client."""
        self._delete(message_id)

    def expire(self, interaction: Interaction) -> None:
        """Make an interaction's token invalid, as Discord does after 15 minutes."""
        interaction.expired = True

    async def set_channel_nsfw(self, nsfw: bool) -> None:
        """Make the channel age-restricted or not, telling the bot as Discord does."""
        self.channel_nsfw = nsfw
        await self.dispatch("CHANNEL_UPDATE", self.channel())

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        down = not self._gateway_up.is_set()
        assert self._sockets or down, "no bot is connected to the gateway"
        seq = next(self._seq)
        frame = json.dumps({"op": 0, "t": event, "s": seq, "d": data})
        self._dispatched.append((seq, frame))
        for socket in list(self._sockets):
            await socket.send_str(frame)

    # -- outages -----------------------------------------------------------------------------

    def fail(
        self,
        status: int,
        fragment: str = "",
        *,
        method: str | None = None,
        retry_after: float = 0.05,
        via: bool = True,
    ) -> Fault:
        """Answer REST calls whose path contains ``fragment`` with ``status`` until healed."""
        fault = Fault(status, fragment, method, retry_after, via)
        self.faults.append(fault)
        return fault

    async def drop_gateway(self, code: int = 4000, *, session_lost: bool = False) -> None:
        """Close the gateway connections with ``code`` (4000: resumable) and keep the
        gateway down: a reconnecting client is let in but hears nothing until
        :meth:`restore_gateway`. Events dispatched meanwhile wait for its RESUME;
        ``session_lost`` answers that RESUME with an invalid session instead, so the
        client identifies again and gets a new READY."""
        self._gateway_up.clear()
        self._session_lost = session_lost
        sockets, self._sockets = list(self._sockets), []
        for socket in sockets:
            await socket.close(code=code)

    def restore_gateway(self) -> None:
        self._gateway_up.set()

    async def wait_for(
        self, condition: Callable[[], Any], *, within: float = 60.0, what: str = "a condition"
    ) -> Any:
        deadline = time.monotonic() + within
        async with self._changed:
            while True:
                value = condition()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {within}s waiting for {what}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.5))

    # -- reading what happened ----------------------------------------------------------------

    def command_names(self) -> list[str]:
        return [c["name"] for c in self.commands]

    def channel(self) -> dict[str, Any]:
        return {
            "id": str(CHANNEL_ID),
            "type": 0,
            "guild_id": str(GUILD_ID),
            "name": "art",
            "position": 0,
            "nsfw": self.channel_nsfw,
            "permission_overwrites": [],
        }

    def buttons(self, message_id: int) -> list[dict[str, Any]]:
        message = self.messages[message_id]
        return [
            component
            for row in message.get("components", [])
            for component in row.get("components", [])
            if component.get("type") == 2
        ]

    def button(self, message_id: int, label: str) -> str:
        for component in self.buttons(message_id):
            shown = f"{component.get('emoji', {}).get('name', '')}{component.get('label', '')}"
            if component.get("label") == label or shown == label:
                custom_id: str = component["custom_id"]
                return custom_id
        labels = [
            (b.get("emoji", {}).get("name", ""), b.get("label")) for b in self.buttons(message_id)
        ]
        raise AssertionError(f"no button {label!r} on message {message_id}: {labels}")

    def attachment_bytes(self, message_id: int) -> list[bytes]:
        return [self.files[int(a["id"])] for a in self.messages[message_id]["attachments"]]

    def original(self, interaction: Interaction) -> dict[str, Any] | None:
        if interaction.original_id is None:
            return None
        return self.messages.get(interaction.original_id)

    def said_privately(self, interaction: Interaction) -> str | None:
        """The ephemeral sentence an interaction was answered with, if any."""
        if interaction.responses and interaction.responses[0]["type"] == 4:
            data = interaction.responses[0].get("data") or {}
            if data.get("flags", 0) & EPHEMERAL:
                return str(data.get("content", ""))
        for message_id in interaction.followups:
            message = self.messages.get(message_id)
            if message is not None and message["flags"] & EPHEMERAL:
                return str(message["content"])
        return None

    def calls_to(self, method: str, fragment: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and fragment in c.path]

    # -- gateway -----------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await self._gateway_up.wait()
        await socket.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        try:
            async for frame in socket:
                message = json.loads(frame.data)
                op = message["op"]
                if op == 1:
                    await socket.send_str(json.dumps({"op": 11}))
                elif op == 2:
                    self.identifies += 1
                    self._sockets.append(socket)
                    await self._ready(socket)
                elif op == 6:
                    self.resumes += 1
                    if self._session_lost:
                        self._session_lost = False
                        await socket.send_str(json.dumps({"op": 9, "d": False}))
                    else:
                        await self._resume(socket, message["d"].get("seq") or 0)
        finally:
            if socket in self._sockets:
                self._sockets.remove(socket)
        return socket

    async def _resume(self, socket: web.WebSocketResponse, seen: int) -> None:
        index = 0
        while index < len(self._dispatched):  # what is dispatched while replaying, too
            seq, frame = self._dispatched[index]
            if seq > seen:
                await socket.send_str(frame)
            index += 1
        self._sockets.append(socket)
        frame_out = {"op": 0, "t": "RESUMED", "s": next(self._seq), "d": {}}
        await socket.send_str(json.dumps(frame_out))

    async def _ready(self, socket: web.WebSocketResponse) -> None:
        ready = {
            "v": 10,
            "user": BOT_USER,
            "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
            "session_id": "fake-session",
            "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway",
            "application": {"id": str(BOT_ID), "flags": 0},
        }
        guild = {
            "id": str(GUILD_ID),
            "unavailable": False,
            "name": "Art Club",
            "owner_id": MOD["id"],
            "member_count": 4,
            "channels": [self.channel()],
            "roles": [
                {"id": str(GUILD_ID), "name": "@everyone", "permissions": "0", "position": 0},
                {"id": str(ARTISTS_ROLE), "name": "artists", "permissions": "0", "position": 1},
            ],
            "members": [{"user": BOT_USER, "roles": [], "flags": 0, "joined_at": None}],
            "features": [],
        }
        for event, data in (("READY", ready), ("GUILD_CREATE", guild)):
            frame = {"op": 0, "t": event, "s": next(self._seq), "d": data}
            await socket.send_str(json.dumps(frame))

    # -- REST --------------------------------------------------------------------------------

    async def _attachment(self, request: web.Request) -> web.StreamResponse:
        self.downloads.append(int(request.match_info["id"]))
        if (target := self.redirects.get(int(request.match_info["id"]))) is not None:
            raise web.HTTPFound(target)
        data = self.files.get(int(request.match_info["id"]))
        if data is None:
            return web.Response(status=404)
        if int(request.match_info["id"]) in self.chunked:
            stream = web.StreamResponse()
            stream.enable_chunked_encoding()
            await stream.prepare(request)
            for start in range(0, len(data), 4096):
                await stream.write(data[start : start + 4096])
            await stream.write_eof()
            return stream
        return web.Response(body=data, content_type="application/octet-stream")

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body, files = await _read_body(request)
        call = Call(request.method, path, body, files, time.perf_counter())
        fault = next((f for f in self.faults if f.matches(request.method, path)), None)
        if fault is not None:
            response: web.StreamResponse = fault.response()
            fault.answered.append(call)
        else:
            try:
                response = await self._route(
                    request.method, path.split("/")[1:], body, files, request
                )
            except KeyError as exc:
                response = _error(404, 10008, f"Unknown {exc}")
        call.status = response.status
        self.calls.append(call)
        async with self._changed:
            self._changed.notify_all()
        return response

    async def _route(
        self,
        method: str,
        parts: list[str],
        body: dict[str, Any] | None,
        files: list[tuple[str, bytes]],
        request: web.Request,
    ) -> web.StreamResponse:
        match method, parts:
            case "GET", ["users", "@me"]:
                if request.headers.get("Authorization") != "Bot fake-token":
                    return _error(401, 0, "401: Unauthorized")
                return _json(BOT_USER)
            case "GET", ["oauth2", "applications", "@me"]:
                return _json(
                    {
                        "id": str(BOT_ID),
                        "name": "Imagine",
                        "description": "",
                        "icon": None,
                        "bot_public": True,
                        "bot_require_code_grant": False,
                        "owner": MOD,
                        "verify_key": "0" * 64,
                        "flags": 0,
                    }
                )
            case "PUT", ["applications", _, "commands"]:
                return _json(self._sync(body))
            case "PUT", ["applications", _, "guilds", _, "commands"]:
                return _json(self._sync(body))
            case "POST", ["interactions", _, token, "callback"]:
                return self._callback(token, body or {}, files)
            case "POST", ["webhooks", _, token]:
                return self._followup(token, body or {}, files)
            case _, ["webhooks", _, token, "messages", message]:
                return self._webhook_message(method, token, message, body, files)
            case "GET", ["users", user_id]:
                known = {int(u["id"]): u for u in (ALICE, BOB, MOD)}
                if int(user_id) not in known:
                    return _error(404, 10013, "Unknown User")
                return _json(known[int(user_id)])
            case "POST", ["users", "@me", "channels"]:
                recipient = int((body or {})["recipient_id"])
                dm = self.dm_channels.setdefault(recipient, next(self._ids))
                return _json({"id": str(dm), "type": 1, "recipients": [], "last_message_id": None})
            case "POST", ["channels", channel, "messages"]:
                if error := self._refused_post(int(channel)):
                    return error
                if error := self._too_large(files):
                    return error
                created = self._create(int(channel), body or {}, files)
                await self.dispatch("MESSAGE_CREATE", created)
                return _json(created)
            case _, ["channels", channel, "messages", message]:
                if int(channel) == CHANNEL_ID and self.channel_forbidden:
                    return _error(403, 50013, "Missing Permissions")
                return self._channel_message(method, int(message), body, files)
        return _error(404, 0, f"the fake does not serve {method} /{'/'.join(parts)}")

    def _sync(self, body: Any) -> list[dict[str, Any]]:
        commands = []
        for command in body or []:
            known = next((c for c in self.commands if c["name"] == command["name"]), None)
            command_id = known["id"] if known else str(next(self._ids))
            commands.append(
                {**command, "id": command_id, "application_id": str(BOT_ID), "version": "1"}
            )
        self.commands = commands
        return commands

    def _refused_post(self, channel_id: int) -> web.Response | None:
        if channel_id == CHANNEL_ID and self.channel_forbidden:
            return _error(403, 50013, "Missing Permissions")
        refusing = {dm: user for user, dm in self.dm_channels.items() if user in self.dms_refused}
        if channel_id in refusing:
            return _error(403, 50007, "Cannot send messages to this user")
        return None

    def direct_messages(self, user: dict[str, Any]) -> list[dict[str, Any]]:
        """What the bot sent ``user`` by direct message, oldest first."""
        dm = self.dm_channels.get(int(user["id"]))
        return [m for m in self.messages.values() if dm is not None and m["channel_id"] == str(dm)]

    def _too_large(self, files: list[tuple[str, bytes]]) -> web.Response | None:
        for name, data in files:
            if len(data) > self.attachment_size_limit:
                return _error(413, 40005, f"Request entity too large: {name} is {len(data)} bytes")
        return None

    def _callback(
        self, token: str, body: dict[str, Any], files: list[tuple[str, bytes]]
    ) -> web.Response:
        interaction = self.interactions.get(token)
        if interaction is None:
            return _error(404, 10062, "Unknown interaction")
        if interaction.responses:
            return _error(400, 40060, "Interaction has already been acknowledged.")
        if error := self._too_large(files):
            return error
        interaction.responses.append(body)
        interaction.responded_at = time.perf_counter()
        kind = body["type"]
        data = body.get("data") or {}
        resource: dict[str, Any] | None = None
        if kind == 4:
            message = self._create(CHANNEL_ID, data, files)
            interaction.original_id = int(message["id"])
            resource = {"type": 4, "message": message}
        elif kind == 5:
            flags = LOADING | (data.get("flags", 0) & EPHEMERAL)
            message = self._create(CHANNEL_ID, {"content": "", "flags": flags}, [])
            interaction.original_id = int(message["id"])
            resource = {"type": 5, "message": message}
        elif kind in (6, 7):
            # Deferred update / update: "@original" is the message the component is on.
            interaction.original_id = int(interaction.payload["message"]["id"])
            if kind == 7:
                message = self._edit(interaction.original_id, data, files)
                resource = {"type": 7, "message": message}
        response: dict[str, Any] = {
            "interaction": {
                "id": str(interaction.id),
                "type": interaction.type,
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool(data.get("flags", 0) & EPHEMERAL),
            }
        }
        if interaction.original_id is not None and kind in (4, 5, 6, 7):
            response["interaction"]["response_message_id"] = str(interaction.original_id)
        if resource is not None:
            response["resource"] = resource
        return _json(response)

    def _live(self, token: str) -> Interaction | web.Response:
        interaction = self.interactions.get(token)
        if interaction is None or interaction.expired:
            return _error(401, 50027, "Invalid Webhook Token")
        return interaction

    def _followup(
        self, token: str, body: dict[str, Any], files: list[tuple[str, bytes]]
    ) -> web.Response:
        interaction = self._live(token)
        if isinstance(interaction, web.Response):
            return interaction
        if not interaction.responses:
            return _error(404, 10015, "Unknown Webhook: the interaction was not answered yet")
        if error := self._too_large(files):
            return error
        original = self.original(interaction)
        if interaction.response_type == 5 and original is not None and original["flags"] & LOADING:
            # The first followup after a deferred "thinking" reply replaces it.
            flags = original["flags"] & ~LOADING
            if body.get("flags", 0) & EPHEMERAL:
                flags |= EPHEMERAL
            interaction.followups.append(int(original["id"]))
            return _json(self._edit(int(original["id"]), {**body, "flags": flags}, files))
        created = self._create(CHANNEL_ID, body, files)
        interaction.followups.append(int(created["id"]))
        return _json(created)

    def _webhook_message(
        self,
        method: str,
        token: str,
        message: str,
        body: dict[str, Any] | None,
        files: list[tuple[str, bytes]],
    ) -> web.Response:
        interaction = self._live(token)
        if isinstance(interaction, web.Response):
            return interaction
        if message == "@original":
            if interaction.original_id is None:
                return _error(404, 10008, "Unknown Message")
            message_id = interaction.original_id
        else:
            message_id = int(message)
        if message_id not in self.messages:
            return _error(404, 10008, "Unknown Message")
        if method == "GET":
            return _json(self.messages[message_id])
        if method == "DELETE":
            self._delete(message_id)
            return web.Response(status=204)
        if error := self._too_large(files):
            return error
        edited = dict(body or {})
        if self.messages[message_id]["flags"] & LOADING:
            edited["flags"] = self.messages[message_id]["flags"] & ~LOADING
        return _json(self._edit(message_id, edited, files))

    def _channel_message(
        self,
        method: str,
        message_id: int,
        body: dict[str, Any] | None,
        files: list[tuple[str, bytes]],
    ) -> web.Response:
        message = self.messages.get(message_id)
        if message is None:
            return _error(404, 10008, "Unknown Message")
        if message["flags"] & EPHEMERAL:
            return _error(404, 10008, "Unknown Message (ephemeral messages have no channel route)")
        if method == "GET":
            return _json(message)
        if message["author"]["id"] != BOT_USER["id"] and method == "PATCH":
            return _error(403, 50005, "Cannot edit a message authored by another user")
        if method == "DELETE":
            self._delete(message_id)
            return web.Response(status=204)
        if error := self._too_large(files):
            return error
        return _json(self._edit(message_id, dict(body or {}), files))

    # -- messages ----------------------------------------------------------------------------

    def _attachments(
        self, files: list[tuple[str, bytes]], listed: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]]:
        created = []
        for index, (name, data) in enumerate(files):
            filename = name
            for entry in listed or []:
                if str(entry.get("id")) == str(index) and entry.get("filename"):
                    filename = entry["filename"]
            attachment_id = next(self._ids)
            self.files[attachment_id] = data
            url = f"{self.base}/attachments/{attachment_id}/{filename}"
            created.append(
                {
                    "id": str(attachment_id),
                    "filename": filename,
                    "size": len(data),
                    "url": url,
                    "proxy_url": url,
                    "content_type": _content_type(filename),
                }
            )
        return created

    def _create(
        self, channel_id: int, body: dict[str, Any], files: list[tuple[str, bytes]]
    ) -> dict[str, Any]:
        message_id = next(self._ids)
        message = {
            "id": str(message_id),
            "type": 0,
            "channel_id": str(channel_id),
            "guild_id": str(GUILD_ID),
            "author": BOT_USER,
            "content": body.get("content") or "",
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "attachments": self._attachments(files, body.get("attachments")),
            "embeds": body.get("embeds") or [],
            "components": body.get("components") or [],
            "timestamp": datetime.now(UTC).isoformat(),
            "edited_timestamp": None,
            "flags": body.get("flags", 0),
            "tts": False,
            "pinned": False,
            "history": [],
        }
        self.messages[message_id] = message
        return message

    def _edit(
        self, message_id: int, body: dict[str, Any], files: list[tuple[str, bytes]]
    ) -> dict[str, Any]:
        message = self.messages[message_id]
        message["history"].append(
            {key: message[key] for key in ("content", "attachments", "components")}
        )
        for key in ("content", "embeds", "components", "flags"):
            if key in body:
                message[key] = (
                    body[key] if body[key] is not None else ([] if key != "content" else "")
                )
        if "attachments" in body or files:
            listed = body.get("attachments") or []
            kept_ids = {str(entry["id"]) for entry in listed}
            kept = [a for a in message["attachments"] if a["id"] in kept_ids]
            message["attachments"] = kept + self._attachments(files, listed)
        message["edited_timestamp"] = datetime.now(UTC).isoformat()
        return message

    def _delete(self, message_id: int) -> None:
        self.messages.pop(message_id, None)
        self.deleted.add(message_id)


def _option_value(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("__role__") or value.get("__attachment__")
    return value


def _option_type(value: Any) -> int:
    if isinstance(value, dict) and "__role__" in value:
        return 8
    if isinstance(value, dict) and "__attachment__" in value:
        return 11
    if isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return 4
    if isinstance(value, float):
        return 10
    return 3


def _content_type(filename: str) -> str:
    suffix = filename.rsplit(".", 1)[-1].lower()
    return {
        "png": "image/png",
        "jpg": "image/jpeg",
        "jpeg": "image/jpeg",
        "webp": "image/webp",
        "gif": "image/gif",
    }.get(suffix, "application/octet-stream")


async def _read_body(request: web.Request) -> tuple[Any, list[tuple[str, bytes]]]:
    if request.content_type.startswith("multipart/"):
        body: Any = None
        files: list[tuple[str, bytes]] = []
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, type(part)) or part.name is None:  # pragma: no cover
                continue
            data = await part.read()  # type: ignore[union-attr]
            if part.name == "payload_json":
                body = json.loads(data)
            else:
                files.append((part.filename or part.name, bytes(data)))  # type: ignore[union-attr]
        return body, files
    if request.can_read_body:
        raw = await request.read()
        return (json.loads(raw) if raw else None), []
    return None, []
