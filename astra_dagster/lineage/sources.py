"""Sources and the partition keys that name blocks of them.

A key names a block of consecutive ``astra.source.pk``: with block size B, block i holds pks
``i*B+1 .. (i+1)*B`` and its key is ``"<lo>-<hi>"`` (zero-padded so keys sort as numbers); with
B = 1 the key is the single pk. Blocks are fixed by pk, so new sources never change an existing
block's meaning; a partial last block simply fills up later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psycopg

_WIDTH = 8


def block_key(lo: int, hi: int) -> str:
    return f"{lo:0{_WIDTH}d}" if lo == hi else f"{lo:0{_WIDTH}d}-{hi:0{_WIDTH}d}"


def block_bounds(key: str) -> tuple[int, int]:
    """(lo, hi) inclusive source pks of a partition key; ValueError for a malformed key."""
    lo_text, sep, hi_text = key.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
    except ValueError:
        raise ValueError(f"partition key {key!r} is not a source block like '00000001-00000100'") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"partition key {key!r} names an empty or negative range")
    return lo, hi


def block_of(pk: int, size: int) -> str:
    """The key of the block that holds source pk ``pk``."""
    index = (pk - 1) // size
    return block_key(index * size + 1, (index + 1) * size)


def blocks_for(pks: Iterable[int], size: int) -> list[str]:
    """Keys of every block holding any of ``pks``, in source order."""
    return sorted({block_of(pk, size) for pk in pks}, key=lambda k: block_bounds(k)[0])


def ranges_of(keys: Sequence[str]) -> list[tuple[int, int]]:
    return sorted(block_bounds(k) for k in keys)


@dataclass(frozen=True)
class SourceRow:
    pk: int
    source_id: str


def sources_in_blocks(conn: psycopg.Connection, keys: Sequence[str]) -> list[SourceRow]:
    """Sources whose pk falls in any of the blocks, ordered by pk (one query)."""
    if not keys:
        return []
    bounds = ranges_of(keys)
    rows = conn.execute(
        """
        select s.pk, s.source_id
        from astra.source s
        join unnest(%s::bigint[], %s::bigint[]) as b(lo, hi) on s.pk between b.lo and b.hi
        order by s.pk
        """,
        ([lo for lo, _ in bounds], [hi for _, hi in bounds]),
    ).fetchall()
    return [SourceRow(*r) for r in rows]


def register_sources(conn: psycopg.Connection, source_ids: Sequence[str]) -> dict[str, int]:
    """Get-or-create sources; new ones get pks in the order given. Returns source_id → pk."""
    if not source_ids:
        return {}
    ordered = list(dict.fromkeys(source_ids))
    # Only missing sources reach the insert: ON CONFLICT alone would burn a sequence value per
    # existing source, leaving gaps in the pks that blocks are made of.
    conn.execute(
        """
        insert into astra.source (source_id)
        select u.source_id from unnest(%s::text[]) with ordinality as u(source_id, n)
        where not exists (select 1 from astra.source s where s.source_id = u.source_id)
        order by u.n
        on conflict (source_id) do nothing
        """,
        (ordered,),
    )
    rows = conn.execute(
        "select source_id, pk from astra.source where source_id = any(%s)", (ordered,)
    ).fetchall()
    return dict(rows)
