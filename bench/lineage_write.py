"""How much does full lineage cost next to writing the results alone?

For each method table, writes N per-source tasks the way a batch does: task rows with their
parameter rows and links before compute (status 0), then in one transaction the output_interface
rows, the result rows (COPY), statuses, durations, the batch parent and its batch_interface
links. Separately it COPYs the same result rows alone into an identical table with no lineage.
Both paths COPY result rows the same way (psycopg text COPY, its default) into tables with the
same columns and primary key, so the difference is the lineage. Result rows are built from each
table's own column types with 5 spectra per source (2 stacks + 3 visits), float32 values.

    python bench/lineage_write.py --tasks 20000 [--tables doppler,apogeenet,ferre,thepayne] [--repeats 3]

The default splits N tasks evenly over the four seed method tables with real columns (one batch
per table, as one pipeline pass would). Prints per-table rates; the last line is JSON:
``{"tasks": N, "lineage_tasks_per_s": ..., "copy_rows_per_s": ..., "ratio": ..., "tables": {...}}``.
Runs against a throw-away embedded PostgreSQL (or the configured database with --use-env).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_TABLES = "doppler,apogeenet,ferre,thepayne"
SPECTRA_PER_SOURCE = 5


def make_rows(conn, table: str, n: int, rng: np.random.Generator) -> list[dict]:
    columns = conn.execute(
        "select column_name, data_type, udt_name from information_schema.columns "
        "where table_schema = 'astra' and table_name = %s and column_name <> 'output_pk' "
        "order by ordinal_position", (table,)).fetchall()
    rows = []
    for _ in range(n):
        row = {}
        for name, data_type, udt in columns:
            if udt == "_float4":
                row[name] = rng.normal(size=SPECTRA_PER_SOURCE).astype(np.float32)
            elif udt == "_int4":
                row[name] = rng.integers(0, 2**16, size=SPECTRA_PER_SOURCE)
            elif data_type == "boolean":
                row[name] = bool(rng.integers(0, 2))
            elif udt == "float4":
                row[name] = float(rng.normal())
            else:
                raise SystemExit(f"bench: no generator for {table}.{name} ({udt})")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--tables", default=DEFAULT_TABLES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--use-env", action="store_true", help="use ASTRA_HOME / ASTRA_DATABASE_URL as set")
    args = parser.parse_args()

    tmp = None
    if not args.use_env:
        tmp = tempfile.mkdtemp(prefix="astra-bench-")
        os.environ["ASTRA_HOME"] = tmp
        os.environ.pop("ASTRA_DATABASE_URL", None)

    from astra_dagster.db.connection import close_pools, connect, database_url
    from astra_dagster.db.schema import ensure_schema
    from astra_dagster.lineage import store
    from astra_dagster.lineage.identity import TaskIdentity
    from astra_dagster.lineage.sources import register_sources

    url = database_url()
    ensure_schema(url)
    tables = args.tables.split(",")
    per_table = [args.tasks // len(tables) + (i < args.tasks % len(tables)) for i in range(len(tables))]
    rng = np.random.default_rng(1)
    ids = [f"BENCH-{i:08d}" for i in range(max(per_table))]
    with connect(url) as conn:
        source_pks = register_sources(conn, ids)
        rows_by_table = {t: make_rows(conn, t, n, rng) for t, n in zip(tables, per_table, strict=True)}
        for t in tables:
            conn.execute(f"create table if not exists astra.bench_copy_{t} (like astra.{t} including all)")

    lineage_s: dict[str, list[float]] = {t: [] for t in tables}
    copy_s: dict[str, list[float]] = {t: [] for t in tables}
    for repeat in range(args.repeats):
        for table in tables:
            rows = rows_by_table[table]
            n = len(rows)
            # Parameters of a typical method task: version, a few options, source, input.
            config = {"astra_version_major": 0, "astra_version_minor": 1, "repeat": repeat,
                      "option": 2.5, "template_set": "synspec"}
            t0 = time.perf_counter()
            children = TaskIdentity.build_many(
                "bench.module", f"Bench.{table}", config,
                [{"source_id": sid, "input_fingerprint": f"{i:064x}"} for i, sid in enumerate(ids[:n])],
            )
            parent = TaskIdentity.build("bench.module", f"Bench.{table}", {**config, "batch_children": "x"})
            with connect(url) as conn, conn.transaction():
                created = store.create_tasks(conn, [*children, parent],
                                             source_pks=[source_pks[s] for s in ids[:n]] + [None],
                                             asset_key=f"bench_{table}", run_id="bench-run")
                store.link_batch(conn, created[parent.task_hash], [created[c.task_hash].pk for c in children])
            outcomes = [store.Outcome(created[c.task_hash].pk, store.STATUS_SUCCESS, 0.01, None, row)
                        for c, row in zip(children, rows, strict=True)]
            with connect(url) as conn, conn.transaction():
                store.finish_tasks(conn, table, outcomes)
                store.finish_parent(conn, created[parent.task_hash].pk, time.perf_counter() - t0,
                                    partition_first="a", partition_last="b", n_sources=n,
                                    n_computed=n, n_skipped=0, n_failed=0)
            lineage_s[table].append(time.perf_counter() - t0)

            # The same result rows alone, written the same way, into an identical table.
            with connect(url) as conn:
                conn.execute(f"truncate astra.bench_copy_{table}")
            columns = list(rows[0])
            t0 = time.perf_counter()
            with connect(url) as conn, conn.transaction(), conn.cursor().copy(
                f"copy astra.bench_copy_{table} (output_pk, {', '.join(columns)}) from stdin"
            ) as copy:
                for i, row in enumerate(rows):
                    copy.write_row([i + 1, *(store._to_db(row[c]) for c in columns)])
            copy_s[table].append(time.perf_counter() - t0)
            print(f"repeat {repeat + 1} {table:9s} {n} tasks: lineage {lineage_s[table][-1]:.3f} s, "
                  f"raw COPY {copy_s[table][-1]:.3f} s", flush=True)

    report = {}
    for table, n in zip(tables, per_table, strict=True):
        lin, raw = statistics.median(lineage_s[table]), statistics.median(copy_s[table])
        report[table] = {"tasks": n, "lineage_tasks_per_s": round(n / lin, 1),
                         "copy_rows_per_s": round(n / raw, 1), "ratio": round(raw / lin, 3)}
        print(f"{table:9s} lineage {n / lin:8,.0f} tasks/s  raw COPY {n / raw:8,.0f} rows/s  "
              f"ratio {raw / lin:.2f}")
    total_lin = sum(statistics.median(v) for v in lineage_s.values())
    total_raw = sum(statistics.median(v) for v in copy_s.values())
    print(f"all       lineage {args.tasks / total_lin:8,.0f} tasks/s  "
          f"raw COPY {args.tasks / total_raw:8,.0f} rows/s  ratio {total_raw / total_lin:.2f}")
    close_pools()
    if tmp:
        from astra_dagster.db.embedded import stop_server

        stop_server(Path(tmp))
    print(json.dumps({"tasks": args.tasks, "lineage_tasks_per_s": round(args.tasks / total_lin, 1),
                      "copy_rows_per_s": round(args.tasks / total_raw, 1),
                      "ratio": round(total_raw / total_lin, 3), "tables": report}))


if __name__ == "__main__":
    main()
