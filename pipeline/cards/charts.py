"""Matplotlib figures for the data-card site: funnel, histograms and the H3 density map.

Every function takes already-aggregated rows (DuckDB does the counting) and writes one PNG. Figures are
built without pyplot (no global state) and saved without metadata, so the same rows give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import geopandas as gpd
import h3
import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.colors import ListedColormap, LogNorm, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

KEPT_COLOUR = "#3d8f5a"
REASON_COLOURS = ("#c8553d", "#e59a3b", "#8e63b5", "#3c78c3", "#b8a032", "#7a7a7a", "#2aa6a6", "#d0609a")
CLIP_CATEGORIES = (("published", "#3c78c3"), ("passed the filter, dropped later", "#9bbbe0"),
                   ("dropped by the filter", "#c8553d"))
STYLE: dict[RcKeyType, Any] = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                               "axes.titlesize": 10, "axes.titleweight": "bold", "legend.frameon": False}
DPI = 100
# magma without its palest and darkest ends: every count stands out on the grey land and the pale sea
DENSITY_CMAP = ListedColormap(colormaps["magma_r"](np.linspace(0.2, 0.95, 256)), name="density")


def source_colours(sources: Iterable[str]) -> dict[str, str]:
    """One stable colour per source (sorted names on tab20), shared by every chart so sources read alike."""
    cmap = colormaps["tab20"]
    return {s: to_hex(cmap(i % 20)) for i, s in enumerate(sorted(set(sources)))}


def _save(fig: Figure, path: Path, dpi: int = DPI) -> Path:
    """PNG without Software/date metadata: byte-identical across runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.1)
    return path


def _stacked_bars(ax: Axes, labels: Sequence[str], series: Mapping[str, Sequence[int]],
                  colours: Mapping[str, str]) -> None:
    """Vertical bars, one stacked segment per series (e.g. per source), legend outside on the right."""
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for name, counts in series.items():
        ax.bar(x, counts, bottom=bottom, color=colours.get(name, "#888888"), label=name, width=0.8)
        bottom += np.asarray(counts, dtype=float)
    ax.set_xticks(x, labels, fontsize=7.5)
    ax.set_ylabel("samples")
    if len(series) > 1:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


@dataclass(frozen=True)
class StageTotals:
    """One funnel stage summed over sources: rows in, kept, added (sentence rows) and dropped by reason."""

    stage: str
    rows_in: int
    kept: int
    added: int
    dropped_by_reason: dict[str, int]


def funnel_chart(stages: Sequence[StageTotals], path: Path) -> Path:
    """One horizontal bar per stage: rows kept plus rows dropped, split by reason."""
    reasons = sorted({r for s in stages for r in s.dropped_by_reason})
    colour = {r: REASON_COLOURS[i % len(REASON_COLOURS)] for i, r in enumerate(reasons)}
    ordered = list(stages)[::-1]  # first stage on top
    with rc_context(STYLE):
        fig = Figure(figsize=(10, 0.45 * len(stages) + 1.4))
        ax = fig.add_subplot()
        y = np.arange(len(ordered))
        left = np.asarray([s.kept for s in ordered], dtype=float)
        ax.barh(y, left, color=KEPT_COLOUR, label="kept")
        for reason in reasons:
            n = np.asarray([s.dropped_by_reason.get(reason, 0) for s in ordered], dtype=float)
            ax.barh(y, n, left=left, color=colour[reason], label=f"dropped: {reason}")
            left = left + n
        for yi, s in zip(y, ordered, strict=True):
            ax.annotate(f" {s.rows_in:,} in → {s.kept:,} kept", (float(left[yi]), float(yi)), va="center",
                        fontsize=8)
        ax.set_yticks(y, [s.stage for s in ordered])
        ax.set_xlabel("rows (samples) entering the stage")
        ax.set_xlim(0, max(float(left.max(initial=1.0)), 1.0) * 1.25)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        return _save(fig, path)


def level_histogram(rows: Sequence[tuple[int, str, int]], colours: Mapping[str, str], path: Path) -> Path:
    """Samples per Text2Earth level, stacked by source; level 0 (unknown GSD) first, then every level in range."""
    present = sorted({lvl for lvl, _, _ in rows if lvl})
    levels = ([0] if any(lvl == 0 for lvl, _, _ in rows) else []) + (
        list(range(present[0], present[-1] + 1)) if present else [])
    labels = ["0\nunknown" if lvl == 0 else f"{lvl}\n{_metres(2.0 ** (17 - lvl))}" for lvl in levels]
    series = _series(rows, levels)
    with rc_context(STYLE):
        fig = Figure(figsize=(10, 3.6))
        ax = fig.add_subplot()
        _stacked_bars(ax, labels, series, colours)
        ax.set_xlabel("Text2Earth level (and its nominal GSD, 2^(17 − level) m)")
        return _save(fig, path)


def gsd_histogram(rows: Sequence[tuple[int, str, int]], colours: Mapping[str, str], path: Path) -> Path:
    """Samples per power-of-two GSD bin [2^e, 2^(e+1)) m, stacked by source; samples without GSD are left out."""
    exps = sorted({e for e, _, _ in rows})
    bins = list(range(exps[0], exps[-1] + 1)) if exps else []
    labels = [f"{2.0 ** e:g}–{2.0 ** (e + 1):g}" for e in bins]
    series = _series(rows, bins)
    with rc_context(STYLE):
        fig = Figure(figsize=(10, 3.6))
        ax = fig.add_subplot()
        _stacked_bars(ax, labels, series, colours)
        ax.tick_params(axis="x", labelrotation=35)
        ax.set_xlabel("ground sample distance (m per pixel), power-of-two bins")
        return _save(fig, path)


def caption_length_histogram(rows: Sequence[tuple[int, int]], cap: int, path: Path) -> Path:
    """Captions per word count; the last bar gathers everything at or above `cap` words."""
    counts = dict(rows)
    top = max(counts, default=1)
    x = list(range(1, top + 1))
    with rc_context(STYLE):
        fig = Figure(figsize=(10, 3.0))
        ax = fig.add_subplot()
        ax.bar(x, [counts.get(i, 0) for i in x], color="#3c78c3", width=0.85)
        ax.set_xlabel(f"caption length (words; {cap} = {cap} or more)")
        ax.set_ylabel("samples")
        return _save(fig, path)


def clip_histograms(edges: Sequence[float], counts: Mapping[tuple[str, str], Sequence[int]],
                    thresholds: Mapping[str, Sequence[tuple[int, float]]], min_score: float | None,
                    path: Path) -> Path:
    """One panel per source: CLIP scores of published, later-dropped and filtered-out rows, thresholds drawn.

    With `min_score` set, that one line is drawn on every panel; otherwise each (source, level) group gets a
    dashed line at its effective threshold (the lowest published score).
    """
    sources = sorted({s for s, _ in counts})
    ncols = min(3, max(len(sources), 1))
    nrows = max(1, math.ceil(len(sources) / ncols))
    bins = len(edges) - 1
    with rc_context(STYLE):
        fig = Figure(figsize=(4.2 * ncols, 2.6 * nrows + 0.6))
        axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw={"hspace": 0.45, "wspace": 0.22})
        for i, (ax, source) in enumerate(zip(axes.flat, sources, strict=False)):
            bottom = np.zeros(bins)
            for category, colour in CLIP_CATEGORIES:  # one filled step patch per layer: fast, crisp
                top = bottom + np.asarray(counts.get((source, category), [0] * bins), dtype=float)
                ax.stairs(top, edges, baseline=bottom, fill=True, color=colour)
                bottom = top
            lines = [(None, min_score)] if min_score is not None else list(thresholds.get(source, []))
            for level, value in lines:
                ax.axvline(value, color="#222222", linestyle="-" if level is None else "--", linewidth=1)
                if level is not None and len(lines) <= 6:
                    ax.annotate(f"L{level}", (value, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                                fontsize=7, va="top", ha="right")
            ax.set_title(source, fontsize=9)
            ax.set_xlim(edges[0], edges[-1])
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.yaxis.set_major_locator(MaxNLocator(4, integer=True))
            if i + ncols >= len(sources):  # lowest panel of its column
                ax.set_xlabel("CLIP score (image–caption cosine)")
        for ax in list(axes.flat)[len(sources):]:
            ax.set_visible(False)
        handles = [Patch(color=c, label=name) for name, c in CLIP_CATEGORIES]
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.9), ncols=3, fontsize=8)
        return _save(fig, path)


def density_map(cells: Sequence[tuple[str, int]], boundaries: Path, path: Path) -> Path:
    """Samples per H3 cell on Natural Earth outlines, equirectangular, log colour scale."""
    with rc_context(STYLE):
        fig = Figure(figsize=(12, 6.4))
        ax = fig.add_subplot()
        land = [np.asarray(p.exterior.coords) for g in gpd.read_file(boundaries).geometry for p in _polygons(g)]
        ax.add_collection(PolyCollection(land, facecolor="#e9e9e4", edgecolor="#b4b4ac", linewidth=0.3))
        hexes, values = [], []
        for cell, n in cells:
            for ring in _cell_rings(cell):
                hexes.append(ring)
                values.append(n)
        if hexes:
            top = max(max(values), 2)
            coll = PolyCollection(hexes, array=np.asarray(values, dtype=float), cmap=DENSITY_CMAP,
                                  norm=LogNorm(vmin=1, vmax=top), linewidth=0.6)
            coll.set_edgecolor("face")
            ax.add_collection(coll)
            fig.colorbar(coll, ax=ax, shrink=0.7, pad=0.01, label="samples per cell (log scale)")
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        ax.set_aspect("equal")
        ax.set_xticks(range(-180, 181, 60))
        ax.set_yticks(range(-90, 91, 30))
        ax.set_facecolor("#f2f6fa")
        ax.grid(color="white", linewidth=0.5)
        return _save(fig, path, dpi=130)


def _cell_rings(cell: str) -> list[np.ndarray]:
    """Lon/lat rings of one H3 cell; a cell across the antimeridian is drawn on both edges of the map."""
    ring = np.asarray([(lng, lat) for lat, lng in h3.cell_to_boundary(cell)])
    if np.ptp(ring[:, 0]) <= 180:
        return [ring]
    east = ring.copy()
    east[:, 0] = np.where(east[:, 0] < 0, east[:, 0] + 360, east[:, 0])
    west = east.copy()
    west[:, 0] -= 360
    return [east, west]


def _polygons(geom: BaseGeometry | None) -> list[Polygon]:
    """Every polygon of a (multi)polygon or geometry collection."""
    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    return [p for part in getattr(geom, "geoms", []) for p in _polygons(part)]


def _series(rows: Sequence[tuple[int, str, int]], bins: Sequence[int]) -> dict[str, list[int]]:
    """Pivot (bin, source, n) rows into one count list per source, aligned on `bins`."""
    index = {b: i for i, b in enumerate(bins)}
    series: dict[str, list[int]] = {}
    for b, source, n in sorted(rows, key=lambda r: (r[1], r[0])):
        series.setdefault(source, [0] * len(bins))[index[b]] += n
    return series


def _metres(m: float) -> str:
    """Short GSD label: 0.25 m, 2 m, 1 km."""
    if m >= 1000:
        return f"{m / 1000:.3g} km"
    return f"{m:g} m"
