"""Summary tables of the method results: ``astraAllStar<Method>`` (one row per source and apStar
stack; for doppler one row per source) and ``astraAllVisitDoppler`` (one row per visit).

The columns come from the method table itself (``information_schema``), so a method whose label
set changes needs no change here: every array column that holds a value for at least one
result becomes a column, each label ``x`` with a ``u_x`` partner is written as ``x, u_x``, and
a scalar column is repeated on each of its source's rows. The rows of a release are, per source
of the release, its newest succeeded task of the method whose input spectra came from that
release (a source re-observed in a later release keeps its result here, and counts as missing
until it has one).

Files are written atomically (a temporary file in the same folder, then a rename) as FITS (an
astropy table, units in TUNITn and descriptions in TCOMMn, which TOPCAT shows), Parquet (pyarrow,
units and descriptions as field metadata) or CSV.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from astra_dagster import __version__

FORMATS = ("fits", "parquet", "csv")
SUFFIX = {"fits": ".fits", "parquet": ".parquet", "csv": ".csv"}


class SummaryError(ValueError):
    """An unknown method, release or format (the message names it)."""


@dataclass(frozen=True)
class MethodSpec:
    """How one method's table turns into summary rows."""

    name: str
    #: Table (schema astra) and asset whose tasks wrote it.
    table: str
    asset: str
    #: File stem: astraAllStar<stem>, astraAllVisit<stem>.
    stem: str
    #: What one array element of a result row is: an apStar "stack" or an apVisit "visit".
    element: str
    #: Module and attribute of the method's flag bits.
    flags: tuple[str, str]
    #: Flag bits that do not make a result unusable (benign conditions).
    informational: int = 0


METHODS: dict[str, MethodSpec] = {
    "doppler": MethodSpec("doppler", "doppler", "doppler", "Doppler", "visit",
                          ("astra_dagster.methods.doppler.flags", "DopplerFlag"),
                          # non-finite pixels masked, bc computed, rest-frame input: all benign
                          informational=(1 << 3) | (1 << 7) | (1 << 9)),
    "thecannon": MethodSpec("thecannon", "thecannon", "thecannon", "TheCannon", "stack",
                            ("astra_dagster.methods.thecannon.flags", "FLAGS")),
    "thepayne": MethodSpec("thepayne", "thepayne", "thepayne", "ThePayne", "stack",
                           ("astra_dagster.methods.thepayne.flags", "FLAGS")),
    "ferre": MethodSpec("ferre", "ferre", "ferre", "FERRE", "stack",
                        ("astra_dagster.methods.ferre.flags", "FLAGS")),
    "apogeenet": MethodSpec("apogeenet", "apogeenet", "apogeenet", "APOGEENet", "stack",
                            ("astra_dagster.methods.apogeenet.flags", "ApogeeNetFlag")),
}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise SummaryError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})") from None


def flag_bits(spec: MethodSpec) -> dict[str, int]:
    """Flag name → bit value of the method (a dict or an IntFlag class in its flags module)."""
    module, attribute = spec.flags
    flags = getattr(importlib.import_module(module), attribute)
    if isinstance(flags, dict):
        return {str(k): int(v) for k, v in flags.items()}
    return {f.name: int(f.value) for f in flags if f.name}


def describe_flags(bits: dict[str, int], value: int | None) -> str:
    """``"A|B"`` for the bits set in ``value`` (empty for none, ``?`` for unknown)."""
    if value is None or value < 0:
        return "?"
    return "|".join(name for name, bit in bits.items() if value & bit)


# ----------------------------------------------------------------------------- columns, units


_UNITS = {"teff": "K", "vrel": "km/s", "vhelio": "km/s", "bc": "km/s", "rv": "km/s", "v_turb": "km/s",
          "v_macro": "km/s", "vhelio_star": "km/s", "vscatter": "km/s", "mjd": "d", "mjd_first": "d",
          "mjd_last": "d"}

_DESCRIPTIONS = {
    "source_pk": "Primary key of the source in astra.source",
    "source_id": "Source identifier (APOGEE id)",
    "release": "Data release the fitted spectra come from",
    "telescope": "Telescope of the spectrum",
    "file": "File of the spectrum, relative to its release",
    "teff": "Effective temperature",
    "logg": "Surface gravity, log10(g / cm s^-2)",
    "fe_h": "[Fe/H], dex",
    "m_h": "[M/H], dex",
    "metals": "[M/H] (FERRE's overall metallicity), dex",
    "alpha_m": "[alpha/M], dex",
    "o_mg_si_s_ca_ti": "[alpha/M] (FERRE's alpha dimension), dex",
    "c": "[C/M] (FERRE), dex",
    "n": "[N/M] (FERRE), dex",
    "log10vdop": "log10 of the microturbulence in km/s (FERRE)",
    "lgvsini": "log10 of v sin i in km/s (FERRE)",
    "v_turb": "Microturbulence",
    "v_macro": "Macroturbulence",
    "c12_c13": "12C/13C isotope ratio",
    "rv": "Radial velocity offset fitted with the labels (rest-frame input: ~0)",
    "vrel": "Radial velocity relative to the observer",
    "vhelio": "Heliocentric radial velocity (vrel + bc)",
    "bc": "Barycentric correction",
    "vhelio_star": "The star's heliocentric velocity from the joint fit over its visits",
    "u_vhelio_star": "Uncertainty of vhelio_star (1 sigma)",
    "vscatter": "Scatter of the visit velocities",
    "mjd": "Modified Julian date of the visit",
    "mjd_first": "MJD of the first visit",
    "mjd_last": "MJD of the last visit",
    "n_visits": "Visits fitted",
    "n_rv_good": "Visits with a trusted velocity",
    "snr": "Signal-to-noise ratio per pixel",
    "chisq": "Reduced chi-square of the fit",
    "r_chi_sq": "Reduced chi-square of the fit",
    "log_chisq_fit": "log10 of the reduced chi-square of the grid fit",
    "log_snr_sq": "log10 of (S/N)^2",
    "bitmask_flag": "Result flags (bits; names in flag_names; -1 unknown)",
    "flag_names": "Names of the flag bits set, separated by |",
    "task_id": "Astra task that produced the result (astra.task.task_id)",
    "v_astra": "Astra version (major.minor) of that task",
}


def unit_of(column: str) -> str | None:
    base = column[2:] if column.startswith("u_") else column.removeprefix("initial_")
    return _UNITS.get(base)


def description_of(column: str) -> str:
    if column in _DESCRIPTIONS:
        return _DESCRIPTIONS[column]
    if column.startswith("u_"):
        return f"Uncertainty of {column[2:]} (1 sigma)"
    if column.startswith("initial_"):
        return f"Initial value of {column[8:]} in the fit"
    if column.startswith("frozen_"):
        return f"{column[7:]} held fixed in the fit"
    if column.endswith("_h"):
        return f"[{column[:-2].capitalize()}/H], dex"
    return column


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    array: bool
    #: "float", "int", "bool" or "text".
    kind: str


_KINDS = {"float4": "float", "float8": "float", "numeric": "float", "int2": "int", "int4": "int",
          "int8": "int", "bool": "bool", "text": "text", "varchar": "text"}


def table_schema(conn: psycopg.Connection, table: str) -> list[ColumnInfo]:
    """The method table's columns in their order (output_pk and pk left out)."""
    rows = conn.execute(
        "select column_name, data_type, udt_name from information_schema.columns "
        "where table_schema = 'astra' and table_name = %s order by ordinal_position", (table,)).fetchall()
    if not rows:
        raise SummaryError(f"table astra.{table} does not exist")
    out = []
    for name, data_type, udt in rows:
        if name in ("output_pk", "pk"):
            continue
        array = data_type == "ARRAY"
        out.append(ColumnInfo(name, array, _KINDS.get(udt.lstrip("_"), "text")))
    return out


# ----------------------------------------------------------------------------- reading results


@dataclass(frozen=True)
class Release:
    pk: int
    name: str
    path: Path
    synthetic: bool | None
    n_sources: int


def find_release(conn: psycopg.Connection, name: str) -> Release:
    row = conn.execute("select pk, name, path, synthetic from astra.data_release where name = %s",
                       (name,)).fetchone()
    if row is None:
        known = [r[0] for r in conn.execute("select name from astra.data_release order by pk").fetchall()]
        raise SummaryError(f"unknown release {name!r} (registered: {', '.join(known) or 'none'})")
    n = conn.execute("select count(*) from astra.release_source where release_pk = %s", (row[0],)).fetchone()[0]
    return Release(row[0], row[1], Path(row[2]), row[3], int(n))


def releases_with_results(conn: psycopg.Connection, spec: MethodSpec) -> list[Release]:
    """Registered releases whose sources have at least one succeeded task of the method."""
    names = [r[0] for r in conn.execute(
        "select r.name from astra.data_release r where exists ("
        " select 1 from astra.release_source rs join astra.task t on t.source_pk = rs.source_pk"
        " where rs.release_pk = r.pk and t.asset_key = %s and t.status_code = 1) order by r.pk",
        (spec.asset,)).fetchall()]
    return [find_release(conn, n) for n in names]


@dataclass
class Result:
    """One source's result row with the spectra it was fitted on."""

    source_pk: int
    source_id: str
    task_pk: int
    task_id: str
    output_pk: int
    v_astra: str
    release: str | None
    values: dict[str, Any]
    #: astra.spectrum rows of the input spectra task, in the order the method's arrays follow.
    spectra: list[dict[str, Any]] = field(default_factory=list)


_SPECTRUM_COLUMNS = "output_pk, file_format, kind, row_index, telescope, snr, mjd, path, release_pk"


@dataclass(frozen=True)
class _Picked:
    source_pk: int
    source_id: str
    task_pk: int
    task_id: str
    output_pk: int
    spectra: list[dict[str, Any]]


def _pick(conn: psycopg.Connection, spec: MethodSpec, release_pk: int | None, run_id: str | None) -> list[_Picked]:
    """Per source, the newest succeeded task of the method (whose input spectra come from the
    release, when given), in source order. Simple indexed lookups joined here: one query with
    every join in it lets the planner misjudge its row counts (measured 3-14 s for 10k sources,
    against 0.3 s this way)."""
    where, params = "t.asset_key = %s and t.status_code = 1 and t.output_pk is not null", [spec.asset]
    if release_pk is not None:
        where += " and t.source_pk in (select source_pk from astra.release_source where release_pk = %s)"
        params.append(release_pk)
    if run_id is not None:
        where += " and t.run_id = %s"
        params.append(run_id)
    tasks = conn.execute(
        f"select t.source_pk, t.pk, t.task_id, t.output_pk from astra.task t where {where} "
        "and t.source_pk is not null order by t.source_pk, t.modified desc, t.pk desc", params).fetchall()
    if not tasks:
        return []
    inputs = dict(conn.execute(
        "select tp.task_pk, p.parameter_value from astra.task_parameter tp "
        "join astra.parameter p on p.pk = tp.parameter_pk "
        "where tp.task_pk = any(%s) and p.parameter_name = 'input_task_id'", ([t[1] for t in tasks],)).fetchall())
    source_pks = sorted({t[0] for t in tasks})
    spectra_tasks = {(r[0], r[1]): r[2] for r in conn.execute(
        "select source_pk, task_id, output_pk from astra.task where asset_key = 'spectra' and status_code = 1 "
        "and source_pk = any(%s)", (source_pks,)).fetchall()}
    with conn.cursor(row_factory=dict_row) as cur:
        spectra: dict[int, list[dict[str, Any]]] = {}
        for r in cur.execute(f"select {_SPECTRUM_COLUMNS} from astra.spectrum where output_pk = any(%s)",
                             (list(set(spectra_tasks.values())),)).fetchall():
            spectra.setdefault(r["output_pk"], []).append(r)
    names = dict(conn.execute("select pk, source_id from astra.source where pk = any(%s)", (source_pks,)).fetchall())
    out: list[_Picked] = []
    for source_pk, task_pk, task_id, output_pk in tasks:
        if out and out[-1].source_pk == source_pk:
            continue  # an older task of a source already picked
        rows = spectra.get(spectra_tasks.get((source_pk, inputs.get(task_pk)), -1), [])
        if release_pk is not None and not any(r["release_pk"] == release_pk for r in rows):
            continue  # fitted on another release's spectra: an older task may still be this release's
        out.append(_Picked(source_pk, names[source_pk], task_pk, task_id, output_pk, rows))
    return out


def _ordered_spectra(spec: MethodSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The spectra a result's arrays follow: the first combined row of each apStar file by
    (telescope, path) for the label methods (defs.labels.stacks_of), the apVisits by (MJD, path)
    for doppler (tasks.doppler.estimate)."""
    if spec.element == "visit":
        visits = [r for r in rows if r["file_format"] == "apVisit"]
        return sorted(visits, key=lambda r: (r["mjd"] or 0, r["path"]))
    stacks = [r for r in rows if r["file_format"] == "apStar" and r["kind"] == "stack" and r["row_index"] == 0]
    return sorted(stacks, key=lambda r: (r["telescope"] or "", r["path"]))


def fetch_results(conn: psycopg.Connection, spec: MethodSpec, *, release_pk: int | None = None,
                  run_id: str | None = None) -> list[Result]:
    """Per source, the newest succeeded result of the method (of a release's spectra, or
    written by one Dagster run), in source order. A handful of set-based queries."""
    picked = _pick(conn, spec, release_pk, run_id)
    if not picked:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        values = {r["output_pk"]: r for r in cur.execute(
            sql.SQL("select * from astra.{} where output_pk = any(%s)").format(sql.Identifier(spec.table)),
            ([p.output_pk for p in picked],)).fetchall()}
    versions: dict[int, dict[str, str]] = {}
    for task_pk, name, value in conn.execute(
            "select tp.task_pk, p.parameter_name, p.parameter_value from astra.task_parameter tp "
            "join astra.parameter p on p.pk = tp.parameter_pk "
            "where tp.task_pk = any(%s) and p.parameter_name in ('astra_version_major', 'astra_version_minor')",
            ([p.task_pk for p in picked],)).fetchall():
        versions.setdefault(task_pk, {})[name] = value
    release_names = dict(conn.execute("select pk, name from astra.data_release").fetchall())
    out = []
    for p in picked:
        rows = _ordered_spectra(spec, p.spectra)
        release = next((release_names.get(r["release_pk"]) for r in rows if r["release_pk"] is not None), None)
        v = versions.get(p.task_pk, {})
        out.append(Result(p.source_pk, p.source_id, p.task_pk, p.task_id, p.output_pk,
                          f"{v.get('astra_version_major', '?')}.{v.get('astra_version_minor', '?')}",
                          release, dict(values.get(p.output_pk, {})), rows))
    return out


# ----------------------------------------------------------------------------- tables


@dataclass
class SummaryTable:
    """Named columns (numpy arrays of one length) with units and descriptions."""

    product: str
    columns: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def units(self) -> dict[str, str | None]:
        return {c: unit_of(c) for c in self.columns}

    def descriptions(self) -> dict[str, str]:
        return {c: description_of(c) for c in self.columns}


def _float(values: Iterable[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float32)


def _int(values: Iterable[Any], missing: int = -1) -> np.ndarray:
    return np.array([missing if v is None else v for v in values], dtype=np.int64)


def _array(kind: str, values: list[Any]) -> np.ndarray:
    if kind == "float":
        return _float(values)
    if kind == "int":
        return _int(values)
    if kind == "bool":
        return np.array([bool(v) for v in values], dtype=bool)
    return np.array(["" if v is None else str(v) for v in values], dtype=str)


def _element(values: Any, i: int) -> Any:
    if values is None or i >= len(values):
        return None
    return values[i]


def _column_order(schema: list[ColumnInfo]) -> list[ColumnInfo]:
    """Schema order, each ``u_x`` right after its ``x``."""
    by_name = {c.name: c for c in schema}
    out: list[ColumnInfo] = []
    for c in schema:
        if c.name.startswith("u_") and c.name[2:] in by_name:
            continue
        out.append(c)
        if f"u_{c.name}" in by_name:
            out.append(by_name[f"u_{c.name}"])
    return out


def label_columns(schema: Sequence[ColumnInfo]) -> list[str]:
    """Labels: float array columns with a ``u_`` partner (teff, logg, fe_h, vrel, ...)."""
    names = {c.name for c in schema}
    return [c.name for c in schema if c.array and c.kind == "float" and not c.name.startswith("u_")
            and f"u_{c.name}" in names]


def _nonnull(results: Sequence[Result], column: ColumnInfo) -> bool:
    for r in results:
        v = r.values.get(column.name)
        if v is None:
            continue
        if not column.array or any(x is not None for x in v):
            return True
    return False


def _n_elements(result: Result, schema: Sequence[ColumnInfo]) -> int:
    return max((len(result.values.get(c.name) or []) for c in schema if c.array), default=0)


def element_table(spec: MethodSpec, schema: list[ColumnInfo], results: Sequence[Result],
                  product: str) -> SummaryTable:
    """One row per array element (an apStar stack, or a doppler visit) of every result."""
    bits = flag_bits(spec)
    kept = [c for c in _column_order(schema) if _nonnull(results, c)]
    own = {c.name for c in kept}
    index = [(r, i) for r in results for i in range(_n_elements(r, schema))]
    spectrum = [(r.spectra[i] if i < len(r.spectra) else {}) for r, i in index]
    cols: dict[str, np.ndarray] = {
        "source_pk": _int(r.source_pk for r, _ in index),
        "source_id": _array("text", [r.source_id for r, _ in index]),
        "release": _array("text", [r.release for r, _ in index]),
        "telescope": _array("text", [s.get("telescope") for s in spectrum]),
    }
    if spec.element == "visit":
        cols["file"] = _array("text", [_relative(s.get("path"), r.release) for (r, _), s in zip(index, spectrum,
                                                                                              strict=True)])
    if "snr" not in own:  # the method table has no S/N: the spectrum's own
        cols["snr"] = _float(s.get("snr") for s in spectrum)
    for c in kept:
        if c.name == "bitmask_flag":
            continue
        if c.array:
            cols[c.name] = _array(c.kind, [_element(r.values.get(c.name), i) for r, i in index])
        else:
            cols[c.name] = _array(c.kind, [r.values.get(c.name) for r, _ in index])
    flags = _int(_element(r.values.get("bitmask_flag"), i) for r, i in index)
    cols["bitmask_flag"] = flags
    cols["flag_names"] = _array("text", [describe_flags(bits, int(f)) for f in flags])
    cols["task_id"] = _array("text", [r.task_id for r, _ in index])
    cols["v_astra"] = _array("text", [r.v_astra for r, _ in index])
    return SummaryTable(product, cols, {"method": spec.name, "labels": [c for c in label_columns(kept)]})


def _relative(path: str | None, release: str | None) -> str:
    if not path:
        return ""
    parts = Path(path).parts
    return str(Path(*parts[-2:])) if len(parts) >= 2 else path


def doppler_star_table(spec: MethodSpec, schema: list[ColumnInfo], results: Sequence[Result],
                       product: str) -> SummaryTable:
    """One row per source: the joint-fit velocity, the visit scatter and per-visit aggregates."""
    bits = flag_bits(spec)
    scalars = [c for c in schema if not c.array and _nonnull(results, c)]
    cols: dict[str, np.ndarray] = {
        "source_pk": _int(r.source_pk for r in results),
        "source_id": _array("text", [r.source_id for r in results]),
        "release": _array("text", [r.release for r in results]),
        "telescope": _array("text", [",".join(sorted({s["telescope"] or "" for s in r.spectra})) for r in results]),
        "n_visits": _int(len(r.values.get("vrel") or []) for r in results),
        "n_rv_good": _int(sum(v is not None and np.isfinite(v) for v in (r.values.get("vrel") or []))
                          for r in results),
        "mjd_first": _int(min(r.values.get("mjd") or [None], key=lambda m: m or 0) for r in results),
        "mjd_last": _int(max(r.values.get("mjd") or [None], key=lambda m: m or 0) for r in results),
        # visits add in quadrature, as their stack does
        "snr": _float(float(np.sqrt(np.nansum(np.square(_float(s["snr"] for s in r.spectra))))) if r.spectra
                      else None for r in results),
    }
    for c in scalars:
        cols[c.name] = _array(c.kind, [r.values.get(c.name) for r in results])
    flags = _int(int(np.bitwise_or.reduce([f or 0 for f in r.values.get("bitmask_flag") or [0]]))
                 for r in results)
    cols["bitmask_flag"] = flags
    cols["flag_names"] = _array("text", [describe_flags(bits, int(f)) for f in flags])
    cols["task_id"] = _array("text", [r.task_id for r in results])
    cols["v_astra"] = _array("text", [r.v_astra for r in results])
    table = SummaryTable(product, cols, {"method": spec.name, "labels": []})
    table.meta["flags_combine"] = "bitmask_flag is the OR of the visits' flags"
    return table


def product_name(spec: MethodSpec, kind: str = "Star") -> str:
    return f"astraAll{kind}{spec.stem}"


def build_tables(spec: MethodSpec, schema: list[ColumnInfo], results: Sequence[Result]) -> list[SummaryTable]:
    """The method's summary tables: astraAllStar<Method>, and for doppler also astraAllVisitDoppler."""
    if spec.element == "visit":
        return [doppler_star_table(spec, schema, results, product_name(spec)),
                element_table(spec, schema, results, product_name(spec, "Visit"))]
    return [element_table(spec, schema, results, product_name(spec))]


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class WrittenFile:
    product: str
    file_format: str
    path: Path
    sha256: str
    size: int
    n_rows: int


def file_name(product: str, file_format: str, version: str = __version__) -> str:
    return f"{product}-{version}{SUFFIX[file_format]}"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> tuple[str, int]:
    """``write(tmp)`` into a temporary file next to ``path``, then rename it over ``path``: a
    reader sees the old file or the new one, never half of one. Returns (sha256, size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        digest, size = sha256_of(tmp), tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest, size


def to_astropy(table: SummaryTable) -> Any:
    from astropy.table import Column, Table

    units, descriptions = table.units(), table.descriptions()
    return Table([Column(values, name=name, unit=units[name], description=descriptions[name])
                  for name, values in table.columns.items()])


def _write_fits(table: SummaryTable, path: Path) -> None:
    from astropy.io import fits
    from astropy.io.fits.connect import _encode_mixins

    # _encode_mixins is what Table.write uses to keep the descriptions (astropy's YAML comment
    # block); TCOMMn below is the FITS convention other readers (TOPCAT) show.
    hdu = fits.table_to_hdu(_encode_mixins(to_astropy(table)), character_as_bytes=True)
    hdu.name = table.product.upper()[:68]
    descriptions = table.descriptions()
    for i, name in enumerate(table.columns, start=1):
        hdu.header[f"TCOMM{i}"] = descriptions[name][:68]  # TOPCAT's column descriptions
    primary = fits.PrimaryHDU()
    for key, value in (("PRODUCT", table.product), ("METHOD", table.meta.get("method", "")),
                       ("RELEASE", table.meta.get("release", "")), ("V_ASTRA", __version__),
                       ("NSOURCES", table.meta.get("n_sources", 0)), ("NMISSING", table.meta.get("n_missing", 0))):
        primary.header[key] = value
    fits.HDUList([primary, hdu]).writeto(path)


def _write_parquet(table: SummaryTable, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    units, descriptions = table.units(), table.descriptions()
    fields, arrays = [], []
    for name, values in table.columns.items():
        array = pa.array(values.tolist() if values.dtype.kind == "U" else values)
        meta = {b"description": descriptions[name].encode()}
        if units[name]:
            meta[b"unit"] = units[name].encode()
        fields.append(pa.field(name, array.type, metadata=meta))
        arrays.append(array)
    schema = pa.schema(fields, metadata={b"product": table.product.encode(), b"v_astra": __version__.encode(),
                                         **{k.encode(): str(v).encode() for k, v in table.meta.items()
                                            if isinstance(v, str | int | float)}})
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path)


def _write_csv(table: SummaryTable, path: Path) -> None:
    to_astropy(table).write(path, format="ascii.csv")


_WRITERS: dict[str, Callable[[SummaryTable, Path], None]] = {
    "fits": _write_fits, "parquet": _write_parquet, "csv": _write_csv}


def write_table(table: SummaryTable, directory: Path, file_format: str) -> WrittenFile:
    if file_format not in _WRITERS:
        raise SummaryError(f"unknown format {file_format!r} (known: {', '.join(FORMATS)})")
    path = Path(directory) / file_name(table.product, file_format)
    digest, size = atomic_write(path, lambda tmp: _WRITERS[file_format](table, tmp))
    return WrittenFile(table.product, file_format, path, digest, size, table.n_rows)


@dataclass
class SummaryReport:
    method: str
    release: str
    files: list[WrittenFile]
    tables: list[SummaryTable]
    n_sources: int   # sources of the release with a result
    n_missing: int   # sources of the release without one


def summary_directory(astra_home: Path, release: str) -> Path:
    return Path(astra_home) / "summary" / release


def release_tables(conn: psycopg.Connection, method: str, release: str) -> tuple[list[SummaryTable], int, int]:
    """(the method's summary tables for the release, sources with a result, sources missing)."""
    spec = method_spec(method)
    rel = find_release(conn, release)
    results = fetch_results(conn, spec, release_pk=rel.pk)
    tables = build_tables(spec, table_schema(conn, spec.table), results)
    for t in tables:
        t.meta.update({"release": rel.name, "n_sources": len(results), "n_missing": rel.n_sources - len(results)})
    return tables, len(results), rel.n_sources - len(results)


def write_summary(conn: psycopg.Connection, method: str, release: str, directory: Path,
                  formats: Sequence[str] = ("fits", "parquet")) -> SummaryReport:
    """Write the method's summary tables of one release in each format under ``directory``."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SummaryError(f"unknown format {unknown[0]!r} (known: {', '.join(FORMATS)})")
    tables, n_sources, n_missing = release_tables(conn, method, release)
    files = [write_table(t, directory, f) for t in tables for f in formats]
    return SummaryReport(method, release, files, tables, n_sources, n_missing)


def result_fingerprint(conn: psycopg.Connection, spec: MethodSpec, release_pk: int) -> tuple[str, int]:
    """(sha256 over the (source, task, output) of every result a release summary would hold,
    their number): a new or recomputed result changes it, and with it the summary task."""
    h = hashlib.sha256()
    picked = _pick(conn, spec, release_pk, None)
    for p in picked:
        spectra_pk = p.spectra[0]["output_pk"] if p.spectra else None
        h.update(f"{p.source_pk}:{p.task_pk}:{p.output_pk}:{spectra_pk}\n".encode())
    return h.hexdigest(), len(picked)
