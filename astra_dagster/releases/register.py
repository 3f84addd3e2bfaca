"""Registering data releases: their sources and files, from the manifest, in bulk.

Registration reads only the manifest (no FITS); the ``spectra`` asset later reads and validates
the files of each source as a task of its own, so a bad file fails only its source.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

from astra_dagster.lineage.sources import register_sources
from astra_dagster.spectra.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    manifest_sha256,
    read_manifest,
)


@dataclass(frozen=True)
class Registration:
    release: str
    release_pk: int
    manifest_sha256: str
    #: pk of every source in the release, in manifest order.
    source_pks: list[int]
    #: Sources that are new, or whose files differ from their previous release.
    changed_pks: list[int]
    new_pks: list[int]
    already_registered: bool = False


def complete_releases(data_root: Path) -> Iterator[Path]:
    """Release folders under ``data_root`` with a manifest (half-written ones have none)."""
    if not data_root.is_dir():
        raise FileNotFoundError(f"ASTRA_DATA_ROOT {data_root} is not a folder")
    for path in sorted(data_root.iterdir()):
        if path.is_dir() and (path / MANIFEST_NAME).is_file():
            yield path


def register_release(conn: psycopg.Connection, release_dir: Path) -> Registration:
    """Record a release, its sources (new ones get the next pks, in manifest order) and files.

    A release already registered with the same manifest is returned as is. Re-registering a
    release name whose manifest changed is refused: releases are immutable, publish a new name.
    """
    release_dir = Path(release_dir).resolve()
    manifest = read_manifest(release_dir)
    digest = manifest_sha256(release_dir)
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext('astra.data_release'))")
        existing = conn.execute(
            "select pk, manifest_sha256 from astra.data_release where name = %s", (manifest.release,)
        ).fetchone()
        if existing and existing[1] != digest:
            raise ManifestError(
                f"{release_dir}: release {manifest.release!r} is already registered with another "
                "manifest; releases are immutable, publish the changes under a new release name"
            )
        ids = [s.source_id for s in manifest.sources]
        known = dict(conn.execute(
            "select source_id, pk from astra.source where source_id = any(%s)", (ids,)).fetchall())
        pks = register_sources(conn, ids)
        if existing:
            return Registration(manifest.release, existing[0], digest, [pks[i] for i in ids], [], [],
                                already_registered=True)
        release_pk = conn.execute(
            "insert into astra.data_release (name, path, manifest_sha256, n_sources, n_files, synthetic) "
            "values (%s, %s, %s, %s, %s, %s) returning pk",
            (manifest.release, str(release_dir), digest, len(manifest.sources), manifest.n_files,
             manifest.synthetic),
        ).fetchone()[0]
        _update_coordinates(conn, manifest, pks)
        previous = dict(conn.execute(
            """
            select distinct on (rs.source_pk) rs.source_pk, rs.fingerprint
            from astra.release_source rs
            where rs.source_pk = any(%s)
            order by rs.source_pk, rs.release_pk desc
            """,
            ([pks[i] for i in ids],),
        ).fetchall())
        with conn.cursor().copy(
            "copy astra.release_source (release_pk, source_pk, fingerprint) from stdin"
        ) as copy:
            for src in manifest.sources:
                copy.write_row((release_pk, pks[src.source_id], src.fingerprint))
        with conn.cursor().copy(
            "copy astra.release_file (release_pk, source_pk, path, file_format, sha256, size) from stdin"
        ) as copy:
            for src in manifest.sources:
                for f in src.files:
                    copy.write_row((release_pk, pks[src.source_id], f.path, f.format, f.sha256, f.size))
    changed = [pks[s.source_id] for s in manifest.sources
               if previous.get(pks[s.source_id]) != s.fingerprint]
    new = [pks[i] for i in ids if i not in known]
    return Registration(manifest.release, release_pk, digest, [pks[i] for i in ids], changed, new)


def _update_coordinates(conn: psycopg.Connection, manifest: Manifest, pks: dict[str, int]) -> None:
    rows = [(pks[s.source_id], s.ra, s.dec) for s in manifest.sources if s.ra is not None]
    if rows:
        conn.execute(
            "update astra.source s set ra = u.ra, dec = u.dec "
            "from unnest(%s::bigint[], %s::float8[], %s::float8[]) as u(pk, ra, dec) "
            "where s.pk = u.pk and s.ra is null",
            ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]),
        )


@dataclass(frozen=True)
class SourceFiles:
    source_pk: int
    source_id: str
    release: str
    release_pk: int
    release_path: Path
    fingerprint: str
    #: (path relative to the release, format, sha256, size)
    files: list[tuple[str, str, str, int]]


def latest_files(conn: psycopg.Connection, source_pks: Sequence[int]) -> dict[int, SourceFiles]:
    """Each source's files in the newest release that has it (two queries for any number)."""
    if not source_pks:
        return {}
    rows = conn.execute(
        """
        select distinct on (rs.source_pk) rs.source_pk, s.source_id, r.name, r.pk, r.path, rs.fingerprint
        from astra.release_source rs
        join astra.data_release r on r.pk = rs.release_pk
        join astra.source s on s.pk = rs.source_pk
        where rs.source_pk = any(%s)
        order by rs.source_pk, rs.release_pk desc
        """,
        (list(source_pks),),
    ).fetchall()
    found = {r[0]: SourceFiles(r[0], r[1], r[2], r[3], Path(r[4]), r[5], []) for r in rows}
    files = conn.execute(
        """
        select f.source_pk, f.path, f.file_format, f.sha256, f.size
        from astra.release_file f
        join unnest(%s::bigint[], %s::bigint[]) as u(source_pk, release_pk)
          on f.source_pk = u.source_pk and f.release_pk = u.release_pk
        order by f.source_pk, f.path
        """,
        ([s.source_pk for s in found.values()], [s.release_pk for s in found.values()]),
    ).fetchall()
    for source_pk, path, fmt, sha, size in files:
        found[source_pk].files.append((path, fmt, sha, size))
    return found


def synthetic_releases(conn: psycopg.Connection, release_pks: Sequence[int]) -> dict[int, bool]:
    """Whether each release is synthetic (:attr:`Manifest.synthetic`), from its registration;
    releases registered before that was recorded have their manifest read once and recorded."""
    if not release_pks:
        return {}
    rows = conn.execute("select pk, path, synthetic from astra.data_release where pk = any(%s)",
                        (list(release_pks),)).fetchall()
    out = {pk: synthetic for pk, _, synthetic in rows if synthetic is not None}
    for pk, path, synthetic in rows:
        if synthetic is None:
            out[pk] = read_manifest(Path(path)).synthetic
            conn.execute("update astra.data_release set synthetic = %s where pk = %s", (out[pk], pk))
    return out
