"""``python -m bot.cli``: the same as the ``imagine`` command."""

import sys

from bot.cli import main

sys.exit(main())
