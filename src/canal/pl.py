"""Plots of annotation results. Each function returns a matplotlib Figure or Axes.

Figures are built with the object-oriented API (:class:`matplotlib.figure.Figure`, whose
canvas is Agg), never through ``pyplot``: nothing is shown, no global figure state is touched,
and the caller saves with ``fig.savefig(path)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from canal import metrics
from canal.metrics import UNASSIGNED

logger = logging.getLogger(__name__)

__all__ = ["accuracy_matrix", "confusion", "novelty_hist", "stream_accuracy", "umap"]

_UNASSIGNED_COLOR = "#bdbdbd"


def _new_axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    fig = Figure(figsize=size, layout="constrained")
    return fig.add_subplot()


def _obs_column(adata, col: str, what: str) -> pd.Series:
    if col not in adata.obs:
        raise KeyError(f"{what} column {col!r} not in adata.obs (columns: "
                       f"{list(adata.obs.columns)}); pass the right key")
    return adata.obs[col]


def confusion(adata, *, truth: str = "cell_type", key: str = "canal",
              normalize: Literal["true", "pred", "all"] | None = "true",
              ax: Axes | None = None) -> Axes:
    """Heatmap of the confusion matrix (rows: true types, columns: predicted, ``Unassigned`` last).

    Parameters
    ----------
    adata
        Annotated cells.
    truth
        ``adata.obs`` column of true labels.
    key
        ``adata.obs`` column of predictions (``key_added`` of ``predict``).
    normalize
        As in :func:`canal.metrics.confusion`; ``"true"`` shows the share of each true type.
    ax
        Axes to draw into; a new figure by default.

    Returns
    -------
    The Axes (its ``.figure`` to save).
    """
    cm = metrics.confusion(_obs_column(adata, truth, "truth"), _obs_column(adata, key,
                                                                           "prediction"),
                           normalize=normalize)
    n_rows, n_cols = cm.shape
    ax = _new_axes(ax, (1.5 + 0.45 * n_cols, 1.2 + 0.4 * n_rows))
    values = cm.to_numpy(dtype=float)
    image = ax.imshow(values, cmap="Blues", aspect="auto", vmin=0,
                      vmax=1 if normalize else max(values.max(), 1))
    ax.set_xticks(range(n_cols), cm.columns, rotation=90)
    ax.set_yticks(range(n_rows), cm.index)
    ax.set_xlabel(f"predicted ({key})")
    ax.set_ylabel(f"true ({truth})")
    top = values.max() if values.size else 0
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            if v == 0:
                continue
            text = f"{v:.2f}" if normalize else f"{int(v)}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 * top else "black")
    ax.figure.colorbar(image, ax=ax, shrink=0.8,
                       label="share of true type" if normalize == "true" else
                       ("share" if normalize else "cells"))
    return ax


def _palette(categories: Sequence[str]) -> dict[str, str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    named = [c for c in categories if c != UNASSIGNED]
    cmap = colormaps["tab20" if len(named) > 10 else "tab10"]
    colors = {c: to_hex(cmap(i % cmap.N)) for i, c in enumerate(named)}
    colors[UNASSIGNED] = _UNASSIGNED_COLOR
    return colors


def umap(adata, *, rep: str = "X_canal", color: Sequence[str] = ("canal",),
         max_cells: int = 20000, n_neighbors: int = 15, seed: int = 0) -> Figure:
    """UMAP of a representation, one panel per ``adata.obs`` column in ``color``.

    The neighbour graph and UMAP are computed with scanpy
    (``sc.pp.neighbors(use_rep=rep)``, ``sc.tl.umap``) on a light copy holding only ``rep`` and
    the colour columns; ``adata`` is not modified. Categories shared by several columns get the
    same colour in every panel; ``Unassigned`` is grey.

    Parameters
    ----------
    adata
        Annotated cells (in memory or backed).
    rep
        ``adata.obsm`` key of the representation.
    color
        ``adata.obs`` columns to colour by, e.g. ``("canal", "cell_type")``.
    max_cells
        Plot a seeded random subset of at most this many cells.
    n_neighbors
        Neighbours of the kNN graph.
    seed
        Seed of the subset and of UMAP.

    Returns
    -------
    A Figure with one Axes per colour column.
    """
    import anndata as ad
    import scanpy as sc

    if rep not in adata.obsm:
        raise KeyError(f"{rep!r} not in adata.obsm ({list(adata.obsm)}); run "
                       "model.predict(adata) first or pass rep=...")
    color = [color] if isinstance(color, str) else list(color)
    cols = {c: _obs_column(adata, c, "colour").astype(str).to_numpy() for c in color}
    x = np.asarray(adata.obsm[rep], dtype=np.float32)
    idx = np.arange(adata.n_obs)
    if adata.n_obs > max_cells:
        idx = np.sort(np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False))
        logger.info("UMAP of %d of %d cells", max_cells, adata.n_obs)
    if len(idx) < 3:
        raise ValueError(f"a UMAP needs at least 3 cells, got {len(idx)}")
    light = ad.AnnData(obs=pd.DataFrame({c: v[idx] for c, v in cols.items()},
                                        index=adata.obs_names[idx].astype(str)),
                       obsm={rep: x[idx]})
    sc.pp.neighbors(light, use_rep=rep, n_neighbors=min(n_neighbors, len(idx) - 1),
                    random_state=seed)
    sc.tl.umap(light, random_state=seed)
    xy = light.obsm["X_umap"]
    seen = set(np.concatenate([light.obs[c].to_numpy() for c in color]))
    categories = sorted(seen - {UNASSIGNED}) + ([UNASSIGNED] if UNASSIGNED in seen else [])
    colors = _palette(categories)
    fig = Figure(figsize=(5.5 * len(color), 4.5), layout="constrained")
    axes = fig.subplots(1, len(color), squeeze=False)[0]
    size = max(1.0, min(20.0, 12000 / len(idx)))
    for ax, c in zip(axes, color, strict=True):
        labels = light.obs[c].to_numpy()
        present = [k for k in categories if k in set(labels)]
        for k in present:
            m = labels == k
            ax.scatter(xy[m, 0], xy[m, 1], s=size, c=colors[k], label=k, linewidths=0,
                       rasterized=True)
        ax.set_title(c)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP1")
        ax.set_ylabel("UMAP2")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False,
                  markerscale=max(1.0, 20 / size) ** 0.5)
    return fig


def novelty_hist(adata, *, key: str = "canal", truth: str | None = None,
                 novel_types: Iterable[str] | str = (), bins: int = 40,
                 ax: Axes | None = None) -> Axes:
    """Histogram of novelty scores, known vs novel cells, with the threshold used.

    Parameters
    ----------
    adata
        Cells annotated with ``predict`` (``obs[f"{key}_novelty"]``, ``uns[key]["params"]``).
    key
        ``key_added`` of the prediction.
    truth
        ``adata.obs`` column of true labels; with ``novel_types`` splits the cells into known
        and novel. Without them all cells form one histogram.
    novel_types
        True labels the model has never seen.
    bins
        Histogram bins.
    ax
        Axes to draw into; a new figure by default.

    Returns
    -------
    The Axes.
    """
    scores = _obs_column(adata, f"{key}_novelty", "novelty score").to_numpy(dtype=float)
    if np.isnan(scores).all():
        raise ValueError(f"obs['{key}_novelty'] is all NaN (predicted with novelty='none'); "
                         "predict with novelty='energy' or 'calibrated' to plot scores")
    ok = ~np.isnan(scores)
    novel = {novel_types} if isinstance(novel_types, str) else {str(t) for t in novel_types}
    ax = _new_axes(ax, (5.5, 3.8))
    edges = np.histogram_bin_edges(scores[ok], bins=bins)
    if truth is not None and novel:
        is_novel = _obs_column(adata, truth, "truth").astype(str).isin(novel).to_numpy()
        ax.hist(scores[ok & ~is_novel], bins=edges, alpha=0.6, color="tab:blue",
                label=f"known types (n={int((ok & ~is_novel).sum())})")
        ax.hist(scores[ok & is_novel], bins=edges, alpha=0.6, color="tab:red",
                label=f"novel: {', '.join(sorted(novel))} (n={int((ok & is_novel).sum())})")
    else:
        ax.hist(scores[ok], bins=edges, color="tab:blue", alpha=0.7,
                label=f"all cells (n={int(ok.sum())})")
    params = dict(adata.uns.get(key, {})).get("params", {})
    threshold = float(params.get("threshold", np.nan))
    if np.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--",
                   label=f"threshold {threshold:.3f} ({params.get('novelty', '?')})")
    ax.set_xlabel(f"novelty score ({key}_novelty)")
    ax.set_ylabel("cells")
    ax.legend(fontsize=7, frameon=False)
    return ax


def accuracy_matrix(R: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Heatmap of a stream's accuracy matrix (rows: after stage t; columns: stage j's cells)."""
    ax = _new_axes(ax, (1.2 + 0.9 * R.shape[1], 1.0 + 0.7 * R.shape[0]))
    values = R.to_numpy(dtype=float)
    im = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center",
                    color="white" if v < 0.6 else "black", fontsize=9)
    ax.set_xticks(range(R.shape[1]), [str(c) for c in R.columns])
    ax.set_yticks(range(R.shape[0]), [f"after stage {i}" for i in R.index])
    ax.set_xlabel("held-out cells of")
    ax.figure.colorbar(im, ax=ax, label="accuracy")
    return ax.figure


def stream_accuracy(table: pd.DataFrame, *, metric: str = "accuracy",
                    ax: Axes | None = None) -> Figure:
    """One line per test set: ``metric`` after each stage (``table`` has stage, test, metric)."""
    ax = _new_axes(ax, (5.5, 3.5))
    for name, sub in table.groupby("test", sort=False):
        ax.plot(sub["stage"], sub[metric], marker="o", label=str(name))
    ax.set_xlabel("stage")
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(sorted(table["stage"].unique()))
    ax.legend(fontsize=8, frameon=False)
    return ax.figure
