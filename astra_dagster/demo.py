"""``astra demo``: the main job, end to end, printing what it did."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from astra_dagster.build import build
from astra_dagster.db.connection import connect

Echo = Callable[[str], Any]

#: The four tasks of the seed's example (Astra's database chapter).
SEED_EXAMPLE = (
    {"seed": 0},
    {"seed": 0, "draws": 10},
    {"seed": 3, "draws": 2, "delay_time": 5},
    {"seed": 5, "draws": 1, "delay_time": 3},
)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join("    " + line for line in lines)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return "{" + ",".join(f"{v:.8g}" for v in value) + "}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def seed_example(echo: Echo) -> None:
    from astra_dagster.defs.examples import RandomNumberGeneratorTask

    tasks = [RandomNumberGeneratorTask(**kw) for kw in SEED_EXAMPLE]
    echo("The seed's example: four RNG.RandomNumberGeneratorTask tasks through Dagster")
    results = build(tasks, log_level="WARNING")
    for kw, result in zip(SEED_EXAMPLE, results, strict=True):
        done = "computed" if result.metadata.get("astra/computed") else "skipped (identical task succeeded)"
        status = "ok" if result.success else "FAILED"
        echo(f"  {result.task_id}  {kw}  {status}, {done}")
    pks = [r.metadata.get("astra/task_pk") for r in results]
    with connect() as conn:
        rows = conn.execute(
            "select t.pk, t.task_module, t.task_id, t.duration, rng.samples "
            "from astra.task as t, astra.random_number_generator as rng "
            "where t.output_pk = rng.output_pk and t.pk = any(%s) order by t.pk",
            (pks,),
        ).fetchall()
        echo("  task ⋈ random_number_generator:")
        echo(_table(rows, ["pk", "task_module", "task_id", "duration", "samples"]))
        third = pks[2]
        rows = conn.execute(
            "select t.task_id, t.duration, p.parameter_name, p.parameter_value "
            "from astra.parameter as p, astra.task_parameter as tp, astra.task as t "
            "where t.pk = %s and t.pk = tp.task_pk and tp.parameter_pk = p.pk "
            "order by p.parameter_name",
            (third,),
        ).fetchall()
        echo(f"  parameters of task pk {third}:")
        echo(_table(rows, ["task_id", "duration", "parameter_name", "parameter_value"]))
    if not all(r.success for r in results):
        raise RuntimeError("some seed-example runs failed; see the Dagster UI (astra ui)")


def run_demo(echo: Echo) -> None:
    seed_example(echo)
    echo("Done. Inspect a task with `astra task show <task_id>`; browse runs with `astra ui`.")
