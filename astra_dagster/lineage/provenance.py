"""The provenance of one result: result row -> its task -> spectra task and files -> model task
-> batch parent, read from the ``astra.provenance`` view (so the CLI and psql users see the same
links) and the lineage tables. Read-only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from astra_dagster.lineage.identity import family_of
from astra_dagster.lineage.recreate import STATUS_NAMES
from astra_dagster.spectra.manifest import MANIFEST_NAME

#: The method tables the view covers.
METHODS = ("doppler", "thecannon", "thepayne", "ferre", "apogeenet")

#: Result columns shown as the row's "key values" (those the table has, in this order).
KEY_COLUMNS = ("teff", "logg", "fe_h", "metals", "alpha_m", "vhelio_star", "u_vhelio_star", "vscatter",
               "snr", "r_chi_sq", "bitmask_flag")


class ProvenanceError(LookupError):
    """Unknown table, output_pk or source, or no result of the method for the source."""


def method_of(table: str) -> str:
    """``thecannon`` from ``thecannon`` or ``astra.thecannon``; ProvenanceError otherwise."""
    name = table.strip().lower().removeprefix("astra.")
    if name not in METHODS:
        raise ProvenanceError(f"unknown table {table!r} (known: {', '.join(METHODS)})")
    return name


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: they become null, as in the rv command's JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _task(conn: psycopg.Connection, pk: int | None) -> dict[str, Any] | None:
    if pk is None:
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "select t.pk, t.task_id, t.task_module, t.status_code, t.duration, t.run_id, t.asset_key, "
            "t.created, t.output_pk, t.error, s.source_id from astra.task t "
            "left join astra.source s on s.pk = t.source_pk where t.pk = %s", (pk,)).fetchone()
    row["family"] = family_of(row["task_id"])
    row["status"] = STATUS_NAMES.get(row["status_code"], "unknown")
    row["created"] = row["created"].isoformat(sep=" ", timespec="seconds")
    row["parameters"] = dict(conn.execute(
        "select p.parameter_name, p.parameter_value from astra.task_parameter tp "
        "join astra.parameter p on p.pk = tp.parameter_pk where tp.task_pk = %s order by 1", (pk,)).fetchall())
    return row


def _files(conn: psycopg.Connection, output_pk: int | None) -> list[dict[str, Any]]:
    """The distinct files behind a spectra task's spectrum rows, with their release."""
    if output_pk is None:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "select distinct sp.path, sp.file_format, sp.sha256, r.name as release, r.path as release_path, "
            "r.manifest_sha256 from astra.spectrum sp left join astra.data_release r on r.pk = sp.release_pk "
            "where sp.output_pk = %s order by sp.file_format, sp.path", (output_pk,)).fetchall()
    for row in rows:
        release_path = row.pop("release_path")
        row["manifest_path"] = str(Path(release_path) / MANIFEST_NAME) if release_path else None
    return rows


def provenance(conn: psycopg.Connection, table: str, output_pk: int) -> dict[str, Any]:
    """The whole chain of one result row as one JSON-able dict (the ``--json`` object)."""
    method = method_of(table)
    with conn.cursor(row_factory=dict_row) as cur:
        link = cur.execute("select * from astra.provenance where method = %s and output_pk = %s",
                           (method, output_pk)).fetchone()
        if link is None:
            raise ProvenanceError(f"astra.{method} has no row with output_pk {output_pk}")
        row = cur.execute(sql.SQL("select * from astra.{} where output_pk = %s").format(sql.Identifier(method)),
                          (output_pk,)).fetchone()
    values = {k: _clean(row[k]) for k in KEY_COLUMNS if k in row and row[k] is not None}
    spectra = _task(conn, link["input_task_pk"])
    if spectra is not None:
        spectra["files"] = _files(conn, spectra["output_pk"])
    model = _task(conn, link["model_task_pk"])
    if model is not None:
        with conn.cursor(row_factory=dict_row) as cur:
            model["model"] = cur.execute("select model_class, path, sha256, size from astra.model "
                                         "where output_pk = %s", (model["output_pk"],)).fetchone()
    batch = _task(conn, link["batch_task_pk"])
    if batch is not None:
        with conn.cursor(row_factory=dict_row) as cur:
            batch["counts"] = cur.execute(
                "select partition_first, partition_last, n_sources, n_computed, n_skipped, n_failed "
                "from astra.batch where task_pk = %s", (batch["pk"],)).fetchone()
    return {
        "result": {"table": f"astra.{method}", "method": method, "output_pk": output_pk,
                   "source_id": link["source_id"], "values": values},
        "task": _task(conn, link["task_pk"]),
        "spectra_task": spectra,
        "model_task": model,
        "batch": batch,
    }


def result_for_source(conn: psycopg.Connection, source_id: str, method: str) -> int:
    """output_pk of the source's newest successful result of the method."""
    method = method_of(method)
    source = conn.execute("select pk from astra.source where source_id = %s", (source_id,)).fetchone()
    if source is None:
        raise ProvenanceError(f"unknown source {source_id!r}")
    row = conn.execute(
        sql.SQL("select t.output_pk from astra.task t join astra.{} r on r.output_pk = t.output_pk "
                "where t.source_pk = %s and t.status_code = 1 order by t.modified desc, t.pk desc limit 1"
                ).format(sql.Identifier(method)), (source[0],)).fetchone()
    if row is None:
        raise ProvenanceError(f"source {source_id!r} has no {method} result")
    return row[0]


# ----------------------------------------------------------------------------- the tree


def _short(value: Any) -> str:
    if isinstance(value, list):
        shown = ", ".join(_short(v) for v in value[:6])
        return f"[{shown}{', ...' if len(value) > 6 else ''}]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _task_lines(task: dict[str, Any]) -> list[str]:
    duration = "-" if task["duration"] is None else f"{task['duration']:.4g} s"
    lines = [f"status_code {task['status_code']} ({task['status']})   duration {duration}   "
             f"run {task['run_id'] or '-'}   created {task['created']}"]
    if task["error"]:
        lines.append(f"error {task['error']}")
    return lines


def _node(title: str, lines: list[str], children: list[tuple]) -> tuple:
    return title, lines, children


def _params(task: dict[str, Any]) -> tuple:
    return _node("parameters", [f"{k} = {v}" for k, v in task["parameters"].items()], [])


def render_tree(p: dict[str, Any]) -> str:
    """The provenance as an indented tree (what ``astra provenance`` prints)."""
    result = p["result"]
    values = "   ".join(f"{k}={_short(v)}" for k, v in result["values"].items())
    task = p["task"]
    if task is None:
        root = _node(f"{result['table']} output_pk {result['output_pk']}", [values, "task: none "
                     "(its task was recomputed with force and now points at a newer output)"], [])
        return "\n".join(_render(root))
    children = [_params(task)]
    spectra = p["spectra_task"]
    if spectra is not None:
        # Files under their release: the manifest is said once, not once per file.
        releases: dict[Any, list[tuple]] = {}
        for f in spectra["files"]:
            key = (f["release"], f["manifest_path"], f["manifest_sha256"])
            releases.setdefault(key, []).append(
                _node(f"{f['file_format']} {f['path']}", [f"sha256 {f['sha256']}"], []))
        nodes = [_node(f"release {name or '-'}",
                       [f"manifest {path} (sha256 {digest})"] if path else [], files)
                 for (name, path, digest), files in releases.items()]
        children.append(_node(f"spectra {spectra['task_id']} (pk {spectra['pk']})", _task_lines(spectra),
                              [_params(spectra), *nodes]))
    model = p["model_task"]
    if model is not None:
        role = "templates" if result["method"] == "doppler" else "model"
        sub = [_params(model)]
        if model.get("model"):
            m = model["model"]
            sub.append(_node(f"file {m['path']}", [f"class {m['model_class']}", f"sha256 {m['sha256']}"], []))
        children.append(_node(f"{role} {model['task_id']} (pk {model['pk']})", _task_lines(model), sub))
    batch = p["batch"]
    if batch is not None:
        lines = [f"run {batch['run_id'] or '-'}   created {batch['created']}"]
        c = batch.get("counts")
        if c:
            lines.append(f"{c['n_sources']} sources ({c['partition_first']}...{c['partition_last']}): "
                         f"{c['n_computed']} computed, {c['n_skipped']} skipped, {c['n_failed']} failed")
        children.append(_node(f"batch {batch['task_id']} (pk {batch['pk']})", lines, []))
    task_node = _node(f"task {task['task_id']} (pk {task['pk']})   {task['family']}",
                      [f"source {task['source_id'] or '-'}", *_task_lines(task)], children)
    root = _node(f"{result['table']} output_pk {result['output_pk']}", [values] if values else [], [task_node])
    return "\n".join(_render(root))


def _render(node: tuple, prefix: str = "", last: bool = True, top: bool = True) -> list[str]:
    title, lines, children = node
    head = "" if top else ("└─ " if last else "├─ ")
    body = prefix + ("" if top else ("   " if last else "│  "))
    out = [prefix + head + title]
    bar = "│  " if children else "   "
    out += [body + bar + line for line in lines]
    for i, child in enumerate(children):
        out += _render(child, body, i == len(children) - 1, False)
    return out
