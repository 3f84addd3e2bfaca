"""Quality checks of a method's results (the asset checks' science, free of Dagster).

Each check takes a summary table (:func:`astra_dagster.products.summary.element_table`: one row
per stack or visit) and returns a :class:`CheckOutcome`:

* ``finite_labels``: no label NaN, infinite or NULL without a flag (a failed fit must say so);
* ``uncertainties``: every unflagged finite label has a finite, positive uncertainty;
* ``flagged_fraction``: the fraction of flagged results, a warning above a threshold;
* ``accuracy_vs_truth``: for synthetic releases, the rms against the release's truth of the
  unflagged results, pooled above the S/N each target names, within the method's stated
  targets (``reference/methods.md`` §6), a warning otherwise.

"Flagged" means a flag bit that is not merely informational (:attr:`MethodSpec.informational`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astra_dagster.products.summary import MethodSpec, SummaryTable

#: Above this fraction of flagged results the flagged_fraction check warns.
FLAGGED_FRACTION_WARN = 0.2
#: Offending rows listed in a failed check's metadata.
SHOWN = 10


@dataclass(frozen=True)
class Target:
    """rms of ``label`` (relative to the truth when ``relative``) at S/N >= ``snr_min`` over stars
    of ``kinds`` (None: all) at most ``limit``."""

    label: str
    limit: float
    snr_min: float
    relative: bool = False
    kinds: tuple[str, ...] | None = None


_COOL = ("giant", "dwarf", "yso")

#: The accuracy targets of reference/methods.md §6 (Doppler's velocity ones from issue #10: cool stars).
TARGETS: dict[str, list[Target]] = {
    "doppler": [Target("vrel", 0.1, 20, kinds=_COOL), Target("vrel", 0.05, 50, kinds=_COOL),
                Target("teff", 150.0, 20), Target("logg", 0.25, 20), Target("fe_h", 0.15, 20)],
    "thecannon": [Target("teff", 60.0, 50, kinds=("giant",)), Target("logg", 0.12, 50, kinds=("giant",)),
                  Target("fe_h", 0.08, 50, kinds=("giant",))],
    "thepayne": [Target("teff", 50.0, 50), Target("logg", 0.1, 50), Target("fe_h", 0.05, 50)],
    "ferre": [Target("teff", 0.02, 100, relative=True), Target("logg", 0.1, 100), Target("metals", 0.05, 100)],
    "apogeenet": [Target("teff", 0.05, 50, relative=True), Target("logg", 0.15, 50), Target("fe_h", 0.1, 50)],
}

#: Table label → truth column of the release's truth_sources.csv (vrel: truth_visits.csv).
TRUTH_COLUMN = {"teff": "teff", "logg": "logg", "fe_h": "fe_h", "metals": "fe_h", "m_h": "fe_h",
                "alpha_m": "alpha_m", "o_mg_si_s_ca_ti": "alpha_m", "vrel": "vrel"}


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    #: "ERROR" or "WARN": how a failure shows in the UI.
    severity: str
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def flagged(spec: MethodSpec, table: SummaryTable) -> np.ndarray:
    flags = table.columns["bitmask_flag"].astype(np.int64)
    # an unknown flag (-1, a NULL) counts as flagged: nothing vouches for the result
    return (flags < 0) | ((flags & ~spec.informational) != 0)


def _offenders(table: SummaryTable, rows: np.ndarray, label: str) -> list[str]:
    ids = table.columns["source_id"][rows][:SHOWN]
    return [f"{s} ({label})" for s in ids]


def finite_labels(spec: MethodSpec, table: SummaryTable) -> CheckOutcome:
    bad_flag = flagged(spec, table)
    counts, shown = {}, []
    for label in table.meta["labels"]:
        bad = ~np.isfinite(table.columns[label]) & ~bad_flag
        counts[label] = int(bad.sum())
        shown += _offenders(table, bad, label)
    n = sum(counts.values())
    return CheckOutcome("finite_labels", n == 0, "ERROR",
                        "No label is NaN, infinite or NULL without a flag saying why.",
                        {"rows": table.n_rows, "unflagged_nonfinite": n, "per_label": counts,
                         **({"examples": shown[:SHOWN]} if shown else {})})


def uncertainties(spec: MethodSpec, table: SummaryTable) -> CheckOutcome:
    good = ~flagged(spec, table)
    counts, shown = {}, []
    for label in table.meta["labels"]:
        u = table.columns.get(f"u_{label}")
        if u is None:
            continue
        value = table.columns[label]
        bad = good & np.isfinite(value) & ~(np.isfinite(u) & (u > 0))
        counts[label] = int(bad.sum())
        shown += _offenders(table, bad, label)
    n = sum(counts.values())
    return CheckOutcome("uncertainties", n == 0, "ERROR",
                        "Every unflagged finite label has a finite, positive uncertainty.",
                        {"rows": table.n_rows, "bad_uncertainties": n, "per_label": counts,
                         **({"examples": shown[:SHOWN]} if shown else {})})


def flagged_fraction(spec: MethodSpec, table: SummaryTable,
                     threshold: float = FLAGGED_FRACTION_WARN) -> CheckOutcome:
    bad = flagged(spec, table)
    fraction = float(bad.mean()) if table.n_rows else 0.0
    names: dict[str, int] = {}
    for text in table.columns["flag_names"][bad]:
        for name in str(text).split("|"):
            if name:
                names[name] = names.get(name, 0) + 1
    return CheckOutcome("flagged_fraction", fraction <= threshold, "WARN",
                        f"At most {threshold:.0%} of the results carry a flag.",
                        {"rows": table.n_rows, "flagged": int(bad.sum()), "fraction": round(fraction, 4),
                         "threshold": threshold, "flags": dict(sorted(names.items(), key=lambda kv: -kv[1]))})


# ----------------------------------------------------------------------------- truth


@dataclass(frozen=True)
class Truth:
    """The truth tables of the synthetic releases a table's rows come from."""

    stars: dict[str, dict[str, Any]]
    visits: dict[tuple[str, int], dict[str, Any]]


def load_truth(release_paths: Mapping[str, Path]) -> Truth:
    from astra_dagster.spectra.release import read_truth

    stars: dict[str, dict[str, Any]] = {}
    visits: dict[tuple[str, int], dict[str, Any]] = {}
    for path in release_paths.values():
        s, v = read_truth(path)
        stars.update({row["source_id"]: row for row in s})
        visits.update({(row["source_id"], int(row["mjd"])): row for row in v})
    return Truth(stars, visits)


def truth_columns(spec: MethodSpec, table: SummaryTable, truth: Truth) -> dict[str, np.ndarray]:
    """Per row of the table, the true value of each label that has one, and ``kind``."""
    ids = table.columns["source_id"]
    out: dict[str, np.ndarray] = {}
    kinds = [truth.stars.get(s, {}).get("kind", "?") for s in ids]
    for label in table.meta["labels"]:
        column = TRUTH_COLUMN.get(label)
        if column is None:
            continue
        if column == "vrel":
            if "mjd" not in table.columns:
                continue
            rows = [truth.visits.get((s, int(m)), {}) for s, m in zip(ids, table.columns["mjd"], strict=True)]
        else:
            rows = [truth.stars.get(s, {}) for s in ids]
        out[label] = np.array([r.get(column, np.nan) for r in rows], dtype=float)
    out["kind"] = np.array(kinds)
    return out


def accuracy(spec: MethodSpec, table: SummaryTable, truth: Truth,
             targets: Sequence[Target] | None = None) -> CheckOutcome:
    """rms of the unflagged results against the truth per target (see :data:`TARGETS`)."""
    targets = TARGETS.get(spec.name, []) if targets is None else targets
    true = truth_columns(spec, table, truth)
    good = ~flagged(spec, table)
    snr = table.columns["snr"].astype(float)
    results, passed = [], True
    for t in targets:
        if t.label not in true:
            continue  # the method no longer reports the label
        delta = table.columns[t.label].astype(float) - true[t.label]
        if t.relative:
            delta = delta / true[t.label]
        with np.errstate(invalid="ignore"):
            pick = good & (snr >= t.snr_min) & np.isfinite(delta)
        if t.kinds is not None:
            pick &= np.isin(true["kind"], t.kinds)
        rms = float(np.sqrt(np.mean(delta[pick] ** 2))) if pick.any() else None
        ok = rms is None or rms <= t.limit
        passed &= ok
        results.append({"label": t.label, "snr_min": t.snr_min, "kinds": ",".join(t.kinds or ("all",)),
                        "n": int(pick.sum()), "rms": None if rms is None else round(rms, 5),
                        "limit": t.limit, "relative": t.relative, "pass": ok})
    return CheckOutcome("accuracy_vs_truth", passed, "WARN",
                        "rms against the synthetic release's truth (unflagged results) within the method's "
                        "stated targets.", {"rows": table.n_rows, "targets": results})


def accuracy_by_snr(spec: MethodSpec, table: SummaryTable, truth: Truth) -> list[dict[str, Any]]:
    """Contract 6's per-S/N-bin statistics of the unflagged results against the truth."""
    # imported here: the code location (defs/checks) loads this module, no astra_dagster.methods needed
    from astra_dagster.methods.metrics import SNR_BINS, accuracy_bins

    true = truth_columns(spec, table, truth)
    good = ~flagged(spec, table)
    labels = [label for label in table.meta["labels"] if label in true]
    if not labels or not good.any():
        return []
    return accuracy_bins({k: true[k][good] for k in labels},
                         {k: table.columns[k][good].astype(float) for k in labels},
                         {k: table.columns[f"u_{k}"][good].astype(float) for k in labels
                          if f"u_{k}" in table.columns},
                         table.columns["snr"][good].astype(float), bins=SNR_BINS)


def run_checks(spec: MethodSpec, table: SummaryTable, truth: Truth | None) -> list[CheckOutcome]:
    """Every check; accuracy only with the truth of a synthetic release."""
    out = [finite_labels(spec, table), uncertainties(spec, table), flagged_fraction(spec, table)]
    if truth is None:
        out.append(CheckOutcome("accuracy_vs_truth", True, "WARN", "No synthetic release among the results: "
                                "nothing to compare with.", {"rows": table.n_rows}))
    else:
        out.append(accuracy(spec, table, truth))
    return out


def truth_for(conn: Any, table: SummaryTable) -> Truth | None:
    """The truth of the synthetic releases the table's rows come from (None: none is synthetic)."""
    names = sorted({str(r) for r in table.columns["release"] if r}) if table.n_rows else []
    if not names:
        return None
    rows = conn.execute("select name, path from astra.data_release where name = any(%s) and synthetic",
                        (names,)).fetchall()
    return load_truth({name: Path(path) for name, path in rows}) if rows else None
