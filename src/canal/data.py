"""AnnData -> token batches for the network.

Cells are held as a sparse CSR matrix on the model's gene panel (log-normalized); each batch is
sliced from it and binned with one tensor operation (:func:`canal.pp.bin_tokens`), so there is
no Python loop over cells and memory stays proportional to the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from canal import pp


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
class CellData:
    """Cells on a model's gene panel, with optional integer labels.

    Attributes
    ----------
    X
        Log-normalized expression, cells x panel genes, CSR float32.
    labels
        Integer class codes (``-1`` where unknown) or ``None``.
    """

    X: sp.csr_matrix
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.X = sp.csr_matrix(self.X, dtype=np.float32)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if len(self.labels) != self.X.shape[0]:
                raise ValueError("labels and X have different numbers of cells")

    @classmethod
    def from_adata(cls, adata, genes: Sequence[str], *, labels=None, **prepare_kwargs) -> CellData:
        """Prepare ``adata`` on ``genes`` (see :func:`canal.pp.prepare`)."""
        return cls(pp.prepare(adata, genes, **prepare_kwargs), labels)

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    def subset(self, index: np.ndarray) -> CellData:
        return CellData(self.X[index], None if self.labels is None else self.labels[index])

    def tokens(self, index: np.ndarray | slice | None = None) -> torch.Tensor:
        block = self.X if index is None else self.X[index]
        return pp.bin_tokens(block)

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None,
                index: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(cell indices, tokens)`` batches, optionally in a seeded random order."""
        order = np.arange(self.n_cells) if index is None else np.asarray(index)
        if shuffle:
            perm = torch.randperm(len(order), generator=generator).numpy()
            order = order[perm]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield idx, self.tokens(idx)


def concat(parts: Sequence[CellData]) -> CellData:
    """Stack several :class:`CellData` (labels must be all present or all absent)."""
    labels = [p.labels for p in parts]
    if any(lab is None for lab in labels) and not all(lab is None for lab in labels):
        raise ValueError("cannot concatenate labelled and unlabelled cells")
    return CellData(sp.vstack([p.X for p in parts], format="csr"),
                    None if labels[0] is None else np.concatenate(labels))
