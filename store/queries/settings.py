"""Store settings rows: the pinned base model."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..schema import SettingRow

__all__ = ["pin_setting"]


def pin_setting(session: Any, dialect: str, key: str, value: str) -> str:
    """Set a setting unless one is set; returns the value it holds. Concurrent first writers
    may race: the first insert wins and the rest read the winner's value to compare."""
    insert = postgres_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(SettingRow).values(key=key, value=value).on_conflict_do_nothing())
    return session.scalar(select(SettingRow.value).where(SettingRow.key == key))
