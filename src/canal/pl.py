"""Plots of annotation results. Each function returns a matplotlib Figure or Axes.

Figures are built with the object-oriented API (:class:`matplotlib.figure.Figure`, whose
canvas is Agg), never through ``pyplot``: nothing is shown, no global figure state is touched,
and the caller saves with ``fig.savefig(path)``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from canal import metrics
from canal.metrics import UNASSIGNED

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from matplotlib.axes import Axes

logger = logging.getLogger(__name__)

__all__ = ["accuracy_matrix", "confusion", "gene_importance_heatmap", "novelty_calibration",
           "novelty_hist", "stream_accuracy", "umap"]

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
              label_min: float | None = None, ax: Axes | None = None) -> Axes:
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
    label_min
        Write the value into cells of at least this value (normalised matrices; default
        0.005, so no cell reads "0.00", and 0.05 above 15 types, where small numbers would
        crowd the matrix).
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
    ax = _new_axes(ax, (max(3.5, 1.5 + 0.45 * n_cols), max(3.0, 1.2 + 0.4 * n_rows)))
    values = cm.to_numpy(dtype=float)
    image = ax.imshow(values, cmap="Blues", aspect="auto", vmin=0,
                      vmax=1 if normalize else max(values.max(), 1))
    ax.set_xticks(range(n_cols), cm.columns, rotation=90)
    ax.set_yticks(range(n_rows), cm.index)
    ax.set_xlabel(f"predicted ({key})")
    ax.set_ylabel(f"true ({truth})")
    top = values.max() if values.size else 0
    if label_min is None:
        label_min = 0.05 if max(n_rows, n_cols) > 15 else 0.005
    floor = label_min if normalize else 1
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            if v == 0 or v < floor:
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
    if len(named) <= 20:
        cmap = colormaps["tab20" if len(named) > 10 else "tab10"]
        palette = [to_hex(cmap(i)) for i in range(cmap.N)]
    else:  # distinct colours up to 60 types (tab20 repeated colours above 20)
        palette = [to_hex(colormaps[name](i)) for name in ("tab20", "tab20b", "tab20c")
                   for i in range(20)]
    colors = {c: palette[i % len(palette)] for i, c in enumerate(named)}
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
                 share: bool = False, ax: Axes | None = None) -> Axes:
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
    share
        Plot each group's share of its own cells per bin instead of counts, so a handful of
        novel cells stays visible beside thousands of known ones.
    ax
        Axes to draw into; a new figure by default.

    Returns
    -------
    The Axes.
    """
    scores = _obs_column(adata, f"{key}_novelty", "novelty score").to_numpy(dtype=float)
    if np.isnan(scores).all():
        raise ValueError(f"obs['{key}_novelty'] is all NaN (predicted with novelty='none'); "
                         "predict with novelty='calibrated' or 'mixup' to plot scores")
    ok = ~np.isnan(scores)
    novel = {novel_types} if isinstance(novel_types, str) else {str(t) for t in novel_types}
    ax = _new_axes(ax, (5.5, 3.8))
    edges = np.histogram_bin_edges(scores[ok], bins=bins)

    def weights(m: np.ndarray):
        return np.full(int(m.sum()), 1.0 / max(int(m.sum()), 1)) if share else None

    if truth is not None and novel:
        is_novel = _obs_column(adata, truth, "truth").astype(str).isin(novel).to_numpy()
        known, nov = ok & ~is_novel, ok & is_novel
        ax.hist(scores[known], bins=edges, alpha=0.6, color="tab:blue",
                weights=weights(known), label=f"known types (n={int(known.sum())})")
        ax.hist(scores[nov], bins=edges, alpha=0.6, color="tab:red", weights=weights(nov),
                label=f"novel: {', '.join(sorted(novel))} (n={int(nov.sum())})")
    else:
        ax.hist(scores[ok], bins=edges, color="tab:blue", alpha=0.7, weights=weights(ok),
                label=f"all cells (n={int(ok.sum())})")
    params = dict(adata.uns.get(key, {})).get("params", {})
    threshold = float(params.get("threshold", np.nan))
    if np.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--",
                   label=f"threshold {threshold:.3f} ({params.get('novelty', '?')})")
    ax.set_xlabel(f"novelty score ({key}_novelty)")
    ax.set_ylabel("share of the group's cells" if share else "cells")
    # below the axes: inside it the legend covered the bars
    ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.18),
              ncols=2)
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


def gene_importance_heatmap(table: pd.DataFrame, *, n_top: int = 5) -> Figure:
    """Heatmap of each cell type's most important genes (rows) across all types (columns).

    Parameters
    ----------
    table
        Genes x types scores (``canal.explain.GeneImportance.scores``, or a GeneImportance), or
        the tidy ``type, rank, gene, score`` table from ``Annotator.gene_importance`` (genes
        outside a type's listed top genes are then left blank).
    n_top
        Genes shown per type; rows are grouped by the type that ranks them first.

    Returns
    -------
    The Figure. Each column is divided by its largest absolute score, so colours compare genes
    within a type (attributions of different types' logits have different scales); dots mark
    a type's own top genes.
    """
    scores = getattr(table, "scores", table)
    if not isinstance(scores, pd.DataFrame) or scores.empty:
        raise ValueError("pass the gene-importance scores (genes x types DataFrame) or the tidy "
                         "table from Annotator.gene_importance")
    if {"type", "gene", "score"} <= set(scores.columns):
        scores = scores.pivot_table(index="gene", columns="type", values="score",
                                    aggfunc="first", sort=False)
    types = [str(t) for t in scores.columns]
    genes: list[str] = []
    own: list[tuple[int, int]] = []
    for j, t in enumerate(scores.columns):
        col = scores[t].to_numpy(dtype=float)
        order = np.argsort(-np.nan_to_num(col, nan=-np.inf), kind="stable")[:n_top]
        for i in order:
            gene = str(scores.index[i])
            if gene not in genes:
                genes.append(gene)
            own.append((genes.index(gene), j))
    values = scores.loc[genes].to_numpy(dtype=float)
    scale = np.nanmax(np.abs(scores.to_numpy(dtype=float)), axis=0)
    values = values / np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    fig = Figure(figsize=(2.2 + 0.5 * len(types), 1.4 + 0.2 * len(genes)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    rows, cols = zip(*own, strict=True) if own else ((), ())
    ax.scatter(cols, rows, s=6, c="black", marker="o")
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(genes)), genes, fontsize=7)
    ax.set_xlabel("cell type")
    fig.colorbar(im, ax=ax, label="importance / type's largest", shrink=0.6)
    return fig


def novelty_calibration(scores, is_novel_type, calibration, *, predicted=None,
                        alphas: Sequence[float] | None = None, bins: int = 40,
                        title: str | None = None) -> Figure:
    """Calibrated novelty: score histogram with the threshold, and the trade-off as alpha varies.

    Parameters
    ----------
    scores
        ``(n,)`` novelty scores of test cells (``calibration``'s score).
    is_novel_type
        ``(n,)`` bool, true for cells whose true type the model never saw.
    calibration
        A :class:`canal.novelty.NoveltyCalibration`.
    predicted
        Each cell's predicted known type (per-class thresholds); ``None`` uses the pooled one.
    alphas
        Target false-rejection rates of the curve (default 0.01 to 0.30).
    bins
        Histogram bins.
    title
        Figure title.

    Returns
    -------
    A Figure: left, histograms of known and novel cells with the pooled threshold at the
    calibrated ``fpr``; right, the share of known cells called novel (false rejection) and of
    novel cells called novel (detection) against alpha, with the diagonal alpha = realised.
    """
    from canal.novelty import POOLED

    s = np.asarray(scores, dtype=float).reshape(-1)
    nov = np.asarray(is_novel_type, dtype=bool).reshape(-1)
    if len(s) != len(nov):
        raise ValueError(f"{len(s)} scores for {len(nov)} is_novel_type entries")
    pred = np.full(len(s), POOLED) if predicted is None else np.asarray(predicted, dtype=str)
    alphas = np.asarray(alphas if alphas is not None else np.arange(0.01, 0.305, 0.01))
    fig = Figure(figsize=(10.5, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    ok = np.isfinite(s)
    edges = np.histogram_bin_edges(s[ok], bins=bins)
    ax1.hist(s[ok & ~nov], bins=edges, alpha=0.6, color="tab:blue",
             label=f"known types (n={int((ok & ~nov).sum())})")
    if nov.any():
        ax1.hist(s[ok & nov], bins=edges, alpha=0.6, color="tab:red",
                 label=f"novel types (n={int((ok & nov).sum())})")
    thr = calibration.thresholds.get(POOLED, np.inf)
    if np.isfinite(thr):
        ax1.axvline(thr, color="black", linestyle="--",
                    label=f"pooled threshold at fpr {calibration.fpr:g}")
    ax1.set_xlabel(f"novelty score ({calibration.score})")
    ax1.set_ylabel("cells")
    ax1.legend(fontsize=7, frameon=False)
    p = calibration.p_values(s, pred)
    fr = [float(np.mean(p[~nov] <= a)) if (~nov).any() else np.nan for a in alphas]
    ax2.plot(alphas, fr, color="tab:blue", marker=".", label="known called novel")
    if nov.any():
        det = [float(np.mean(p[nov] <= a)) for a in alphas]
        ax2.plot(alphas, det, color="tab:red", marker=".", label="novel called novel")
    ax2.plot(alphas, alphas, color="grey", linestyle=":", label="target (alpha)")
    ax2.axvline(calibration.fpr, color="black", linestyle="--", linewidth=0.8)
    ax2.set_xlabel("alpha (target false-rejection rate)")
    ax2.set_ylabel("share of cells called novel")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def novelty_tradeoff(adata, *, key: str = "canal", truth: str, novel_types: Iterable[str],
                     alphas: Sequence[float] | None = None, ax: Axes | None = None) -> Axes:
    """False rejection and detection as the novelty level alpha varies, from the stored
    conformal p-values (``obs[f"{key}_novelty_p"]``): a cell is novel at alpha when
    ``p <= alpha``, so no model is needed.

    Returns
    -------
    The Axes: share of known cells called novel and of novel cells called novel, against
    alpha, with the diagonal (realised = target false rejection).
    """
    p = _obs_column(adata, f"{key}_novelty_p", "conformal p-value").to_numpy(dtype=float)
    if np.isnan(p).all():
        raise ValueError(f"obs['{key}_novelty_p'] is all NaN: predict with novelty='calibrated'")
    novel = {novel_types} if isinstance(novel_types, str) else {str(t) for t in novel_types}
    is_novel = _obs_column(adata, truth, "truth").astype(str).isin(novel).to_numpy()
    alphas = np.asarray(alphas if alphas is not None else np.linspace(0.01, 0.3, 30))
    ax = _new_axes(ax, (4.5, 3.8))
    ok = ~np.isnan(p)
    frr = [(p[ok & ~is_novel] <= a).mean() for a in alphas]
    ax.plot(alphas, frr, marker=".", color="tab:blue", label="known cells called novel")
    if (ok & is_novel).any():
        det = [(p[ok & is_novel] <= a).mean() for a in alphas]
        ax.plot(alphas, det, marker=".", color="tab:red", label="novel cells called novel")
    ax.plot(alphas, alphas, color="grey", linestyle=":", label="alpha")
    fpr = dict(adata.uns.get(key, {})).get("params", {}).get("fpr")
    if fpr is not None:
        ax.axvline(float(fpr), color="black", linestyle="--", label=f"used: {float(fpr):g}")
    ax.set_xlabel("alpha (target false rejection)")
    ax.set_ylabel("share called Unassigned")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, frameon=False)
    return ax
