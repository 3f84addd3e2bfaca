"""Release manifests and their registration (no FITS reading involved)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from astra_dagster.db.connection import connect
from astra_dagster.releases.register import complete_releases, latest_files, register_release
from astra_dagster.spectra.manifest import (
    ManifestError,
    ReleaseSource,
    file_entry,
    read_manifest,
    write_manifest,
)


def fake_release(root: Path, name: str, sources: dict[str, list[str]]) -> Path:
    """A release whose 'files' are small text files (registration never opens them)."""
    release = root / name
    entries = []
    for source_id, visits in sources.items():
        files = []
        for visit in visits:
            path = release / "apVisit" / f"apVisit-{source_id}-{visit}.fits"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{source_id} {visit}")
            files.append(file_entry(release, path, "apVisit"))
        entries.append(ReleaseSource(source_id, tuple(files), ra=1.0, dec=2.0))
    write_manifest(release, name, entries, seed=0)
    return release


def test_manifest_round_trip_and_fingerprints(tmp_path: Path) -> None:
    release = fake_release(tmp_path, "r1", {"2M01": ["55000"], "2M02": ["55000", "55001"]})
    manifest = read_manifest(release)
    assert manifest.release == "r1" and [s.source_id for s in manifest.sources] == ["2M01", "2M02"]
    assert manifest.n_files == 3
    again = fake_release(tmp_path / "other", "r1", {"2M01": ["55000"], "2M02": ["55000", "55001"]})
    assert read_manifest(again).sources[1].fingerprint == manifest.sources[1].fingerprint
    changed = fake_release(tmp_path / "third", "r1", {"2M02": ["55000", "55001", "55002"]})
    assert read_manifest(changed).sources[0].fingerprint != manifest.sources[1].fingerprint


@pytest.mark.parametrize("payload, message", [
    (None, "no manifest.json"),
    ("{not json", "not valid JSON"),
    ({"format": "other"}, "format must be"),
    ({"format": "astra-release/1", "release": "x", "sources": [{"files": []}]}, "no source_id"),
    ({"format": "astra-release/1", "release": "x",
      "sources": [{"source_id": "a", "files": [{"path": "/abs.fits", "format": "apStar", "sha256": "x", "size": 1}]}]},
     "must be relative"),
    ({"format": "astra-release/1", "release": "x",
      "sources": [{"source_id": "a", "files": [{"path": "a.fits", "format": "apStar"}]}]},
     "lacks path, sha256 or size"),
])
def test_bad_manifests_name_the_problem(tmp_path: Path, payload: object, message: str) -> None:
    if payload is not None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_registration_orders_sources_and_detects_changes(clean_db: str, tmp_path: Path) -> None:
    r1 = fake_release(tmp_path, "r1", {"2M01": ["1"], "2M02": ["1"], "2M03": ["1"]})
    (tmp_path / "half-written").mkdir()  # no manifest: never read
    assert [p.name for p in complete_releases(tmp_path)] == ["r1"]
    with connect() as conn:
        first = register_release(conn, r1)
        assert first.source_pks == [1, 2, 3] and first.changed_pks == [1, 2, 3] and first.new_pks == [1, 2, 3]
        assert register_release(conn, r1).already_registered
        # r2: 2M02 gained a visit, 2M04 is new, 2M01 and 2M03 are unchanged.
        r2 = fake_release(tmp_path, "r2", {"2M01": ["1"], "2M02": ["1", "2"], "2M03": ["1"], "2M04": ["1"]})
        second = register_release(conn, r2)
        assert second.changed_pks == [2, 4] and second.new_pks == [4]
        files = latest_files(conn, [1, 2, 4])
        assert files[1].release == "r2" and len(files[2].files) == 2 and files[4].files[0][1] == "apVisit"
        assert conn.execute("select count(*) from astra.release_file").fetchone()[0] == 3 + 5
        # A changed manifest under an old name is refused.
        fake_release(tmp_path, "r1", {"2M01": ["9"]})
        with pytest.raises(ManifestError, match="immutable"):
            register_release(conn, r1)
