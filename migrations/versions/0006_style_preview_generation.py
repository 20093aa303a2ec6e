"""Styles added from Discord keep the generation that made their preview.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("styles") as batch:
        batch.add_column(
            sa.Column(
                "preview_generation_id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=True,
            )
        )
        batch.create_foreign_key(
            batch.f("fk_styles_preview_generation_id_generations"),
            "generations",
            ["preview_generation_id"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    with op.batch_alter_table("styles") as batch:
        batch.drop_constraint(
            batch.f("fk_styles_preview_generation_id_generations"), type_="foreignkey"
        )
        batch.drop_column("preview_generation_id")
