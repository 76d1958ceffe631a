from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from canal import pp


def test_detects_counts_log_and_unlogged(baron, seger):
    assert pp.detect_input(baron) == "counts"
    logged = baron[:300].copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    assert pp.detect_input(logged) == "log"
    lawlor = seger[seger.obs["batch"].str.startswith("Lawlor")]
    assert pp.detect_input(lawlor) == "unlogged"


def test_log_normalize_matches_scanpy_and_never_twice(baron):
    sub = baron[:300].copy()
    before = sub.X.copy()
    ours = pp.log_normalize(sub)
    ref = sub.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    np.testing.assert_allclose(ours.toarray(), ref.X.toarray(), rtol=1e-5, atol=1e-6)
    # the user's data is untouched
    assert (before != sub.X).nnz == 0
    # already log-normalized input passes through unchanged: no double normalization
    again = pp.log_normalize(ref)
    np.testing.assert_allclose(again.toarray(), ref.X.toarray(), rtol=1e-6)


def test_prepare_reorders_and_zero_fills(baron, panel):
    sub = baron[:50]
    genes = [panel[3], "NOT_A_GENE", panel[0]] + panel[10:200]
    x = pp.prepare(sub, genes, match=pp.GeneMatch(min_overlap=0.1))
    full = pp.log_normalize(sub)
    col = {g: i for i, g in enumerate(sub.var_names)}
    np.testing.assert_allclose(x[:, 0].toarray(), full[:, col[panel[3]]].toarray())
    np.testing.assert_allclose(x[:, 2].toarray(), full[:, col[panel[0]]].toarray())
    assert x[:, 1].nnz == 0


def test_partial_panel_warns(seger, baron, caplog):
    # Segerstolpe/Lawlor ships only 1,213 genes: a panel half made of other genes is partial
    others = [g for g in baron.var_names if g not in set(seger.var_names)]
    panel = list(seger.var_names[:60]) + others[:140]
    with caplog.at_level(logging.WARNING, logger="canal"):
        al = pp.align_genes(seger.var_names, panel)
    assert al.fraction == 0.3 and al.fraction < pp.WARN_OVERLAP
    assert "60 of 200 model genes (30%) measured" in caplog.text
    assert "not measured" in caplog.text
    np.testing.assert_array_equal(al.measured, np.arange(200) < 60)
    x = pp.prepare(seger[:20], panel)
    missing = np.flatnonzero(al.source_index < 0)
    assert x[:, missing].nnz == 0 and x.shape == (20, len(panel))


def test_few_genes_error_names_a_filtered_gene_set(seger, baron):
    # a published processed matrix keeping few genes: the message says so (not "symbols")
    others = [g for g in baron.var_names if g not in set(seger.var_names)]
    panel = list(seger.var_names[:5]) + others[:195]
    with pytest.raises(ValueError, match="filtered gene set") as err:
        pp.GeneMatch().align(seger, panel)
    assert "5 of 200" in str(err.value) and "min_overlap" in str(err.value)
    # the floor is an option: lowered, the same data are read
    al = pp.GeneMatch(min_overlap=0.01).align(seger, panel)
    assert al.n_found == 5


def test_gene_match_round_trip_and_resolve():
    m = pp.GeneMatch(orthologs=True, min_overlap=0.1)
    assert pp.GeneMatch.from_dict(m.to_dict()) == m
    assert pp.GeneMatch.resolve(None, m) is m
    assert pp.GeneMatch.resolve({"layer": "counts"}, m) == m.replace(layer="counts")
    with pytest.raises(ValueError, match="newer canal"):
        pp.GeneMatch.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="shares"):
        pp.GeneMatch(min_overlap=2)


def test_mouse_through_orthologs(baron_mouse, panel):
    with pytest.raises(ValueError, match="mouse"):
        pp.align_genes(baron_mouse.var_names, panel)
    table = pp.orthologs()
    al = pp.align_genes(baron_mouse.var_names, panel, orthologs_table=table)
    assert al.fraction > 0.6
    # the mouse gene standing in for human INS-like genes is the ortholog from the table
    human_to_mouse = dict(zip(table["human"], table["mouse"], strict=False))
    i = next(i for i, g in enumerate(panel) if g in human_to_mouse and al.source_index[i] >= 0)
    assert baron_mouse.var_names[al.source_index[i]] == human_to_mouse[panel[i]]
    ci = pp.align_genes(baron_mouse.var_names, panel, case_insensitive=True)
    assert ci.fraction > 0.5


def test_ensembl_ids_named_in_error(panel):
    ids = [f"ENSG{i:011d}" for i in range(500)]
    with pytest.raises(ValueError, match="Ensembl"):
        pp.align_genes(ids, panel)


def test_binning_matches_direct_computation(baron, panel):
    x = pp.prepare(baron[:64], panel)
    tokens = pp.bin_tokens(x)
    direct = np.floor(np.minimum(x.toarray(), pp.N_BINS - 1)).astype(np.int64)
    assert tokens.shape == (64, len(panel) + 1)
    np.testing.assert_array_equal(tokens[:, :-1].numpy(), direct)
    assert (tokens[:, -1] == 0).all()
    assert tokens.max() <= pp.N_BINS - 1 and tokens.max() >= 3  # real data reaches high bins
    np.testing.assert_array_equal(pp.bin_tokens(x.toarray()).numpy(), tokens.numpy())


def test_dense_and_backed_inputs_agree(baron, panel, tmp_path):
    sub = baron[:120].copy()
    ref = pp.prepare(sub, panel)
    dense = sub.copy()
    dense.X = dense.X.toarray()
    np.testing.assert_allclose(pp.prepare(dense, panel).toarray(), ref.toarray())
    sub.write_h5ad(tmp_path / "s.h5ad")
    backed = ad.read_h5ad(tmp_path / "s.h5ad", backed="r")
    got = pp.prepare(backed, panel, chunk_size=50)
    np.testing.assert_allclose(got.toarray(), ref.toarray())
    backed.file.close()


def _bad(baron, fn):
    a = baron[:40].copy()
    fn(a)
    return a


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.X.data.__setitem__(0, np.nan), "NaN"),
        (lambda a: a.X.data.__setitem__(0, np.inf), "NaN or inf"),
        (lambda a: a.X.data.__setitem__(0, -1.0), "negative"),
    ],
)
def test_bad_values_are_named(baron, panel, mutate, match):
    a = _bad(baron, mutate)
    snapshot = a.X.copy()
    with pytest.raises(ValueError, match=match):
        pp.prepare(a, panel)
    np.testing.assert_array_equal(a.X.data, snapshot.data)  # nothing modified


def test_empty_cells_duplicates_and_empty_adata(baron, panel):
    a = baron[:40].copy()
    x = a.X.tolil()
    x[5, :] = 0
    a.X = sp.csr_matrix(x)
    with pytest.raises(ValueError, match="filter_cells"):
        pp.prepare(a, panel)
    b = baron[:10, :300].copy()
    b.var_names = ["G"] * 299 + ["H"]
    with pytest.raises(ValueError, match="var_names_make_unique"):
        pp.prepare(b, panel)
    with pytest.raises(ValueError, match="no cells"):
        pp.prepare(baron[:0].copy(), panel)


def test_select_panel_over_several_files(baron, seger):
    one = pp.select_panel(baron, n_genes=100)
    assert len(one) == 100 == len(set(one))
    assert one == pp.select_panel(baron, n_genes=100)  # deterministic
    assert "INS" in pp.select_panel(baron, n_genes=1000)
    both = pp.select_panel([baron, seger], n_genes=150)
    assert len(both) == 150 and set(both) <= set(baron.var_names) | set(seger.var_names)
    with pytest.raises(ValueError, match="smaller n_genes"):
        pp.select_panel(seger, n_genes=5000)


def _cp10k(a, total=1e4):
    sc.pp.normalize_total(a, target_sum=total)


# (name, transform of a counts AnnData, the scale detect_scale must report)
_SCALES = [
    ("ln_cp10k", lambda a: (_cp10k(a), sc.pp.log1p(a)), "ln(1 + CP10k)"),
    ("log1p_twice", lambda a: (_cp10k(a), sc.pp.log1p(a), sc.pp.log1p(a)),
     "ln(1 + ln(1 + CP10k))"),
    ("ln_cpm", lambda a: (_cp10k(a, 1e6), sc.pp.log1p(a)), "ln(1 + CPM)"),
    ("log2_cp10k", lambda a: (_cp10k(a), sc.pp.log1p(a, base=2)), "log2(1 + CP10k)"),
    # the same values without scanpy's record: told from the data alone
    ("log2_cp10k_no_uns", lambda a: (_cp10k(a), sc.pp.log1p(a, base=2), a.uns.pop("log1p")),
     "log2(1 + CP10k)"),
    ("log10_cpm", lambda a: (_cp10k(a, 1e6), sc.pp.log1p(a, base=10)), "log10(1 + CPM)"),
    ("ln_counts", lambda a: sc.pp.log1p(a), "ln(1 + counts)"),
    ("ln_median_total", lambda a: (sc.pp.normalize_total(a), sc.pp.log1p(a)), "ln(1 + values"),
]


@pytest.mark.parametrize(("transform", "scale"), [s[1:] for s in _SCALES],
                         ids=[s[0] for s in _SCALES])
def test_log_scales_detected_and_converted(baron, panel, transform, scale, caplog):
    # before: only exact ln(1 + CP10k) was read right; log1p twice, ln(1 + CPM) and
    # log2(1 + CP10k) were used as is, silently
    counts = baron[:200].copy()
    ref = pp.prepare(counts, panel)
    a = counts.copy()
    with np.errstate(all="ignore"):
        transform(a)
    got = pp.detect_scale(a)
    assert got.kind == "log" and str(got).startswith(scale)
    with caplog.at_level(logging.INFO, logger="canal"):
        x = pp.prepare(a, panel)
    np.testing.assert_allclose(x.toarray(), ref.toarray(), atol=2e-5)
    if not got.canonical:
        assert "converted to ln(1 + CP10k)" in caplog.text


def test_canonical_input_passes_through_unchanged(baron):
    a = baron[:200].copy()
    _cp10k(a)
    sc.pp.log1p(a)
    assert pp.detect_scale(a) == pp.CANONICAL
    assert pp.normalize_block(a.X, pp.detect_scale(a)) is a.X


def test_gene_subset_after_normalizing(baron, panel):
    # scanpy users often keep only some genes after log1p: rows no longer share a total
    counts = baron[:200].copy()
    keep = np.asarray(counts.X.sum(axis=0)).ravel().argsort()[-3000:]
    ln = counts.copy()
    _cp10k(ln)
    sc.pp.log1p(ln)
    ln = ln[:, keep].copy()
    assert str(pp.detect_scale(ln)) == "ln(1 + CP10k) of a gene subset"
    genes = [g for g in panel if g in set(ln.var_names)]
    ref = pp.prepare(ln, genes)  # used as is
    np.testing.assert_allclose(ref.toarray(), ln[:, genes].X.toarray(), rtol=1e-6)
    log2 = counts.copy()
    _cp10k(log2)
    sc.pp.log1p(log2, base=2)
    log2 = log2[:, keep].copy()
    assert str(pp.detect_scale(log2)) == "log2(1 + CP10k) of a gene subset"
    np.testing.assert_allclose(pp.prepare(log2, genes).toarray(), ref.toarray(), atol=2e-5)


def test_uns_log1p_base_decides_and_undecidable_is_refused(seger):
    # Lawlor's values are not counts: once logged, only scanpy's record tells the base
    lawlor = seger[seger.obs["batch"].str.startswith("Lawlor")][:120].copy()
    assert pp.detect_input(lawlor) == "unlogged"
    logged = lawlor.copy()
    sc.pp.log1p(logged, base=2)
    got = pp.detect_scale(logged)
    assert got.kind == "log" and got.base == 2 and got.logs == 1
    x = pp.log_normalize(logged)
    np.testing.assert_allclose(x.toarray(), pp.log_normalize(lawlor).toarray(), atol=2e-5)
    del logged.uns["log1p"]
    with pytest.raises(ValueError, match=r"cannot tell how adata.X was normalized.*layer="):
        pp.detect_scale(logged)
    logged.uns["log1p"] = {"base": 2}  # the fix the message names, for a known scale
    assert pp.detect_scale(logged).base == 2
    with pytest.raises(ValueError, match="must exceed 1"):
        pp.detect_scale(ad.AnnData(logged.X, uns={"log1p": {"base": 0.5}}))


def test_iter_panel_blocks_streams_a_row_range_as_the_full_pass_reads_it(baron, panel, tmp_path):
    """A block of rows (as one rank of a sharded prediction reads it) equals those rows of the
    full pass, backed or in memory."""
    cells = baron[:700].copy()
    cells.write_h5ad(tmp_path / "cells.h5ad")
    for data in (cells, ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")):
        full = sp.vstack(list(pp.iter_panel_blocks(data, panel, chunk_size=128)), format="csr")
        part = sp.vstack(list(pp.iter_panel_blocks(data, panel, chunk_size=128,
                                                   cells=slice(250, 611))), format="csr")
        assert part.shape == (361, len(panel))
        assert (part != full[250:611]).nnz == 0
        assert list(pp.iter_panel_blocks(data, panel, cells=slice(700, 700))) == []
        with pytest.raises(ValueError, match="contiguous slice"):
            next(pp.iter_panel_blocks(data, panel, cells=slice(0, 10, 2)))
