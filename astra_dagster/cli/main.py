"""The ``astra`` command line."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from astra_dagster.settings import get_settings

EXIT_ERROR = 1
EXIT_UNKNOWN = 2


class AstraCliError(click.ClickException):
    """A one-line failure with an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"astra: {self.format_message()}", err=True)


class _WithoutDagsterEchoes:
    """stderr without Dagster's "Exception while writing logger call to event log: database
    unreachable ..." lines: when the server goes away the command's own last line says it once."""

    _ECHO = "Exception while writing logger call to event log: database unreachable at "

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        if text.startswith(self._ECHO):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _WithoutRunFailures:
    """stderr without Dagster's failure records (STEP_FAILURE and RUN_FAILURE with their stack
    traces, "Dependencies for step ... failed"): a quiet ``astra materialize`` names the failed step
    and its error in its own last line instead; --verbose shows them. Each record is one write."""

    _ERROR = " - dagster - ERROR - "
    _FAILURES = (" - STEP_FAILURE - ", " - RUN_FAILURE - ", " - Dependencies for step ")

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        head = text.split("\n", 1)[0]
        if self._ERROR in head and any(f in head for f in self._FAILURES):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def one_line_errors(fn: Callable) -> Callable:
    """Turn expected failures into one line on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from astra_dagster.db.connection import DatabaseUnavailableError
        from astra_dagster.lineage.recreate import UnknownTaskError
        from astra_dagster.orchestration.guard import StepAborted

        saved, sys.stderr = sys.stderr, _WithoutDagsterEchoes(sys.stderr)
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except UnknownTaskError as exc:
            raise AstraCliError(_one_line(exc), EXIT_UNKNOWN) from exc
        except (DatabaseUnavailableError, StepAborted, ValueError, KeyError, FileNotFoundError,
                OSError) as exc:
            raise AstraCliError(_one_line(exc)) from exc
        finally:
            sys.stderr = saved

    return wrapper


def _one_line(exc: BaseException) -> str:
    # KeyError's str() adds quotes around its message; args[0] is the message itself.
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


_VERBOSE = "astra.verbose"


def _set_verbose(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[_VERBOSE] = True  # meta is shared by the group's and the command's contexts
    return value


#: ``--verbose`` of the group and of each command that runs Dagster: either turns the full log on.
verbose_option = click.option(
    "--verbose", "-v", is_flag=True, expose_value=False, callback=_set_verbose,
    help="Print Dagster's full event log (DEBUG) as the run goes, not only the summary.")


def dagster_log_level() -> str | None:
    """Level of Dagster's console log for our runs: WARNING (warnings and failures only, then our
    summary lines) unless --verbose, which keeps Dagster's default (DEBUG, every event)."""
    ctx = click.get_current_context(silent=True)
    return None if ctx is not None and ctx.meta.get(_VERBOSE) else "WARNING"


@click.group()
@click.version_option(package_name="astra_dagster")
@verbose_option
def main() -> None:
    """Astra on Dagster: stellar-spectra analyses with task lineage in PostgreSQL."""


# ---------------------------------------------------------------------------- init / db


def initialise(echo: bool = True) -> None:
    """Database, schema, Dagster's dagster.yaml and Dagster's own tables."""
    from astra_dagster.db.connection import database_url, mask_password
    from astra_dagster.db.schema import ensure_schema, schema_version
    from astra_dagster.orchestration.instance import get_instance, write_dagster_yaml

    settings = get_settings()
    url = database_url(settings)
    ensure_schema(url)
    path = write_dagster_yaml(settings)
    get_instance(settings).dispose()  # creates Dagster's tables on first use
    if echo:
        click.echo(f"database     {mask_password(url)} (schema astra, version {schema_version()})")
        click.echo(f"dagster.yaml {path}")


@main.command()
@one_line_errors
def init() -> None:
    """Create or upgrade the schema and write Dagster's dagster.yaml (safe to repeat)."""
    initialise()
    home = get_settings().dagster_home
    click.echo(f"Use plain dagster commands with: export DAGSTER_HOME={home}")


@main.group()
def db() -> None:
    """The Astra database."""


@db.command("url")
@one_line_errors
def db_url() -> None:
    """Print the database URL (psql accepts it)."""
    from astra_dagster.db.connection import database_url

    click.echo(database_url())


@db.command("stop")
@one_line_errors
def db_stop() -> None:
    """Stop the embedded PostgreSQL server (it restarts on demand)."""
    from astra_dagster.db.connection import close_pools
    from astra_dagster.db.embedded import stop_server

    settings = get_settings()
    if settings.database_url:
        raise AstraCliError("ASTRA_DATABASE_URL is set: there is no embedded server to stop")
    close_pools()
    stopped = stop_server(settings.astra_home)
    click.echo("stopped" if stopped else "not running")


# ---------------------------------------------------------------------------- tasks


@main.group()
def task() -> None:
    """Inspect and re-run tasks."""


def _format_value(value: Any) -> str:
    if isinstance(value, list):
        shown = ", ".join(_format_value(v) for v in value[:12])
        return f"[{shown}{', ...' if len(value) > 12 else ''}] ({len(value)})"
    if isinstance(value, float):
        return f"{value:.8g}"
    return str(value)


@task.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@one_line_errors
def task_show(ref: str, as_json: bool) -> None:
    """Show a task (by task_id or pk): parameters, status_code, duration, output."""
    from astra_dagster.db.connection import connect
    from astra_dagster.lineage.recreate import find_task

    with connect() as conn:
        record = find_task(conn, ref)
    if as_json:
        payload = {k: v for k, v in vars(record).items()}
        payload["family"] = record.family
        click.echo(json.dumps(payload, default=str))
        return
    duration = "-" if record.duration is None else f"{record.duration:.6g} s"
    lines = [
        f"task_id     {record.task_id}   (pk {record.pk})",
        f"module      {record.task_module}",
        f"family      {record.family}",
        f"status_code {record.status_code} ({record.status_name})",
        f"duration    {duration}",
        f"created     {record.created:%Y-%m-%d %H:%M:%S}   modified {record.modified:%Y-%m-%d %H:%M:%S}",
    ]
    if record.asset_key:
        lines.append(f"asset       {record.asset_key}   run {record.run_id}")
    if record.error:
        lines.append(f"error       {record.error}")
    lines.append("parameters")
    lines += [f"  {k} = {v}" for k, v in record.parameters.items()]
    if record.output is not None:
        lines.append(f"output      {record.output_table} (output_pk {record.output_pk})")
        lines += [f"  {k} = {_format_value(v)}" for k, v in record.output.items() if k != "output_pk"]
    else:
        lines.append("output      none")
    if record.batch:
        b = record.batch
        lines.append(
            f"batch       {b['n_sources']} sources ({b['partition_first']}...{b['partition_last']}): "
            f"{b['n_computed']} computed, {b['n_skipped']} skipped, {b['n_failed']} failed"
        )
    for parent in record.parent_task_ids:
        lines.append(f"in batch    {parent}")
    click.echo("\n".join(lines))


@task.command("rerun")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Recompute even though the task already succeeded.")
@verbose_option
@one_line_errors
def task_rerun(ref: str, force: bool) -> None:
    """Re-create a task from its parameter rows and run it again through Dagster."""
    from astra_dagster.lineage.rerun import rerun_task

    report = rerun_task(ref, force=force, log_level=dagster_log_level())
    click.echo(report.summary())
    if not report.success:
        raise AstraCliError(f"re-run of {report.task_id} failed (Dagster run {report.run_id})")


@main.command()
@click.argument("table", required=False)
@click.argument("output_pk", required=False)
@click.option("--source", "source_id", default=None, help="A source id (with --method): its newest result.")
@click.option("--method", default=None, help="doppler, thecannon, thepayne, ferre or apogeenet (with --source).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@one_line_errors
def provenance(table: str | None, output_pk: str | None, source_id: str | None, method: str | None,
               as_json: bool) -> None:
    """The whole chain of a result: its row, task, spectra task and files, model task and batch.

    TABLE OUTPUT_PK (e.g. thecannon 42), or --source SOURCE_ID --method M for the source's newest
    result of the method."""
    from astra_dagster.db.connection import connect
    from astra_dagster.lineage import provenance as pv

    by_source = source_id is not None or method is not None
    if by_source == (table is not None) or (by_source and (source_id is None or method is None)) \
            or (table is not None and output_pk is None):
        raise AstraCliError("give TABLE OUTPUT_PK, or --source SOURCE_ID --method M", EXIT_UNKNOWN)
    try:
        with connect() as conn:
            if by_source:
                name, pk = pv.method_of(method), pv.result_for_source(conn, source_id, method)
            else:
                name = pv.method_of(table)
                if not output_pk.strip().isdigit():
                    raise pv.ProvenanceError(f"output_pk must be a number, not {output_pk!r}")
                pk = int(output_pk)
            chain = pv.provenance(conn, name, pk)
    except pv.ProvenanceError as exc:
        raise AstraCliError(_one_line(exc), EXIT_UNKNOWN) from exc
    click.echo(json.dumps(chain, default=str) if as_json else pv.render_tree(chain))


# ---------------------------------------------------------------------------- releases


@main.group()
def release() -> None:
    """Data releases: generate a synthetic one, register one."""


@release.command("generate")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--release", "name", required=True, help="Release name (a folder under DIRECTORY).")
@click.option("--sources", type=click.IntRange(min=1), required=True, help="Number of sources.")
@click.option("--seed", type=int, default=0, show_default=True)
@one_line_errors
def release_generate(directory: Path, name: str, sources: int, seed: int) -> None:
    """Write a synthetic release (apVisit + apStar files, truth table, manifest last)."""
    from astra_dagster.spectra.release import generate_release

    path = generate_release(directory, name, sources, seed, progress=True)
    click.echo(f"release {name}: {sources} sources in {path}")


@release.command("register")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run/--no-run", default=False,
              help="Also run the release's assets over its new or changed sources, in this process.")
@verbose_option
@one_line_errors
def release_register(directory: Path, run: bool) -> None:
    """Register one release folder (as the release sensor would) and add its partitions."""
    from astra_dagster.defs.sensors import release_assets
    from astra_dagster.orchestration.build import load_definitions
    from astra_dagster.orchestration.instance import get_instance
    from astra_dagster.orchestration.planned_runs import run_release
    from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases
    from astra_dagster.spectra.manifest import MANIFEST_NAME

    if not (directory / MANIFEST_NAME).is_file():
        raise AstraCliError(f"{directory}: no {MANIFEST_NAME} (not a release, or still being written)")
    initialise(echo=False)
    settings = get_settings()
    instance = get_instance(settings)
    plan = plan_new_releases(instance, directory.resolve().parent, None,
                             block_size=settings.sources_per_partition, only=directory.resolve().name)
    if plan.errors:
        raise AstraCliError(plan.errors[0])
    if plan.new_partition_keys:
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
    for reg in plan.registrations:
        state = "already registered" if reg.already_registered else "registered"
        click.echo(f"release {reg.release} {state}: {len(reg.source_pks)} sources, "
                   f"{len(reg.new_pks)} new, {len(reg.changed_pks)} new or changed")
    click.echo(f"{len(plan.new_partition_keys)} new partitions; {len(plan.runs)} range run(s) planned")
    if run:
        assets = release_assets(settings.release_assets)
        defs = load_definitions()
        for outcome in run_release(defs, plan.runs, assets, instance=instance, log_level=dagster_log_level()):
            if isinstance(outcome, str):
                click.echo(outcome)
                continue
            counts = ", ".join(f"{c.asset}: {c.computed} computed, {c.skipped} skipped, {c.failed} failed"
                               for c in outcome.counts)
            click.echo(f"  {outcome.run.first}...{outcome.run.last}: "
                       f"{'ok' if outcome.success else 'FAILED'} ({counts})")


# ---------------------------------------------------------------------------- radial velocities


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN → null: JSON has no NaN
        return None
    return value


#: Velocity fields of a fit; in a rest-frame spectrum they are residual shifts, so they are
#: reported under these names instead.
_REST_FRAME_NAMES = {"vrel": "v_residual", "u_vrel": "u_v_residual",
                     "ccf_vrel": "ccf_v_residual", "u_ccf_vrel": "u_ccf_v_residual"}


def _rv_record(path: Path, spectrum: Any, result: Any) -> dict[str, Any]:
    """One JSON record: the frame first; a rest-frame spectrum (apStar rows, already shifted by
    the pipeline's velocities) has no vhelio or bc and its shift is named a residual."""
    frame = str(spectrum.meta.get("frame") or "observed")
    record: dict[str, Any] = {"file": str(path), "index": spectrum.meta.get("index", 0),
                              "kind": spectrum.meta.get("kind"), "frame": frame}
    for key, value in result.to_dict().items():
        if frame == "rest":
            if key in ("vhelio", "bc"):
                value = None
            key = _REST_FRAME_NAMES.get(key, key)
        record[key] = _json_number(value)
    return record


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--templates", type=click.Choice(["auto", "synspec", "generator"]), default="auto",
              show_default=True,
              help="Template families: Synspec grids (real stars), generator-trained (synthetic releases), or "
              "both with the cross-correlation choosing per spectrum.")
@click.option("--vrange", type=float, default=1000.0, show_default=True, help="Search range, ±km/s.")
@one_line_errors
def rv(files: tuple[Path, ...], templates: str, vrange: float) -> None:
    """Measure radial velocities of apVisit/apStar files (no database): one JSON object per
    spectrum per line, with its frame ('observed': vrel and vhelio; 'rest', apStar rows:
    v_residual, vhelio null). A velocity the fit does not trust is null with BAD_RV in
    flag_names and the reason in message. RVs stored in the files are never read."""
    from astra_dagster.methods.doppler import (
        DopplerError,
        UnsupportedSpectrumError,
        fit_visit,
        load_templates,
        train_generator_emulators,
    )
    from astra_dagster.spectra.errors import SpectrumFormatError
    from astra_dagster.spectra.io import read_spectra

    generator = train_generator_emulators() if templates == "generator" else None
    emulators = load_templates(templates, generator=generator)
    problems: list[str] = []

    def problem(message: str) -> None:
        problems.append(message)
        if len(files) > 1:  # one line per bad file, then a summary; a single file gets one line
            click.echo(f"astra: {message}", err=True)

    for path in files:
        try:
            spectra = read_spectra(path)
        except SpectrumFormatError as exc:
            problem(str(exc))
            continue
        for spectrum in spectra:
            try:
                result = fit_visit(spectrum, emulators, vrange=vrange)
            except UnsupportedSpectrumError as exc:
                # e.g. a BOSS spec-lite file: every row of the file is equally out of range.
                problem(f"{path}: not supported by these templates ({exc.reason})")
                break
            except DopplerError as exc:
                problem(f"{path}: {exc}")
                break
            click.echo(json.dumps(_rv_record(path, spectrum, result)))
    if problems:
        raise AstraCliError(problems[0] if len(files) == 1 else
                            f"{len(problems)} of {len(files)} file(s) could not be read or measured")


# ---------------------------------------------------------------------------- materialize


@main.command()
@click.argument("assets", nargs=-1, required=True)
@click.option("--config", "config_text", default=None, metavar="JSON",
              help='Config of the assets\' ops, e.g. \'{"n_train": 300}\' (every selected asset gets it), '
              'or a whole run config \'{"ops": {"ASSET": {"config": {...}}}}\'.')
@click.option("--partitions", default=None, metavar="KEY|FIRST...LAST",
              help="A partition key or a range (one run over the range); not for unpartitioned assets.")
@verbose_option
@one_line_errors
def materialize(assets: tuple[str, ...], config_text: str | None, partitions: str | None) -> None:
    """Materialise assets in this process on the Astra instance (like `dagster asset materialize`,
    but the selection, its Config and its partitions are checked first: a mistake is one line and
    exit 2, and no run starts). Prints the run, then computed/skipped/failed per asset."""
    import dagster as dg

    from astra_dagster.orchestration import materialize as mt
    from astra_dagster.orchestration.build import load_definitions
    from astra_dagster.orchestration.instance import get_instance

    initialise(echo=False)
    defs = load_definitions()
    instance = get_instance()
    try:
        selection = mt.prepare(defs, assets, config_text, partitions, instance)
        quiet = dagster_log_level() is not None
        saved, sys.stderr = sys.stderr, (_WithoutRunFailures(sys.stderr) if quiet else sys.stderr)
        try:
            outcome = mt.run(defs, selection, instance=instance, log_level=dagster_log_level())
        finally:
            sys.stderr = saved
    except mt.MaterializeInputError as exc:
        raise AstraCliError(str(exc), EXIT_UNKNOWN) from exc
    except dg.DagsterInvalidConfigError as exc:  # a check of Dagster's own that ours missed: still before the run
        raise AstraCliError(f"invalid run config: {_one_line(exc)}", EXIT_UNKNOWN) from exc
    scope = ""
    if selection.partitions:
        first, last = selection.partitions
        scope = f" over {first}" if first == last else f" over {first}...{last}"
    click.echo(f"run {outcome.run_id}{scope}: {'success' if outcome.success else 'FAILED'}")
    for c in outcome.counts:
        click.echo(f"  {c.asset}: {c.computed} computed, {c.skipped} skipped, {c.failed} failed")
    for name in outcome.materialized:
        click.echo(f"  {name}: materialized")
    if outcome.checks_passed or outcome.checks_failed:
        click.echo(f"  checks: {outcome.checks_passed} passed, {outcome.checks_failed} failed")
    if not outcome.success:
        reason = outcome.errors[0] if outcome.errors else "see the run's log (--verbose)"
        raise AstraCliError(f"run {outcome.run_id} failed: {reason}")


# ---------------------------------------------------------------------------- backfills


@main.command()
@click.option("--select", "assets", required=True,
              help="Comma-separated asset keys (all must share the source-block partitions).")
@click.option("--from", "first", default=None, help="First partition key (default: the first).")
@click.option("--to", "last", default=None, help="Last partition key (default: the last).")
@click.option("--partitions", default=None, help="Comma-separated partition keys instead of a range.")
@click.option("--chunk", type=int, default=None,
              help="Partitions per backfill (one backfill per chunk; default: all in one).")
@click.option("--config-json", default=None, help="Run config for the runs, as JSON.")
@click.option("--url", default="http://127.0.0.1:3000/graphql", show_default=True,
              help="GraphQL endpoint of the Dagster webserver.")
@click.option("--wait/--no-wait", default=False, help="Wait for the backfills to finish.")
@click.option("--timeout", type=float, default=3600.0, show_default=True)
@one_line_errors
def backfill(assets: str, first: str | None, last: str | None, partitions: str | None,
             chunk: int | None, config_json: str | None, url: str, wait: bool, timeout: float) -> None:
    """Launch policy-aware asset backfills through the webserver (like the UI's Materialize)."""
    from tqdm import tqdm

    from astra_dagster.orchestration import backfill as bf

    selected = [a.strip() for a in assets.split(",") if a.strip()]
    run_config = json.loads(config_json) if config_json else None
    try:
        if partitions:
            keys = [k.strip() for k in partitions.split(",") if k.strip()]
        else:
            keys = bf.select_range(bf.partition_keys(url, selected[0]), first, last)
        launched = bf.launch(url, selected, keys, chunk=chunk, run_config=run_config)
        for item in launched:
            click.echo(f"backfill {item.backfill_id}: {len(item.partitions)} partitions "
                       f"{item.partitions[0]}...{item.partitions[-1]}")
        if wait:
            with tqdm(total=len(launched), desc="backfills", unit="backfill") as bar:
                def progress(done: int, total: int) -> None:
                    bar.update(done - bar.n)

                status = bf.wait(url, launched, timeout=timeout, on_progress=progress)
            failed = {k: v for k, v in status.items() if v not in ("COMPLETED", "COMPLETED_SUCCESS")}
            if failed:
                raise AstraCliError(f"{len(failed)} backfill(s) did not succeed: "
                                    + ", ".join(f"{k} {v}" for k, v in failed.items()))
            click.echo(f"all {len(launched)} backfill(s) completed")
    except bf.BackfillError as exc:
        raise AstraCliError(str(exc)) from exc


# ---------------------------------------------------------------------------- summaries


@main.command()
@click.option("--method", required=True, help="doppler, thecannon, thepayne, ferre or apogeenet.")
@click.option("--release", "release_name", required=True, help="A registered release.")
@click.option("--format", "formats", multiple=True, default=("fits",), show_default=True,
              help="fits, parquet or csv (repeat for several).")
@click.option("--force", is_flag=True, help="Write again even though an identical summary task succeeded.")
@verbose_option
@one_line_errors
def export(method: str, release_name: str, formats: tuple[str, ...], force: bool) -> None:
    """Write a method's summary files of one release (astraAllStar<Method>, for doppler also
    astraAllVisitDoppler) under ASTRA_HOME/summary/<release>/, as the <method>_summary asset does
    (a Dagster run in this process, with a summary task in the lineage tables)."""
    import dagster as dg

    from astra_dagster.db.connection import connect
    from astra_dagster.orchestration.build import load_definitions, materialize_assets
    from astra_dagster.orchestration.instance import get_instance
    from astra_dagster.products import summary as sm

    initialise(echo=False)
    try:
        spec = sm.method_spec(method)
        unknown = [f for f in formats if f not in sm.FORMATS]
        if unknown:
            raise sm.SummaryError(f"unknown format {unknown[0]!r} (known: {', '.join(sm.FORMATS)})")
        with connect() as conn:
            rel = sm.find_release(conn, release_name)
    except sm.SummaryError as exc:
        raise AstraCliError(str(exc), EXIT_UNKNOWN) from exc
    name = f"{spec.name}_summary"
    config = {"releases": [rel.name], "formats": list(formats), "force": force}
    result = materialize_assets(load_definitions(), [dg.AssetKey(name)], instance=get_instance(),
                                run_config={"ops": {name: {"config": config}}},
                                log_level=None if dagster_log_level() is None else "ERROR")
    if not result.success:
        raise AstraCliError(f"export of {method} for {rel.name} failed (Dagster run {result.run_id})")
    with connect() as conn:
        rows = conn.execute(
            "select distinct on (product, file_format) path, n_rows, n_sources, n_missing, sha256 "
            "from astra.summary_file where method = %s and release = %s and file_format = any(%s) "
            "order by product, file_format, pk desc", (spec.name, rel.name, list(formats))).fetchall()
    for path, n_rows, _, _, sha in rows:
        click.echo(f"{path}  {n_rows} rows  sha256 {sha}")
    if rows and rows[0][3]:
        click.echo(f"{rows[0][3]} of {rows[0][2] + rows[0][3]} sources of {rel.name} have no {method} result yet")


# ---------------------------------------------------------------------------- demo / ui


@main.command()
@verbose_option
@one_line_errors
def demo() -> None:
    """Run the main job end to end on the embedded database and print what it did."""
    from astra_dagster.cli.demo import run_demo

    initialise()
    run_demo(click.echo, log_level=dagster_log_level())


@main.command()
@click.option("--port", default=3000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@one_line_errors
def ui(port: int, host: str) -> None:
    """Start Dagster's web UI and daemon (``dagster dev``) on the Astra instance.

    Ctrl-C or SIGTERM stops the whole tree (webserver, daemon, code server, run workers): the
    signal goes to ``dagster dev``'s process group, what is left after 10 s is killed."""
    from astra_dagster.cli.supervise import run_tree

    initialise(echo=False)
    settings = get_settings()
    workspace = Path(__file__).resolve().parents[2] / "workspace.yaml"
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or shutil.which("dagster")
    if dagster is None:
        raise AstraCliError("the dagster command is not installed in this environment")
    env = {**os.environ, "DAGSTER_HOME": str(settings.dagster_home)}
    target = ["-w", str(workspace)] if workspace.exists() else ["-m", "astra_dagster.definitions"]
    click.echo(f"Dagster UI on http://{host}:{port} (DAGSTER_HOME={settings.dagster_home})")
    stopped = run_tree([dagster, "dev", *target, "-h", host, "-p", str(port)], env)
    click.echo(f"astra: {stopped.message('dagster dev')}", err=True)
    # A stop by signal exits 128 + n, as the shell reports a process the signal ended.
    raise SystemExit(128 + stopped.signal if stopped.signal is not None else stopped.returncode)


if __name__ == "__main__":
    main()
