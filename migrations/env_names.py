"""What the migration history manages, shared by ``env.py`` and the tests."""

from __future__ import annotations


def include_name(name: str | None, type_: str, _parents: object) -> bool:
    """procrastinate's tables belong to procrastinate (installed by revision 0007)."""
    return not (type_ == "table" and name is not None and name.startswith("procrastinate_"))
