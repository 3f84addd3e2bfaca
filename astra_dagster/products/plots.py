"""Small PNG plots of a method's results for the Dagster UI, and the metadata that carries them.

Dagster has no image metadata type: a PNG goes in as markdown with a ``data:image/png;base64``
URI (``MetadataValue.md``), so plots are kept small (a few tens of kB: 4.8 x 3.6 in at 70 dpi).
Everything here takes a :class:`~astra_dagster.products.summary.SummaryTable` (one row per stack
or visit) and returns markdown strings or plain records; the Dagster wrappers turn them into
metadata values.

* :func:`kiel_markdown`: Teff vs logg coloured by [Fe/H] (unflagged results);
* :func:`delta_markdown`: Δlabel vs the true value, per label, for synthetic releases;
* :func:`rv_scatter_markdown`: histogram of the visit RV scatter (doppler, per star);
* :func:`rv_error_markdown`: the RV uncertainty (and |ΔRV| with truth) vs S/N (doppler, per visit).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from astra_dagster.products.summary import SummaryTable

FIGSIZE = (4.8, 3.6)
DPI = 70
#: Points drawn per panel at most (a random, fixed subset beyond): drawing 20,000 markers costs
#: ~1 s a panel, and the picture of 3,000 is the same.
MAX_POINTS = 3000
#: Metallicity columns, in order of preference, for the Kiel diagram's colour.
METALLICITY = ("fe_h", "m_h", "metals")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def _subset(mask: np.ndarray) -> np.ndarray:
    """``mask`` thinned to at most MAX_POINTS true entries (the same ones on every call)."""
    rows = np.flatnonzero(mask)
    if rows.size > MAX_POINTS:
        rows = np.sort(np.random.default_rng(0).choice(rows, MAX_POINTS, replace=False))
    out = np.zeros(mask.shape, dtype=bool)
    out[rows] = True
    return out


def png_markdown(fig: Any, alt: str) -> str:
    """The figure as a markdown image with a base64 PNG data URI (the figure is closed)."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def _good(table: SummaryTable, informational: int) -> np.ndarray:
    flags = table.columns["bitmask_flag"].astype(np.int64)
    return (flags >= 0) & ((flags & ~informational) == 0)


def kiel_markdown(table: SummaryTable, informational: int = 0, title: str = "") -> str | None:
    """Teff vs logg (both axes reversed, as astronomers draw it) coloured by [Fe/H]; None when
    the table has no Teff and logg."""
    if "teff" not in table.columns or "logg" not in table.columns:
        return None
    plt = _pyplot()
    good = _good(table, informational)
    teff, logg = table.columns["teff"], table.columns["logg"]
    shown = good & np.isfinite(teff) & np.isfinite(logg)
    keep = _subset(shown)
    metal = next((m for m in METALLICITY if m in table.columns), None)
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    if metal is not None:
        points = ax.scatter(teff[keep], logg[keep], c=table.columns[metal][keep], s=8, cmap="viridis",
                            vmin=-2.0, vmax=0.5)
        fig.colorbar(points, ax=ax, label=f"[{'Fe' if metal == 'fe_h' else 'M'}/H]")
    else:
        ax.scatter(teff[keep], logg[keep], s=8)
    ax.invert_xaxis()
    ax.invert_yaxis()
    ax.set_xlabel("Teff (K)")
    ax.set_ylabel("log g")
    ax.set_title(f"{title} ({int(shown.sum())} of {table.n_rows} unflagged)", fontsize=9)
    return png_markdown(fig, "Kiel diagram")


def delta_markdown(table: SummaryTable, truth: Mapping[str, np.ndarray], informational: int = 0,
                   title: str = "") -> str | None:
    """Δlabel (estimate − truth) vs truth, one panel per label with a truth, unflagged results."""
    labels = [k for k in table.meta.get("labels", []) if k in truth and k in table.columns]
    if not labels:
        return None
    plt = _pyplot()
    good = _good(table, informational)
    fig, axes = plt.subplots(1, len(labels), figsize=(2.4 * len(labels), 2.6), squeeze=False, layout="constrained")
    for ax, label in zip(axes[0], labels, strict=True):
        t = truth[label]
        d = table.columns[label].astype(float) - t
        keep = _subset(good & np.isfinite(d))
        ax.scatter(t[keep], d[keep], s=6, c=table.columns["snr"][keep], cmap="plasma", vmin=0, vmax=200)
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_xlabel(f"true {label}", fontsize=8)
        ax.set_ylabel(f"Δ{label}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{title}: Δ vs truth (colour: S/N)", fontsize=9)
    return png_markdown(fig, "Delta vs truth")


def rv_scatter_markdown(stars: SummaryTable, title: str = "") -> str | None:
    """Histogram of the stars' visit RV scatter (km/s), stars with two or more good visits."""
    if "vscatter" not in stars.columns:
        return None
    plt = _pyplot()
    v = stars.columns["vscatter"].astype(float)
    keep = np.isfinite(v) & (stars.columns.get("n_rv_good", np.full(len(v), 2)) >= 2)
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    if keep.any():
        ax.hist(np.log10(np.clip(v[keep], 1e-3, None)), bins=30)
    ax.set_xlabel("log10 visit RV scatter (km/s)")
    ax.set_ylabel("stars")
    ax.set_title(f"{title} ({int(keep.sum())} stars)", fontsize=9)
    return png_markdown(fig, "RV scatter")


def rv_error_markdown(visits: SummaryTable, true_vrel: np.ndarray | None = None, informational: int = 0,
                      title: str = "") -> str | None:
    """The visits' RV uncertainty vs S/N (and |ΔRV| against the truth when given), log-log."""
    if "u_vrel" not in visits.columns:
        return None
    plt = _pyplot()
    good = _good(visits, informational)
    snr, u = visits.columns["snr"].astype(float), visits.columns["u_vrel"].astype(float)
    shown = good & np.isfinite(u) & (u > 0) & np.isfinite(snr) & (snr > 0)
    keep = _subset(shown)
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    ax.scatter(snr[keep], u[keep], s=8, label="σ(vrel)")
    if true_vrel is not None:
        d = np.abs(visits.columns["vrel"].astype(float) - true_vrel)
        dk = keep & np.isfinite(d) & (d > 0)
        ax.scatter(snr[dk], d[dk], s=8, marker="x", label="|Δvrel| vs truth")
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("S/N")
    ax.set_ylabel("km/s")
    ax.set_title(f"{title} ({int(shown.sum())} visits)", fontsize=9)
    return png_markdown(fig, "RV error vs S/N")


def accuracy_records(bins: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Contract 6's bins flattened: one record per S/N bin and label (empty bins left out)."""
    out = []
    for b in bins:
        if not b["n"]:
            continue
        span = f"{b['snr_lo']}-{b['snr_hi']}" if b["snr_hi"] is not None else f"{b['snr_lo']}+"
        for label, st in b["labels"].items():
            if st["rms"] is None:
                continue
            out.append({"snr": span, "label": label, "n": int(b["n"]),
                        **{k: (None if st[k] is None else round(float(st[k]), 4))
                           for k in ("bias", "rms", "robust_sigma", "outlier_frac", "pull_std")}})
    return out


def diagnostics(spec: Any, elements: SummaryTable, truth: Any = None, stars: SummaryTable | None = None,
                title: str = "") -> dict[str, Any]:
    """The plots (markdown strings) and the per-S/N accuracy records (a list) of a result table:
    Kiel diagram; with ``truth`` (:class:`~astra_dagster.products.quality.Truth`) the accuracy per
    S/N bin and Δ vs truth; for doppler the RV scatter histogram (``stars``) and RV error vs S/N."""
    from astra_dagster.products import quality as qa

    out: dict[str, Any] = {}
    if not elements.n_rows:
        return out
    true = qa.truth_columns(spec, elements, truth) if truth is not None else None
    kiel = kiel_markdown(elements, spec.informational, title)
    if kiel:
        out["kiel_diagram"] = kiel
    if true is not None:
        out["accuracy_by_snr"] = accuracy_records(qa.accuracy_by_snr(spec, elements, truth))
        delta = delta_markdown(elements, true, spec.informational, title)
        if delta:
            out["delta_vs_truth"] = delta
    if stars is not None:
        scatter = rv_scatter_markdown(stars, title)
        if scatter:
            out["rv_scatter"] = scatter
    if "vrel" in elements.columns:
        error = rv_error_markdown(elements, None if true is None else true.get("vrel"), spec.informational, title)
        if error:
            out["rv_error_vs_snr"] = error
    return out
