"""A process killed with SIGKILL right after its commit loses nothing."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap

from sqlalchemy.engine import URL

from storage.database import Database
from storage.generations import get_generation
from storage.models import GenerationStatus

WRITER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from sqlalchemy.engine import make_url
    from storage.database import Database
    from storage.generations import NewImage, add_images, create_generation, transition
    from storage.models import GenerationKind, GenerationStatus
    from storage.recipe import Recipe

    async def main() -> None:
        database = Database(make_url(sys.argv[1]))
        recipe = Recipe(model="tiny", prompt="kill me", seed=7, width=64, height=64,
                        steps=4, guidance=5.0)
        async with database.session() as session:
            generation = await create_generation(
                session, kind=GenerationKind.IMAGINE, recipe=recipe, requester_id=5)
            await transition(session, generation.id, GenerationStatus.RUNNING)
            await add_images(session, generation.id, [
                NewImage(index=i, seed=7 + i, width=64, height=64,
                         blob_key=f"{i:064x}", sha256=f"{i:064x}") for i in range(4)])
            await transition(session, generation.id, GenerationStatus.SUCCEEDED)
        print(generation.id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def test_committed_generation_survives_sigkill(database: Database) -> None:
    url: URL = database.url
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", WRITER, url.render_as_string(hide_password=False)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    generation_id = int(result.stdout.strip())

    reopened = Database(url)
    try:
        async with reopened.session() as session:
            generation = await get_generation(session, generation_id)
            assert generation.status is GenerationStatus.SUCCEEDED
            assert [image.seed for image in generation.images] == [7, 8, 9, 10]
            assert generation.recipe.prompt == "kill me"
    finally:
        await reopened.dispose()
