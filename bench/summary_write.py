"""How fast is a summary file of a large release written, next to astropy's own write of it?

    python bench/summary_write.py --sources 10000 [--method thecannon] [--stacks 2]

Builds, under a throw-away ASTRA_HOME, a release of N sources with their spectra tasks
(``--stacks`` apStar stacks and 2 apVisits each) and one succeeded task per source of the method
(array rows from the table's own column types), all through the lineage store as a run would.
Then times :func:`astra_dagster.products.summary.write_summary` (the database reads, building the
table, FITS + Parquet written atomically with their sha256) and, on the same table, astropy's
``Table.write`` to FITS alone, and the plots a materialisation attaches (against a truth table
written for the bench). Targets (issue #14): 10,000 sources in <= 10 s, plots <= 1 s. The last line is
JSON: ``{"sources": N, "rows": r, "seconds": t, "rows_per_s": ..., "fetch_s": ..., "fits_s": ...,
"parquet_s": ..., "astropy_fits_s": ..., "astropy_rows_per_s": ..., "plot_s": ..., "pass": bool}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=10000)
    parser.add_argument("--method", default="thecannon")
    parser.add_argument("--stacks", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the throw-away ASTRA_HOME (server stopped)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="astra-bench-summary-"))
    os.environ["ASTRA_HOME"] = str(home)
    os.environ.pop("ASTRA_DATABASE_URL", None)
    from astra_dagster.db.connection import close_pools, connect
    from astra_dagster.db.embedded import stop_server
    from astra_dagster.db.schema import ensure_schema
    from astra_dagster.lineage import store
    from astra_dagster.lineage.identity import TaskIdentity
    from astra_dagster.lineage.sources import register_sources
    from astra_dagster.products import summary as sm

    try:
        ensure_schema()
        spec = sm.method_spec(args.method)
        rng = np.random.default_rng(1)
        n = args.sources
        ids = [f"2M{i:08d}+0000000" for i in range(n)]
        t0 = time.perf_counter()
        with connect() as conn, conn.transaction():
            pks = register_sources(conn, ids)
            release_pk = conn.execute(
                "insert into astra.data_release (name, path, manifest_sha256, n_sources, n_files, synthetic) "
                "values ('bench', %s, 'x', %s, 0, true) returning pk", (str(home / "bench"), n)).fetchone()[0]
            conn.execute("insert into astra.release_source (release_pk, source_pk, fingerprint) "
                         "select %s, u, 'f' from unnest(%s::bigint[]) u", (release_pk, list(pks.values())))
            version = {"astra_version_major": 0, "astra_version_minor": 1}
            spectra = TaskIdentity.build_many("bench", "Spectra.RegisterSpectra", version,
                                              [{"source_id": s} for s in ids])
            made = store.create_tasks(conn, spectra, source_pks=[pks[s] for s in ids], asset_key="spectra")

            def spectrum_rows(source_id: str) -> list[dict]:
                rows = [{"source_pk": pks[source_id], "release_pk": release_pk, "file_format": "apStar",
                         "kind": "stack", "frame": "rest", "row_index": 0, "snr": float(rng.uniform(10, 300)),
                         "telescope": tel, "path": f"/data/apStar-{tel}-{source_id}.fits", "sha256": "x"}
                        for tel in ("apo25m", "lco25m")[:args.stacks]]
                rows += [{"source_pk": pks[source_id], "release_pk": release_pk, "file_format": "apVisit",
                          "kind": "visit", "frame": "observed", "row_index": 0, "snr": 50.0, "mjd": 60000 + v,
                          "telescope": "apo25m", "path": f"/data/apVisit-{source_id}-{v}.fits", "sha256": "x"}
                         for v in range(2)]
                return rows

            store.finish_tasks(conn, "spectrum", [
                store.Outcome(made[i.task_hash].pk, store.STATUS_SUCCESS, 0.0, None, spectrum_rows(s))
                for i, s in zip(spectra, ids, strict=True)])
            schema = sm.table_schema(conn, spec.table)
            per_element = args.stacks if spec.element == "stack" else 2
            tasks = TaskIdentity.build_many("bench", f"Bench.{spec.name}", version,
                                            [{"source_id": s, "input_task_id": i.task_id}
                                             for s, i in zip(ids, spectra, strict=True)])
            made = store.create_tasks(conn, tasks, source_pks=[pks[s] for s in ids], asset_key=spec.asset)

            def result_row() -> dict:
                row = {}
                for c in schema:
                    if c.array:
                        row[c.name] = (rng.integers(0, 4, per_element).tolist() if c.kind == "int"
                                       else rng.normal(size=per_element).astype(np.float32).tolist())
                    elif c.kind == "float":
                        row[c.name] = float(rng.normal())
                    elif c.kind == "bool":
                        row[c.name] = False
                return row

            store.finish_tasks(conn, spec.table, [
                store.Outcome(made[i.task_hash].pk, store.STATUS_SUCCESS, 0.0, None, result_row()) for i in tasks])
        print(f"built {n} sources with spectra and {spec.name} tasks in {time.perf_counter() - t0:.1f} s", flush=True)

        out = home / "summary" / "bench"
        with connect() as conn:
            t0 = time.perf_counter()
            tables, n_sources, n_missing = sm.release_tables(conn, spec.name, "bench")
            fetch_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        fits_file = sm.write_table(tables[0], out, "fits")
        fits_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        sm.write_table(tables[0], out, "parquet")
        parquet_s = time.perf_counter() - t1
        seconds = time.perf_counter() - t0
        rows = tables[0].n_rows
        t1 = time.perf_counter()
        sm.to_astropy(tables[0]).write(home / "astropy.fits")
        astropy_s = time.perf_counter() - t1
        # the plots a materialisation attaches (Kiel diagram, accuracy per S/N, Δ vs truth), against
        # a truth table written for the bench's sources; first call (matplotlib's import) and again
        from astra_dagster.products import plots
        from astra_dagster.products import quality as qa

        truth_dir = home / "bench"
        truth_dir.mkdir(exist_ok=True)
        (truth_dir / "truth_sources.csv").write_text("source_id,kind,teff,logg,fe_h,alpha_m\n" + "".join(
            f"{s},giant,{rng.normal(4800, 300):.1f},{rng.normal(2.5, 0.5):.3f},{rng.normal(-0.3, 0.3):.3f},0.0\n"
            for s in ids))
        (truth_dir / "truth_visits.csv").write_text("source_id,mjd,vrel\n")
        with connect() as conn:
            truth = qa.truth_for(conn, tables[-1])
        plot_s = []
        for _ in range(2):
            t1 = time.perf_counter()
            shown = plots.diagnostics(spec, tables[-1], truth, tables[0] if len(tables) > 1 else None, title="bench")
            plot_s.append(time.perf_counter() - t1)
        png_kb = sum(len(v) for v in shown.values() if isinstance(v, str)) * 3 / 4 / 1024
        print(f"plots ({', '.join(shown)}): {plot_s[0]:.2f} s first (matplotlib's import), {plot_s[1]:.2f} s "
              f"after; {png_kb:.0f} kB of PNG")
        print(f"{'PASS' if plot_s[1] <= 1 else 'FAIL'}: plots add {plot_s[1]:.2f} s per materialisation (<= 1)")
        report = {"sources": n, "method": spec.name, "rows": rows, "seconds": round(seconds, 3),
                  "rows_per_s": round(rows / seconds), "fetch_s": round(fetch_s, 3), "fits_s": round(fits_s, 3),
                  "parquet_s": round(parquet_s, 3), "astropy_fits_s": round(astropy_s, 3),
                  "astropy_rows_per_s": round(rows / astropy_s), "fits_bytes": fits_file.size,
                  "plot_s_first": round(plot_s[0], 3), "plot_s": round(plot_s[1], 3), "png_kb": round(png_kb, 1),
                  "pass": (seconds <= 10.0 or n > 10000) and plot_s[1] <= 1.0}
        print(f"summary of {n_sources} sources ({rows} rows, {n_missing} missing): {seconds:.2f} s "
              f"({rows / seconds:,.0f} rows/s; reading and building {fetch_s:.2f} s, FITS {fits_s:.2f} s, "
              f"Parquet {parquet_s:.2f} s); astropy's own FITS write of the same table {astropy_s:.2f} s "
              f"({rows / astropy_s:,.0f} rows/s); FITS {fits_file.size / 1e6:.1f} MB")
        if n == 10000:
            print(f"{'PASS' if seconds <= 10 else 'FAIL'}: 10,000 sources in {seconds:.2f} s (<= 10)")
    finally:
        close_pools()
        stop_server(home)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    print(json.dumps({**report, **({"home": str(home)} if args.keep else {})}))


if __name__ == "__main__":
    main()
