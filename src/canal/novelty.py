"""Novel-cell detection: CANAL's energy-based novelty score and its automatic threshold.

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
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["calibrate", "energy_score", "is_novel", "mixup_threshold", "novelty_score"]

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
