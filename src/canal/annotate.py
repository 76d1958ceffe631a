"""Batched inference: stream cells through the network, score novelty, call cell types.

The core of :meth:`canal.Annotator.predict`. Cells are read chunk by chunk on the model's gene
panel (:func:`canal.pp.iter_panel_blocks`, which also streams backed AnnData), binned one batch
at a time and run through the network under :func:`torch.inference_mode`, so only a batch of
dense tokens is ever held; what is kept per cell is its representation and its logits.

Novel cells (``Unassigned``) are called by one of three rules (:mod:`canal.novelty`):

* ``"calibrated"`` (default) — split-conformal: each cell's novelty score is compared with the
  scores of held-out known cells from training (stored with the model), per predicted type; a
  cell is novel when its conformal p-value is at most ``fpr`` (about ``fpr`` of known cells are
  rejected). A cell's call depends on that cell alone.
* ``"mixup"`` — CANAL's transductive rule, as in the paper: the energy is min-max normalised
  over the cells being annotated and the threshold comes from mixup of their representations
  (seeded); ``"energy"`` is its former name.
* ``"none"`` — every cell gets its most probable known type.

Optionally (``groups``), calls are made per cluster: a cluster is novel when most of its cells
are, and known cells take their cluster's majority type (CellTypist's majority voting).

Inside a process group (``torchrun``; :mod:`canal.distributed`) the forward pass is sharded:
each rank streams a contiguous block of the file's rows (whole batches, so exactly the batches
one process would run) on its own device, and the representations and logits are gathered in
cell order on every rank. Everything after the forward pass (novelty scores, p-values, mixup
threshold, cluster votes) runs on the gathered outputs, so each rank's result is the
single-process result; ``groups="auto"`` clustering runs on rank 0 and is broadcast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from canal import distributed, pp
from canal import novelty as nov
from canal._settings import settings
from canal.data import Batch
from canal.metrics import UNASSIGNED
from canal.nn import CellOutput
from canal.runtime import (
    BATCH_SIZE,
    Precision,
    check_batch_size,
    check_precision,
    eval_mode,
    forward_cells,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    import scipy.sparse as sp

    from canal.nn import CanalNet

logger = logging.getLogger(__name__)

__all__ = ["Annotation", "annotate", "output_keys", "represent", "results_frame",
           "write_results"]

Novelty = Literal["calibrated", "mixup", "none"]
#: Former name of ``"mixup"`` (still accepted).
_ALIASES = {"energy": "mixup"}

TEMPERATURE = nov.TEMPERATURE
#: Below this many cells, transductive (``"energy"``) normalisation is flagged as unreliable.
_FEW_CELLS = 50
#: Cells read from the file per chunk (rounded to a multiple of the batch size).
_CHUNK_CELLS = 4096


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


def represent(net: CanalNet, adata, genes: Sequence[str], *,
              alignment: pp.GeneAlignment, match: pp.GeneMatch, share: float = 1.0,
              batch_size: int = BATCH_SIZE, precision: Precision = "fp32",
              device: str | torch.device | None = None,
              progress: str | None = None) -> CellOutput:
    """Representations and logits of every cell of ``adata``, streamed from the file.

    Reads ``_CHUNK_CELLS`` rows at a time on the panel (backed AnnData stays on disk), bins a
    batch at a time and runs :func:`canal.runtime.forward_cells`. In a process group each
    rank runs its :func:`canal.distributed.block` of rows on :func:`canal.distributed.
    local_device` and the outputs are gathered in cell order on every rank (a failure on one
    rank is raised on all); the progress bar (rank 0's block) is shown by rank 0 only.

    Returns
    -------
    :class:`~canal.nn.CellOutput`, float32 CPU tensors with one row per cell of ``adata``.
    """
    cells = distributed.block(adata.n_obs, multiple=batch_size)
    chunk = batch_size * max(1, _CHUNK_CELLS // batch_size)
    dev = distributed.local_device(settings.torch_device(device))
    if distributed.active() and progress is not None:
        progress = f"{progress} (rank 0 of {distributed.world_size()})" \
            if distributed.is_main() else None

    def run() -> CellOutput:
        blocks = pp.iter_panel_blocks(adata, genes, match=match, chunk_size=chunk,
                                      alignment=alignment, share=share, cells=cells)
        return forward_cells(net, panel_batches(blocks, batch_size, measured=alignment.measured),
                             n_cells=cells.stop - cells.start, precision=precision, device=dev,
                             progress=progress)

    out = distributed.agree(run)
    if not distributed.active():
        return out
    return CellOutput(distributed.gather_blocks(out.representation),
                      distributed.gather_blocks(out.logits))


def _classifier(net: CanalNet):
    """The classification head as a float32 function of CPU representations (call in eval)."""
    dev = next(net.parameters()).device

    def classify(rep: torch.Tensor) -> torch.Tensor:
        return net.head.classify(rep.to(dev)).float().cpu()

    return classify


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
    p_values
        Conformal p-value per cell (float32; NaN unless ``novelty="calibrated"``).
    closed
        Index of each cell's most probable known type, ``Unassigned`` cells included.
    params
        Settings and threshold used; only str/int/float values (h5ad-serialisable).
    """

    cell_types: list[str]
    codes: np.ndarray
    representation: np.ndarray
    probabilities: np.ndarray
    confidence: np.ndarray
    novelty: np.ndarray
    p_values: np.ndarray | None = None
    closed: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return len(self.codes)

    @property
    def labels(self) -> pd.Categorical:
        """Calls as a categorical with categories ``cell_types + ["Unassigned"]``."""
        codes = np.where(self.codes < 0, len(self.cell_types), self.codes)
        return pd.Categorical.from_codes(codes, categories=[*self.cell_types, UNASSIGNED])

    @property
    def closed_labels(self) -> pd.Categorical:
        """Each cell's most probable known type (``Unassigned`` cells included)."""
        codes = self.codes if self.closed is None else self.closed
        return pd.Categorical.from_codes(np.maximum(codes, 0), categories=self.cell_types)


def _mixup(outputs: CellOutput, classify, *, temperature: float, seed: int
           ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """CANAL's transductive rule: scores normalised over these cells, mixup threshold."""
    logits = outputs.logits
    n = logits.shape[0]
    if n < 2:
        raise ValueError("novelty='mixup' normalises scores over the annotated cells and cannot "
                         "score a single cell; use novelty='calibrated' (per cell) or 'none'")
    if n < _FEW_CELLS:
        logger.warning("novelty='mixup' normalises scores over the %d cells given; with so few "
                       "cells they are unreliable, consider novelty='calibrated'", n)
    energy = nov.energy_score(logits, temperature=temperature)
    lo, hi = float(energy.min()), float(energy.max())
    scores = nov.novelty_score(logits, temperature=temperature)
    gen = torch.Generator().manual_seed(int(seed))
    threshold = nov.mixup_threshold(outputs.representation, classify, temperature=temperature,
                                    generator=gen, ref_min=lo, ref_max=hi)
    return (scores.numpy(), nov.is_novel(scores, threshold).numpy(),
            {"novelty": "mixup", "threshold": float(threshold), "temperature": float(temperature),
             "energy_min": lo, "energy_max": hi, "seed": int(seed)})


def _calibrated(outputs: CellOutput, closed: np.ndarray, cell_types: Sequence[str], *,
                calibration: nov.NoveltyCalibration, reference: np.ndarray | None,
                fpr: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """The split-conformal rule: per-cell scores, p-values and calls at ``fpr``."""
    if calibration.score == "knn" and reference is None:
        raise ValueError("the kNN novelty score needs the example bank's representations; the "
                         "model has no bank: recalibrate with model.calibrate_novelty(adata) or "
                         "use novelty='mixup'")
    predicted = np.asarray(cell_types, dtype=object)[closed]
    scores = calibration.scores(representation=outputs.representation, logits=outputs.logits,
                                reference=reference)
    p = calibration.p_values(scores, predicted)
    level = calibration.fpr if fpr is None else float(fpr)
    if not 0 < level < 1:
        raise ValueError(f"novelty_fpr must be in (0, 1), got {fpr!r}")
    novel = calibration.is_novel(scores, predicted, fpr=level)
    pooled = calibration.thresholds.get(nov.POOLED, float("nan"))
    # the pooled threshold (for plots; types with enough calibration cells have their own)
    return scores, p, novel, {"novelty": "calibrated", "score": calibration.score,
                              "fpr": level, "calibrated_fpr": calibration.fpr,
                              "threshold": float(pooled) if np.isfinite(pooled) else
                              float("nan")}


def annotate(
    net: CanalNet,
    adata,
    genes: Sequence[str],
    cell_types: Sequence[str],
    *,
    novelty: Novelty = "calibrated",
    calibration: nov.NoveltyCalibration | None = None,
    reference: np.ndarray | None = None,
    fpr: float | None = None,
    groups: Sequence[str] | Literal["auto"] | None = None,
    match: pp.GeneMatch | None = None,
    shares: pd.Series | None = None,
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
        ``"calibrated"`` (uses ``calibration``), ``"mixup"`` (CANAL's transductive rule;
        ``"energy"`` is its former name) or ``"none"``.
    calibration
        The model's :class:`canal.novelty.NoveltyCalibration`.
    reference
        The example bank's representations (the kNN score's reference cells).
    fpr
        Share of known cells to reject (default: the calibrated one); another level re-reads
        the stored p-values, nothing is recomputed.
    groups
        One cluster label per cell, or ``"auto"`` (Leiden clusters of the representation,
        from the same pass): decide per cluster (a cluster is novel when most of its
        cells are; known cells take their cluster's majority type).
    batch_size
        Cells per forward pass; results do not depend on it.
    precision
        ``"fp32"`` or ``"bf16"`` autocast.
    match
        How expression is read and genes matched (:class:`canal.pp.GeneMatch`). Panel genes
        the data lack are not measured: they take no part in the computation.
    shares
        The reference's gene shares (:func:`canal.pp.dataset_gene_shares`): a file holding
        only part of the transcriptome is scaled by the share its genes held there.
    temperature
        Energy temperature of the ``"mixup"`` rule.
    seed
        Seed of the mixup generator.
    device
        Torch device; ``None`` uses ``canal.settings.device``.

    Returns
    -------
    :class:`Annotation`; write it into an AnnData with :func:`write_results`.
    """
    requested = novelty
    novelty = _ALIASES.get(novelty, novelty)
    if novelty not in ("calibrated", "mixup", "none"):
        raise ValueError(f"novelty must be 'calibrated', 'mixup' or 'none', got {requested!r}")
    if novelty == "calibrated" and calibration is None:
        raise ValueError("the model has no novelty calibration (fit_stage makes one; or call "
                         "model.calibrate_novelty(adata) on held-out known cells); or pass "
                         "novelty='mixup' or 'none'")
    if groups is not None and not isinstance(groups, str) and len(groups) != adata.n_obs:
        raise ValueError(f"groupby gives {len(groups)} labels for {adata.n_obs} cells")
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
    alignment = match.align(adata, genes)
    share = pp.reference_share(alignment, shares)
    outputs = represent(net, adata, genes, alignment=alignment, match=match, share=share,
                        batch_size=batch_size, precision=precision, device=device,
                        progress="canal predict")

    probs = torch.softmax(outputs.logits, dim=1)
    confidence, closed = probs.max(dim=1)
    closed = closed.numpy().astype(np.int64)
    n = len(closed)
    p_values = np.full(n, np.nan)
    if novelty == "none":
        scores, novel = np.full(n, np.nan), np.zeros(n, dtype=bool)
        params: dict[str, Any] = {"novelty": "none"}
    elif novelty == "mixup":
        with eval_mode(net):
            scores, novel, params = _mixup(outputs, _classifier(net), temperature=temperature,
                                           seed=seed)
    else:
        scores, p_values, novel, params = _calibrated(outputs, closed, cell_types,
                                                      calibration=calibration,
                                                      reference=reference, fpr=fpr)
    codes = closed.copy()
    if isinstance(groups, str):  # transductive and costly: once, on rank 0
        groups = distributed.on_main(nov.neighbour_groups, outputs.representation.numpy(),
                                     seed=seed)
    if groups is not None:
        voted, novel = nov.cluster_vote(np.asarray(cell_types)[closed], novel, groups,
                                        unassigned=UNASSIGNED)
        lookup = {t: i for i, t in enumerate(cell_types)}
        codes = np.asarray([lookup.get(v, -1) for v in voted], dtype=np.int64)
        params["groupby"] = "clusters"
    codes[novel] = -1
    if novelty != "none":
        logger.info("%d of %d cells Unassigned (%s)", int(novel.sum()), n, params["novelty"])
    params.update(novelty_requested=requested, n_genes_found=int(alignment.n_found),
                  n_genes=int(alignment.n_panel), fraction_genes_measured=alignment.fraction,
                  transcriptome_share=share,
                  batch_size=batch_size, precision=precision, n_cells=int(len(codes)),
                  **{f"match_{k}": ("" if v is None else v)
                     for k, v in match.to_dict().items()})
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    return Annotation(cell_types=cell_types, codes=codes,
                      representation=f32(outputs.representation.numpy()),
                      probabilities=f32(probs.numpy()), confidence=f32(confidence.numpy()),
                      novelty=f32(scores), p_values=f32(p_values), closed=closed,
                      params=params)


# --------------------------------------------------------------------------------------------
# AnnData output
# --------------------------------------------------------------------------------------------


def output_keys(key_added: str = "canal") -> dict[str, str]:
    """The obs/obsm keys that :func:`write_results` fills for ``key_added``."""
    return {"label": key_added, "confidence": f"{key_added}_confidence",
            "novelty": f"{key_added}_novelty", "p_value": f"{key_added}_novelty_p",
            "closed": f"{key_added}_closed", "rep": f"X_{key_added}",
            "probabilities": f"{key_added}_probabilities", "colors": f"{key_added}_colors"}


def results_frame(result: Annotation, obs_names: Sequence[str], *,
                  key_added: str = "canal") -> pd.DataFrame:
    """The calls, confidence, novelty score and p-value, best known type, one probability
    column per type.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``obs_names``; columns ``key_added``, ``f"{key_added}_confidence"``,
        ``f"{key_added}_novelty"``, ``f"{key_added}_novelty_p"``, ``f"{key_added}_closed"``,
        then one column per known cell type.
    """
    keys = output_keys(key_added)
    cols = [keys[k] for k in ("label", "confidence", "novelty", "p_value", "closed")]
    clash = set(cols) & set(result.cell_types)
    if clash:
        raise ValueError(f"cell type(s) {sorted(clash)} clash with the result columns; pass "
                         "another key_added")
    index = pd.Index(obs_names)
    frame = pd.DataFrame(dict(zip(cols, _obs_columns(result), strict=True)), index=index)
    probs = pd.DataFrame(result.probabilities, index=index, columns=result.cell_types)
    return pd.concat([frame, probs], axis=1)


def _obs_columns(result: Annotation) -> list:
    p = result.p_values if result.p_values is not None else np.full(result.n_cells, np.nan,
                                                                      dtype=np.float32)
    return [result.labels.remove_unused_categories(), result.confidence, result.novelty, p,
            result.closed_labels]


def _colors(categories: Sequence[str]) -> list[str]:
    """scanpy's default palette for the types, grey for ``Unassigned``."""
    from matplotlib import colors as mcolors
    from matplotlib import pyplot as plt

    palette = plt.get_cmap("tab20").colors if len(categories) > 10 else \
        plt.get_cmap("tab10").colors
    out, i = [], 0
    for c in categories:
        if c == UNASSIGNED:
            out.append("#bdbdbd")
        else:
            out.append(mcolors.to_hex(palette[i % len(palette)]))
            i += 1
    return out


def write_results(adata, result: Annotation, *, key_added: str = "canal") -> None:
    """Write an :class:`Annotation` into ``adata`` (in memory or backed: obs/obsm/uns only).

    Returns
    -------
    Nothing. Sets ``adata.obs[key_added]`` (categorical of the types called, ``Unassigned``
    for novel cells), ``adata.obs[f"{key_added}_confidence"]``,
    ``adata.obs[f"{key_added}_novelty"]`` (float32 score, higher = more novel) and
    ``adata.obs[f"{key_added}_novelty_p"]`` (float32 conformal p-value: re-threshold with
    ``p <= alpha``), ``adata.obs[f"{key_added}_closed"]`` (categorical: most probable known
    type, ``Unassigned`` cells included), ``adata.obsm[f"X_{key_added}"]`` (float32
    representation), ``adata.obsm[f"{key_added}_probabilities"]`` (DataFrame, one column per
    known type), ``adata.uns[f"{key_added}_colors"]`` (``Unassigned`` grey) and
    ``adata.uns[key_added]["params"]``.
    """
    if adata.n_obs != result.n_cells:
        raise ValueError(f"the result has {result.n_cells} cells, adata {adata.n_obs}; write it "
                         "into the AnnData that was annotated")
    keys = output_keys(key_added)
    columns = _obs_columns(result)
    for k, col in zip(("label", "confidence", "novelty", "p_value", "closed"), columns,
                      strict=True):
        adata.obs[keys[k]] = col
    adata.uns[keys["colors"]] = _colors(list(columns[0].categories))
    adata.obsm[keys["rep"]] = result.representation
    adata.obsm[keys["probabilities"]] = pd.DataFrame(result.probabilities,
                                                     index=adata.obs_names.copy(),
                                                     columns=result.cell_types)
    uns = dict(adata.uns.get(key_added, {}))
    uns["params"] = dict(result.params)
    adata.uns[key_added] = uns
