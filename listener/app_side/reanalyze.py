"""Which rows ``listener reanalyze`` starts over: chosen by id, owner, a predicate, or all.

The rows are read from the app's table in a READ ONLY transaction, so a ``--where``
predicate (the operator's own SQL, run with the operator's rights and parsed by Postgres)
cannot write anything, whatever it contains; the restart itself is
``listener.reanalyze`` through the job store.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from listener.db.queries import Attachment


class SelectionError(ValueError):
    """The selection is not one of --id, --owner, --where, --all, or cannot be used."""


async def select_rows(
    pool: asyncpg.Pool,
    attachment: Attachment,
    *,
    ids: Sequence[str] = (),
    owner: str | None = None,
    where: str | None = None,
    everything: bool = False,
) -> list[str]:
    """Ids (as text) of the rows of ``attachment``'s table that the selection names.

    Exactly one of ``ids``, ``owner``, ``where`` and ``everything`` must be given. ``ids``
    that name no row are left out.

    Raises:
        SelectionError: none or several selections, or ``owner`` on a table attached without
            an owner column.
        asyncpg.PostgresError: the predicate is not valid SQL, or tried to write
            (``ReadOnlySQLTransactionError``).
    """
    chosen = [bool(ids), owner is not None, where is not None, everything]
    if sum(chosen) != 1:
        raise SelectionError("give exactly one of --id, --owner, --where, --all")
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        id_col = await conn.fetchval("SELECT quote_ident($1)", attachment.id_column)
        base = f"SELECT s.{id_col}::text FROM {attachment.source_table} AS s"
        args: list[object] = []
        if ids:
            query, args = f"{base} WHERE s.{id_col}::text = ANY($1::text[])", [list(ids)]
        elif owner is not None:
            if attachment.owner_column is None:
                raise SelectionError(
                    f"{attachment.source_table} was attached without --owner-column"
                )
            owner_col = await conn.fetchval("SELECT quote_ident($1)", attachment.owner_column)
            query, args = f"{base} WHERE s.{owner_col}::text = $1", [owner]
        elif where is not None:
            query = f"{base} WHERE ({where})"
        else:
            query = base
        return [r[0] for r in await conn.fetch(f"{query} ORDER BY 1", *args)]
