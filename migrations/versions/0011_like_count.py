"""A stored like count on each image, so the galleries rank by likes without counting them;
and the indexes behind a server's gallery and an image's lineage.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("like_count", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE images SET like_count = "
        "(SELECT count(*) FROM likes WHERE likes.image_id = images.id)"
    )
    with op.batch_alter_table("images") as batch:
        batch.create_index("ix_images_top", ["like_count", "created_at", "id"])
    with op.batch_alter_table("generations") as batch:
        batch.create_index(batch.f("ix_generations_guild_id"), ["guild_id"])
        batch.create_index(batch.f("ix_generations_parent_image_id"), ["parent_image_id"])


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_index(batch.f("ix_generations_parent_image_id"))
        batch.drop_index(batch.f("ix_generations_guild_id"))
    with op.batch_alter_table("images") as batch:
        batch.drop_index("ix_images_top")
        batch.drop_column("like_count")
