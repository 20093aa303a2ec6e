"""The rank of each stored style's LoRA, so a worker sizes its style slots at start
without reading every LoRA blob.

Rows of styles added before stay NULL here: the first worker that sizes its slots reads
their blobs' headers once and fills them in (storage/slot_rank.py), as a migration has
no blob store to read them from.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("styles") as batch:
        batch.add_column(sa.Column("lora_rank", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("styles") as batch:
        batch.drop_column("lora_rank")
