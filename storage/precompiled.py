"""Statements compiled once and sent as they are: for the worker's hottest statements.

Executing a large statement through SQLAlchemy costs more CPU each time than its round
trip: the statement's cache key is walked element by element, its parameters are
processed, and the ORM loads the rows into objects. :class:`Precompiled` compiles a Core
statement once for a dialect and sends its SQL text with
:meth:`~sqlalchemy.ext.asyncio.AsyncConnection.exec_driver_sql` (so errors, disconnects
and the engine's events are as for any statement), converting parameters and results
as SQLAlchemy does; :func:`detached` makes ORM objects of the values, detached as a
closed session leaves what it loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sqlalchemy import Select, UpdateBase, inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import make_transient_to_detached
from sqlalchemy.orm.attributes import instance_state, set_committed_value

T = TypeVar("T")


class Precompiled:
    """``statement`` compiled for ``dialect`` once, run with :meth:`fetch`.

    Its selected columns must be labelled (the keys of :meth:`fetch`'s rows); binds with
    a value in the statement (an ``IN`` list, a literal) keep it."""

    def __init__(self, statement: Select[Any] | UpdateBase, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        unset = {name: None for name, bind in compiled.binds.items() if bind.required}
        expanded = compiled.construct_expanded_state(unset)
        assert expanded.positiontup is not None, "a dialect with positional parameters"
        self.sql = expanded.statement
        self.fixed = {name: expanded.parameters[name] for name in expanded.positiontup}
        processors: dict[str, Any] = {**compiled._bind_processors, **expanded.processors}
        self.parameters = [
            (name, processors.get(name), name in unset) for name in expanded.positiontup
        ]
        self.types = [(str(column.key), column.type) for column in statement.exported_columns]
        self.dialect = dialect
        self.columns: list[tuple[str, Callable[[Any], Any] | None]] | None = None

    def arguments(self, parameters: Mapping[str, Any]) -> tuple[Any, ...]:
        """The driver's positional arguments for these bound values."""
        values = []
        for name, process, given in self.parameters:
            value = parameters[name] if given else self.fixed[name]
            values.append(value if process is None else process(value))
        return tuple(values)

    async def fetch(
        self, connection: AsyncConnection, parameters: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """Run it on ``connection``: its rows, as SQLAlchemy would have converted them."""
        result = await connection.exec_driver_sql(self.sql, self.arguments(parameters))
        if self.columns is None:  # some processors depend on the driver's type of a column
            self.columns = [
                (key, kind.dialect_impl(self.dialect).result_processor(self.dialect, described[1]))
                for (key, kind), described in zip(
                    self.types, result.context.cursor.description, strict=True
                )
            ]
        return [
            {
                key: value if process is None else process(value)
                for (key, process), value in zip(self.columns, row, strict=True)
            }
            for row in result.all()
        ]

    async def execute_many(
        self, connection: AsyncConnection, parameters: list[Mapping[str, Any]]
    ) -> None:
        """Run it once for each of ``parameters`` (the driver's ``executemany``)."""
        await connection.exec_driver_sql(self.sql, [self.arguments(each) for each in parameters])


def detached(cls: type[T], values: Mapping[str, Any], **related: object) -> T:
    """An instance of the mapped ``cls`` with these column ``values`` and ``related``
    objects, as a query loads it (no history, nothing pending) and then detached."""
    mapper: Any = inspect(cls)
    instance = mapper.class_manager.new_instance()
    # Where a query's loading puts column values; relationships get their collections.
    instance_state(instance).dict.update(
        {attribute.key: values[attribute.key] for attribute in mapper.column_attrs}
    )
    for key, value in related.items():
        set_committed_value(instance, key, value)
    make_transient_to_detached(instance)
    return instance
