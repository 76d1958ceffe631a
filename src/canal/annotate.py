"""Batched inference: stream cells through the network, score novelty, call cell types.

The core of :meth:`canal.Annotator.predict`. Cells are read chunk by chunk on the model's gene
panel (:func:`canal.pp.iter_panel_blocks`, which also streams backed AnnData), binned one batch
at a time and run through the network under :func:`torch.inference_mode`, so only a batch of
dense tokens is ever held; what is kept per cell is its representation and its logits.

Novel cells (``Unassigned``) are called with CANAL's novelty score (:mod:`canal.novelty`):

* ``"energy"`` — transductive, as in the CANAL paper: the energy is min-max normalised over the
  cells being annotated and the threshold comes from mixup of their representations (seeded).
* ``"calibrated"`` — non-transductive: energy bounds and threshold were computed once on
  reference cells (training cells or the example bank, see :func:`calibration`) and are stored
  with the model, so each cell is scored on its own.
* ``"none"`` — every cell gets its most probable known type.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from canal import novelty as nov
from canal import pp
from canal.data import Batch, CellData
from canal.metrics import UNASSIGNED
from canal.runtime import (
    BATCH_SIZE,
    Precision,
    check_batch_size,
    check_precision,
    eval_mode,
    forward_cells,
)

if TYPE_CHECKING:
    import scipy.sparse as sp

    from canal.nn import CanalNet, CellOutput

logger = logging.getLogger(__name__)

__all__ = ["Annotation", "annotate", "calibration", "results_frame", "write_results"]

Novelty = Literal["energy", "calibrated", "none"]

TEMPERATURE = nov.TEMPERATURE
#: Below this many cells, transductive (``"energy"``) normalisation is flagged as unreliable.
_FEW_CELLS = 50
#: Cells read from the file per chunk (rounded to a multiple of the batch size).
_CHUNK_CELLS = 4096
_CALIBRATION_KEYS = ("energy_min", "energy_max", "threshold", "temperature")


# --------------------------------------------------------------------------------------------
# running the network
# --------------------------------------------------------------------------------------------


def panel_batches(blocks: Iterable[sp.csr_matrix], batch_size: int, *,
                  measured: np.ndarray) -> Iterator[Batch]:
    """Bin each ``batch_size`` rows of the panel blocks; ``measured`` is the dataset's gene mask."""
    present = None if measured.all() else pp.present_mask(measured[None])
    for block in blocks:
        for start in range(0, block.shape[0], batch_size):
            tokens = pp.bin_tokens(block[start:start + batch_size])
            yield Batch(tokens, None if present is None else present.expand(len(tokens), -1))


def _classifier(net: CanalNet):
    """The classification head as a float32 function of CPU representations (call in eval)."""
    dev = next(net.parameters()).device

    def classify(rep: torch.Tensor) -> torch.Tensor:
        return net.head.classify(rep.to(dev)).float().cpu()

    return classify


# --------------------------------------------------------------------------------------------
# calibration (non-transductive novelty)
# --------------------------------------------------------------------------------------------


def calibration(net: CanalNet, data: CellData, *, batch_size: int = BATCH_SIZE,
                temperature: float = TEMPERATURE, seed: int = 0,
                precision: Precision = "fp32",
                device: str | torch.device | None = None) -> dict[str, Any]:
    """Calibrate the novelty score on reference cells, for ``novelty="calibrated"``.

    Call it after a training stage on the stage's training cells or the example bank, and store
    the result in the model's ``meta["novelty"]`` (:meth:`canal.Annotator.calibrate_novelty`
    does both).

    Parameters
    ----------
    net
        The trained network (its train/eval mode is restored afterwards).
    data
        Reference cells on the model's panel (at least 2).
    batch_size
        Cells per forward pass.
    temperature
        Energy temperature.
    seed
        Seed of the mixup generator; the result is deterministic.
    precision, device
        As in :func:`forward`.

    Returns
    -------
    dict
        The keys of :func:`canal.novelty.calibrate` (``energy_min``, ``energy_max``,
        ``threshold``, ``temperature``, ``n_cells``) plus ``seed``; JSON-serialisable.
    """
    batch_size = check_batch_size(batch_size)
    if data.n_cells < 2:
        raise ValueError(f"calibration needs at least 2 reference cells, got {data.n_cells}; "
                         "pass the training cells or the example bank")
    if net.head.n_classes == 0:
        raise ValueError("the network has no cell types yet; calibrate after a training stage")
    out = forward_cells(net, (b for _, b in data.batches(batch_size)), n_cells=data.n_cells,
                        precision=precision, device=device)
    gen = torch.Generator().manual_seed(int(seed))
    with eval_mode(net):
        cal = nov.calibrate(out.representation, out.logits, _classifier(net),
                            temperature=temperature, generator=gen)
    cal["seed"] = int(seed)
    logger.info("novelty calibrated on %d cells: threshold %.4f", data.n_cells, cal["threshold"])
    return cal


def _check_calibration(cal: Any) -> dict[str, float]:
    if not isinstance(cal, Mapping) or any(k not in cal for k in _CALIBRATION_KEYS):
        raise ValueError("the model has no usable novelty calibration (meta['novelty']); run "
                         "model.calibrate_novelty(reference_adata) or use novelty='energy'")
    return {k: float(cal[k]) for k in _CALIBRATION_KEYS}


# --------------------------------------------------------------------------------------------
# annotation
# --------------------------------------------------------------------------------------------


@dataclass
class Annotation:
    """The result of :func:`annotate`, one row per cell.

    Attributes
    ----------
    cell_types
        The model's cell-type library (the probability columns, in order).
    codes
        Index into ``cell_types`` of each cell's call; ``-1`` for ``Unassigned``.
    representation
        ``(cells, rep_dim)`` float32.
    probabilities
        ``(cells, types)`` float32 softmax probabilities.
    confidence
        Largest probability per cell (float32).
    novelty
        Novelty score per cell (float32; NaN with ``novelty="none"``).
    params
        Settings and threshold used; only str/int/float values (h5ad-serialisable).
    """

    cell_types: list[str]
    codes: np.ndarray
    representation: np.ndarray
    probabilities: np.ndarray
    confidence: np.ndarray
    novelty: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return len(self.codes)

    @property
    def labels(self) -> pd.Categorical:
        """Calls as a categorical with categories ``cell_types + ["Unassigned"]``."""
        codes = np.where(self.codes < 0, len(self.cell_types), self.codes)
        return pd.Categorical.from_codes(codes, categories=[*self.cell_types, UNASSIGNED])


def _novelty(outputs: CellOutput, classify, *, mode: str, cal: Mapping | None,
             temperature: float, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Novelty scores and the threshold, with the params describing them."""
    logits = outputs.logits
    n = logits.shape[0]
    if mode == "none":
        return torch.full((n,), float("nan")), {"novelty": "none", "threshold": float("nan"),
                                               "temperature": float("nan")}
    if mode == "calibrated":
        c = _check_calibration(cal)
        scores = nov.novelty_score(logits, temperature=c["temperature"],
                                   ref_min=c["energy_min"], ref_max=c["energy_max"])
        return scores, {"novelty": "calibrated", "threshold": c["threshold"],
                        "temperature": c["temperature"], "energy_min": c["energy_min"],
                        "energy_max": c["energy_max"]}
    if n < _FEW_CELLS:
        logger.warning("novelty='energy' normalises scores over the %d cells given; with so few "
                       "cells they are unreliable, consider novelty='calibrated'", n)
    energy = nov.energy_score(logits, temperature=temperature)
    lo, hi = float(energy.min()), float(energy.max())
    scores = nov.novelty_score(logits, temperature=temperature)
    gen = torch.Generator().manual_seed(int(seed))
    threshold = nov.mixup_threshold(outputs.representation, classify, temperature=temperature,
                                    generator=gen, ref_min=lo, ref_max=hi)
    return scores, {"novelty": "energy", "threshold": float(threshold),
                    "temperature": float(temperature), "energy_min": lo, "energy_max": hi,
                    "seed": int(seed)}


def annotate(
    net: CanalNet,
    adata,
    genes: Sequence[str],
    cell_types: Sequence[str],
    *,
    novelty: Novelty = "energy",
    calibration: Mapping[str, Any] | None = None,
    match: pp.GeneMatch | None = None,
    batch_size: int = BATCH_SIZE,
    precision: Precision = "fp32",
    temperature: float = TEMPERATURE,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Annotation:
    """Annotate every cell of ``adata`` with ``net`` (streamed in batches; adata is not changed).

    Parameters
    ----------
    net
        A trained network whose classifier has ``len(cell_types)`` outputs.
    adata
        Cells to annotate: raw counts or log-normalized, in memory or backed.
    genes
        The model's gene panel, in model order.
    cell_types
        The model's cell-type library, in classifier order.
    novelty
        ``"energy"`` (transductive), ``"calibrated"`` (uses ``calibration``) or ``"none"``.
        ``"energy"`` on a single cell falls back to ``"calibrated"`` when ``calibration`` is
        given and raises a ValueError otherwise.
    calibration
        The dict of :func:`calibration` (the model's ``meta["novelty"]``).
    batch_size
        Cells per forward pass; results do not depend on it.
    precision
        ``"fp32"`` or ``"bf16"`` autocast.
    match
        How expression is read and genes matched (:class:`canal.pp.GeneMatch`). Panel genes
        the data lack are not measured: they take no part in the computation.
    temperature
        Energy temperature of the ``"energy"`` mode (the calibrated mode uses the calibrated one).
    seed
        Seed of the mixup generator of the ``"energy"`` mode.
    device
        Torch device; ``None`` uses ``canal.settings.device``.

    Returns
    -------
    :class:`Annotation`; write it into an AnnData with :func:`write_results`.
    """
    if novelty not in ("energy", "calibrated", "none"):
        raise ValueError(f"novelty must be 'energy', 'calibrated' or 'none', got {novelty!r}")
    batch_size = check_batch_size(batch_size)
    check_precision(precision)
    match = match or pp.GeneMatch()
    cell_types = [str(c) for c in cell_types]
    if not cell_types or net.head.n_classes == 0:
        raise ValueError("the model has no cell types yet; train it first with "
                         "model.fit_stage(adata, labels_key=...)")
    if len(cell_types) != net.head.n_classes:
        raise ValueError(f"{len(cell_types)} cell types for a classifier with "
                         f"{net.head.n_classes} outputs")
    if UNASSIGNED in cell_types:
        raise ValueError(f"{UNASSIGNED!r} is reserved for novel cells; rename that cell type "
                         "in the training labels")
    requested = novelty
    if novelty == "energy" and adata.n_obs < 2:
        if calibration is None:
            raise ValueError("novelty='energy' normalises scores over the annotated cells and "
                             "cannot score a single cell; pass novelty='calibrated' with a "
                             "calibrated model (model.calibrate_novelty(reference_adata)) or "
                             "novelty='none'")
        logger.warning("one cell: novelty='energy' falls back to the model's calibration")
        novelty = "calibrated"
    if novelty == "calibrated":
        _check_calibration(calibration)

    alignment = match.align(adata, genes)
    chunk = batch_size * max(1, _CHUNK_CELLS // batch_size)
    blocks = pp.iter_panel_blocks(adata, genes, match=match, chunk_size=chunk,
                                  alignment=alignment)
    outputs = forward_cells(net, panel_batches(blocks, batch_size, measured=alignment.measured),
                            n_cells=adata.n_obs, precision=precision, device=device,
                            progress="canal predict")

    with eval_mode(net):
        scores, params = _novelty(outputs, _classifier(net), mode=novelty, cal=calibration,
                                  temperature=temperature, seed=seed)
    probs = torch.softmax(outputs.logits, dim=1)
    confidence, codes = probs.max(dim=1)
    codes = codes.numpy().astype(np.int64)
    if novelty != "none":
        novel = nov.is_novel(scores, params["threshold"]).numpy()
        codes[novel] = -1
        logger.info("%d of %d cells Unassigned (threshold %.4f)", int(novel.sum()),
                    len(codes), params["threshold"])
    params.update(novelty_requested=requested, n_genes_found=int(alignment.n_found),
                  n_genes=int(alignment.n_panel), fraction_genes_measured=alignment.fraction,
                  batch_size=batch_size, precision=precision, n_cells=int(len(codes)),
                  **{f"match_{k}": ("" if v is None else v)
                     for k, v in match.to_dict().items()})
    return Annotation(cell_types=cell_types, codes=codes,
                      representation=outputs.representation.numpy().astype(np.float32,
                                                                           copy=False),
                      probabilities=probs.numpy().astype(np.float32, copy=False),
                      confidence=confidence.numpy().astype(np.float32, copy=False),
                      novelty=scores.numpy().astype(np.float32, copy=False), params=params)


# --------------------------------------------------------------------------------------------
# AnnData output
# --------------------------------------------------------------------------------------------


def output_keys(key_added: str = "canal") -> dict[str, str]:
    """The obs/obsm keys that :func:`write_results` fills for ``key_added``."""
    return {"label": key_added, "confidence": f"{key_added}_confidence",
            "novelty": f"{key_added}_novelty", "rep": f"X_{key_added}",
            "probabilities": f"{key_added}_probabilities"}


def results_frame(result: Annotation, obs_names: Sequence[str], *,
                  key_added: str = "canal") -> pd.DataFrame:
    """The calls, confidence, novelty score and one probability column per type.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``obs_names``; columns ``key_added``, ``f"{key_added}_confidence"``,
        ``f"{key_added}_novelty"``, then one column per known cell type.
    """
    keys = output_keys(key_added)
    clash = {keys["label"], keys["confidence"], keys["novelty"]} & set(result.cell_types)
    if clash:
        raise ValueError(f"cell type(s) {sorted(clash)} clash with the result columns; pass "
                         "another key_added")
    index = pd.Index(obs_names)
    frame = pd.DataFrame({keys["label"]: result.labels, keys["confidence"]: result.confidence,
                          keys["novelty"]: result.novelty}, index=index)
    probs = pd.DataFrame(result.probabilities, index=index, columns=result.cell_types)
    return pd.concat([frame, probs], axis=1)


def write_results(adata, result: Annotation, *, key_added: str = "canal") -> None:
    """Write an :class:`Annotation` into ``adata`` (in memory or backed: obs/obsm/uns only).

    Returns
    -------
    Nothing. Sets ``adata.obs[key_added]`` (categorical, ``Unassigned`` for novel cells),
    ``adata.obs[f"{key_added}_confidence"]`` and ``adata.obs[f"{key_added}_novelty"]``
    (float32), ``adata.obsm[f"X_{key_added}"]`` (float32 representation),
    ``adata.obsm[f"{key_added}_probabilities"]`` (DataFrame, one column per known type) and
    ``adata.uns[key_added]["params"]``.
    """
    if adata.n_obs != result.n_cells:
        raise ValueError(f"the result has {result.n_cells} cells, adata {adata.n_obs}; write it "
                         "into the AnnData that was annotated")
    keys = output_keys(key_added)
    adata.obs[keys["label"]] = result.labels
    adata.obs[keys["confidence"]] = result.confidence
    adata.obs[keys["novelty"]] = result.novelty
    adata.obsm[keys["rep"]] = result.representation
    adata.obsm[keys["probabilities"]] = pd.DataFrame(result.probabilities,
                                                     index=adata.obs_names.copy(),
                                                     columns=result.cell_types)
    uns = dict(adata.uns.get(key_added, {}))
    uns["params"] = dict(result.params)
    adata.uns[key_added] = uns
