"""What the query functions run on: a read connection or a write session."""

from __future__ import annotations

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

__all__ = ["Reader"]

Reader = Session | Connection
