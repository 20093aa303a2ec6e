"""The web gallery: a server's switches for it, what a generation may not show there
(private replies, NSFW prompts), and the WebP thumbnails made once per image.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _switch(name: str) -> sa.Column[bool]:
    return sa.Column(name, sa.Boolean(), nullable=False, server_default=sa.false())


def upgrade() -> None:
    with op.batch_alter_table("guilds") as batch:
        batch.add_column(_switch("web_enabled"))
        batch.add_column(_switch("web_nsfw"))
    with op.batch_alter_table("generations") as batch:
        batch.add_column(_switch("private"))
        batch.add_column(_switch("nsfw"))
    with op.batch_alter_table("images") as batch:
        batch.create_index(batch.f("ix_images_blob_key"), ["blob_key"])
    op.create_table(
        "thumbnails",
        sa.Column("image_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("blob_key", sa.String(length=64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_thumbnails_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("image_id", "size", name=op.f("pk_thumbnails")),
    )


def downgrade() -> None:
    op.drop_table("thumbnails")
    with op.batch_alter_table("images") as batch:
        batch.drop_index(batch.f("ix_images_blob_key"))
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("nsfw")
        batch.drop_column("private")
    with op.batch_alter_table("guilds") as batch:
        batch.drop_column("web_nsfw")
        batch.drop_column("web_enabled")
