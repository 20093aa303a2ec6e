"""Zoom Out and Pan: generations of a new kind, ``outpaint``.

The kind is stored as a string with a CHECK of the allowed values; this widens it.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ("imagine", "variation", "upscale", "reroll", "remix")
AFTER = (*BEFORE, "outpaint")


def _kind(values: Sequence[str]) -> sa.Enum:
    return sa.Enum(
        *values, name="generation_kind", native_enum=False, create_constraint=True, length=32
    )


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.alter_column("kind", existing_type=_kind(BEFORE), type_=_kind(AFTER))


def downgrade() -> None:
    # Kept, as the nearest older kind: a downgrade loses no image.
    op.execute("UPDATE generations SET kind = 'variation' WHERE kind = 'outpaint'")
    with op.batch_alter_table("generations") as batch:
        batch.alter_column("kind", existing_type=_kind(AFTER), type_=_kind(BEFORE))
