"""Queue columns: the model a job needs, and a cancellation request any worker can see.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cancel_requested_at", sa.DateTime(timezone=True)))
        batch_op.add_column(sa.Column("model", sa.String(512), nullable=False, server_default=""))
        batch_op.create_index(batch_op.f("ix_generations_model"), ["model"])
    # Jobs recorded before this revision name their model only inside the recipe.
    generations = sa.table("generations", sa.column("id"), sa.column("recipe", sa.JSON))
    connection = op.get_bind()
    for generation_id, recipe in connection.execute(sa.select(generations)).all():
        model = (recipe or {}).get("model", "")
        connection.execute(
            sa.text("UPDATE generations SET model = :model WHERE id = :id"),
            {"model": model, "id": generation_id},
        )
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.alter_column("model", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_generations_model"))
        batch_op.drop_column("model")
        batch_op.drop_column("cancel_requested_at")
