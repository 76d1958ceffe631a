"""Which genes drive each cell type: gene attribution aggregated per type, and marker recovery.

Method
------
A cell enters the network as one token per panel gene, ``token_emb[bin] + pos_emb[gene]``. The
natural "absence" of a gene is its bin-0 token (not expressed), so a gene's contribution is
measured against the cell with that gene's expression token set to bin 0 and everything else as
it is. We attribute the cell's *own-type logit* (the type it is grouped under) to the genes.

``integrated_gradients`` (default) integrates the gradient of that logit along the straight
path from the all-bin-0 embeddings to the actual ones (midpoint rule, ``steps`` points) and
dots it with the embedding difference ``token_emb[bin] - token_emb[0]``, summed over the
embedding dimensions. Attributions then add up (up to the quadrature error) to
``logit(cell) - logit(unexpressed cell)``, so genes are credited on one scale per type.
``grad_x_input`` is the same dot product with the gradient at the actual cell only (one
backward pass instead of ``steps``): a first-order, cheaper and noisier estimate.

Per type, the importance of a gene is the mean over the type's cells of the attribution of
that type's logit. Genes that a cell does not express (bin 0) get exactly zero, so a high score
means "expressed in these cells and pushing them towards their type".

Why not attention weights? The Performer (FAVOR+) never forms the ``genes x genes`` attention
matrix; reading it out would need an exact softmax pass that is not the computation the model
actually runs (it approximates it with random features) and costs ``O(genes^2)`` per head and
layer. More importantly, CANAL's head does not pool through a class token: it projects every
gene position to a scalar and feeds all of them to an MLP, so how much a token is attended to
says little about how much it moves the class logit. Gradient-based attribution measures the
latter directly, through the attention as it is computed, at the cost of backward passes.

Everything runs in eval mode (no dropout) with fixed random features and a fixed cell order, so
two runs give identical scores. Cells are processed in batches; the integration steps are a loop
of ``steps`` batched forward/backward passes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from canal import pp
from canal._settings import settings

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from canal.data import CellData
    from canal.nn import CanalNet

logger = logging.getLogger(__name__)

Method = Literal["integrated_gradients", "grad_x_input"]
METHODS = ("integrated_gradients", "grad_x_input")

#: Canonical markers per experiment: cell type -> genes, any one of which counts.
KNOWN_MARKERS: dict[str, dict[str, tuple[str, ...]]] = {
    "pancreas": {
        "alpha": ("GCG",),
        "beta": ("INS",),
        "delta": ("SST",),
        "gamma": ("PPY",),
        "acinar": ("PRSS1", "CPA1"),
        "ductal": ("KRT19",),
    },
    "immune": {
        "B": ("MS4A1", "CD79A"),
        "CD4 T": ("CD3E",),
        "CD8 T": ("CD8A", "CD3E"),
        "NK": ("NKG7", "GNLY"),
        "CD14 Mono": ("CD14", "LYZ"),
        "FCGR3A Mono": ("FCGR3A",),
        "Megakaryocyte": ("PPBP",),
        "DC": ("FCER1A",),
    },
}


# --------------------------------------------------------------------------------------------
# Attribution of one batch
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _frozen_eval(net: CanalNet) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; restores both afterwards."""
    was_training = net.training
    flags = [p.requires_grad for p in net.parameters()]
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        net.train(was_training)


def _target_grad(net: CanalNet, hidden: torch.Tensor, targets: torch.Tensor,
                 present: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of each cell's target logit with respect to its input embeddings."""
    hidden = hidden.detach().requires_grad_(True)
    logits = net(hidden=hidden, present=present).logits
    chosen = logits.gather(1, targets[:, None]).sum()
    (grad,) = torch.autograd.grad(chosen, hidden)
    return grad


def attribute_batch(net: CanalNet, tokens: torch.Tensor, targets: torch.Tensor, *,
                    method: Method = "integrated_gradients", steps: int = 8,
                    present: torch.Tensor | None = None) -> torch.Tensor:
    """Per-gene attribution of each cell's ``targets`` logit, relative to unexpressed genes.

    Parameters
    ----------
    net
        The network (put in eval mode by the caller, see :func:`attribute`).
    tokens
        ``(cells, n_genes + 1)`` token ids from :func:`canal.pp.bin_tokens`.
    targets
        ``(cells,)`` index of the logit to explain for each cell.
    method
        ``integrated_gradients`` or ``grad_x_input`` (see the module docstring).
    steps
        Integration points for ``integrated_gradients``.
    present
        Genes measured (``None``: all); genes not measured get exactly 0.

    Returns
    -------
    A ``(cells, n_genes)`` float32 tensor; genes in bin 0 get exactly 0.
    """
    actual = net.embed(tokens)
    base = net.embed(torch.zeros_like(tokens))
    delta = actual - base
    if method == "grad_x_input":
        grad = _target_grad(net, actual, targets, present)
    elif method == "integrated_gradients":
        grad = torch.zeros_like(actual)
        for i in range(steps):
            alpha = (i + 0.5) / steps
            grad += _target_grad(net, base + alpha * delta, targets, present)
        grad /= steps
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    attr = (delta * grad).sum(-1)
    if present is not None:
        attr = attr * present
    return attr[:, :net.config.n_genes].float()


def attribute(net: CanalNet, data: CellData, targets: np.ndarray, *,
              method: Method = "integrated_gradients", steps: int = 8, batch_size: int = 16,
              device: str | torch.device | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Attributions for every cell of ``data``, in order, one batch at a time.

    Yields
    ------
    ``(cell indices, (cells, n_genes) attributions)`` for each batch.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be at least 1")
    dev = settings.torch_device(device)
    targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    net.to(dev)
    with _frozen_eval(net):
        for idx, batch in data.batches(batch_size):
            b = batch.to(dev)
            attr = attribute_batch(net, b.tokens, targets[idx].to(dev), method=method,
                                   steps=steps, present=b.present)
            yield idx, attr.cpu().numpy()


# --------------------------------------------------------------------------------------------
# Per-type aggregation
# --------------------------------------------------------------------------------------------


@dataclass
class GeneImportance:
    """Per-type gene importance: mean attribution of each type's logit over its cells.

    Attributes
    ----------
    scores
        Genes x types DataFrame (panel order, the model's type order).
    n_cells
        Cells behind each type's column.
    params
        How the scores were computed (method, steps, groupby, timing).
    """

    scores: pd.DataFrame
    n_cells: pd.Series
    params: dict = field(default_factory=dict)

    def top(self, n_top: int | None = 20) -> pd.DataFrame:
        """Tidy table of each type's ``n_top`` genes (all with ``None``), best first.

        Returns
        -------
        A DataFrame with columns ``type``, ``rank`` (1 = most important), ``gene``, ``score``.
        """
        return top_genes(self.scores, n_top=n_top)

    def to_uns(self) -> dict:
        """An h5ad-serialisable dict (arrays and names, no pickled objects)."""
        return {
            "scores": self.scores.to_numpy(dtype=np.float32),
            "genes": np.asarray(self.scores.index, dtype=str),
            "types": np.asarray(self.scores.columns, dtype=str),
            "n_cells": self.n_cells.to_numpy(dtype=np.int64),
            "params": dict(self.params),
        }

    @classmethod
    def from_uns(cls, entry: Mapping) -> GeneImportance:
        """Rebuild from ``adata.uns[key]`` as written by :meth:`to_uns`."""
        try:
            types = [str(t) for t in entry["types"]]
            scores = pd.DataFrame(np.asarray(entry["scores"], dtype=np.float32),
                                  index=[str(g) for g in entry["genes"]], columns=types)
            n_cells = pd.Series(np.asarray(entry["n_cells"], dtype=np.int64), index=types)
        except KeyError as err:
            raise KeyError(f"gene-importance entry lacks {err}; compute it with "
                           "Annotator.gene_importance") from err
        return cls(scores, n_cells, dict(entry.get("params", {})))


def top_genes(scores: pd.DataFrame, *, n_top: int | None = 20) -> pd.DataFrame:
    """Tidy ``type, rank, gene, score`` table of each column's best genes (ties: panel order)."""
    rows = []
    for t in scores.columns:
        col = scores[t]
        order = np.argsort(-col.to_numpy(), kind="stable")[:n_top]
        rows.append(pd.DataFrame({"type": t, "rank": np.arange(1, len(order) + 1),
                                  "gene": col.index[order], "score": col.to_numpy()[order]}))
    if not rows:
        return pd.DataFrame({"type": [], "rank": [], "gene": [], "score": []})
    return pd.concat(rows, ignore_index=True)


def gene_importance(net: CanalNet, data: CellData, labels: Sequence[str], *,
                    genes: Sequence[str], cell_types: Sequence[str],
                    method: Method = "integrated_gradients", steps: int = 8,
                    batch_size: int = 16, device: str | torch.device | None = None,
                    groupby: str = "prediction") -> GeneImportance:
    """Mean attribution of each type's logit over the cells labelled with that type.

    Parameters
    ----------
    net, data
        The network and the cells on its gene panel.
    labels
        One cell type per cell; cells whose type is not in ``cell_types`` are left out.
    genes, cell_types
        The model's panel and cell-type library (its logits' order).
    method, steps, batch_size, device
        See :func:`attribute`.
    groupby
        Recorded in ``params`` only.

    Returns
    -------
    A :class:`GeneImportance` with one column per type present among the labels.
    """
    labels = np.asarray(labels, dtype=str)
    if len(labels) != data.n_cells:
        raise ValueError(f"{len(labels)} labels for {data.n_cells} cells")
    lookup = {t: i for i, t in enumerate(cell_types)}
    codes = np.array([lookup.get(t, -1) for t in labels], dtype=np.int64)
    unknown = sorted(set(labels[codes < 0]))
    if unknown:
        logger.warning("%d cells of types %s unknown to the model are left out",
                       int((codes < 0).sum()), unknown[:10])
    keep = np.flatnonzero(codes >= 0)
    if keep.size == 0:
        raise ValueError(f"no cell has a type the model knows ({list(cell_types)[:10]}); pass "
                         "groupby=None to explain the model's own predictions")
    sums = np.zeros((len(cell_types), len(genes)), dtype=np.float64)
    counts = np.bincount(codes[keep], minlength=len(cell_types))
    sub = data.subset(keep)
    t0 = time.perf_counter()
    n_batches = -(-keep.size // batch_size)
    bar = tqdm(attribute(net, sub, codes[keep], method=method, steps=steps,
                         batch_size=batch_size, device=device),
               total=n_batches, desc="explain", unit="batch", disable=not settings.progress,
               leave=False)
    for idx, attr in bar:
        np.add.at(sums, codes[keep][idx], attr.astype(np.float64))
    seconds = time.perf_counter() - t0
    present = np.flatnonzero(counts > 0)
    means = sums[present] / counts[present, None]
    types = [cell_types[i] for i in present]
    scores = pd.DataFrame(means.T.astype(np.float32), index=list(genes), columns=types)
    params = {"method": method, "steps": int(steps) if method == "integrated_gradients" else 1,
              "target": "own-type logit", "baseline": "bin-0 expression tokens",
              "groupby": groupby, "n_cells": int(keep.size), "seconds": float(seconds),
              "seconds_per_cell": float(seconds / keep.size)}
    logger.info("attributed %d cells in %.1fs (%.1f ms per cell)", keep.size, seconds,
                1e3 * seconds / keep.size)
    return GeneImportance(scores, pd.Series(counts[present], index=types), params)


# --------------------------------------------------------------------------------------------
# Baseline and marker recovery
# --------------------------------------------------------------------------------------------


def rank_genes_baseline(adata, genes: Sequence[str], *, groupby: str = "cell_type",
                        method: Literal["t-test", "wilcoxon"] = "t-test",
                        layer: str | None = None) -> pd.DataFrame:
    """Differential-expression scores per type on the model's panel (scanpy's rank_genes_groups).

    Expression is log-normalized as canal does it and restricted to ``genes`` (genes missing
    from the data are zeros); each type is compared with all other cells.

    Returns
    -------
    A genes x types DataFrame of scanpy's scores (higher = more up in the type), the same shape
    as :attr:`GeneImportance.scores`, for :func:`marker_recovery`.
    """
    import anndata as ad
    import scanpy as sc

    if groupby not in adata.obs:
        raise KeyError(f"{groupby!r} not in adata.obs (columns: {list(adata.obs.columns)}); "
                       "pass groupby=...")
    labels = adata.obs[groupby].astype(str).to_numpy()
    tmp = ad.AnnData(pp.prepare(adata, genes, match=pp.GeneMatch(layer=layer)),
                     obs=pd.DataFrame({"group": pd.Categorical(labels)},
                                      index=np.asarray(adata.obs_names, dtype=str)),
                     var=pd.DataFrame(index=[str(g) for g in genes]))
    sizes = tmp.obs["group"].value_counts()
    groups = sorted(sizes.index[sizes >= 2])
    if len(groups) < 2:
        raise ValueError(f"need at least two groups with >= 2 cells in obs[{groupby!r}]")
    sc.tl.rank_genes_groups(tmp, "group", groups=groups, reference="rest", method=method,
                            n_genes=tmp.n_vars, use_raw=False)
    res = tmp.uns["rank_genes_groups"]
    out = {}
    for g in groups:
        out[g] = pd.Series(np.asarray(res["scores"][g], dtype=np.float32),
                           index=np.asarray(res["names"][g], dtype=str))
    return pd.DataFrame(out).reindex(tmp.var_names).fillna(0.0)


def _as_matrix(importance) -> pd.DataFrame:
    if isinstance(importance, GeneImportance):
        return importance.scores
    if not isinstance(importance, pd.DataFrame):
        raise TypeError("pass a genes x types DataFrame or a GeneImportance")
    if {"type", "gene", "score"} <= set(importance.columns):
        raise ValueError("this looks like a tidy top-genes table; pass the full genes x types "
                         "matrix instead (GeneImportance.scores, or "
                         "GeneImportance.from_uns(adata.uns[key]).scores)")
    return importance


def marker_recovery(importance, markers: Mapping[str, Sequence[str]], *,
                    n_top: int = 20) -> dict:
    """Share of cell types whose known marker is among their ``n_top`` most important genes.

    A type counts as recovered when any of its listed markers ranks in its top ``n_top`` with
    a positive score. Types whose markers are all missing from the gene panel cannot be
    recovered by any method and are reported as ``not in panel``.

    Parameters
    ----------
    importance
        Genes x types scores (:attr:`GeneImportance.scores` or :func:`rank_genes_baseline`), or
        a :class:`GeneImportance`.
    markers
        Cell type -> marker genes (alternatives), e.g. ``KNOWN_MARKERS["pancreas"]``.
    n_top
        How far down each type's ranking a marker may sit.

    Returns
    -------
    A dict: ``share`` (recovered / types with a marker in the panel), ``share_raw`` (recovered /
    all listed types present), ``n_types``, ``n_in_panel``, ``n_recovered``, ``absent_types``
    (listed types with no column) and ``per_type``: type -> ``status`` (``recovered``,
    ``missed``, ``not in panel``), ``best`` (best-ranked marker or None) and ``ranks`` (marker
    -> 1-based rank, None if not in the panel).
    """
    scores = _as_matrix(importance)
    per_type = {}
    for t, genes in markers.items():
        if t not in scores.columns:
            continue
        col = scores[t].to_numpy()
        order = np.argsort(-col, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        ranks, best, best_rank = {}, None, None
        for g in genes:
            if g in scores.index:
                i = scores.index.get_loc(g)
                ranks[g] = int(rank[i])
                if col[i] > 0 and (best_rank is None or rank[i] < best_rank):
                    best, best_rank = g, int(rank[i])
            else:
                ranks[g] = None
        if all(r is None for r in ranks.values()):
            status = "not in panel"
        elif best_rank is not None and best_rank <= n_top:
            status = "recovered"
        else:
            status = "missed"
        per_type[t] = {"status": status, "best": best, "ranks": ranks}
    n_types = len(per_type)
    n_in = sum(v["status"] != "not in panel" for v in per_type.values())
    n_rec = sum(v["status"] == "recovered" for v in per_type.values())
    return {"share": n_rec / n_in if n_in else float("nan"),
            "share_raw": n_rec / n_types if n_types else float("nan"),
            "n_types": n_types, "n_in_panel": n_in, "n_recovered": n_rec, "n_top": n_top,
            "absent_types": [t for t in markers if t not in scores.columns],
            "per_type": per_type}
