"""Recording a generation's success: its images, their thumbnails, its grid and the status,
all at once or not at all.

On PostgreSQL this is one statement in autocommit (one round trip, atomic by itself):
the status moves first, and the image and thumbnail rows are inserted only if it
moved, so a worker whose row was re-queued meanwhile records nothing. On SQLite (no
data-modifying ``WITH``) the same steps run as statements in one transaction.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Integer,
    Select,
    String,
    Table,
    bindparam,
    func,
    insert,
    literal,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY

from storage.database import Database
from storage.generations import (
    NewImage,
    add_images,
    record_grid,
    returned_rows,
    transition,
    transition_in_one_statement,
    transition_statement,
)
from storage.models import (
    Generation,
    GenerationStatus,
    Image,
    Thumbnail,
    utcnow,
)
from storage.recipe import Recipe
from storage.thumbnails import NewThumbnail, record_images_thumbnails

S = GenerationStatus


async def record_success(
    database: Database,
    generation_id: int,
    images: Sequence[NewImage],
    thumbnails: Sequence[Sequence[NewThumbnail]],
    grid_key: str | None,
    recipe: Recipe,
    *,
    owner: str | None,
) -> Generation:
    """Record a running generation's images (``thumbnails[i]`` are ``images[i]``'s), its
    grid (unless it has one) and its completed ``recipe``, and move it to ``succeeded``;
    returns it with its images. :class:`~storage.errors.IllegalTransition` if it is no
    longer running on worker ``owner`` (then nothing is recorded)."""
    if database.backend != "postgresql":
        async with database.session() as session:
            rows = await add_images(session, generation_id, images)
            await record_images_thumbnails(
                session, {row.id: made for row, made in zip(rows, thumbnails, strict=True)}
            )
            if grid_key is not None:
                await record_grid(session, generation_id, grid_key)
            return await transition(session, generation_id, S.SUCCEEDED, recipe=recipe, owner=owner)
    made = [
        (image.index, thumb)
        for image, per_image in zip(images, thumbnails, strict=True)
        for thumb in per_image
    ]
    return await transition_in_one_statement(
        database,
        _success_statement(),
        {
            "generation_id": generation_id,
            "now": utcnow(),
            "owner": owner,
            "recipe": recipe,
            "grid": grid_key,
            "indexes": [image.index for image in images],
            "seeds": [image.seed for image in images],
            "widths": [image.width for image in images],
            "heights": [image.height for image in images],
            "blob_keys": [image.blob_key for image in images],
            "sha256s": [image.sha256 for image in images],
            "thumb_indexes": [index for index, _ in made],
            "thumb_sizes": [thumb.size for _, thumb in made],
            "thumb_keys": [thumb.blob_key for _, thumb in made],
            "thumb_widths": [thumb.width for _, thumb in made],
            "thumb_heights": [thumb.height for _, thumb in made],
        },
        S.SUCCEEDED,
    )


def _unnest(*columns: tuple[str, type[Integer] | type[BigInteger] | type[String]]) -> object:
    """``unnest(:a, :b, …) AS name(a, b, …)``: one row per element of the bound arrays."""
    arrays = [bindparam(name, type_=ARRAY(kind())) for name, kind in columns]
    return (
        func.unnest(*arrays)
        .table_valued(*(name for name, _ in columns))
        .render_derived(with_types=False)
    )


@functools.cache
def _success_statement() -> Select[Any]:
    """:func:`record_success` on PostgreSQL, built once."""
    generations = cast(Table, Generation.__table__)
    images = cast(Table, Image.__table__)
    thumbnails = cast(Table, Thumbnail.__table__)
    now = bindparam("now", type_=images.c.created_at.type)
    finished = (
        transition_statement(S.SUCCEEDED, ("generation_id", "now", "owner", "recipe"))
        .values(
            grid_blob_key=func.coalesce(
                generations.c.grid_blob_key, bindparam("grid", type_=String)
            )
        )
        .returning(*generations.c)
        .cte("finished")
    )
    new = cast(
        "Table",
        _unnest(
            ("indexes", Integer),
            ("seeds", BigInteger),
            ("widths", Integer),
            ("heights", Integer),
            ("blob_keys", String),
            ("sha256s", String),
        ),
    )
    inserted = (
        insert(images)
        .from_select(
            [
                "generation_id",
                "index",
                "seed",
                "width",
                "height",
                "blob_key",
                "sha256",
                "created_at",
                "like_count",
            ],
            select(
                finished.c.id,
                new.c.indexes,
                new.c.seeds,
                new.c.widths,
                new.c.heights,
                new.c.blob_keys,
                new.c.sha256s,
                now,
                literal(0),
            ).join_from(finished, new, true()),
            include_defaults=False,
        )
        .returning(*images.c)
        .cte("inserted")
    )
    thumbs = cast(
        "Table",
        _unnest(
            ("thumb_indexes", Integer),
            ("thumb_sizes", Integer),
            ("thumb_keys", String),
            ("thumb_widths", Integer),
            ("thumb_heights", Integer),
        ),
    )
    thumbnailed = (
        insert(thumbnails)
        .from_select(
            ["image_id", "size", "blob_key", "width", "height", "created_at"],
            select(
                inserted.c.id,
                thumbs.c.thumb_sizes,
                thumbs.c.thumb_keys,
                thumbs.c.thumb_widths,
                thumbs.c.thumb_heights,
                now,
            ).join_from(inserted, thumbs, thumbs.c.thumb_indexes == inserted.c.index),
            include_defaults=False,
        )
        .cte("thumbnailed")
    )
    return returned_rows(finished, inserted, thumbnailed)
