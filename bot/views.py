"""The buttons under a generation's messages, whose ``custom_id`` holds ids only.

Messages get plain buttons from here, in views that are stopped at once, so
discord.py keeps nothing per message. A click is matched by its ``custom_id``
against the templates below by the :class:`discord.ui.DynamicItem` classes of
:mod:`bot.cogs.imagine`, which rebuild the button from the id and handle it,
whatever message it sits on and however long ago the bot started.

    gen:<generation id>:u<n> | v<n> | reroll | remix      under a grid
    img:<image id>:subtle | strong | up | remix | zoom2 | zoom15 | pan_<direction>
                 | like | info | delete                                   under one image
"""

from __future__ import annotations

from typing import Any

import discord

from storage.models import Generation, Image

GRID_TEMPLATE = r"gen:(?P<id>[0-9]{1,20}):(?P<action>[uv][1-9]|reroll|remix)"
IMAGE_TEMPLATE = (
    r"img:(?P<id>[0-9]{1,20}):(?P<action>subtle|strong|up|remix|zoom2|zoom15"
    r"|pan_left|pan_right|pan_up|pan_down|like|info|delete)"
)
# Zoom Out and Pan: the button's action and what it asks of storage.derive.
ZOOMS = {"zoom2": 2.0, "zoom15": 1.5}
PANS = {"pan_left": "left", "pan_right": "right", "pan_up": "up", "pan_down": "down"}
MAX_TILE_BUTTONS = 4  # U1-U4 and V1-V4: two rows of Discord's five

Button = discord.ui.Button[Any]


def grid_button(generation_id: int, action: str) -> Button:
    look: dict[str, Any]
    if action == "reroll":
        look = {"emoji": "🔄", "style": discord.ButtonStyle.secondary, "row": 0}
    elif action == "remix":
        look = {"emoji": "✏️", "label": "Remix", "style": discord.ButtonStyle.secondary, "row": 1}
    else:
        row = 0 if action[0] == "u" else 1
        look = {"label": action.upper(), "style": discord.ButtonStyle.secondary, "row": row}
    return discord.ui.Button(custom_id=f"gen:{generation_id}:{action}", **look)


def image_button(image_id: int, action: str, likes: int = 0) -> Button:
    grey = discord.ButtonStyle.secondary
    look: dict[str, Any] = {
        "subtle": {"label": "Vary (Subtle)", "emoji": "🪄", "style": grey, "row": 0},
        "strong": {"label": "Vary (Strong)", "emoji": "🪄", "style": grey, "row": 0},
        "up": {"label": "Upscale 2×", "emoji": "🔍", "style": grey, "row": 0},
        "remix": {"label": "Remix", "emoji": "✏️", "style": grey, "row": 0},
        "zoom2": {"label": "Zoom Out 2×", "emoji": "🔭", "style": grey, "row": 1},
        "zoom15": {"label": "Zoom Out 1.5×", "emoji": "🔭", "style": grey, "row": 1},
        "pan_left": {"emoji": "⬅️", "style": grey, "row": 2},
        "pan_right": {"emoji": "➡️", "style": grey, "row": 2},
        "pan_up": {"emoji": "⬆️", "style": grey, "row": 2},
        "pan_down": {"emoji": "⬇️", "style": grey, "row": 2},
        "like": {"label": str(likes), "emoji": "❤️", "style": discord.ButtonStyle.primary, "row": 3},
        "info": {"label": "Info", "emoji": "ℹ️", "style": grey, "row": 3},
        "delete": {"label": "Delete", "emoji": "🗑️", "style": discord.ButtonStyle.danger, "row": 3},
    }[action]
    return discord.ui.Button(custom_id=f"img:{image_id}:{action}", **look)


def stopped_view(items: list[discord.ui.Item[Any]]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for item in items:
        view.add_item(item)
    # Stopped, so discord.py does not keep it in memory per message: clicks are
    # dispatched by the dynamic items' templates, on any message, after any restart.
    view.stop()
    return view


def grid_view(generation: Generation) -> discord.ui.View:
    tiles = min(len(generation.images), MAX_TILE_BUTTONS)
    items: list[discord.ui.Item[Any]] = []
    items += [grid_button(generation.id, f"u{n}") for n in range(1, tiles + 1)]
    items.append(grid_button(generation.id, "reroll"))
    items += [grid_button(generation.id, f"v{n}") for n in range(1, tiles + 1)]
    items.append(grid_button(generation.id, "remix"))
    return stopped_view(items)


def retry_view(generation: Generation) -> discord.ui.View:
    return stopped_view([grid_button(generation.id, "reroll"), grid_button(generation.id, "remix")])


def image_view(image: Image, likes: int) -> discord.ui.View:
    actions = ("subtle", "strong", "up", "remix", *ZOOMS, *PANS, "like", "info", "delete")
    return stopped_view([image_button(image.id, action, likes) for action in actions])
