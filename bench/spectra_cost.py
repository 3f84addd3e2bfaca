"""What the ``spectra`` asset's per-source work costs against the floor of reading and hashing:

    python bench/spectra_cost.py --sources 40 --repeat 3

For each source of a synthetic release (written to a temporary folder): the time of
``spectrum_rows`` (check, hash, read and describe the source's files: what the asset does per
source, without the database) and, in the same process, the time to read the same files' bytes
and ``hashlib.sha256`` them. The ratio is the overhead of parsing and checking over the I/O the
asset cannot avoid (target <= ~2x); against astropy's floor (read, hash, open the bytes and load
every HDU), which ``spectrum_rows`` undercuts by reading apStar/apVisit files with
``spectra/plain_fits.py`` (astropy only for what that reader leaves to it). Each measurement is
the best of ``--repeat`` passes (the files are in the page cache after the first), in CPU seconds.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from astra_dagster.spectra.manifest import read_manifest
from astra_dagster.spectra.registration import spectrum_rows
from astra_dagster.spectra.release import generate_release


def read_and_hash(release: Path, files: list[tuple[str, str, str, int]]) -> int:
    total = 0
    for relative, _, _, _ in files:
        data = (release / relative).read_bytes()
        hashlib.sha256(data).hexdigest()
        total += len(data)
    return total


def parse_only(release: Path, files: list[tuple[str, str, str, int]]) -> None:
    """astropy's own floor: read and hash the bytes, open them and load every HDU's data."""
    from astropy.io import fits

    for relative, _, _, _ in files:
        data = (release / relative).read_bytes()
        hashlib.sha256(data).hexdigest()
        with fits.open(io.BytesIO(data), memmap=False) as hdul:
            for hdu in hdul:
                _ = hdu.data


def best(fn: Callable[[], object], repeat: int) -> float:
    # CPU time of this process (user + system, the reads included): the other processes of a
    # loaded machine inflate wall-clock time, far less this
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def measure(release: Path, repeat: int) -> dict[str, float]:
    manifest = read_manifest(release)
    sources = [(s.source_id, [(f.path, f.format, f.sha256, f.size) for f in s.files]) for s in manifest.sources]
    n_bytes = sum(read_and_hash(release, files) for _, files in sources)  # also warms the page cache
    n_rows = sum(len(spectrum_rows(sid, release, files)) for sid, files in sources)
    # interleaved per pass, so that load on the machine falls on both alike
    floor = best(lambda: [read_and_hash(release, files) for _, files in sources], repeat)
    work = best(lambda: [spectrum_rows(sid, release, files) for sid, files in sources], repeat)
    astropy = best(lambda: [parse_only(release, files) for _, files in sources], repeat)
    n = len(sources)
    return {"sources": n, "files": sum(len(f) for _, f in sources), "spectra": n_rows,
            "mb": round(n_bytes / 1e6, 1), "read_hash_ms_per_source": round(1e3 * floor / n, 2),
            "astropy_open_ms_per_source": round(1e3 * astropy / n, 2),
            "spectrum_rows_ms_per_source": round(1e3 * work / n, 2), "ratio": round(work / floor, 2),
            "ratio_to_astropy_open": round(work / astropy, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spectra-cost-") as tmp:
        release = generate_release(tmp, "bench-spectra", args.sources, args.seed, progress=False)
        figures = measure(release, args.repeat)
    print(f"{figures['sources']} sources, {figures['files']} files, {figures['spectra']} spectra, "
          f"{figures['mb']} MB: spectrum_rows {figures['spectrum_rows_ms_per_source']} ms/source, "
          f"read + sha256 {figures['read_hash_ms_per_source']} ms/source: ratio {figures['ratio']}x; "
          f"read + sha256 + astropy open of every HDU {figures['astropy_open_ms_per_source']} ms/source: "
          f"ratio {figures['ratio_to_astropy_open']}x")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
