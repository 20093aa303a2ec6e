"""SQLAlchemy 2 models: users, guilds, generations, images, styles, likes.

Datetimes are timezone-aware UTC (``*_at``). Discord ids are 64-bit
snowflakes. Constraint names come from one naming convention so that
migrations are stable on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from storage.recipe import Recipe

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")
MAX_ID = 2**63 - 1  # the largest 64-bit key: ids from text anyone can craft are checked against it


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware datetimes in UTC and always hands back aware UTC datetimes.

    SQLite has no time zones; without this, values read back would be naive.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are refused; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class RecipeType(TypeDecorator[Recipe]):
    """A :class:`Recipe` stored as JSON."""

    impl = JSON()
    cache_ok = True

    def process_bind_param(self, value: Recipe | None, dialect: Dialect) -> Any:
        return None if value is None else value.model_dump(mode="json")

    def process_result_value(self, value: Any, dialect: Dialect) -> Recipe | None:
        return None if value is None else Recipe.as_made(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class GenerationKind(enum.StrEnum):
    IMAGINE = "imagine"
    VARIATION = "variation"
    UPSCALE = "upscale"
    REROLL = "reroll"
    REMIX = "remix"
    OUTPAINT = "outpaint"  # Zoom Out and Pan


class GenerationStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {GenerationStatus.SUCCEEDED, GenerationStatus.FAILED, GenerationStatus.CANCELLED}
)


class NsfwPolicy(enum.StrEnum):
    BLOCK = "block"
    AGE_RESTRICTED_CHANNELS = "age_restricted_channels"
    ALLOW = "allow"


def _enum(cls: type[enum.StrEnum], name: str) -> Enum:
    # Stored as plain strings with a CHECK, so adding a member is a small migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [m.value for m in members],
    )


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Guild(Base):
    __tablename__ = "guilds"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    banned_words: Mapped[list[str]] = mapped_column(JSON, default=list)
    max_running_per_user: Mapped[int | None] = mapped_column(Integer)
    max_queued_per_user: Mapped[int | None] = mapped_column(Integer)
    nsfw_policy: Mapped[NsfwPolicy] = mapped_column(
        _enum(NsfwPolicy, "nsfw_policy"), default=NsfwPolicy.AGE_RESTRICTED_CHANNELS
    )
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    updated_by: Mapped[int | None] = mapped_column(BigInteger)
    # style name → ids of the roles that may use it; a style not listed is open to all.
    style_roles: Mapped[dict[str, list[int]] | None] = mapped_column(JSON)
    # The web gallery shows the server only once a manager turns it on; NSFW prompts
    # need a second switch.
    web_enabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    web_nsfw: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class PolicyChange(Base):
    """Who changed a server's policy, and what they changed, for the moderators' record."""

    __tablename__ = "policy_changes"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    guild_id: Mapped[int] = mapped_column(BigInteger, index=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    change: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Generation(Base):
    """One job: a grid, a variation, an upscale, a reroll or a remix."""

    __tablename__ = "generations"
    __table_args__ = (
        Index("ix_generations_status_priority", "status", "priority", "queued_at"),
        Index("ix_generations_requester_queued", "requester_id", "queued_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    kind: Mapped[GenerationKind] = mapped_column(_enum(GenerationKind, "generation_kind"))
    parent_image_id: Mapped[int | None] = mapped_column(
        ForeignKey("images.id", ondelete="SET NULL", use_alter=True), index=True
    )
    requester_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    # Indexed: galleries list a server's images, and an image page finds what was made from it.
    guild_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    channel_id: Mapped[int | None] = mapped_column(BigInteger)
    message_id: Mapped[int | None] = mapped_column(BigInteger)
    interaction_token: Mapped[str | None] = mapped_column(Text)
    interaction_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    recipe: Mapped[Recipe] = mapped_column(RecipeType)
    # The base model the job needs: workers only claim jobs for the model they hold.
    model: Mapped[str] = mapped_column(String(512), default="", index=True)
    status: Mapped[GenerationStatus] = mapped_column(
        _enum(GenerationStatus, "generation_status"), default=GenerationStatus.QUEUED
    )
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    worker_name: Mapped[str | None] = mapped_column(String(128))
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The procrastinate job carrying this row in the scaled mode (PostgreSQL).
    job_id: Mapped[int | None] = mapped_column(BigInteger)
    # The images composed into one, stored once by the worker; none for a single image.
    grid_blob_key: Mapped[str | None] = mapped_column(String(64))
    # Answered only to its requester (an ephemeral reply): never on the web.
    private: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The prompt tripped the NSFW word check: on the web only where the server allows it.
    nsfw: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    images: Mapped[list[Image]] = relationship(
        back_populates="generation",
        order_by="Image.index",
        foreign_keys="Image.generation_id",
        cascade="all, delete-orphan",
    )
    styles: Mapped[list[GenerationStyle]] = relationship(
        back_populates="generation", cascade="all, delete-orphan"
    )


class GenerationStyle(Base):
    """Which styles a generation used: lets galleries filter by style in SQL."""

    __tablename__ = "generation_styles"

    generation_id: Mapped[int] = mapped_column(
        ForeignKey("generations.id", ondelete="CASCADE"), primary_key=True
    )
    style_name: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    weight: Mapped[float] = mapped_column(Float)

    generation: Mapped[Generation] = relationship(back_populates="styles")


class Image(Base):
    """One picture a generation produced."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("generation_id", "index"),
        # The "top" order of the galleries, most liked first.
        Index("ix_images_top", "like_count", "created_at", "id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    generation_id: Mapped[int] = mapped_column(
        ForeignKey("generations.id", ondelete="CASCADE"), index=True
    )
    index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    # Indexed: the web gallery finds the image behind a /media/ URL by it.
    blob_key: Mapped[str] = mapped_column(String(64), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # Deleted from Discord by its author or a moderator: out of the gallery, kept here.
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    removed_by: Mapped[int | None] = mapped_column(BigInteger)
    # The rows of ``likes`` for this image, kept by storage/gallery.py in the same transaction
    # as each like, so that ranking by likes does not count them on every page.
    like_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    generation: Mapped[Generation] = relationship(
        back_populates="images", foreign_keys=[generation_id]
    )


class Thumbnail(Base):
    """A smaller WebP of an image, made once and kept in the blob store for the web gallery."""

    __tablename__ = "thumbnails"

    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    size: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_key: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Style(Base):
    """A named LoRA recipe. ``guild_id`` 0 marks a global style."""

    __tablename__ = "styles"
    __table_args__ = (UniqueConstraint("guild_id", "name"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    guild_id: Mapped[int] = mapped_column(BigInteger, default=0)
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    lora_blob_key: Mapped[str | None] = mapped_column(String(64))
    lora_sha256: Mapped[str | None] = mapped_column(String(64))
    # The LoRA's largest layer rank, so a worker sizes its style slots without reading
    # every blob; None on rows added before it was recorded, until a worker fills it in.
    lora_rank: Mapped[int | None] = mapped_column(Integer)
    default_weight: Mapped[float] = mapped_column(Float, default=1.0)
    trigger_words: Mapped[list[str]] = mapped_column(JSON, default=list)
    prompt_template: Mapped[str] = mapped_column(Text, default="{prompt}")
    negative_template: Mapped[str] = mapped_column(Text, default="{negative}")
    base_model_family: Mapped[str] = mapped_column(String(16))
    # The fixed-seed generation made when the style was added from Discord.
    preview_generation_id: Mapped[int | None] = mapped_column(
        ForeignKey("generations.id", ondelete="SET NULL")
    )
    preview_image_id: Mapped[int | None] = mapped_column(
        ForeignKey("images.id", ondelete="SET NULL")
    )
    created_by: Mapped[int | None] = mapped_column(BigInteger)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Like(Base):
    __tablename__ = "likes"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Blob(Base):
    """Blob bytes kept in the database, for workers on machines without a shared folder."""

    __tablename__ = "blobs"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Worker(Base):
    """A worker process's heartbeat: jobs of a worker gone quiet can be taken over."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(512))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
