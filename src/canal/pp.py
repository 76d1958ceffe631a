"""Preprocessing: input checks, normalization, gene-panel alignment, panel choice, binning.

The user's AnnData is never modified: every function here reads it and returns new arrays.
Everything works row-chunk by row-chunk so that backed (on-disk) files stream with bounded
memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from canal._settings import data_dir

logger = logging.getLogger(__name__)

#: Expression bins 0..N_BINS-1 come from flooring the clipped log value; the next id is the mask.
N_BINS = 6
MASK_TOKEN = N_BINS
N_TOKENS = N_BINS + 1
#: normalize_total target, as in scanpy's/scBERT's preprocessing.
TARGET_SUM = 1e4
#: log1p(1e6): no log-normalized value exceeds this; larger non-integer values are un-logged.
_LOG_MAX = 14.0
_DETECT_CELLS = 2000
_DETECT_VALUES = 300_000

InputKind = Literal["counts", "log", "unlogged"]



# --------------------------------------------------------------------------------------------
# Reading rows, checks and normalization
# --------------------------------------------------------------------------------------------


def _matrix(adata, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not in adata.layers ({list(adata.layers)}); "
                       "pass layer=None to use adata.X")
    return adata.layers[layer]


def _rows(adata, start: int, stop: int, layer: str | None) -> sp.csr_matrix:
    """Rows ``start:stop`` as a float32 CSR matrix, whatever the storage (dense, sparse, backed)."""
    block = _matrix(adata, layer)[start:stop]
    if hasattr(block, "to_memory"):  # anndata backed sparse dataset
        block = block.to_memory()
    if sp.issparse(block):
        block = sp.csr_matrix(block, dtype=np.float32)
    else:
        block = sp.csr_matrix(np.asarray(block, dtype=np.float32))
    block.sum_duplicates()
    return block


def check_adata(adata) -> None:
    """Check the AnnData's shape and gene names; raise a ValueError that names the fix."""
    if adata.n_obs == 0:
        raise ValueError("the AnnData has no cells (n_obs == 0); pass a non-empty dataset")
    if adata.n_vars == 0:
        raise ValueError("the AnnData has no genes (n_vars == 0); pass a non-empty dataset")
    names = pd.Index(adata.var_names)
    if names.has_duplicates:
        dup = names[names.duplicated()].unique()[:5].tolist()
        raise ValueError(f"adata.var_names has duplicate gene names (e.g. {dup}); "
                         "call adata.var_names_make_unique() first")


def _check_block(block: sp.csr_matrix, offset: int) -> None:
    data = block.data
    if data.size and not np.isfinite(data).all():
        first = int(np.flatnonzero(~np.isfinite(data))[0])
        cell = offset + int(np.searchsorted(block.indptr, first, side="right") - 1)
        raise ValueError(f"expression contains NaN or inf values (first in cell {cell}); "
                         "remove or impute them, e.g. np.nan_to_num, before annotating")
    if data.size and data.min() < 0:
        raise ValueError("expression contains negative values (scaled or batch-corrected data?); "
                         "pass raw counts or log-normalized values (e.g. adata.raw or a counts "
                         "layer via layer=...)")
    empty = np.flatnonzero(np.asarray(block.sum(axis=1)).ravel() <= 0)
    if empty.size:
        raise ValueError(f"{empty.size} cell(s) have no counts (first: cell {offset + empty[0]}); "
                         "remove them, e.g. sc.pp.filter_cells(adata, min_counts=1)")


#: Log transforms tried when un-logging input: (base, how many times log(1 + x) was applied);
#: base None is the identity (linear values).
_CANDIDATES: tuple[tuple[float | None, int], ...] = (
    (math.e, 1), (2.0, 1), (10.0, 1), (math.e, 2), (2.0, 2), (None, 0))
#: log2(1 + 1e9): no log-scaled expression value exceeds this.
_ANY_LOG_MAX = 30.0
_INTEGER_SHARE = 0.9  # share of un-logged values that are integer multiples of the cell's factor
_TOTAL_CV = 1e-3  # rows "sum to a common total" below this coefficient of variation


@dataclass(frozen=True)
class InputScale:
    """How expression values were transformed, as told from the data by :func:`detect_scale`.

    ``kind`` is ``"counts"``, ``"log"`` (``logs`` times ``log_base(1 + x)``) or ``"unlogged"``
    (non-integer linear values: TPM, CPM, FPKM). ``total`` is the common per-cell total of the
    un-logged values (1e4 for CP10k); ``None`` means each cell is normalized again over the file's
    genes.
    """

    kind: InputKind
    base: float | None = None
    logs: int = 0
    total: float | None = None
    description: str = ""

    @property
    def canonical(self) -> bool:
        """canal's own scale, ln(1 + CP10k): used as is."""
        return (self.kind == "log" and self.logs == 1 and self.base is not None
                and abs(self.base - math.e) < 1e-9 and self.total == TARGET_SUM)

    def __str__(self) -> str:
        return self.description or self.kind


CANONICAL = InputScale("log", math.e, 1, TARGET_SUM, "ln(1 + CP10k)")


def _log_name(base: float | None) -> str:
    return {math.e: "ln", 2.0: "log2", 10.0: "log10"}.get(base, f"log_{base:g}")


def _describe(base: float | None, logs: int, inner: str) -> str:
    out = inner
    for _ in range(logs):
        out = f"{_log_name(base)}(1 + {out})"
    return out


def _total_name(total: float | None) -> str:
    return {1e4: "CP10k", 1e6: "CPM"}.get(total, f"values normalized to {total:g} per cell")


def _unlog(data: np.ndarray, base: float | None, logs: int) -> np.ndarray:
    out = np.asarray(data, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(logs):
            out = np.expm1(out * math.log(base))
    return out


def _declared_base(adata) -> float | None:
    """``uns["log1p"]["base"]`` as scanpy records it (None there means e); None if absent."""
    rec = adata.uns.get("log1p")
    if rec is None:
        return None
    base = rec.get("base") if isinstance(rec, Mapping) else None
    if base is None:
        return math.e
    base = float(np.asarray(base).item())
    if not base > 1:
        raise ValueError(f"adata.uns['log1p']['base'] is {base!r}; a log base must exceed 1 "
                         "(set it to the base used, or None for the natural log)")
    return base


@dataclass
class _Fit:
    base: float | None
    logs: int
    values: np.ndarray  # un-logged non-zero values
    integer_share: float
    factors: np.ndarray  # per-cell smallest un-logged value (the factor of a count of 1)
    totals: np.ndarray  # per-cell sums of the un-logged values

    @property
    def cv(self) -> float:
        return float(np.std(self.totals) / max(np.mean(self.totals), 1e-300))


def _fit(block: sp.csr_matrix, base: float | None, logs: int) -> _Fit | None:
    """Un-log ``block`` with one candidate and measure how count-like the result is."""
    c = _unlog(block.data, base, logs)
    if not np.isfinite(c).all():
        return None
    nnz = np.diff(block.indptr)
    has = nnz > 0
    starts = block.indptr[:-1][has]
    factors = np.minimum.reduceat(c, starts)
    totals = np.add.reduceat(c, starts)
    ratio = c / np.repeat(factors, nnz[has])
    # counts of 1 make every candidate look integer: score the larger multiples only
    big = (ratio >= 1.5) & (ratio <= 1000)
    share = 0.0
    if big.sum() >= 50:
        r = ratio[big]
        share = float((np.abs(r - np.round(r)) < 0.02 + 1e-4 * r).mean())
    return _Fit(base, logs, c, share, factors, totals)


def _nice(total: float) -> float:
    rounded = float(f"{total:.2g}")
    return rounded if abs(rounded / total - 1) < 5e-3 else float(total)


def _scale_of(fit: _Fit, *, integer: bool) -> InputScale:
    """The scale a chosen candidate implies, with the per-cell total it was normalized to."""
    if fit.logs == 0:
        return InputScale("unlogged", description="non-integer values, not log-transformed "
                          "(TPM/CPM-like)")
    if integer and np.mean(np.abs(fit.factors - 1) < 1e-3) > 0.99:
        return InputScale("log", fit.base, fit.logs, None, _describe(fit.base, fit.logs,
                                                                     "counts"))
    if fit.cv < _TOTAL_CV:
        total = _nice(float(np.median(fit.totals)))
        return InputScale("log", fit.base, fit.logs, total,
                          _describe(fit.base, fit.logs, _total_name(total)))
    return _subset_scale(fit.base, fit.logs, fit.totals)


def _subset_scale(base: float | None, logs: int, totals: np.ndarray) -> InputScale:
    """Rows do not share a total (genes were subset after normalizing): bound the total."""
    if totals.max() <= 1.01 * TARGET_SUM:
        logger.info("cells' un-logged values do not sum to a common total (genes subset after "
                    "normalizing?); their largest sum %.0f fits CP10k, taken as CP10k",
                    totals.max())
        return InputScale("log", base, logs, TARGET_SUM,
                          _describe(base, logs, "CP10k") + " of a gene subset")
    logger.warning("cells' un-logged values do not sum to a common total and exceed 1e4 (genes "
                   "subset after normalizing to CPM or more?); normalizing each cell again over "
                   "the file's genes")
    return InputScale("log", base, logs, None,
                      _describe(base, logs, "values of unknown total") + " of a gene subset")


def _undecidable(adata, layer: str | None) -> ValueError:
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    return ValueError(
        f"cannot tell how {where} was normalized: its values are non-integer, un-logging them "
        "(ln, log2, log10, once or twice) gives neither integer multiples of a per-cell factor "
        "nor a common per-cell total, and adata.uns['log1p'] does not name a base. Pass raw "
        "counts (layer='counts', or adata.raw.to_adata()), or log-normalize them with "
        "sc.pp.normalize_total(adata, target_sum=1e4); sc.pp.log1p(adata), which records "
        "uns['log1p']; if you know the values are log(1 + x), record the base, e.g. "
        "adata.uns['log1p'] = {'base': 2} for log2")


def detect_scale(adata, *, layer: str | None = None) -> InputScale:
    """Tell how the expression values were transformed, from the data themselves.

    Looks at up to 2,000 cells. Integer values are counts. Otherwise each candidate transform
    (ln, log2 or log10 of 1 + x, applied once or twice, or none) is inverted, and the one is
    kept whose un-logged values are integer multiples of a per-cell factor (counts scaled per
    cell, as normalize_total does) or, failing that, whose cells sum to a common total. That
    total tells CP10k from CPM. ``adata.uns["log1p"]["base"]`` (scanpy's record) decides the
    base when the data cannot; values above log2(1e9) are linear (TPM, FPKM). Anything else is
    refused with a ValueError that names the fix.

    Returns
    -------
    The :class:`InputScale`; :func:`normalize_block` converts it to canal's ln(1 + CP10k).
    """
    check_adata(adata)
    n = min(adata.n_obs, _DETECT_CELLS)
    step = max(1, adata.n_obs // n)
    idx = np.arange(0, adata.n_obs, step)[:n]
    block = _rows(adata, 0, n, layer) if adata.isbacked else _rows(adata[idx], 0, len(idx), layer)
    _check_block(block, 0)
    data = block.data
    if data.size == 0:
        raise ValueError("expression matrix is all zeros; pass a dataset with measured genes")
    if np.allclose(data, np.round(data)):
        return InputScale("counts", description="raw counts")
    declared = _declared_base(adata)
    candidates = [c for c in _CANDIDATES if c[0] == declared] + \
        [c for c in _CANDIDATES if c[0] != declared]
    if data.max() > _ANY_LOG_MAX:
        candidates = [(None, 0)]
    # trying six transforms on a few hundred thousand values is enough and stays fast
    rows = max(50, int(np.searchsorted(block.indptr, _DETECT_VALUES, side="right")) - 1)
    sample = block[:rows]
    fits = [f for f in (_fit(sample, b, k) for b, k in candidates) if f is not None]
    best = max(fits, key=lambda f: f.integer_share, default=None)
    integer = best is not None and best.integer_share >= _INTEGER_SHARE
    if not integer:
        best = min((f for f in fits if f.cv < _TOTAL_CV), key=lambda f: f.cv, default=None)
    if best is not None:
        if declared is not None and best.logs and best.base != declared:
            logger.warning("adata.uns['log1p'] records base %g but the values are %s-scaled; "
                           "using the data's scale", declared, _log_name(best.base))
        return _scale_of(best, integer=integer)
    if data.max() > _ANY_LOG_MAX:
        return InputScale("unlogged", description="non-integer values, not log-transformed "
                          "(TPM/CPM-like)")
    if declared is not None:
        logger.info("scale taken from adata.uns['log1p'] (base %g)", declared)
        fit = _fit(sample, declared, 1)
        if fit is not None:
            return _subset_scale(declared, 1, fit.totals)
    raise _undecidable(adata, layer)


def detect_input(adata, *, layer: str | None = None) -> InputKind:
    """Tell raw counts from log-normalized input (and from un-logged normalized values).

    The kind of :func:`detect_scale`'s answer, which also names the log base and total.

    Returns
    -------
    ``"counts"``, ``"log"`` or ``"unlogged"``.
    """
    return detect_scale(adata, layer=layer).kind


def normalize_block(block: sp.csr_matrix, kind: InputKind | InputScale, *,
                    share: float = 1.0) -> sp.csr_matrix:
    """Bring a CSR block to canal's ln(1 + CP10k).

    Counts and un-logged values are normalized (normalize_total to 1e4, then log1p); log input
    on another scale (log2, CPM, logged twice, a gene subset) is un-logged and converted; input
    already on ln(1 + CP10k) (``kind="log"`` or a canonical :class:`InputScale`) is returned
    as is.

    ``share`` < 1: the file holds only part of the transcriptome, whose genes took this share
    of all counts in the reference; the normalized values are scaled by it, so that a gene
    reads as it would have in a cell whose whole transcriptome had been measured
    (:func:`reference_share`).
    """
    scale = CANONICAL if kind == "log" else kind
    if isinstance(scale, str):
        scale = InputScale(scale)
    if share < 1.0:
        out = normalize_block(block, scale)
        out.data = np.log1p(np.expm1(out.data.astype(np.float64)) * share).astype(np.float32)
        return out
    if scale.canonical:
        return block
    out = sp.csr_matrix(block, dtype=np.float64, copy=True)
    if scale.kind == "log":
        out.data = _unlog(out.data, scale.base, scale.logs)
    if scale.kind == "log" and scale.total is not None:
        out.data *= TARGET_SUM / scale.total
    else:
        totals = np.asarray(out.sum(axis=1)).ravel()
        factor = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
        out = sp.csr_matrix(sp.diags(factor) @ out)
    np.log1p(out.data, out=out.data)
    return sp.csr_matrix(out, dtype=np.float32)


def log_normalize(adata, *, layer: str | None = None) -> sp.csr_matrix:
    """Expression of all genes on canal's ln(1 + CP10k), as a new CSR matrix (adata unchanged).

    Raw counts and un-logged values are normalized with scanpy's recipe (normalize_total to
    1e4, log1p); log input on another scale is converted (see :func:`detect_scale`); input
    already on ln(1 + CP10k) is passed through, so data is never normalized twice.
    """
    scale = detect_scale(adata, layer=layer)
    blocks = [normalize_block(b, scale) for b, _ in _iter_blocks(adata, layer=layer)]
    return sp.vstack(blocks, format="csr")


def _iter_blocks(adata, *, layer: str | None, chunk_size: int = 4096,
                 cells: slice | None = None) -> Iterator[tuple[sp.csr_matrix, int]]:
    first, last, _ = (slice(None) if cells is None else cells).indices(adata.n_obs)
    for start in range(first, last, chunk_size):
        block = _rows(adata, start, min(start + chunk_size, last), layer)
        _check_block(block, start)
        yield block, start


# --------------------------------------------------------------------------------------------
# Gene alignment
# --------------------------------------------------------------------------------------------


def orthologs(path: str | Path | None = None) -> pd.DataFrame:
    """One-to-one human/mouse orthologs with columns ``human`` and ``mouse``.

    Defaults to ``homologs/human_mouse_1to1.csv.gz`` in the shared data directory
    (``$CANAL_DATA`` or ``../shared/data``).
    """
    path = Path(path) if path is not None else data_dir() / "homologs" / "human_mouse_1to1.csv.gz"
    if not Path(path).exists():
        raise FileNotFoundError(f"ortholog table not found at {path}; pass orthologs=PATH or set "
                                "CANAL_DATA to the folder holding homologs/")
    table = pd.read_csv(path)
    cols = {"human.gene.name": "human", "gene.name": "mouse"}
    if not set(cols) <= set(table.columns):
        raise ValueError(f"{path} lacks the columns {sorted(cols)}; expected the "
                         "human_mouse_1to1 table layout")
    table = table.rename(columns=cols)[["human", "mouse"]].dropna()
    return table.drop_duplicates("human").drop_duplicates("mouse").reset_index(drop=True)


#: Below this share of panel genes measured, matching fails (accuracy is measured to collapse
#: there: see README, "Partial gene panels").
MIN_OVERLAP = 0.05
#: Below this share a warning is logged (accuracy is measured to drop below it).
WARN_OVERLAP = 0.5


@dataclass(frozen=True)
class GeneMatch:
    """How a dataset's expression is read and its genes matched to a model's panel.

    Given once (to :meth:`canal.Annotator.fit_stage` or the constructor), validated, stored in
    the checkpoint's ``config.json`` and reused by every later call.

    Attributes
    ----------
    layer
        Read expression from ``adata.layers[layer]`` instead of ``adata.X``.
    case_insensitive
        Match symbols ignoring case.
    orthologs
        Translate genes through the 1:1 human/mouse ortholog table first: ``True`` (the shared
        table) or the path of such a table.
    min_overlap
        Below this share of the panel measured, raise a ValueError naming the likely cause.
    warn_overlap
        Below this share, log a warning.
    """

    layer: str | None = None
    case_insensitive: bool = False
    orthologs: bool | str = False
    min_overlap: float = MIN_OVERLAP
    warn_overlap: float = WARN_OVERLAP

    def __post_init__(self) -> None:
        if isinstance(self.orthologs, Path):
            object.__setattr__(self, "orthologs", str(self.orthologs))
        if not isinstance(self.orthologs, bool | str):
            raise TypeError(f"orthologs must be True/False or a path, got "
                            f"{type(self.orthologs).__name__}")
        if not 0 <= self.min_overlap <= 1 or not 0 <= self.warn_overlap <= 1:
            raise ValueError(f"min_overlap and warn_overlap are shares in [0, 1], got "
                             f"{self.min_overlap} and {self.warn_overlap}")

    def replace(self, **changes) -> GeneMatch:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> GeneMatch:
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown gene-match keys {sorted(unknown)}; the checkpoint was "
                             "written by a newer canal: upgrade canal")
        return cls(**d)

    @classmethod
    def resolve(cls, match: GeneMatch | dict | None, default: GeneMatch | None = None
                ) -> GeneMatch:
        """``match`` itself, ``default`` when ``None``, or ``default`` updated by a dict."""
        base = default if default is not None else cls()
        if match is None:
            return base
        if isinstance(match, GeneMatch):
            return match
        if isinstance(match, dict):
            return base.replace(**match)
        raise TypeError(f"match must be a canal.GeneMatch or a dict of its fields, got "
                        f"{type(match).__name__}")

    def align(self, adata, genes: Sequence[str]) -> GeneAlignment:
        """Where ``genes`` sit in ``adata``'s columns (see :func:`align_genes`)."""
        table = None
        if self.orthologs is not False:
            table = _orthologs(None if self.orthologs is True else self.orthologs)
        return align_genes(adata.var_names, genes, case_insensitive=self.case_insensitive,
                           orthologs_table=table, min_overlap=self.min_overlap,
                           warn_overlap=self.warn_overlap)


@dataclass(frozen=True)
class GeneAlignment:
    """Where each panel gene sits in a dataset's columns (-1 where the dataset lacks it)."""

    source_index: np.ndarray
    n_found: int
    n_panel: int
    #: the dataset's gene names translated to the panel's species (orthologs), upper-case
    keys: np.ndarray | None = None

    @property
    def fraction(self) -> float:
        return self.n_found / max(self.n_panel, 1)

    @property
    def measured(self) -> np.ndarray:
        """Boolean mask over the panel: genes the dataset measures (a zero there is data)."""
        return self.source_index >= 0


#: A file whose genes held at least this share of the reference's counts is normalized as is.
FULL_SHARE = 0.9


def dataset_gene_shares(adata, genes: Sequence[str], *, match: GeneMatch | None = None
                        ) -> tuple[pd.Series, int]:
    """:func:`gene_shares` of every gene of ``adata`` (streamed), keyed in the panel's species,
    and the number of cells."""
    match = match or GeneMatch()
    alignment = match.align(adata, genes)
    scale = detect_scale(adata, layer=match.layer)
    total = np.zeros(adata.n_vars)
    for block, _ in _iter_blocks(adata, layer=match.layer):
        linear = sp.csr_matrix(normalize_block(block, scale), dtype=np.float64, copy=True)
        linear.data = np.expm1(linear.data) / TARGET_SUM
        total += np.asarray(linear.sum(axis=0)).ravel()
    out = pd.Series(total / max(adata.n_obs, 1), index=pd.Index(alignment.keys))
    return out.groupby(level=0, sort=False).sum(), adata.n_obs


def reference_share(alignment: GeneAlignment, shares: pd.Series | None) -> float:
    """The share of the reference's counts that a dataset's genes hold (1 when unknown or when
    the dataset measures nearly the whole transcriptome, >= :data:`FULL_SHARE`)."""
    if shares is None or alignment.keys is None or not len(shares):
        return 1.0
    keys = pd.Index(alignment.keys).unique()
    f = float(shares.reindex(keys).fillna(0.0).sum() / max(float(shares.sum()), 1e-12))
    if f >= FULL_SHARE or f <= 0:
        return 1.0
    logger.info("the data's %d genes held %.0f%% of the reference's counts: expression is "
                "scaled to a whole transcriptome", len(keys), 100 * f)
    return f


def _guess_cause(var_names: pd.Index, panel: Sequence[str]) -> str:
    names = pd.Index(var_names).astype(str)
    if names.str.match(r"^ENS[A-Z]*G\d+").mean() > 0.5:
        return "adata.var_names look like Ensembl IDs; use gene symbols (e.g. adata.var['gene_symbols'])"
    upper_data = (names.str.upper() == names).mean()
    upper_panel = np.mean([g.upper() == g for g in panel]) if len(panel) else 0
    if upper_panel > 0.8 and upper_data < 0.5:
        return ("the data look like mouse genes (capitalised symbols) and the model is human; "
                "pass orthologs=True (or case_insensitive=True)")
    if upper_panel < 0.5 and upper_data > 0.8:
        return ("the data look like human genes and the model mouse; pass orthologs=True "
                "(or case_insensitive=True)")
    if len(names) < 5000:
        return (f"the data hold only {len(names)} genes (a filtered gene set, e.g. highly "
                "variable genes only?): pass the full matrix (adata.raw.to_adata()), or accept "
                "fewer genes with min_overlap=... (accuracy falls as the share drops)")
    return "check that adata.var_names hold gene symbols of the model's species"


def align_genes(
    var_names: Sequence[str],
    panel: Sequence[str],
    *,
    case_insensitive: bool = False,
    orthologs_table: pd.DataFrame | None = None,
    min_overlap: float = MIN_OVERLAP,
    warn_overlap: float = WARN_OVERLAP,
) -> GeneAlignment:
    """Match a dataset's genes to a model's gene panel by symbol.

    Parameters
    ----------
    var_names
        The dataset's gene symbols.
    panel
        The model's genes, in model order.
    case_insensitive
        Match symbols ignoring case (a rough mouse/human bridge).
    orthologs_table
        A table with ``human`` and ``mouse`` columns (see :func:`orthologs`): dataset genes are
        first translated to the panel's species.
    min_overlap
        Below this share of panel genes found, raise a ValueError naming the likely cause.
    warn_overlap
        Below this share, log a warning.
    """
    names = pd.Index(var_names).astype(str)
    panel = [str(g) for g in panel]
    keys = names
    if orthologs_table is not None:
        panel_set = set(panel)
        human_hits = len(panel_set & set(orthologs_table["human"]))
        mouse_hits = len(panel_set & set(orthologs_table["mouse"]))
        src, dst = ("mouse", "human") if human_hits >= mouse_hits else ("human", "mouse")
        mapping = dict(zip(orthologs_table[src], orthologs_table[dst], strict=False))
        keys = pd.Index([mapping.get(g, g) for g in names])
    if case_insensitive:
        keys = keys.str.upper()
        panel_keys = [g.upper() for g in panel]
    else:
        panel_keys = panel
    lookup = pd.Series(np.arange(len(keys)), index=keys)
    lookup = lookup[~lookup.index.duplicated(keep="first")]
    index = lookup.reindex(panel_keys).fillna(-1).to_numpy(dtype=np.int64)
    found = int((index >= 0).sum())
    frac = found / max(len(panel), 1)
    msg = f"{found} of {len(panel)} model genes ({frac:.0%}) measured in the data"
    if frac < min_overlap:
        raise ValueError(f"only {msg}, below min_overlap={min_overlap:g}; "
                         f"{_guess_cause(names, panel)}")
    if frac < warn_overlap:
        logger.warning("%s; the other genes are treated as not measured, and accuracy is "
                       "measured to drop below %.0f%% of the panel (README, 'Partial gene "
                       "panels')", msg, 100 * warn_overlap)
    else:
        logger.info("%s; the other genes are treated as not measured", msg)
    return GeneAlignment(source_index=index, n_found=found, n_panel=len(panel),
                         keys=np.asarray(keys.str.upper(), dtype=str))


def _select_columns(block: sp.csr_matrix, alignment: GeneAlignment) -> sp.csr_matrix:
    """Reorder a CSR block's columns to the panel, zero-filling missing genes."""
    idx = alignment.source_index
    present = np.flatnonzero(idx >= 0)
    picked = block[:, idx[present]].tocoo()
    out = sp.csr_matrix((picked.data, (picked.row, present[picked.col])),
                        shape=(block.shape[0], len(idx)), dtype=np.float32)
    out.sort_indices()
    return out


def iter_panel_blocks(
    adata,
    genes: Sequence[str],
    *,
    match: GeneMatch | None = None,
    chunk_size: int = 4096,
    alignment: GeneAlignment | None = None,
    share: float = 1.0,
    cells: slice | None = None,
) -> Iterator[sp.csr_matrix]:
    """Stream log-normalized expression on the model's gene panel, ``chunk_size`` cells at a time.

    Works for in-memory (dense or sparse) and backed AnnData. Library sizes use all of the
    file's genes, before the panel is selected. Genes the data lack are empty columns: which
    ones they are is ``alignment.measured`` (a column of zeros is *not* a measured zero). Pass
    a precomputed ``alignment`` (from ``match.align(adata, genes)``) to skip matching again.
    ``cells`` (a step-1 slice of rows) streams only those cells; the input scale is still
    detected on the whole of ``adata``, so a block reads exactly as it does in a full pass.
    """
    match = match or GeneMatch()
    check_adata(adata)
    scale = detect_scale(adata, layer=match.layer)
    if scale.kind == "unlogged":
        logger.warning("expression is non-integer but not log-transformed (TPM/CPM-like); "
                       "normalizing each cell to 1e4 and applying log1p")
    elif scale.kind == "log" and not scale.canonical:
        logger.info("input detected as %s; converted to ln(1 + CP10k)", scale)
    else:
        logger.info("input detected as %s", scale)
    if alignment is None:
        alignment = match.align(adata, genes)
    elif alignment.n_panel != len(genes) or len(alignment.source_index) != len(genes):
        raise ValueError(f"alignment is for {alignment.n_panel} genes, the panel has "
                         f"{len(genes)}; recompute it with match.align(adata, genes)")
    if cells is not None and cells.step not in (None, 1):
        raise ValueError(f"cells must be a contiguous slice of rows, got step {cells.step}")
    for block, _ in _iter_blocks(adata, layer=match.layer, chunk_size=chunk_size, cells=cells):
        yield _select_columns(normalize_block(block, scale, share=share), alignment)


_orthologs = orthologs


def prepare(adata, genes: Sequence[str], *, match: GeneMatch | None = None,
            chunk_size: int = 4096, alignment: GeneAlignment | None = None,
            share: float = 1.0) -> sp.csr_matrix:
    """Log-normalized expression on the model's gene panel (cells x panel genes, CSR float32).

    Genes the data lack are empty columns; ``(match or GeneMatch()).align(adata, genes)
    .measured`` says which. :meth:`canal.data.CellData.from_adata` keeps both together.
    """
    return sp.vstack(list(iter_panel_blocks(adata, genes, match=match, chunk_size=chunk_size,
                                            alignment=alignment, share=share)), format="csr")


# --------------------------------------------------------------------------------------------
# Gene panel
# --------------------------------------------------------------------------------------------


def _gene_ranks(x: sp.csr_matrix, var_names: pd.Index) -> pd.Series:
    """Per-gene rank (0 = best): the better of Seurat-dispersion rank and log-variance rank."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(X=x, var=pd.DataFrame(index=var_names))
    sc.pp.highly_variable_genes(tmp, n_top_genes=min(100, tmp.n_vars), flavor="seurat")
    disp = tmp.var["dispersions_norm"].fillna(-np.inf).to_numpy()
    mean = np.asarray(x.mean(axis=0)).ravel()
    var = np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2
    r_disp = pd.Series(-disp, index=var_names).rank(method="first").to_numpy()
    r_var = pd.Series(-var, index=var_names).rank(method="first").to_numpy()
    return pd.Series(np.minimum(r_disp, r_var) - 1, index=var_names)


def select_panel(adatas, *, n_genes: int = 1000, layer: str | None = None,
                 combine: Literal["votes", "interleave"] = "votes") -> list[str]:
    """Choose a model's gene panel of highly variable genes.

    In each dataset a gene ranks by the better of two scores on log-normalized data: scanpy's
    Seurat normalized dispersion (variable for its mean) and the plain variance. The second keeps
    abundant cell-type markers (INS, GCG, LYZ...) whose ambient spread lowers their normalized
    dispersion. Several datasets (different gene sets allowed) are combined by ``combine``:

    - ``"votes"``: a gene scores by how many datasets place it in their top ``n_genes``, ties
      broken by its mean rank, as scanpy does with ``batch_key``. Suits batches of one tissue.
    - ``"interleave"``: the datasets' ranked lists are merged in turn (each dataset's best gene
      not yet taken, dataset after dataset), so each dataset contributes about the same number
      of its own most variable genes. Suits a corpus of several tissues, where votes would let
      the tissue with most files crowd out the others' markers.

    Returns
    -------
    The panel, a list of ``n_genes`` gene symbols in a deterministic order.
    """
    if not isinstance(adatas, list | tuple):
        adatas = [adatas]
    if combine not in ("votes", "interleave"):
        raise ValueError(f"combine must be 'votes' or 'interleave', got {combine!r}")
    ranks = []
    for adata in adatas:
        if adata.isbacked:
            adata = adata.to_memory()
        ranks.append(_gene_ranks(log_normalize(adata, layer=layer),
                                 pd.Index(adata.var_names.astype(str))))
    if combine == "interleave":
        lists = [r.sort_values(kind="stable").index.tolist() for r in ranks]
        panel: list[str] = []
        taken: set[str] = set()
        pos = [0] * len(lists)
        while len(panel) < n_genes and any(p < len(lst) for p, lst in zip(pos, lists,
                                                                             strict=True)):
            for i, lst in enumerate(lists):
                while pos[i] < len(lst) and lst[pos[i]] in taken:
                    pos[i] += 1
                if pos[i] < len(lst) and len(panel) < n_genes:
                    panel.append(lst[pos[i]])
                    taken.add(lst[pos[i]])
        if len(panel) < n_genes:
            raise ValueError(f"only {len(panel)} genes available, fewer than n_genes={n_genes}; "
                             "pass a smaller n_genes")
        return panel
    table = pd.concat(ranks, axis=1)
    score = pd.DataFrame({"n": (table < n_genes).sum(axis=1),
                          "rank": table.mean(axis=1, skipna=True)})
    score = score.sort_values(["n", "rank"], ascending=[False, True], kind="stable")
    if len(score) < n_genes:
        raise ValueError(f"only {len(score)} genes available, fewer than n_genes={n_genes}; "
                         "pass a smaller n_genes")
    return score.index[:n_genes].tolist()


def translate_genes(var_names: Sequence[str], match: GeneMatch | None = None) -> list[str]:
    """A dataset's gene symbols in the model's species (human): mouse genes through the 1:1
    ortholog table when ``match.orthologs`` (genes without an ortholog keep their symbol)."""
    names = [str(g) for g in var_names]
    if match is None or match.orthologs is False:
        return names
    table = _orthologs(None if match.orthologs is True else match.orthologs)
    mouse, human = set(table["mouse"]), set(table["human"])
    if sum(g in human for g in names) >= sum(g in mouse for g in names):
        return names  # already human symbols
    mapping = dict(zip(table["mouse"], table["human"], strict=False))
    return [mapping.get(g, g) for g in names]


def gene_vocabulary(adatas, *, match: GeneMatch | Sequence[GeneMatch | None] | None = None,
                    min_cells: int = 1) -> list[str]:
    """The genes of a corpus: the union of its files' genes, in the model's species.

    Mouse files are translated through the ortholog table where their ``match`` says so
    (:func:`translate_genes`). A gene is kept when at least ``min_cells`` cells of the corpus
    express it (a gene no cell expresses carries nothing to learn).

    Returns
    -------
    The gene symbols, sorted.
    """
    if not isinstance(adatas, list | tuple):
        adatas = [adatas]
    matches = list(match) if isinstance(match, list | tuple) else [match] * len(adatas)
    if len(matches) != len(adatas):
        raise ValueError(f"{len(matches)} gene matches for {len(adatas)} datasets")
    cells: dict[str, int] = {}
    for adata, m in zip(adatas, matches, strict=True):
        m = m or GeneMatch()
        names = translate_genes(adata.var_names, m)
        n = np.zeros(adata.n_vars, dtype=np.int64)
        for block, _ in _iter_blocks(adata, layer=m.layer):
            n += np.diff(sp.csc_matrix(block > 0).indptr)
        for g, c in zip(names, n, strict=True):
            cells[g] = cells.get(g, 0) + int(c)
    return sorted(g for g, c in cells.items() if c >= min_cells)


def highly_variable_panel(adatas, *, n_genes: int = 1000, match: GeneMatch | None = None
                          ) -> list[str]:
    """A task's gene panel: the ``n_genes`` most highly variable genes of its own data.

    Each dataset is log-normalized (:func:`log_normalize`, whatever its input scale) and its
    genes ranked by scanpy's ``highly_variable_genes(flavor="seurat")`` normalized dispersion
    (the log-data flavour; ``seurat_v3`` on counts would need ``scikit-misc``, which canal does
    not depend on, and some of the files are not counts). Several datasets are combined by
    votes (see :func:`select_panel`). Gene symbols are returned in the model's species
    (:func:`translate_genes`: mouse data through the ortholog table with
    ``match.orthologs``); a symbol two genes translate to is taken once.

    Returns
    -------
    The panel, ``min(n_genes, genes available)`` symbols, most variable first.
    """
    import anndata as ad
    import scanpy as sc

    if n_genes < 1:
        raise ValueError(f"n_genes must be at least 1, got {n_genes}")
    match = match or GeneMatch()
    if not isinstance(adatas, list | tuple):
        adatas = [adatas]
    ranks = []
    for adata in adatas:
        if adata.isbacked:
            adata = adata.to_memory()
        names = pd.Index(translate_genes(adata.var_names, match))
        keep = ~names.duplicated()
        x = log_normalize(adata, layer=match.layer)[:, np.flatnonzero(keep)]
        tmp = ad.AnnData(X=x, var=pd.DataFrame(index=names[keep]))
        sc.pp.highly_variable_genes(tmp, n_top_genes=min(n_genes, tmp.n_vars), flavor="seurat")
        disp = tmp.var["dispersions_norm"].fillna(-np.inf).to_numpy()
        ranks.append(pd.Series(-disp, index=tmp.var_names).rank(method="first") - 1)
    table = pd.concat(ranks, axis=1)
    score = pd.DataFrame({"n": (table < n_genes).sum(axis=1),
                          "rank": table.mean(axis=1, skipna=True)})
    score = score.sort_values(["n", "rank"], ascending=[False, True], kind="stable")
    if len(score) < n_genes:
        logger.warning("the data hold %d genes, fewer than n_genes=%d: the panel is all of them",
                       len(score), n_genes)
    return score.index[:n_genes].tolist()


# --------------------------------------------------------------------------------------------
# Binning into tokens
# --------------------------------------------------------------------------------------------


def present_mask(measured: np.ndarray, *, append_cls: bool = True) -> torch.Tensor:
    """The network's key mask from a ``(cells, genes)`` measured mask (the extra token is
    always present)."""
    present = torch.from_numpy(np.ascontiguousarray(measured, dtype=bool))
    if append_cls:
        present = torch.nn.functional.pad(present, (0, 1), value=True)
    return present


def bin_tokens(block: sp.csr_matrix | np.ndarray, *, n_bins: int = N_BINS,
               append_cls: bool = True) -> torch.Tensor:
    """Token ids for a batch of cells: ``floor(min(log_expr, n_bins - 1))``, as scBERT bins.

    Parameters
    ----------
    block
        Log-normalized expression on the panel (cells x genes), CSR or dense.
    n_bins
        Expression bins ``0..n_bins-1``; id ``n_bins`` is reserved for the mask token.
    append_cls
        Append the extra per-cell token (bin 0) that scBERT/CANAL put after the genes.

    Returns
    -------
    A ``(cells, genes [+ 1])`` int64 tensor.
    """
    if sp.issparse(block):
        csr = sp.csr_matrix(block)
        rows = torch.from_numpy(np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr)))
        cols = torch.from_numpy(csr.indices.astype(np.int64))
        dense = torch.zeros(csr.shape, dtype=torch.float32)
        dense[rows, cols] = torch.from_numpy(csr.data.astype(np.float32, copy=False))
    else:
        dense = torch.as_tensor(np.asarray(block, dtype=np.float32))
    tokens = dense.clamp_(min=0, max=n_bins - 1).floor_().to(torch.int64)
    if append_cls:
        tokens = torch.nn.functional.pad(tokens, (0, 1), value=0)
    return tokens
