"""Counting what a process sends its database: for the benches, and for the tests that pin
how many round trips a job costs the worker."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine


class RoundTrips:
    """Round trips through one SQLAlchemy engine while entered: each statement, and the
    BEGIN and COMMIT or ROLLBACK of a transaction (none are sent in autocommit)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine.sync_engine
        self.count = 0
        self.statements: list[str] = []

    def _statement(self, _c: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.count += 1
        self.statements.append(" ".join(statement.split())[:80])

    def _transaction(self, connection: Any, *_: Any) -> None:
        if connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            self.count += 1
            self.statements.append("BEGIN/COMMIT/ROLLBACK")

    def _listeners(self) -> list[tuple[str, Any]]:
        return [
            ("before_cursor_execute", self._statement),
            ("begin", self._transaction),
            ("commit", self._transaction),
            ("rollback", self._transaction),
        ]

    def __enter__(self) -> RoundTrips:
        for name, listener in self._listeners():
            event.listen(self.engine, name, listener)
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        for name, listener in self._listeners():
            event.remove(self.engine, name, listener)
