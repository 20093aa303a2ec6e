"""The ``imagine`` command: the composition root that wires settings, storage and engine.

Each sub-module adds its sub-commands with a ``register(subparsers)`` function
whose parsers set ``handler`` to a callable taking the parsed arguments and
returning an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from storage.errors import ImagineError


class Interrupted(ImagineError):
    """Ctrl-C or SIGTERM stopped a command after it put its rows in order (exit code 130)."""


def build_parser() -> argparse.ArgumentParser:
    from bot.cli import backup, db, discord_commands, doctor, local, queue, web

    parser = argparse.ArgumentParser(
        prog="imagine",
        description="Imagine: a self-hosted image generation bot for Discord.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    db.register(commands)
    local.register(commands)
    queue.register(commands)
    discord_commands.register(commands)
    doctor.register(commands)
    backup.register(commands)
    web.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # transformers warns at import about optional image backends (torchvision); nothing
    # a user of Imagine can act on.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.handler(args)
        sys.stdout.flush()  # a closed pipe (`imagine show 1 | head -1`) shows up here
    except BrokenPipeError:
        # The reader left: say nothing, and keep the flush at exit from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
    except Interrupted as exc:
        print(f"imagine: {exc}", file=sys.stderr)
        return 130
    except ImagineError as exc:
        print(f"imagine: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imagine: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
