"""Novel-cell detection: novelty scores, split-conformal thresholds, cluster-level votes.

Calibrated novelty (the per-cell rule)
--------------------------------------
A score (higher = more novel) is computed for every cell from its representation and/or logits
(:func:`novelty_scores`; ``"knn"``, ``"mahalanobis"``, ``"relative_mahalanobis"``,
``"energy"``, ``"max_logit"``, ``"msp"``). :func:`fit_calibration` scores held-out known cells
that the model did not train on and keeps, per predicted class with enough cells (pooled
otherwise), their sorted scores: a new cell's conformal p-value is the share of calibration
cells scoring at least as high, and it is called novel when ``p <= fpr``. If the calibration
and test cells are exchangeable, the share of known cells called novel is at most ``fpr``
(split-conformal; López-De-Castro et al. 2025, scConform). A cell's call depends on that cell
alone. :class:`NoveltyCalibration` holds everything the rule needs except the kNN reference
set (the example bank's representations, stored with the bank) and round-trips through JSON.

:func:`cluster_vote` optionally turns per-cell calls into per-cluster ones (CellTypist-style
majority voting).

Wiring it into a model (after each stage): take the representations / logits of the stage's
validation cells (not trained on), score them against the refilled bank's representations
with ``exclude_self=True`` (the bank is refilled from training *and* validation cells), fit
:func:`fit_calibration` on them with the predicted classes, and store ``to_dict()`` in the
checkpoint. At prediction: ``cal.scores(representation=..., logits=..., reference=bank_reps)``,
then ``cal.p_values`` / ``cal.is_novel`` with each cell's most probable known type.
Replayed bank cells in the validation split were trained on in earlier stages, so they score
lower than new cells of their type; benchmarks/novelty.py measures the effect
("last-stage val").

CANAL's mixup rule (``novelty="mixup"``)
----------------------------------------

A cell's novelty score averages two signals computed from the classifier logits:

* the energy ``E = -T * logsumexp(logits / T)`` min-max normalised to ``[0, 1]`` (higher means
  more novel), either over the scored batch or with fixed bounds from reference cells, and
* ``1 - max softmax probability`` (softmax at temperature 1).

The threshold is set without labels by mixup: each reference cell's representation is mixed with
that of another random cell, and the threshold is the mean novelty score of the mixed cells,
which lie between known types. Cells scoring above the threshold are called novel.

All functions take and return ``torch`` tensors; scores are computed in ``float32``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "SCORES", "NoveltyCalibration", "calibrate", "cluster_vote", "energy_score",
    "fit_calibration", "fit_mahalanobis", "is_novel", "knn_score", "mahalanobis_score",
    "max_logit_score", "mixup_threshold", "msp_score", "neighbour_groups", "novelty_score",
    "novelty_scores",
]

_EPS = 1e-12
#: CANAL's energy temperature.
TEMPERATURE = 0.8


def _check_logits(logits: Any, name: str = "logits") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}; convert "
                        f"it with torch.as_tensor")
    if logits.ndim != 2:
        raise ValueError(f"{name} must be 2-D (cells x classes), got shape "
                         f"{tuple(logits.shape)}; add a batch dimension with unsqueeze(0)")
    if logits.shape[1] == 0:
        raise ValueError(f"{name} has no class columns; pass the classifier output")
    return logits


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    return t


def _refs(ref_min: float | torch.Tensor | None,
          ref_max: float | torch.Tensor | None) -> tuple[float, float] | None:
    if (ref_min is None) != (ref_max is None):
        raise ValueError("pass both ref_min and ref_max (e.g. from calibrate()) or neither")
    if ref_min is None or ref_max is None:
        return None
    lo, hi = float(ref_min), float(ref_max)
    if not hi >= lo:
        raise ValueError(f"ref_max ({hi}) must be >= ref_min ({lo}); swap them")
    return lo, hi


def energy_score(logits: torch.Tensor, *, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Free energy of each cell, ``-T * logsumexp(logits / T, dim=1)``.

    Parameters
    ----------
    logits
        ``(n, k)`` classifier logits (any floating dtype; computed in ``float32``).
    temperature
        Energy temperature ``T > 0``.

    Returns
    -------
    torch.Tensor
        ``(n,)`` ``float32`` energies; higher energy means more novel.
    """
    logits = _check_logits(logits)
    t = _check_temperature(temperature)
    return -t * torch.logsumexp(logits.float() / t, dim=1)


def novelty_score(
    logits: torch.Tensor,
    *,
    temperature: float = TEMPERATURE,
    ref_min: float | torch.Tensor | None = None,
    ref_max: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """CANAL novelty score, ``0.5 * (normalised energy + (1 - max softmax probability))``.

    Parameters
    ----------
    logits
        ``(n, k)`` classifier logits (any floating dtype; computed in ``float32``).
    temperature
        Energy temperature; the softmax probability always uses temperature 1.
    ref_min, ref_max
        Fixed energy bounds from reference cells (see :func:`calibrate`). When given, the
        normalised energy is ``(E - ref_min) / (ref_max - ref_min)`` clamped to ``[0, 1]``, so
        each cell's score does not depend on the rest of the batch and single cells can be
        scored. When omitted, the energy is min-max normalised over ``logits`` itself
        (transductive mode). If the bounds coincide the normalised energy is 0 (or 1 above a
        fixed bound).

    Returns
    -------
    torch.Tensor
        ``(n,)`` ``float32`` scores in ``[0, 1)``; higher means more novel.
    """
    logits = _check_logits(logits)
    refs = _refs(ref_min, ref_max)
    x = logits.float()
    energy = energy_score(x, temperature=temperature)
    if refs is not None:
        lo, hi = refs
        norm = ((energy - lo) / max(hi - lo, _EPS)).clamp(0.0, 1.0)
    elif energy.numel() == 0:
        norm = energy
    else:
        lo_t, hi_t = energy.min(), energy.max()
        norm = (energy - lo_t) / (hi_t - lo_t).clamp_min(_EPS)
    maxprob = torch.softmax(x, dim=1).amax(dim=1)
    return 0.5 * (norm + (1.0 - maxprob))


def _batched_energy_range(hidden: torch.Tensor, classify: Callable[[torch.Tensor], torch.Tensor],
                          temperature: float, batch_size: int) -> tuple[float, float]:
    lo, hi = float("inf"), float("-inf")
    for start in range(0, hidden.shape[0], batch_size):
        logits = _check_logits(classify(hidden[start:start + batch_size]), "classify(hidden)")
        energy = energy_score(logits, temperature=temperature)
        lo = min(lo, float(energy.min()))
        hi = max(hi, float(energy.max()))
    return lo, hi


def mixup_threshold(
    hidden: torch.Tensor,
    classify: Callable[[torch.Tensor], torch.Tensor],
    *,
    temperature: float = TEMPERATURE,
    generator: torch.Generator | None = None,
    ref_min: float | torch.Tensor | None = None,
    ref_max: float | torch.Tensor | None = None,
    batch_size: int = 4096,
) -> float:
    """Novelty threshold from mixup of reference cell representations.

    Each cell ``i`` is mixed with another cell ``perm[i] != i`` (``perm`` a random cyclic
    permutation) using a weight ``w_i ~ Beta(1, 1)``:
    ``h_mix = w * h + (1 - w) * h[perm]``. The mixed cells are classified and scored with
    :func:`novelty_score`; the threshold is their mean score.

    Parameters
    ----------
    hidden
        ``(n, d)`` cell representations (the classifier head's input), ``n >= 2``.
    classify
        Callable mapping an ``(m, d)`` tensor to ``(m, k)`` logits, e.g. the model's
        classifier head (put the model in eval mode first).
    temperature
        Energy temperature.
    generator
        Random generator for the permutation and weights; the result is deterministic given a
        seeded generator. ``None`` uses torch's global generator.
    ref_min, ref_max
        Energy bounds for normalising the mixed cells' energy. By default the minimum and
        maximum energy of the original (unmixed) cells, so that mixed scores are on the same
        scale as the cells' own scores.
    batch_size
        Cells per call of ``classify``; the result does not depend on it.

    Returns
    -------
    float
        The threshold; cells with a novelty score above it are called novel.

    Raises
    ------
    ValueError
        If fewer than two cells are given.
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be 2-D (cells x features), got shape "
                         f"{tuple(hidden.shape)}")
    n = int(hidden.shape[0])
    if n < 2:
        raise ValueError(f"mixup needs at least 2 cells, got {n}; calibrate the threshold on "
                         f"more cells or use a saved threshold")
    if not callable(classify):
        raise TypeError("classify must be a callable mapping hidden states to logits")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    temperature = _check_temperature(temperature)
    refs = _refs(ref_min, ref_max)

    with torch.inference_mode():
        if refs is None:
            refs = _batched_energy_range(hidden, classify, temperature, batch_size)
        # Draw everything up front so the result does not depend on batch_size.
        rng_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=rng_device)
        # Pair each cell with the next one in a random order: a cyclic permutation, so no cell
        # is mixed with itself.
        partner = torch.empty_like(order)
        partner[order] = torch.roll(order, -1)
        # Beta(1, 1) is the uniform distribution on [0, 1]; torch.distributions.Beta does not
        # accept a generator, so draw it with torch.rand.
        weight = torch.rand(n, generator=generator, device=rng_device)
        partner = partner.to(hidden.device)
        weight = weight.to(device=hidden.device, dtype=hidden.dtype)

        total = 0.0
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            w = weight[start:stop, None]
            h_mix = w * hidden[start:stop] + (1 - w) * hidden[partner[start:stop]]
            logits = _check_logits(classify(h_mix), "classify(hidden)")
            scores = novelty_score(logits, temperature=temperature,
                                   ref_min=refs[0], ref_max=refs[1])
            total += float(scores.double().sum())
    threshold = total / n
    logger.debug("mixup threshold %.4f from %d cells", threshold, n)
    return threshold


def calibrate(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    classify: Callable[[torch.Tensor], torch.Tensor],
    *,
    temperature: float = TEMPERATURE,
    generator: torch.Generator | None = None,
    batch_size: int = 4096,
) -> dict[str, Any]:
    """Calibrate the novelty score on reference cells (training data or the example bank).

    Parameters
    ----------
    hidden
        ``(n, d)`` representations of the reference cells, ``n >= 2``.
    logits
        ``(n, k)`` logits of the same cells (``classify(hidden)``).
    classify
        Callable mapping representations to logits (the classifier head).
    temperature
        Energy temperature.
    generator
        Random generator for :func:`mixup_threshold`.
    batch_size
        Cells per call of ``classify``.

    Returns
    -------
    dict
        ``energy_min``, ``energy_max`` (energy range of the reference cells), ``threshold``
        (:func:`mixup_threshold` with those bounds), ``temperature`` and ``n_cells``. Store it
        with a model and pass ``ref_min=energy_min, ref_max=energy_max`` to
        :func:`novelty_score` to score new cells independently of their batch.
    """
    logits = _check_logits(logits)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be 2-D (cells x features), got shape "
                         f"{tuple(hidden.shape)}")
    if hidden.shape[0] != logits.shape[0]:
        raise ValueError(f"hidden and logits must describe the same cells, got "
                         f"{hidden.shape[0]} and {logits.shape[0]} rows")
    if hidden.shape[0] < 2:
        raise ValueError(f"calibration needs at least 2 reference cells, got {hidden.shape[0]}; "
                         f"calibrate on more cells or use a saved threshold")
    temperature = _check_temperature(temperature)
    energy = energy_score(logits.detach(), temperature=temperature)
    e_min, e_max = float(energy.min()), float(energy.max())
    threshold = mixup_threshold(hidden, classify, temperature=temperature, generator=generator,
                                ref_min=e_min, ref_max=e_max, batch_size=batch_size)
    return {"energy_min": e_min, "energy_max": e_max, "threshold": threshold,
            "temperature": temperature, "n_cells": int(hidden.shape[0])}


def is_novel(scores: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Cells whose novelty score exceeds the threshold.

    Parameters
    ----------
    scores
        Novelty scores from :func:`novelty_score`.
    threshold
        Threshold from :func:`mixup_threshold` or :func:`calibrate`.

    Returns
    -------
    torch.Tensor
        Boolean tensor, ``scores > threshold``.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}; convert "
                        f"it with torch.as_tensor")
    return scores > threshold


# ===========================================================================================
# calibrated novelty: scores
# ===========================================================================================

Score = Literal["knn", "mahalanobis", "relative_mahalanobis", "energy", "max_logit", "msp"]
#: Scores :func:`novelty_scores` computes; all are "higher = more novel".
SCORES: tuple[str, ...] = ("knn", "mahalanobis", "relative_mahalanobis", "energy", "max_logit",
                           "msp")
#: Scores that need the representation (the others read the logits only).
_NEEDS_REP = {"knn", "mahalanobis", "relative_mahalanobis"}


def _array(x: Any, name: str, *, ndim: int | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numeric array or tensor, got "
                        f"{type(x).__name__}") from err
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}"
                         + ("; add a cell axis with x[None]" if a.ndim == ndim - 1 else ""))
    return a


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def knn_score(representation: Any, reference: Any, *, k: int = 10,
              exclude_self: bool = False, chunk: int = 2048) -> np.ndarray:
    """Distance to the ``k``-th nearest reference cell, both L2-normalised (Sun et al. 2022).

    Parameters
    ----------
    representation
        ``(n, d)`` representations of the cells to score.
    reference
        ``(m, d)`` representations of known cells, e.g. the example bank's (``m >= k``).
    k
        Which neighbour's distance is the score (``1`` = nearest).
    exclude_self
        Ignore reference cells identical to the scored cell (normalised distance < 1e-5).
        Use it when scoring cells that are themselves in the reference, e.g. calibration cells
        that the example bank also kept: a new cell is never in the bank, so a calibration cell
        must not count itself as its nearest neighbour.
    chunk
        Cells per distance block (memory only; results do not depend on it).

    Returns
    -------
    ``(n,)`` float64 Euclidean distances on the unit sphere, in ``[0, 2]``.
    """
    x = _unit(_array(representation, "representation", ndim=2))
    ref = _unit(_array(reference, "reference", ndim=2))
    if x.shape[1] != ref.shape[1]:
        raise ValueError(f"representation has {x.shape[1]} features, reference "
                         f"{ref.shape[1]}; use the same model's representations")
    k = int(k)
    if not 1 <= k <= len(ref) - int(exclude_self):
        raise ValueError(f"k must be in [1, {len(ref) - int(exclude_self)}] (reference cells), "
                         f"got {k}")
    out = np.empty(len(x))
    for s in range(0, len(x), chunk):
        # ||a - b||^2 = 2 - 2 a.b for unit vectors
        sim = x[s:s + chunk] @ ref.T
        if exclude_self:
            sim[sim > 1.0 - 0.5e-10] = -np.inf  # distance < 1e-5
        kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
        out[s:s + chunk] = np.sqrt(np.clip(2.0 - 2.0 * kth, 0.0, None))
    return out


def fit_mahalanobis(representation: Any, labels: Sequence[str], *, classes: Sequence[str],
                    relative: bool = True, shrinkage: float = 1e-3) -> dict[str, Any]:
    """Class means and a shared (tied) covariance of reference representations.

    Parameters
    ----------
    representation
        ``(m, d)`` reference representations (e.g. the example bank's).
    labels
        The reference cells' types.
    classes
        The model's cell types, in classifier order; a class without reference cells gets no
        mean (it is skipped when scoring).
    shrinkage
        Added to the covariance diagonal, relative to its mean variance (keeps it invertible).

    Returns
    -------
    A JSON-serialisable dict: ``classes``, ``means`` (per class, ``None`` when absent),
    ``precision`` (shared within-class precision matrix) and, with ``relative``, ``mean0`` and
    ``precision0`` (one Gaussian over all reference cells, the background of the relative
    Mahalanobis score of Ren et al. 2021). About ``d * (d + n_classes)`` floats (``2 d^2`` more
    with ``relative``).
    """
    x = _array(representation, "representation", ndim=2)
    labels = np.asarray(labels, dtype=str)
    if len(labels) != len(x):
        raise ValueError(f"{len(labels)} labels for {len(x)} reference cells")
    if len(x) < 2:
        raise ValueError("Mahalanobis statistics need at least 2 reference cells")
    means, centred = [], []
    for c in classes:
        members = x[labels == str(c)]
        if len(members) == 0:
            means.append(None)
            continue
        mu = members.mean(0)
        means.append(mu.tolist())
        centred.append(members - mu)
    if not centred:
        raise ValueError(f"no reference cell has one of the classes {list(classes)[:5]}")
    within = np.concatenate(centred)

    def precision(c: np.ndarray) -> list:
        cov = c.T @ c / max(len(c) - 1, 1)
        cov += np.eye(len(cov)) * shrinkage * max(float(np.trace(cov)) / len(cov), _EPS)
        return np.linalg.inv(cov).tolist()

    out = {"classes": [str(c) for c in classes], "means": means,
           "precision": precision(within)}
    if relative:
        mean0 = x.mean(0)
        out.update(mean0=mean0.tolist(), precision0=precision(x - mean0))
    return out


def mahalanobis_score(representation: Any, stats: Mapping[str, Any], *,
                      relative: bool = False) -> np.ndarray:
    """Smallest (relative) Mahalanobis distance to a known class (Lee et al. 2018).

    Parameters
    ----------
    representation
        ``(n, d)`` representations.
    stats
        From :func:`fit_mahalanobis`.
    relative
        Subtract each cell's distance to the background Gaussian from its class distances
        before taking the minimum (Ren et al. 2021), which discounts directions in which all
        cells vary.

    Returns
    -------
    ``(n,)`` float64 squared distances.
    """
    x = _array(representation, "representation", ndim=2)
    means = np.asarray([m for m in stats["means"] if m is not None], dtype=np.float64)
    prec = np.asarray(stats["precision"], dtype=np.float64)
    if means.shape[1] != x.shape[1]:
        raise ValueError(f"representation has {x.shape[1]} features, the statistics "
                         f"{means.shape[1]}; fit them on this model's representations")
    # (x - mu)' P (x - mu) = x'Px - 2 x'P mu + mu'P mu, for all classes at once
    xp = x @ prec
    d = (np.einsum("ij,ij->i", xp, x)[:, None] - 2.0 * xp @ means.T
         + np.einsum("ij,jk,ik->i", means, prec, means)[None, :])
    if relative:
        if "precision0" not in stats:
            raise ValueError("relative Mahalanobis needs statistics from "
                             "fit_mahalanobis(..., relative=True)")
        diff = x - np.asarray(stats["mean0"], dtype=np.float64)
        d0 = np.einsum("ij,jk,ik->i", diff, np.asarray(stats["precision0"], dtype=np.float64),
                       diff)
        d = d - d0[:, None]
    return d.min(axis=1)


def max_logit_score(logits: Any) -> np.ndarray:
    """Negative largest logit (Hendrycks et al. 2022); higher = more novel."""
    return -_array(logits, "logits", ndim=2).max(axis=1)


def msp_score(logits: Any) -> np.ndarray:
    """``1 -`` the largest softmax probability (Hendrycks & Gimpel 2017)."""
    x = _array(logits, "logits", ndim=2)
    x = x - x.max(axis=1, keepdims=True)
    p = np.exp(x)
    return 1.0 - 1.0 / p.sum(axis=1)


def novelty_scores(score: Score, *, representation: Any = None, logits: Any = None,
                   reference: Any = None, mahalanobis: Mapping[str, Any] | None = None,
                   k: int = 10, temperature: float = 0.8,
                   exclude_self: bool = False) -> np.ndarray:
    """One novelty score for every cell (higher = more novel); each cell is scored alone.

    Parameters
    ----------
    score
        ``"knn"`` (:func:`knn_score` against ``reference``), ``"mahalanobis"`` /
        ``"relative_mahalanobis"`` (:func:`mahalanobis_score` with ``mahalanobis``),
        ``"energy"`` (:func:`energy_score` at fixed ``temperature``, no normalisation),
        ``"max_logit"`` or ``"msp"``.
    representation, logits
        ``(n, d)`` representations and ``(n, k)`` logits of the cells (each score needs one).
    reference
        ``(m, d)`` representations of the kNN reference cells (the example bank).
    mahalanobis
        Statistics from :func:`fit_mahalanobis`.
    k, temperature
        kNN neighbour and energy temperature.
    exclude_self
        kNN only: see :func:`knn_score` (for calibration cells that are in the reference).

    Returns
    -------
    ``(n,)`` float64 scores.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if score in _NEEDS_REP and representation is None:
        raise ValueError(f"score {score!r} needs the cells' representations")
    if score not in _NEEDS_REP and logits is None:
        raise ValueError(f"score {score!r} needs the cells' logits")
    if score == "knn":
        if reference is None:
            raise ValueError("score 'knn' needs reference representations (the example bank's)")
        return knn_score(representation, reference, k=k, exclude_self=exclude_self)
    if score in ("mahalanobis", "relative_mahalanobis"):
        if mahalanobis is None:
            raise ValueError(f"score {score!r} needs statistics from fit_mahalanobis()")
        return mahalanobis_score(representation, mahalanobis,
                                 relative=score == "relative_mahalanobis")
    if score == "energy":
        t = torch.as_tensor(_array(logits, "logits", ndim=2))
        return energy_score(t, temperature=temperature).double().numpy()
    if score == "max_logit":
        return max_logit_score(logits)
    return msp_score(logits)


# ===========================================================================================
# calibrated novelty: split-conformal thresholds
# ===========================================================================================

POOLED = "__pooled__"


def _quantile_sketch(sorted_scores: np.ndarray, max_scores: int) -> list[float]:
    if len(sorted_scores) <= max_scores:
        return sorted_scores.tolist()
    return np.quantile(sorted_scores, np.linspace(0.0, 1.0, max_scores)).tolist()


def _conformal_threshold(sorted_scores: np.ndarray, fpr: float) -> float:
    """Largest score that is still called known: the ceil((n+1)(1-fpr))-th smallest."""
    n = len(sorted_scores)
    m = math.ceil((n + 1) * (1.0 - fpr))
    return float(sorted_scores[m - 1]) if m <= n else math.inf


@dataclass(frozen=True)
class NoveltyCalibration:
    """A split-conformal novelty rule: a score, a target false-rejection rate, thresholds.

    Build it with :func:`fit_calibration`. A cell is novel when its conformal p-value (the share
    of calibration cells of its predicted class, or of all of them where the class had fewer
    than ``min_class_cells``, scoring at least as high) is at most ``fpr``; equivalently when
    its score exceeds the class's ``thresholds`` entry.

    Attributes
    ----------
    score
        Score name (see :data:`SCORES`).
    fpr
        Target share of known cells called novel.
    min_class_cells
        Calibration cells a predicted class needs for its own threshold.
    thresholds
        Per class (and :data:`POOLED`): cells scoring above it are novel at ``fpr``.
    calibration
        Per class (and :data:`POOLED`): sorted calibration scores (a quantile sketch of at most
        ``max_scores`` values when there were more cells) for p-values at any level.
    n_cells
        Per class (and :data:`POOLED`): how many calibration cells the entries summarise.
    params
        Score parameters (``k``, ``temperature``) and statistics (``mahalanobis``).
    """

    score: str
    fpr: float
    min_class_cells: int
    thresholds: dict[str, float]
    calibration: dict[str, list[float]]
    n_cells: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)

    def _group(self, predicted: Any, n: int) -> np.ndarray:
        pred = np.asarray(predicted, dtype=object).astype(str)
        if pred.ndim == 0:
            pred = np.full(n, str(pred))
        if len(pred) != n:
            raise ValueError(f"{len(pred)} predicted classes for {n} scores")
        return np.where(np.isin(pred, [c for c in self.thresholds if c != POOLED]), pred, POOLED)

    def scores(self, *, representation: Any = None, logits: Any = None,
               reference: Any = None, exclude_self: bool = False) -> np.ndarray:
        """This rule's novelty score of cells (see :func:`novelty_scores`).

        ``reference`` (the example bank's representations) is needed for ``score="knn"``;
        ``exclude_self`` when the scored cells may be in it (calibration cells).
        """
        return novelty_scores(self.score, representation=representation, logits=logits,
                              reference=reference, mahalanobis=self.params.get("mahalanobis"),
                              k=int(self.params.get("k", 10)),
                              temperature=float(self.params.get("temperature", 0.8)),
                              exclude_self=exclude_self)

    def p_values(self, scores: Any, predicted_class: Any) -> np.ndarray:
        """Conformal p-values ``(1 + #{calibration >= s}) / (n + 1)`` per cell.

        Parameters
        ----------
        scores
            ``(n,)`` novelty scores of this rule's ``score``.
        predicted_class
            Each cell's predicted (most probable known) type.

        Returns
        -------
        ``(n,)`` float64 p-values in ``(0, 1]``; small means novel.
        """
        s = _array(scores, "scores").reshape(-1)
        group = self._group(predicted_class, len(s))
        out = np.empty(len(s))
        for g in np.unique(group):
            at = group == g
            cal = np.asarray(self.calibration[g])
            n = self.n_cells[g]
            # share of calibration cells >= s; exact when all scores were kept
            frac = 1.0 - np.searchsorted(cal, s[at], side="left") / len(cal)
            if len(cal) < n:  # quantile sketch: interpolate the empirical CDF
                frac = 1.0 - np.interp(s[at], cal, np.linspace(0.0, 1.0, len(cal)),
                                       left=0.0, right=1.0)
            out[at] = (1.0 + n * frac) / (n + 1.0)
        return out

    def is_novel(self, scores: Any, predicted_class: Any, *,
                 fpr: float | None = None) -> np.ndarray:
        """Boolean novel call per cell at this rule's ``fpr`` (or another ``fpr``).

        At the calibrated ``fpr`` this compares with ``thresholds`` (exact); at another level
        it uses :meth:`p_values` ``<= fpr``.
        """
        s = _array(scores, "scores").reshape(-1)
        if fpr is not None and not math.isclose(fpr, self.fpr):
            return self.p_values(s, predicted_class) <= fpr
        group = self._group(predicted_class, len(s))
        thr = np.asarray([self.thresholds[g] for g in group], dtype=np.float64)
        return s > thr

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (infinite thresholds become ``None``)."""
        return {"rule": "conformal", "score": self.score, "fpr": self.fpr,
                "min_class_cells": self.min_class_cells,
                "thresholds": {g: (None if math.isinf(t) else t)
                               for g, t in self.thresholds.items()},
                "calibration": self.calibration, "n_cells": self.n_cells,
                "params": self.params}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NoveltyCalibration:
        """Rebuild from :meth:`to_dict` output."""
        try:
            return cls(score=str(d["score"]), fpr=float(d["fpr"]),
                       min_class_cells=int(d["min_class_cells"]),
                       thresholds={g: (math.inf if t is None else float(t))
                                   for g, t in d["thresholds"].items()},
                       calibration={g: [float(v) for v in c]
                                    for g, c in d["calibration"].items()},
                       n_cells={g: int(n) for g, n in d["n_cells"].items()},
                       params=dict(d.get("params", {})))
        except KeyError as err:
            raise ValueError(f"novelty calibration dict lacks {err}; it was not written by "
                             "NoveltyCalibration.to_dict") from err


def fit_calibration(scores: Any, predicted_class: Any, *, score: Score, fpr: float = 0.05,
                    min_class_cells: int = 50, params: Mapping[str, Any] | None = None,
                    max_scores: int = 200) -> NoveltyCalibration:
    """Split-conformal calibration on held-out known cells.

    Parameters
    ----------
    scores
        ``(n,)`` novelty scores of known cells the model did not train on (e.g. a stage's
        validation cells, ideally from several donors so that donor shift is represented).
    predicted_class
        Each calibration cell's predicted type (not its true type: at prediction time only the
        prediction is known, and conditioning on it keeps the guarantee per predicted class).
    score
        Which score ``scores`` are (stored; see :data:`SCORES`).
    fpr
        Target share of known cells called novel, in ``(0, 1)``.
    min_class_cells
        A predicted class with fewer calibration cells uses the pooled threshold.
    params
        Score parameters and statistics stored with the rule (``k``, ``temperature``,
        ``mahalanobis``).
    max_scores
        Calibration scores kept per group (a quantile sketch beyond it), so that the rule stays
        small in ``config.json``; thresholds are computed from all scores.

    Returns
    -------
    The :class:`NoveltyCalibration`.
    """
    s = _array(scores, "scores").reshape(-1)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not 0.0 < float(fpr) < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr!r}")
    if len(s) == 0:
        raise ValueError("no calibration cells; hold out known cells the model did not train on")
    if not np.isfinite(s).all():
        raise ValueError("calibration scores contain NaN or inf")
    pred = np.asarray(predicted_class, dtype=object).astype(str)
    if len(pred) != len(s):
        raise ValueError(f"{len(pred)} predicted classes for {len(s)} calibration scores")
    if len(s) < math.ceil(1.0 / fpr) - 1:
        logger.warning("%d calibration cells cannot reach fpr=%.3g (need >= %d); no cell will "
                       "be called novel", len(s), fpr, math.ceil(1.0 / fpr) - 1)
    groups = {POOLED: np.sort(s)}
    for c in np.unique(pred):
        members = s[pred == c]
        if len(members) >= min_class_cells:
            groups[str(c)] = np.sort(members)
    return NoveltyCalibration(
        score=score, fpr=float(fpr), min_class_cells=int(min_class_cells),
        thresholds={g: _conformal_threshold(v, fpr) for g, v in groups.items()},
        calibration={g: _quantile_sketch(v, max_scores) for g, v in groups.items()},
        n_cells={g: len(v) for g, v in groups.items()}, params=dict(params or {}))


# ===========================================================================================
# cluster-level decisions
# ===========================================================================================

def neighbour_groups(representation: Any, *, n_neighbors: int = 15, resolution: float = 1.0,
                     seed: int = 0) -> np.ndarray:
    """Leiden clusters of a kNN graph over the representation (scanpy), as strings.

    This is transductive by design: clusters depend on all the cells given.
    """
    import anndata as ad
    import scanpy as sc

    x = _array(representation, "representation", ndim=2).astype(np.float32)
    a = ad.AnnData(np.zeros((len(x), 0), dtype=np.float32))
    a.obsm["X_rep"] = x
    sc.pp.neighbors(a, use_rep="X_rep", n_neighbors=min(n_neighbors, max(len(x) - 1, 2)),
                    random_state=seed)
    sc.tl.leiden(a, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2,
                 directed=False)
    return a.obs["leiden"].astype(str).to_numpy()


def cluster_vote(labels: Any, novel: Any, groups: Any, *, min_fraction: float = 0.5,
                 unassigned: str = "Unassigned") -> tuple[np.ndarray, np.ndarray]:
    """Cluster-level calls: a group is novel when most of its cells are; known labels by majority.

    Parameters
    ----------
    labels
        Each cell's best known type (its prediction ignoring novelty).
    novel
        Each cell's per-cell novel call.
    groups
        Each cell's cluster (an obs column, or :func:`neighbour_groups`).
    min_fraction
        A group is novel when more than this share of its cells is novel.
    unassigned
        Label of novel cells.

    Returns
    -------
    ``(labels, novel)``: per cell, its group's majority known type (or ``unassigned``) and its
    group's novel call.
    """
    lab = np.asarray(labels, dtype=object).astype(str)
    nov = np.asarray(novel, dtype=bool).reshape(-1)
    grp = np.asarray(groups, dtype=object).astype(str)
    if not len(lab) == len(nov) == len(grp):
        raise ValueError(f"labels, novel and groups must have one entry per cell, got "
                         f"{len(lab)}, {len(nov)}, {len(grp)}")
    out_lab = lab.astype(object)
    out_nov = nov.copy()
    for g in np.unique(grp):
        at = grp == g
        is_nov = nov[at].mean() > min_fraction
        out_nov[at] = is_nov
        values, counts = np.unique(lab[at], return_counts=True)
        out_lab[at] = unassigned if is_nov else values[np.argmax(counts)]
    return out_lab.astype(str), out_nov
