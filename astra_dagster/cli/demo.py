"""``astra demo``: the main job, end to end, printing what it did."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from astra_dagster.db.connection import connect
from astra_dagster.orchestration.build import build

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


def seed_example(echo: Echo, log_level: str | None = "WARNING") -> None:
    from astra_dagster.defs.examples import RandomNumberGeneratorTask

    tasks = [RandomNumberGeneratorTask(**kw) for kw in SEED_EXAMPLE]
    echo("The seed's example: four RNG.RandomNumberGeneratorTask tasks through Dagster")
    results = build(tasks, log_level=log_level)
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


DEMO_RELEASE = "synth-demo-1"
DEMO_SOURCES = 24
DEMO_SEED = 20261125
#: Model Config for the demo: smaller training sets than the assets' defaults, so the first demo
#: trains every model in a few minutes (the defaults are what the sensor and backfills use).
DEMO_MODELS: dict[str, dict[str, Any]] = {
    "thecannon_model": {"n_train": 400},
    "thepayne_model": {"n_train": 1000, "hidden": 64, "epochs": 200, "n_components": 48},
    "ferre_grid": {"teff_step": 500.0, "logg_step": 0.5, "metals_min": -2.0, "metals_step": 0.5,
                   "alpha_min": 0.0, "alpha_max": 0.25, "n_validation": 0},
    "apogeenet_model": {"n_train": 1000, "epochs": 8},
}


def release_example(echo: Echo, log_level: str | None = "WARNING") -> None:
    """Generate a small synthetic release, let the release-sensor code path pick it up, run it."""
    from astra_dagster.defs.sensors import release_assets
    from astra_dagster.orchestration.build import load_definitions
    from astra_dagster.orchestration.instance import get_instance
    from astra_dagster.orchestration.planned_runs import run_release
    from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, PlannedRun, plan_new_releases
    from astra_dagster.settings import get_settings
    from astra_dagster.spectra.manifest import MANIFEST_NAME
    from astra_dagster.spectra.release import generate_release

    settings = get_settings()
    data_root = settings.data_root or settings.astra_home / "data"
    release_dir = data_root / DEMO_RELEASE
    echo(f"A synthetic data release: {DEMO_SOURCES} sources in {release_dir}")
    if not (release_dir / MANIFEST_NAME).exists():
        generate_release(data_root, DEMO_RELEASE, DEMO_SOURCES, DEMO_SEED, progress=True)
    else:
        echo("  (already generated)")
    instance = get_instance(settings)
    defs = load_definitions()
    plan = plan_new_releases(instance, data_root, None, block_size=settings.sources_per_partition)
    for error in plan.errors:
        echo(f"  skipped a release: {error}")
    if plan.new_partition_keys:
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
    runs = plan.runs
    if not runs:  # everything registered before: run over the whole release to show memoisation
        with connect() as conn:
            pks = [r[0] for r in conn.execute(
                "select rs.source_pk from astra.release_source rs join astra.data_release r "
                "on r.pk = rs.release_pk where r.name = %s order by 1", (DEMO_RELEASE,))]
        from astra_dagster.lineage.sources import blocks_for

        keys = blocks_for(pks, settings.sources_per_partition)
        runs = [PlannedRun(DEMO_RELEASE, keys[0], keys[-1], run_key="demo")] if keys else []
    for reg in plan.registrations:
        echo(f"  release {reg.release}: {len(reg.source_pks)} sources registered, "
             f"{len(reg.changed_pks)} new or changed, {len(plan.new_partition_keys)} new partitions")
    assets = release_assets(settings.release_assets)
    demo_models = {"ops": {name: {"config": config} for name, config in DEMO_MODELS.items()}}
    failed = False
    # spectra first, then each method as soon as its model is trained (as the sensor orders it)
    for outcome in run_release(defs, runs, assets, instance=instance, run_config=demo_models,
                          log_level=log_level):
        if isinstance(outcome, str):
            echo(f"  {outcome}")
            continue
        for c in outcome.counts:
            echo(f"  {c.asset} over {outcome.run.first}...{outcome.run.last}: {c.computed} computed, "
                 f"{c.skipped} skipped, {c.failed} failed")
        failed |= not outcome.success
    with connect() as conn:
        n_spectra, n_visits, n_sources = conn.execute(
            "select count(*), count(*) filter (where file_format = 'apVisit'), count(distinct source_pk) "
            "from astra.spectrum").fetchone()
    echo(f"  astra.spectrum: {n_spectra} spectra ({n_visits} apVisit) of {n_sources} sources")
    label_summary(echo, release_dir)
    if failed:
        raise RuntimeError("a release run failed; see `astra ui`")


#: Per label table: the columns the demo shows (Teff, logg, metallicity).
LABEL_COLUMNS: dict[str, tuple[str, str, str]] = {
    "thecannon": ("teff", "logg", "fe_h"),
    "thepayne": ("teff", "logg", "fe_h"),
    "ferre": ("teff", "logg", "metals"),
    "apogeenet": ("teff", "logg", "fe_h"),
}


def label_summary(echo: Echo, release_dir: Any, n: int = 6) -> None:
    """The first ``n`` sources: the release's truth next to every label table's first stack."""
    from astra_dagster.spectra.release import read_truth

    stars = {s["source_id"]: s for s in read_truth(release_dir)[0]}
    with connect() as conn:
        sources = [r[0] for r in conn.execute("select source_id from astra.source order by pk limit %s", (n,))]
        header, columns = ["source", "truth"], []
        found: dict[str, dict[str, Any]] = {}
        for table, (teff, logg, metals) in LABEL_COLUMNS.items():
            rows = conn.execute(
                f"select distinct on (s.source_id) s.source_id, r.{teff}[1], r.{logg}[1], r.{metals}[1] "
                f"from astra.{table} r join astra.task t on t.output_pk = r.output_pk "
                "join astra.source s on s.pk = t.source_pk where s.source_id = any(%s) "
                "order by s.source_id, t.modified desc", (sources,)).fetchall()
            if rows:
                header.append(table)
                columns.append(table)
                found[table] = {r[0]: r[1:] for r in rows}
    if not columns:
        return

    def fmt(values: Any) -> str:
        if values is None or values[0] is None:
            return "-"
        return f"{values[0]:.0f} K {values[1]:.2f} {values[2]:+.2f}"

    rows = []
    for source in sources:
        star = stars.get(source)
        truth = fmt((star["teff"], star["logg"], star["fe_h"])) if star else "-"
        rows.append([source, truth] + [fmt(found[t].get(source)) for t in columns])
    echo("  Teff, logg, [Fe/H] (FERRE: [M/H]) of the first apStar stack, against the release's truth:")
    echo(_table(rows, header))


def run_demo(echo: Echo, log_level: str | None = "WARNING") -> None:
    """Both examples; ``log_level`` None prints Dagster's full console log (astra demo --verbose)."""
    seed_example(echo, log_level)
    release_example(echo, log_level)
    echo("Done. Inspect a task with `astra task show <task_id>`; browse runs with `astra ui`.")
