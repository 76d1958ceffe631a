"""Experience replay: a class-balanced example bank of fixed total size.

After each stage the bank keeps, for every cell type seen so far, the cells whose representation
lies closest to the type's prototype (CANAL: the classifier's weight row of the type; or the
mean representation of the type's cells), ranked. Each type gets about ``size / n_types`` slots
(sizes differ by at most one; a type with fewer cells keeps all of them and its spare slots go
to the others). As types are added, quotas shrink and each type keeps its best-ranked cells.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from canal.data import CellData, encode_labels

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger(__name__)

Prototype = Literal["classifier", "mean"]


def quotas(available: dict[str, int], size: int | None) -> dict[str, int]:
    """Slots per type: equal shares of ``size`` (within one), water-filled around small types.

    ``available`` maps each type, in library order, to its number of candidate cells.
    ``size=None`` keeps every cell (the ``joint`` strategy).
    """
    if size is None:
        return dict(available)
    quota = dict.fromkeys(available, 0)
    open_types = [t for t in available if available[t] > 0]
    left = size
    while open_types and left > 0:
        share, extra = divmod(left, len(open_types))
        capped = [t for i, t in enumerate(open_types)
                  if available[t] - quota[t] <= share + (1 if i < extra else 0)]
        if not capped:
            for i, t in enumerate(open_types):
                quota[t] += share + (1 if i < extra else 0)
            break
        for t in capped:
            left -= available[t] - quota[t]
            quota[t] = available[t]
        open_types = [t for t in open_types if t not in capped]
    return quota


def prototype_distance(rep: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """Cosine distance of each representation to one prototype vector."""
    return 1 - torch.nn.functional.cosine_similarity(rep.float(), prototype.float()[None], dim=1)


class ExampleBank:
    """A fixed-size, class-balanced store of representative cells for replay.

    Parameters
    ----------
    size
        Total number of cells kept (CANAL's L, default 1,000); ``None`` keeps every cell.
    prototype
        ``"classifier"`` ranks a type's cells by cosine distance to the type's classifier weight
        row (CANAL); ``"mean"`` uses the type's mean representation instead.
    """

    def __init__(self, size: int | None = 1000, *, prototype: Prototype = "classifier"):
        if size is not None and size < 1:
            raise ValueError(f"bank size must be positive or None, got {size}")
        if prototype not in ("classifier", "mean"):
            raise ValueError(f"prototype must be 'classifier' or 'mean', got {prototype!r}")
        self.size = size
        self.prototype = prototype
        self.X = sp.csr_matrix((0, 0), dtype=np.float32)
        #: ``(cells, genes)`` bool: the panel genes each kept cell's dataset measured
        self.measured = np.ones((0, 0), dtype=bool)
        #: ``(cells, rep_dim)`` float32: the kept cells' representations from the model that
        #: chose them (the kNN novelty score's reference), or ``None``
        self.representation: np.ndarray | None = None
        self.obs = pd.DataFrame({"cell_type": pd.Series(dtype=str), "stage": pd.Series(dtype=int),
                                 "rank": pd.Series(dtype=int), "cell": pd.Series(dtype=str)})

    def __len__(self) -> int:
        return len(self.obs)

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    def replay(self, library: Sequence[str]) -> CellData:
        """The kept cells as training data, labels coded in ``library`` order, each cell with
        the genes its dataset measured."""
        group = np.arange(len(self)) if len(self) else None
        return CellData(self.X, encode_labels(self.labels, library, key="bank"),
                        self.measured if len(self) else None, group)

    @property
    def labels(self) -> np.ndarray:
        return self.obs["cell_type"].to_numpy(dtype=str)

    def counts(self) -> dict[str, int]:
        return self.obs["cell_type"].value_counts(sort=False).to_dict()

    def update(self, data: CellData, labels: Sequence[str], representations: torch.Tensor, *,
               library: Sequence[str], classifier_weight: torch.Tensor | None = None,
               stage: Sequence[int] | np.ndarray, cell_names: Sequence[str] | None = None,
               ) -> None:
        """Refill the bank from candidate cells: the previous bank plus a stage's cells.

        Parameters
        ----------
        data
            Candidates on the model's panel (expression and measured genes).
        labels
            Candidates' cell types.
        representations
            Candidates' representations from the model after the stage.
        library
            The cell-type library, in classifier order (defines slot order for remainders).
        classifier_weight
            The classifier's weight matrix (one row per library type); needed for
            ``prototype="classifier"``.
        stage
            The stage each candidate came from.
        cell_names
            Candidates' cell names (kept for provenance).
        """
        labels = np.asarray(labels, dtype=str)
        stage = np.asarray(stage, dtype=int)
        n = len(labels)
        if data.n_cells != n or representations.shape[0] != n or len(stage) != n:
            raise ValueError("data, labels, representations and stage must have one row per "
                             "cell")
        names = np.asarray(cell_names if cell_names is not None else np.arange(n), dtype=str)
        keep, ranks = [], []
        by_type = {t: np.flatnonzero(labels == t) for t in library}
        quota = quotas({t: len(ix) for t, ix in by_type.items()}, self.size)
        for i, t in enumerate(library):
            ix = by_type[t]
            if len(ix) == 0:
                continue
            rep = representations[torch.as_tensor(ix)]
            if self.prototype == "classifier":
                if classifier_weight is None:
                    raise ValueError("prototype='classifier' needs the classifier weights")
                proto = classifier_weight[i]
            else:
                proto = rep.float().mean(0)
            dist = prototype_distance(rep, proto).cpu().numpy()
            order = np.argsort(dist, kind="stable")[: quota[t]]
            keep.append(ix[order])
            ranks.append(np.arange(len(order)))
        keep_ix = np.concatenate(keep) if keep else np.zeros(0, dtype=int)
        self.X = sp.csr_matrix(data.X[keep_ix], dtype=np.float32)
        self.measured = data.measured_rows(keep_ix)
        self.representation = representations[torch.as_tensor(keep_ix)].float().cpu().numpy()
        self.obs = pd.DataFrame({
            "cell_type": labels[keep_ix],
            "stage": stage[keep_ix],
            "rank": np.concatenate(ranks) if ranks else np.zeros(0, dtype=int),
            "cell": names[keep_ix],
        })
        logger.info("example bank: %d cells over %d types", len(self), len(self.counts()))

    def to_anndata(self, genes: Sequence[str]):
        """The bank as AnnData: ``X`` on the model's panel, ``obs`` with cell_type, stage, rank,
        ``layers["measured"]`` (bool: the genes each cell's dataset measured),
        ``obsm["X_canal"]`` (the cells' representations)."""
        import anndata as ad

        obs = self.obs.copy()
        obs.index = [f"bank{i}_{c}" for i, c in enumerate(obs["cell"])]
        obs["cell_type"] = pd.Categorical(obs["cell_type"])
        n_genes = len(genes)
        X = self.X if self.X.shape[1] == n_genes else sp.csr_matrix((len(obs), n_genes),
                                                                    dtype=np.float32)
        bank = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[str(g) for g in genes]))
        if self.measured.shape == X.shape:
            bank.layers["measured"] = self.measured
        if self.representation is not None and len(self.representation) == len(obs):
            bank.obsm["X_canal"] = self.representation
        bank.uns["bank"] = {"size": -1 if self.size is None else int(self.size),
                            "prototype": self.prototype}
        return bank

    @classmethod
    def from_anndata(cls, bank) -> ExampleBank:
        """Rebuild a bank saved with :meth:`to_anndata` (banks saved before canal recorded
        measured genes count every gene as measured)."""
        if isinstance(bank, ExampleBank):
            return bank
        info = dict(bank.uns.get("bank", {}))
        size = int(info.get("size", 1000))
        out = cls(None if size < 0 else size, prototype=info.get("prototype", "classifier"))
        missing = {"cell_type", "stage", "rank"} - set(bank.obs.columns)
        if missing:
            raise ValueError(f"bank.h5ad lacks obs columns {sorted(missing)}; the checkpoint's "
                             "bank is corrupt")
        out.X = sp.csr_matrix(bank.X, dtype=np.float32)
        if "measured" in bank.layers:
            m = bank.layers["measured"]
            out.measured = np.asarray(m.toarray() if sp.issparse(m) else m, dtype=bool)
        else:
            out.measured = np.ones(bank.shape, dtype=bool)
        if "X_canal" in bank.obsm:
            out.representation = np.asarray(bank.obsm["X_canal"], dtype=np.float32)
        out.obs = pd.DataFrame({
            "cell_type": bank.obs["cell_type"].astype(str).to_numpy(),
            "stage": bank.obs["stage"].to_numpy(dtype=int),
            "rank": bank.obs["rank"].to_numpy(dtype=int),
            "cell": bank.obs["cell"].astype(str).to_numpy() if "cell" in bank.obs
            else np.asarray(bank.obs_names, dtype=str),
        })
        return out
