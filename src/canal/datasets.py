"""Cell selection for stages, test sets and corpora: one place for the runner, CLI and benchmarks.

A :class:`DataSpec` names the cells taken from one file (obs filters, cell types, a stratified
part); :func:`load_cells` reads them, :func:`holdout_split` sets a stage's held-out cells aside,
:func:`load_corpus` reads a pre-training corpus. ``canal fit --where/--types/--min-cells`` uses
the same filters (:func:`where_mask`, :func:`type_mask`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from canal._settings import data_dir

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from canal.pp import GeneMatch

CONFIGS = Path(__file__).parent / "configs"
#: Cell types with fewer cells in a stage are left out of it (the reference experiments' rule).
MIN_CELLS_PER_TYPE = 10


def where_mask(adata, where: Mapping[str, Sequence[str]], *, name: str = "") -> np.ndarray:
    """Cells whose ``obs[column]`` is one of the values, for every column of ``where``."""
    mask = np.ones(adata.n_obs, dtype=bool)
    for col, values in where.items():
        if col not in adata.obs:
            raise KeyError(f"{name}obs column {col!r} not in the data "
                           f"({list(adata.obs.columns)})")
        mask &= adata.obs[col].astype(str).isin([str(v) for v in values]).to_numpy()
    return mask


def type_mask(adata, *, labels_key: str, types: Sequence[str] | None = None,
              exclude_types: Sequence[str] = (), min_cells: int = 1,
              within: np.ndarray | None = None) -> np.ndarray:
    """Cells of the kept types: in ``types`` (all if ``None``), not in ``exclude_types``, and of
    a type with at least ``min_cells`` cells among ``within`` (default: all cells)."""
    mask = np.ones(adata.n_obs, dtype=bool)
    if labels_key not in adata.obs:
        return mask
    labels = adata.obs[labels_key].astype(str).to_numpy()
    if types is not None:
        mask &= np.isin(labels, list(types))
    if exclude_types:
        mask &= ~np.isin(labels, list(exclude_types))
    if min_cells > 1:
        scope = mask if within is None else mask & within
        counts = pd.Series(labels[scope]).value_counts()
        mask &= np.isin(labels, counts.index[counts >= min_cells])
    return mask


def holdout_split(cells, *, labels_key: str, holdout: float, seed: int):
    """A stage's ``(training, held-out)`` cells: a stratified ``holdout`` share set aside
    (``holdout=0``: all cells train, ``None`` held out)."""
    if holdout <= 0:
        return cells, None
    labels = cells.obs[labels_key].astype(str).to_numpy()
    keep = stratified_part(labels, 1 - holdout, seed)
    return cells[keep].copy(), cells[~keep].copy()


@dataclass(frozen=True)
class DataSpec:
    """Cells taken from one file: obs filters, type filters and an optional stratified part."""

    file: str
    name: str = ""
    where: dict[str, list[str]] = field(default_factory=dict)
    types: list[str] | None = None
    exclude_types: list[str] = field(default_factory=list)
    min_cells: int = 1
    fraction: float | None = None
    part: str = "first"  # "first": the `fraction` share; "rest": the other cells
    split_seed: int = 0
    orthologs: bool = False
    labels_key: str = "cell_type"

    def match(self, base: GeneMatch) -> GeneMatch:
        """How this entry's file is read: ``base`` with this entry's ortholog setting."""
        return base.replace(orthologs=self.orthologs)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, default_min_cells: int = 1) -> DataSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in a stage/test entry; allowed: "
                             f"{sorted(known)}")
        d = {"min_cells": default_min_cells} | dict(d)
        d["where"] = {k: [str(x) for x in (v if isinstance(v, list) else [v])]
                      for k, v in d.get("where", {}).items()}
        if "name" not in d:
            d["name"] = Path(d["file"]).stem + "".join(
                f" {k}={','.join(v)}" for k, v in d["where"].items())
        return cls(**d)


def stratified_part(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a stratified ``fraction`` of cells.

    Uses ``sklearn.model_selection.train_test_split(..., stratify=labels, random_state=seed)``;
    with ``fraction=0.8, seed=0`` on pbmc3k this is the immune experiment's 80% training part
    (``part = "rest"`` selects the 20% test part).
    """
    from sklearn.model_selection import train_test_split

    first, _ = train_test_split(np.arange(len(labels)), train_size=fraction, stratify=labels,
                                random_state=seed)
    mask = np.zeros(len(labels), dtype=bool)
    mask[first] = True
    return mask


def load_cells(spec: DataSpec, *, root: Path, cache: dict | None = None):
    """Read and filter the cells a :class:`DataSpec` names (a new AnnData)."""
    import anndata as ad

    path = Path(spec.file)
    if not path.is_absolute():
        path = root / path
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; pass --data-dir or set CANAL_DATA to the "
                                "folder holding the shared data")
    key = str(path)
    if cache is not None and key in cache:
        adata = cache[key]
    else:
        adata = ad.read_h5ad(path)
        if cache is not None:
            cache[key] = adata
    mask = where_mask(adata, spec.where, name=f"{spec.name}: ")
    if spec.fraction is not None:
        labels = adata.obs[spec.labels_key].astype(str).to_numpy()
        part = np.zeros(adata.n_obs, dtype=bool)
        idx = np.flatnonzero(mask)
        first = stratified_part(labels[idx], spec.fraction, spec.split_seed)
        part[idx[first if spec.part == "first" else ~first]] = True
        mask = part
    mask &= type_mask(adata, labels_key=spec.labels_key, types=spec.types,
                      exclude_types=spec.exclude_types, min_cells=spec.min_cells, within=mask)
    if not mask.any():
        raise ValueError(f"{spec.name}: the filters select no cells")
    return adata[mask].copy()


def load_corpus(config: str | Path, *, root: str | Path | None = None
                ) -> list[tuple[str, Any, DataSpec]]:
    """The datasets of a pre-training corpus TOML (``[[files]]`` entries, as stages are given).

    ``config`` is a path or a shipped name (``"corpus"``: the corpus of the shared data's
    README, without the reference experiments' test cells). Returns ``(name, AnnData, spec)``
    triples; ``spec.match(...)`` says how each file's genes are matched (orthologs).
    """
    path = Path(config)
    if not path.exists() and (CONFIGS / f"{path.stem}.toml").exists():
        path = CONFIGS / f"{path.stem}.toml"
    if not path.exists():
        raise FileNotFoundError(f"no corpus config {config}; the shipped one is 'corpus'")
    raw = tomllib.loads(path.read_text())
    specs = [DataSpec.from_dict(d) for d in raw.get("files", [])]
    if not specs:
        raise ValueError(f"{path}: a corpus needs at least one [[files]] entry")
    root = Path(root) if root is not None else data_dir()
    cache: dict = {}
    return [(spec.name, load_cells(spec, root=root, cache=cache), spec) for spec in specs]


