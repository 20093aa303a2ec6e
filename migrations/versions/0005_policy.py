"""Server policy: which roles may use which style, and a record of policy changes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("guilds") as batch:
        batch.add_column(sa.Column("style_roles", sa.JSON(), nullable=True))
    op.create_table(
        "policy_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("change", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_changes")),
    )
    op.create_index(
        op.f("ix_policy_changes_guild_id"), "policy_changes", ["guild_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_policy_changes_guild_id"), table_name="policy_changes")
    op.drop_table("policy_changes")
    with op.batch_alter_table("guilds") as batch:
        batch.drop_column("style_roles")
