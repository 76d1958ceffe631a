"""AnnData -> token batches for the network.

Cells are held as a sparse CSR matrix on the model's gene panel (log-normalized); each batch is
sliced from it and binned with one tensor operation (:func:`canal.pp.bin_tokens`), so there is
no Python loop over cells and memory stays proportional to the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from canal import pp

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence


def encode_labels(values, classes: Sequence[str], *, key: str = "labels") -> np.ndarray:
    """Integer codes of string labels in ``classes``; a ValueError names unknown or NaN labels."""
    s = pd.Series(np.asarray(values, dtype=object))
    if s.isna().any():
        raise ValueError(f"{int(s.isna().sum())} cells have a missing label in {key!r}; drop "
                         "them (adata = adata[adata.obs[key].notna()]) or fill them")
    lookup = {c: i for i, c in enumerate(classes)}
    codes = s.astype(str).map(lookup)
    if codes.isna().any():
        unknown = sorted(set(s.astype(str)[codes.isna()]))[:5]
        raise ValueError(f"labels {unknown} are not in the cell-type library {list(classes)[:10]}")
    return codes.to_numpy(dtype=np.int64)


def read_labels(adata, key: str) -> pd.Series:
    """The labels column ``adata.obs[key]`` as strings; clear errors for missing key or NaNs."""
    if key not in adata.obs:
        raise KeyError(f"labels column {key!r} not in adata.obs (columns: "
                       f"{list(adata.obs.columns)}); pass labels_key=...")
    s = adata.obs[key]
    if s.isna().any():
        raise ValueError(f"{int(s.isna().sum())} cells have a missing label in obs[{key!r}]; "
                         f"drop them first: adata = adata[adata.obs[{key!r}].notna()].copy()")
    return s.astype(str)


@dataclass
class Batch:
    """One batch of cells for the network.

    ``present`` is ``None`` when every cell measures every panel gene; else a ``(cells,
    n_genes + 1)`` bool tensor, ``False`` at genes not measured (the extra token is always
    present). ``hidden`` replaces ``tokens`` when the batch resumes from cached layer states.
    """

    tokens: torch.Tensor | None
    present: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @property
    def n_cells(self) -> int:
        return (self.tokens if self.tokens is not None else self.hidden).shape[0]

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.present), move(self.hidden))


@dataclass
class CellData:
    """Cells on a model's gene panel: expression, which genes were measured, optional labels.

    Attributes
    ----------
    X
        Log-normalized expression, cells x panel genes, CSR float32. A gene that a cell's
        dataset does not measure is an empty column there, like a measured zero: ``measured``
        tells them apart.
    labels
        Integer class codes (``-1`` where unknown) or ``None``.
    measured
        ``(groups, genes)`` bool: the panel genes each group of cells measured (one group per
        source dataset); ``None``: every cell measured every gene.
    group
        Each cell's row of ``measured`` (``None`` with ``measured=None``, or with one group).
    """

    X: sp.csr_matrix
    labels: np.ndarray | None = None
    measured: np.ndarray | None = None
    group: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.X = sp.csr_matrix(self.X, dtype=np.float32)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if len(self.labels) != self.X.shape[0]:
                raise ValueError("labels and X have different numbers of cells")
        if self.measured is not None:
            m = np.atleast_2d(np.asarray(self.measured, dtype=bool))
            if m.shape[1] != self.X.shape[1]:
                raise ValueError(f"measured has {m.shape[1]} genes, X {self.X.shape[1]}")
            if self.group is None:
                if len(m) != 1:
                    raise ValueError("several measured rows need a group per cell")
                self.group = np.zeros(self.X.shape[0], dtype=np.int64)
            self.group = np.asarray(self.group, dtype=np.int64)
            if len(self.group) != self.X.shape[0]:
                raise ValueError("group and X have different numbers of cells")
            # canonical form: unique rows, and no mask at all when everything is measured
            uniq, inverse = np.unique(m, axis=0, return_inverse=True)
            if uniq.all():
                self.measured, self.group = None, None
            else:
                self.measured, self.group = uniq, inverse.reshape(-1)[self.group]
        else:
            self.group = None

    @classmethod
    def from_adata(cls, adata, genes: Sequence[str], *, labels=None,
                   match: pp.GeneMatch | None = None,
                   shares: pd.Series | None = None) -> CellData:
        """Read ``adata`` on ``genes`` (see :func:`canal.pp.prepare`), recording which panel
        genes it measures; ``shares`` (:func:`canal.pp.dataset_gene_shares` of the reference)
        rescales
        a file that holds only part of the transcriptome."""
        match = match or pp.GeneMatch()
        alignment = match.align(adata, genes)
        X = pp.prepare(adata, genes, match=match, alignment=alignment,
                       share=pp.reference_share(alignment, shares))
        return cls(X, labels, measured=alignment.measured[None])

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    @property
    def fully_measured(self) -> bool:
        return self.measured is None

    def measured_rows(self, index: np.ndarray | slice | None = None) -> np.ndarray:
        """``(cells, genes)`` bool: the measured genes of cells ``index`` (default: all)."""
        if self.measured is None:  # no per-cell work: called once per batch
            if index is None:
                n = self.n_cells
            elif isinstance(index, slice):
                n = len(range(*index.indices(self.n_cells)))
            else:
                n = len(index)
            return np.ones((n, self.X.shape[1]), dtype=bool)
        group = self.group if index is None else self.group[index]
        return self.measured[group]

    def subset(self, index: np.ndarray) -> CellData:
        return CellData(self.X[index], None if self.labels is None else self.labels[index],
                        self.measured, None if self.group is None else self.group[index])

    def tokens(self, index: np.ndarray | slice | None = None) -> torch.Tensor:
        block = self.X if index is None else self.X[index]
        return pp.bin_tokens(block)

    def present(self, index: np.ndarray | slice | None = None) -> torch.Tensor | None:
        """The network's key mask for cells ``index``: ``None`` if all genes are measured."""
        if self.measured is None:
            return None
        return pp.present_mask(self.measured_rows(index))

    def batch(self, index: np.ndarray | slice | None = None) -> Batch:
        return Batch(self.tokens(index), self.present(index))

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None,
                index: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, Batch]]:
        """Yield ``(cell indices, Batch)``, optionally in a seeded random order."""
        order = np.arange(self.n_cells) if index is None else np.asarray(index)
        if shuffle:
            perm = torch.randperm(len(order), generator=generator).numpy()
            order = order[perm]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield idx, self.batch(idx)


def panel_dropout(present: torch.Tensor | None, n_cells: int, n_genes: int, *, rate: float,
                  share: float, generator: torch.Generator
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Hide a random share of some cells' measured genes, as if their dataset lacked them.

    Each cell is picked with probability ``share``; a picked cell hides each of its measured
    genes with a probability drawn uniformly in ``[0, rate]`` for that cell.

    Returns
    -------
    ``(present, changed)``: the new ``(cells, n_genes + 1)`` key mask and the picked cells
    (``present`` unchanged and ``None`` when the dropout is off).
    """
    if rate <= 0 or share <= 0:
        return present, None
    picked = torch.rand(n_cells, generator=generator) < share
    cell_rate = torch.rand(n_cells, generator=generator) * rate * picked
    hide = torch.rand(n_cells, n_genes, generator=generator) < cell_rate[:, None]
    hide = torch.nn.functional.pad(hide, (0, 1), value=False)  # the extra token stays
    base = present if present is not None else torch.ones(n_cells, n_genes + 1, dtype=torch.bool)
    return base & ~hide, picked


def concat(parts: Sequence[CellData]) -> CellData:
    """Stack several :class:`CellData` (labels must be all present or all absent); each part
    keeps its own measured genes."""
    labels = [p.labels for p in parts]
    if any(lab is None for lab in labels) and not all(lab is None for lab in labels):
        raise ValueError("cannot concatenate labelled and unlabelled cells")
    X = sp.vstack([p.X for p in parts], format="csr")
    measured = None
    group = None
    if any(p.measured is not None for p in parts):
        rows, groups, offset = [], [], 0
        for p in parts:
            m = p.measured if p.measured is not None else np.ones((1, X.shape[1]), dtype=bool)
            g = p.group if p.group is not None else np.zeros(p.n_cells, dtype=np.int64)
            rows.append(m)
            groups.append(g + offset)
            offset += len(m)
        measured, group = np.concatenate(rows), np.concatenate(groups)
    return CellData(X, None if labels[0] is None else np.concatenate(labels), measured, group)
