"""Initial schema: users, guilds, generations, images, styles, likes.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "guilds",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("banned_words", sa.JSON(), nullable=False),
        sa.Column("max_running_per_user", sa.Integer(), nullable=True),
        sa.Column("max_queued_per_user", sa.Integer(), nullable=True),
        sa.Column(
            "nsfw_policy",
            sa.Enum(
                "block",
                "age_restricted_channels",
                "allow",
                name="nsfw_policy",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_guilds")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
    )
    op.create_table(
        "generations",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "imagine",
                "variation",
                "upscale",
                "reroll",
                "remix",
                name="generation_kind",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("parent_image_id", ID, nullable=True),
        sa.Column("requester_id", sa.BigInteger(), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.Column("channel_id", sa.BigInteger(), nullable=True),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column("interaction_token", sa.Text(), nullable=True),
        sa.Column("interaction_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recipe", sa.JSON(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "running",
                "succeeded",
                "failed",
                "cancelled",
                name="generation_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("worker_name", sa.String(length=128), nullable=True),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["requester_id"], ["users.id"], name=op.f("fk_generations_requester_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generations")),
    )
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_generations_requester_queued", ["requester_id", "queued_at"], unique=False
        )
        batch_op.create_index(
            "ix_generations_status_priority", ["status", "priority", "queued_at"], unique=False
        )

    op.create_table(
        "generation_styles",
        sa.Column("generation_id", ID, nullable=False),
        sa.Column("style_name", sa.String(length=64), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["generation_id"],
            ["generations.id"],
            name=op.f("fk_generation_styles_generation_id_generations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("generation_id", "style_name", name=op.f("pk_generation_styles")),
    )
    with op.batch_alter_table("generation_styles", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_generation_styles_style_name"), ["style_name"], unique=False
        )

    op.create_table(
        "images",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("generation_id", ID, nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("blob_key", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["generation_id"],
            ["generations.id"],
            name=op.f("fk_images_generation_id_generations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("generation_id", "index", name=op.f("uq_images_generation_id_index")),
    )
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_images_created_at"), ["created_at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_images_generation_id"), ["generation_id"], unique=False
        )

    # generations and images refer to each other: the parent link comes last.
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.create_foreign_key(
            op.f("fk_generations_parent_image_id_images"),
            "images",
            ["parent_image_id"],
            ["id"],
            ondelete="SET NULL",
        )

    op.create_table(
        "likes",
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("image_id", ID, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_likes_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_likes_user_id_users")),
        sa.PrimaryKeyConstraint("user_id", "image_id", name=op.f("pk_likes")),
    )
    with op.batch_alter_table("likes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_likes_image_id"), ["image_id"], unique=False)

    op.create_table(
        "styles",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("lora_blob_key", sa.String(length=64), nullable=True),
        sa.Column("lora_sha256", sa.String(length=64), nullable=True),
        sa.Column("default_weight", sa.Float(), nullable=False),
        sa.Column("trigger_words", sa.JSON(), nullable=False),
        sa.Column("prompt_template", sa.Text(), nullable=False),
        sa.Column("negative_template", sa.Text(), nullable=False),
        sa.Column("base_model_family", sa.String(length=16), nullable=False),
        sa.Column("preview_image_id", ID, nullable=True),
        sa.Column("created_by", sa.BigInteger(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["preview_image_id"],
            ["images.id"],
            name=op.f("fk_styles_preview_image_id_images"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_styles")),
        sa.UniqueConstraint("guild_id", "name", name=op.f("uq_styles_guild_id_name")),
    )


def downgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("fk_generations_parent_image_id_images"), type_="foreignkey")
    op.drop_table("styles")
    with op.batch_alter_table("likes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_likes_image_id"))

    op.drop_table("likes")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_images_generation_id"))
        batch_op.drop_index(batch_op.f("ix_images_created_at"))

    op.drop_table("images")
    with op.batch_alter_table("generation_styles", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_generation_styles_style_name"))

    op.drop_table("generation_styles")
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index("ix_generations_status_priority")
        batch_op.drop_index("ix_generations_requester_queued")

    op.drop_table("generations")
    op.drop_table("users")
    op.drop_table("guilds")
