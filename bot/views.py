"""Buttons and modals whose ``custom_id`` holds ids only, so they outlive the process.

Every button is a :class:`discord.ui.DynamicItem`: discord.py matches a click's
``custom_id`` against the template and rebuilds the item with
:meth:`from_custom_id`, whatever message it sits on and however long ago the bot
started. What a click does lives in :class:`ButtonActions`, implemented by the
bot's cogs; the items only parse ids and hand over.

    gen:<generation id>:u<n> | v<n> | reroll | remix      under a grid
    img:<image id>:subtle | strong | up | remix | like | info | delete   under one image
"""

from __future__ import annotations

import re
from typing import Any, Protocol, cast

import discord

from storage.models import Generation, Image

GRID_TEMPLATE = r"gen:(?P<id>[0-9]{1,20}):(?P<action>[uv][1-9]|reroll|remix)"
IMAGE_TEMPLATE = r"img:(?P<id>[0-9]{1,20}):(?P<action>subtle|strong|up|remix|like|info|delete)"
REMIX_MODAL = re.compile(r"remix:(?P<id>[0-9]{1,20})")
TRY_MODAL = re.compile(r"try:(?P<name>[A-Za-z0-9_-]{1,64})")
MAX_TILE_BUTTONS = 4  # U1-U4 and V1-V4: two rows of Discord's five


class ButtonActions(Protocol):
    async def grid_action(
        self, interaction: discord.Interaction, generation_id: int, action: str
    ) -> None: ...

    async def image_action(
        self, interaction: discord.Interaction, image_id: int, action: str
    ) -> None: ...

    async def remix_submitted(
        self, interaction: discord.Interaction, generation_id: int, text: str
    ) -> None: ...


def actions_of(interaction: discord.Interaction) -> ButtonActions:
    return cast(ButtonActions, getattr(interaction.client, "actions"))  # noqa: B009


_BUTTON = discord.ui.Button[Any]


def _grid_look(action: str) -> dict[str, Any]:
    if action == "reroll":
        return {"emoji": "🔄", "style": discord.ButtonStyle.secondary, "row": 0}
    if action == "remix":
        return {"emoji": "✏️", "label": "Remix", "style": discord.ButtonStyle.secondary, "row": 1}
    row = 0 if action[0] == "u" else 1
    return {"label": action.upper(), "style": discord.ButtonStyle.secondary, "row": row}


class GridButton(discord.ui.DynamicItem[_BUTTON], template=GRID_TEMPLATE):
    def __init__(self, generation_id: int, action: str) -> None:
        self.generation_id = generation_id
        self.action = action
        button: _BUTTON = discord.ui.Button(
            custom_id=f"gen:{generation_id}:{action}", **_grid_look(action)
        )
        super().__init__(button)

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> GridButton:
        return cls(int(match["id"]), match["action"])

    async def callback(self, interaction: discord.Interaction) -> None:
        await actions_of(interaction).grid_action(interaction, self.generation_id, self.action)


def _image_look(action: str, likes: int) -> dict[str, Any]:
    grey = discord.ButtonStyle.secondary
    return {
        "subtle": {"label": "Vary (Subtle)", "emoji": "🪄", "style": grey, "row": 0},
        "strong": {"label": "Vary (Strong)", "emoji": "🪄", "style": grey, "row": 0},
        "up": {"label": "Upscale 2×", "emoji": "🔍", "style": grey, "row": 0},
        "remix": {"label": "Remix", "emoji": "✏️", "style": grey, "row": 0},
        "like": {"label": str(likes), "emoji": "❤️", "style": discord.ButtonStyle.primary, "row": 1},
        "info": {"label": "Info", "emoji": "ℹ️", "style": grey, "row": 1},
        "delete": {"label": "Delete", "emoji": "🗑️", "style": discord.ButtonStyle.danger, "row": 1},
    }[action]


class ImageButton(discord.ui.DynamicItem[_BUTTON], template=IMAGE_TEMPLATE):
    def __init__(self, image_id: int, action: str, likes: int = 0) -> None:
        self.image_id = image_id
        self.action = action
        button: _BUTTON = discord.ui.Button(
            custom_id=f"img:{image_id}:{action}", **_image_look(action, likes)
        )
        super().__init__(button)

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> ImageButton:
        return cls(int(match["id"]), match["action"])

    async def callback(self, interaction: discord.Interaction) -> None:
        await actions_of(interaction).image_action(interaction, self.image_id, self.action)


def _view(items: list[discord.ui.Item[Any]]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for item in items:
        view.add_item(item)
    # Stopped, so discord.py does not keep it in memory per message: the dynamic
    # items are dispatched by their template, on any message, after any restart.
    view.stop()
    return view


def grid_view(generation: Generation) -> discord.ui.View:
    tiles = min(len(generation.images), MAX_TILE_BUTTONS)
    items: list[discord.ui.Item[Any]] = []
    items += [GridButton(generation.id, f"u{n}") for n in range(1, tiles + 1)]
    items.append(GridButton(generation.id, "reroll"))
    items += [GridButton(generation.id, f"v{n}") for n in range(1, tiles + 1)]
    items.append(GridButton(generation.id, "remix"))
    return _view(items)


def retry_view(generation: Generation) -> discord.ui.View:
    return _view([GridButton(generation.id, "reroll"), GridButton(generation.id, "remix")])


def image_view(image: Image, likes: int) -> discord.ui.View:
    actions = ("subtle", "strong", "up", "remix", "like", "info", "delete")
    return _view([ImageButton(image.id, action, likes) for action in actions])


class RemixModal(discord.ui.Modal):
    """The generation's prompt and flags, to edit; submitted as a new generation.

    Submissions are handled by :func:`remix_submission` from the bot's
    ``on_interaction``, not by ``on_submit``: a modal that was open while the bot
    restarted is then handled like any other.
    """

    def __init__(self, generation_id: int, text: str) -> None:
        super().__init__(title="Remix", custom_id=f"remix:{generation_id}", timeout=15 * 60)
        self.generation_id = generation_id
        self.prompt: discord.ui.TextInput[RemixModal] = discord.ui.TextInput(
            label="Prompt and flags",
            style=discord.TextStyle.paragraph,
            default=text[:4000],
            max_length=4000,
            custom_id="prompt",
        )
        self.add_item(self.prompt)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        """Nothing: see the class docstring."""


def _modal(interaction: discord.Interaction, pattern: re.Pattern[str]) -> tuple[str, str] | None:
    if interaction.type is not discord.InteractionType.modal_submit or interaction.data is None:
        return None
    match = pattern.fullmatch(str(interaction.data.get("custom_id", "")))
    if match is None:
        return None
    return match[1], _find_value(interaction.data.get("components", []), "prompt") or ""


def remix_submission(interaction: discord.Interaction) -> tuple[int, str] | None:
    """(generation id, edited text) if ``interaction`` submits a remix modal."""
    found = _modal(interaction, REMIX_MODAL)
    return (int(found[0]), found[1]) if found is not None else None


def try_submission(interaction: discord.Interaction) -> tuple[str, str] | None:
    """(style name, prompt text) if ``interaction`` submits a "try this style" modal."""
    return _modal(interaction, TRY_MODAL)


def _find_value(node: Any, custom_id: str) -> str | None:
    if isinstance(node, dict):
        if node.get("custom_id") == custom_id and "value" in node:
            return str(node["value"])
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            found = _find_value(child, custom_id)
            if found is not None:
                return found
    return None
