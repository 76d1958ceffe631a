"""Annotation metrics: per-dataset scores, novel-cell scores and stream (continual) metrics.

Label inputs are array-likes of labels (lists, NumPy arrays, ``pandas.Series`` or
``pandas.Categorical``); they are compared as strings. The prediction label for a cell judged
to be of a novel (unseen) type is :data:`UNASSIGNED`.

Stream metrics take an accuracy matrix ``R`` where ``R[t, j]`` is the accuracy after training
stage ``t`` on the test set of stage ``j`` (``NaN`` where not evaluated); see
:func:`accuracy_matrix` to build it from evaluation records.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, f1_score

logger = logging.getLogger(__name__)

UNASSIGNED = "Unassigned"
"""Prediction label for cells judged to be of a novel cell type."""

__all__ = [
    "UNASSIGNED",
    "accuracy",
    "accuracy_matrix",
    "ari",
    "average_accuracy",
    "backward_transfer",
    "confusion",
    "evaluate",
    "forgetting",
    "macro_f1",
    "novel_scores",
    "summarize",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _as_labels(values: Any, name: str) -> np.ndarray:
    """Convert an array-like of labels to a 1-D array of ``str``."""
    if values is None:
        raise TypeError(f"{name} must be an array-like of labels, got None")
    if isinstance(values, str):
        raise TypeError(f"{name} must be an array-like of labels, not a single string; "
                        f"wrap it in a list")
    arr = np.asarray(values, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per cell), got shape {arr.shape}; "
                         f"flatten it first")
    return arr.astype(str)


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert a pair of label arrays of the same, non-zero length."""
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred")
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape[0]} and "
                         f"{p.shape[0]}; pass one prediction per cell")
    if t.shape[0] == 0:
        raise ValueError("y_true and y_pred are empty; pass at least one cell")
    return t, p


def _unique_in_order(values: Iterable[str]) -> list[str]:
    """Unique values in first-seen order."""
    return list(dict.fromkeys(values))


def _novel_set(novel_types: Any) -> set[str]:
    """Convert ``novel_types`` (a string or an iterable of strings) to a set of labels."""
    if novel_types is None:
        return set()
    if isinstance(novel_types, str):
        return {novel_types}
    return {str(v) for v in np.asarray(list(novel_types), dtype=object).ravel()}


# --------------------------------------------------------------------------------------------
# per-dataset metrics
# --------------------------------------------------------------------------------------------


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of cells whose predicted label equals the true label.

    Parameters
    ----------
    y_true
        True labels, one per cell.
    y_pred
        Predicted labels, one per cell (may contain :data:`UNASSIGNED`).

    Returns
    -------
    float
        Accuracy in ``[0, 1]``.
    """
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))


def macro_f1(y_true: Any, y_pred: Any, *, labels: Sequence[str] | None = None) -> float:
    """Unweighted mean of the per-class F1 scores.

    Parameters
    ----------
    y_true
        True labels, one per cell.
    y_pred
        Predicted labels, one per cell.
    labels
        Classes to average over. By default the classes present in ``y_true``: a prediction of
        :data:`UNASSIGNED` (or of any class absent from ``y_true``) counts as a miss for the
        true class, but such a predicted-only class is not itself averaged in.

    Returns
    -------
    float
        Macro F1 in ``[0, 1]``; classes with no support and no predictions score 0.
    """
    t, p = _pair(y_true, y_pred)
    if labels is None:
        use = sorted(set(t.tolist()))
    else:
        use = [str(lab) for lab in labels]
        if not use:
            raise ValueError("labels is empty; pass at least one class or leave it as None")
    return float(f1_score(t, p, labels=use, average="macro", zero_division=0))


def ari(y_true: Any, y_pred: Any) -> float:
    """Adjusted Rand index between true and predicted labels.

    Parameters
    ----------
    y_true
        True labels, one per cell.
    y_pred
        Predicted labels, one per cell.

    Returns
    -------
    float
        ARI; 1 for identical partitions, about 0 for random ones.
    """
    t, p = _pair(y_true, y_pred)
    return float(adjusted_rand_score(t, p))


def confusion(
    y_true: Any,
    y_pred: Any,
    *,
    labels: Sequence[str] | None = None,
    normalize: Literal["true", "pred", "all"] | None = None,
) -> pd.DataFrame:
    """Confusion matrix as a labelled table (rows: true labels, columns: predicted labels).

    Parameters
    ----------
    y_true
        True labels, one per cell.
    y_pred
        Predicted labels, one per cell.
    labels
        Row labels, also used as the first columns. By default the sorted labels of ``y_true``.
        The columns are followed by every other predicted label (sorted), with
        :data:`UNASSIGNED` last. With explicit ``labels``, cells whose true label is not in
        ``labels`` are left out.
    normalize
        ``"true"``: divide each row by the number of cells of that true label (rows sum to 1);
        ``"pred"``: divide each column by its total over the shown rows; ``"all"``: divide by the
        number of shown cells. ``None`` keeps counts. Empty rows/columns stay 0.

    Returns
    -------
    pandas.DataFrame
        Index named ``"true"``, columns named ``"pred"``.
    """
    if normalize not in (None, "true", "pred", "all"):
        raise ValueError(f"normalize must be 'true', 'pred', 'all' or None, got {normalize!r}")
    t, p = _pair(y_true, y_pred)
    if labels is None:
        rows = sorted(set(t.tolist()))
    else:
        rows = _unique_in_order(str(lab) for lab in labels)
        if not rows:
            raise ValueError("labels is empty; pass at least one class or leave it as None")
    keep = np.isin(t, rows)
    t, p = t[keep], p[keep]
    extra = sorted(set(p.tolist()) - set(rows) - {UNASSIGNED})
    cols = rows + extra + ([UNASSIGNED] if UNASSIGNED in set(p.tolist()) and UNASSIGNED
                           not in rows else [])
    row_idx = {lab: i for i, lab in enumerate(rows)}
    col_idx = {lab: i for i, lab in enumerate(cols)}
    counts = np.zeros((len(rows), len(cols)), dtype=np.int64)
    if t.size:
        np.add.at(counts, (np.fromiter((row_idx[v] for v in t), dtype=np.int64, count=t.size),
                           np.fromiter((col_idx[v] for v in p), dtype=np.int64, count=p.size)),
                  1)
    values: np.ndarray
    if normalize is None:
        values = counts
    else:
        c = counts.astype(float)
        if normalize == "true":
            denom = c.sum(axis=1, keepdims=True)
        elif normalize == "pred":
            denom = c.sum(axis=0, keepdims=True)
        else:
            denom = np.asarray(c.sum())
        values = np.divide(c, denom, out=np.zeros_like(c), where=denom > 0)
    return pd.DataFrame(values, index=pd.Index(rows, name="true"),
                        columns=pd.Index(cols, name="pred"))


def novel_scores(y_true: Any, y_pred: Any, *, novel_types: Iterable[str] | str) -> dict[str, Any]:
    """Scores for annotation with novel (unseen) cell types.

    Parameters
    ----------
    y_true
        True labels, one per cell.
    y_pred
        Predicted labels, one per cell; :data:`UNASSIGNED` marks a cell called novel.
    novel_types
        True labels that the model has never seen (a single string or an iterable).

    Returns
    -------
    dict
        ``known_accuracy``: accuracy on cells whose true type is not novel (``nan`` if there
        are none); ``unknown_accuracy``: share of novel-type cells predicted
        :data:`UNASSIGNED`; ``h_score``: harmonic mean of the two (0 if either is 0, ``nan``
        if ``known_accuracy`` is ``nan``); ``n_known`` and ``n_novel``: cell counts.

    Raises
    ------
    ValueError
        If ``novel_types`` is empty or none of its labels occurs in ``y_true``.
    """
    t, p = _pair(y_true, y_pred)
    novel = _novel_set(novel_types)
    if not novel:
        raise ValueError("novel_types is empty; pass the true labels of the unseen cell types "
                         "(or use accuracy() when there are none)")
    is_novel = np.isin(t, sorted(novel))
    n_novel = int(is_novel.sum())
    if n_novel == 0:
        raise ValueError(f"none of novel_types {sorted(novel)} occurs in y_true; check the "
                         f"label spelling or drop novel_types")
    n_known = int((~is_novel).sum())
    known = float(np.mean(t[~is_novel] == p[~is_novel])) if n_known else float("nan")
    unknown = float(np.mean(p[is_novel] == UNASSIGNED))
    if np.isnan(known):
        h = float("nan")
    elif known == 0.0 or unknown == 0.0:
        h = 0.0
    else:
        h = 2.0 * known * unknown / (known + unknown)
    return {"known_accuracy": known, "unknown_accuracy": unknown, "h_score": h,
            "n_known": n_known, "n_novel": n_novel}


def summarize(y_true: Any, y_pred: Any, *, novel_types: Iterable[str] | str = ()) -> dict[str, Any]:
    """All per-dataset metrics in one dictionary.

    Parameters
    ----------
    y_true
        True labels, one per cell.
    y_pred
        Predicted labels, one per cell.
    novel_types
        True labels of unseen cell types. When given, every cell of a novel type has its true
        label replaced by :data:`UNASSIGNED` before ``accuracy``, ``macro_f1`` and ``ari`` are
        computed, so such a cell counts as correct if and only if it is predicted
        :data:`UNASSIGNED` (and :data:`UNASSIGNED` becomes one of the classes averaged by
        ``macro_f1``); the keys of :func:`novel_scores` are added.

    Returns
    -------
    dict
        ``accuracy``, ``macro_f1``, ``ari``, ``n_cells``, plus ``known_accuracy``,
        ``unknown_accuracy``, ``h_score``, ``n_known``, ``n_novel`` when ``novel_types`` is
        given.
    """
    t, p = _pair(y_true, y_pred)
    novel = _novel_set(novel_types)
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if novel:
        extra = novel_scores(t, p, novel_types=sorted(novel))
        t = np.where(np.isin(t, sorted(novel)), UNASSIGNED, t)
    out["accuracy"] = accuracy(t, p)
    out["macro_f1"] = macro_f1(t, p)
    out["ari"] = ari(t, p)
    out["n_cells"] = int(t.shape[0])
    out.update(extra)
    return out


def evaluate(adata, *, truth: str = "cell_type", key: str = "canal",
             novel_types: Iterable[str] | str = ()) -> dict[str, Any]:
    """:func:`summarize` of the predictions stored in an AnnData by ``Annotator.predict``.

    Parameters
    ----------
    adata
        Annotated cells (in memory or backed).
    truth
        ``adata.obs`` column with the true labels.
    key
        ``key_added`` of the prediction: the calls are ``adata.obs[key]``.
    novel_types
        True labels of cell types the model has never seen (see :func:`summarize`).

    Returns
    -------
    dict
        The keys of :func:`summarize`, plus ``n_unassigned`` (cells called
        :data:`UNASSIGNED`).
    """
    for col, what, fix in ((truth, "truth", "--truth / truth="), (key, "prediction",
                                                                  "--key / key=")):
        if col not in adata.obs:
            raise KeyError(f"{what} column {col!r} not in adata.obs (columns: "
                           f"{list(adata.obs.columns)}); pass {fix}")
    y_true = adata.obs[truth]
    if y_true.isna().any():
        raise ValueError(f"{int(y_true.isna().sum())} cells have no label in obs[{truth!r}]; "
                         "drop them before evaluating")
    y_pred = adata.obs[key].astype(str).to_numpy()
    out = summarize(y_true.astype(str).to_numpy(), y_pred, novel_types=novel_types)
    out["n_unassigned"] = int((y_pred == UNASSIGNED).sum())
    return out


# --------------------------------------------------------------------------------------------
# stream metrics
# --------------------------------------------------------------------------------------------


def _as_matrix(R: Any) -> np.ndarray:
    """Validate an accuracy matrix: 2-D, square, at least one stage."""
    arr = np.asarray(R, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"R must be a 2-D accuracy matrix (stages x test sets), got "
                         f"{arr.ndim} dimension(s); build it with accuracy_matrix()")
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"R must be square (one test set per stage), got shape {arr.shape}; "
                         f"keep only the columns of the per-stage test sets")
    if arr.shape[0] == 0:
        raise ValueError("R is empty; evaluate at least one stage")
    return arr


def _nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries; ``nan`` (without a warning) when there are none."""
    values = np.asarray(values, dtype=float)
    ok = ~np.isnan(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


def average_accuracy(R: Any) -> float:
    """Average accuracy after the last stage: the mean of the final row of ``R``.

    Parameters
    ----------
    R
        Square accuracy matrix, ``R[t, j]`` = accuracy after stage ``t`` on test set ``j``;
        ``NaN`` entries are ignored.

    Returns
    -------
    float
        Mean of ``R[T-1, :]`` over its non-NaN entries (``nan`` if there are none).
    """
    arr = _as_matrix(R)
    return _nanmean(arr[-1])


def backward_transfer(R: Any) -> float:
    """Backward transfer (BWT, Lopez-Paz & Ranzato 2017).

    ``BWT = mean_{j < T-1} (R[T-1, j] - R[j, j])``; negative values mean forgetting.

    Parameters
    ----------
    R
        Square accuracy matrix, ``R[t, j]`` = accuracy after stage ``t`` on test set ``j``.
        Pairs with a ``NaN`` are skipped.

    Returns
    -------
    float
        BWT; ``nan`` when ``T == 1`` (there is no earlier stage) or no pair is evaluated.
    """
    arr = _as_matrix(R)
    T = arr.shape[0]
    if T < 2:
        return float("nan")
    j = np.arange(T - 1)
    return _nanmean(arr[T - 1, j] - arr[j, j])


def forgetting(R: Any) -> float:
    """Average forgetting: ``mean_{j < T-1} (max_{t < T-1} R[t, j] - R[T-1, j])``.

    Parameters
    ----------
    R
        Square accuracy matrix, ``R[t, j]`` = accuracy after stage ``t`` on test set ``j``.
        ``NaN`` entries are ignored in the maximum; a test set without any earlier accuracy is
        skipped.

    Returns
    -------
    float
        Forgetting (positive means accuracy was lost); ``nan`` when ``T == 1``.
    """
    arr = _as_matrix(R)
    T = arr.shape[0]
    if T < 2:
        return float("nan")
    diffs = []
    for j in range(T - 1):
        earlier = arr[: T - 1, j]
        earlier = earlier[~np.isnan(earlier)]
        if earlier.size == 0:
            continue
        diffs.append(earlier.max() - arr[T - 1, j])
    return _nanmean(np.asarray(diffs, dtype=float))


def accuracy_matrix(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Build the accuracy matrix from evaluation records.

    Parameters
    ----------
    records
        Dictionaries ``{"stage": t, "test": name, "accuracy": a}``, one per evaluation.

    Returns
    -------
    pandas.DataFrame
        Rows: stages (index named ``"stage"``), columns: test-set names (named ``"test"``), both
        in first-seen order; ``NaN`` where a pair was not evaluated. Pass ``.to_numpy()`` (or the
        frame itself) to the stream metrics.

    Raises
    ------
    ValueError
        If a record lacks a key or a (stage, test) pair occurs twice.
    """
    if isinstance(records, Mapping):
        raise TypeError("records must be a list of dicts, not a single dict; wrap it in a list")
    stages: list[Any] = []
    tests: list[Any] = []
    values: dict[tuple[Any, Any], float] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise TypeError(f"record {i} must be a dict with keys 'stage', 'test', 'accuracy', "
                            f"got {type(rec).__name__}")
        missing = [k for k in ("stage", "test", "accuracy") if k not in rec]
        if missing:
            raise ValueError(f"record {i} lacks key(s) {missing}; each record needs 'stage', "
                             f"'test' and 'accuracy'")
        key = (rec["stage"], rec["test"])
        if key in values:
            raise ValueError(f"stage {key[0]!r} on test {key[1]!r} occurs twice; keep one "
                             f"record per (stage, test) pair")
        values[key] = float(rec["accuracy"])
        if key[0] not in stages:
            stages.append(key[0])
        if key[1] not in tests:
            tests.append(key[1])
    mat = np.full((len(stages), len(tests)), np.nan)
    s_idx = {s: i for i, s in enumerate(stages)}
    t_idx = {t: i for i, t in enumerate(tests)}
    for (s, t), a in values.items():
        mat[s_idx[s], t_idx[t]] = a
    return pd.DataFrame(mat, index=pd.Index(stages, name="stage"),
                        columns=pd.Index(tests, name="test"))
