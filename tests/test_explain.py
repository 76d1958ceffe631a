from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from canal import Annotator, explain
from canal.cli import main
from canal.explain import KNOWN_MARKERS, GeneImportance, marker_recovery
from canal.train import StageConfig
from tests.conftest import TINY

TYPES = ["acinar", "alpha", "beta", "delta", "ductal"]
MARKERS = {t: KNOWN_MARKERS["pancreas"][t] for t in TYPES}


def _per_type(adata, n: int, rng: np.random.Generator) -> np.ndarray:
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == t))[:n]
                                   for t in TYPES]))


@pytest.fixture(scope="module")
def cells(baron):
    """Disjoint training (40 per type) and explained (10 per type) Baron cells of 5 types."""
    b = baron[baron.obs["cell_type"].isin(TYPES).to_numpy()]
    rng = np.random.default_rng(0)
    train = _per_type(b, 40, rng)
    rest = b[np.setdiff1d(np.arange(b.n_obs), train)]
    return b[train].copy(), rest[_per_type(rest, 10, rng)].copy()


@pytest.fixture(scope="module")
def trained(cells, panel) -> Annotator:
    model = Annotator.from_genes(panel, config=TINY)
    model.fit_stage(cells[0], config=StageConfig(epochs=8, lr=3e-3, patience=10, seed=0))
    return model


@pytest.fixture(scope="module")
def explained(trained, cells):
    adata = cells[1].copy()
    top = trained.gene_importance(adata, n_top=20)
    return adata, top


def test_fields_shape_and_h5ad_round_trip(explained, trained, tmp_path):
    adata, top = explained
    assert list(top.columns) == ["type", "rank", "gene", "score"]
    assert sorted(top["type"].unique()) == TYPES
    assert (top.groupby("type").size() == 20).all()
    assert (top.groupby("type")["score"].apply(lambda s: s.is_monotonic_decreasing)).all()
    entry = adata.uns["canal_gene_importance"]
    assert entry["scores"].shape == (len(trained.genes), len(TYPES))
    assert entry["params"]["method"] == "integrated_gradients"
    assert entry["params"]["groupby"] == "cell_type"
    assert list(entry["n_cells"]) == [10] * 5
    adata.write_h5ad(tmp_path / "x.h5ad")
    back = GeneImportance.from_uns(ad.read_h5ad(tmp_path / "x.h5ad").uns["canal_gene_importance"])
    mine = GeneImportance.from_uns(entry)
    pd.testing.assert_frame_equal(back.scores, mine.scores)
    assert back.params["steps"] == 8
    pd.testing.assert_frame_equal(back.top(20), top)


def test_deterministic_and_batch_independent(trained, cells):
    adata = cells[1][:25].copy()
    a = trained.gene_importance(adata, n_top=None, key_added="a", steps=4)
    b = trained.gene_importance(adata, n_top=None, key_added="b", steps=4)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    np.testing.assert_array_equal(adata.uns["a"]["scores"], adata.uns["b"]["scores"])
    trained.gene_importance(adata, n_top=None, key_added="c", steps=4, batch_size=7)
    np.testing.assert_allclose(adata.uns["c"]["scores"], adata.uns["a"]["scores"],
                               rtol=1e-4, atol=1e-6)


def test_model_state_is_restored(trained, cells):
    net = trained.net
    net.train()
    for i, p in enumerate(net.parameters()):
        p.requires_grad_(i % 2 == 0)
    flags = [p.requires_grad for p in net.parameters()]
    trained.gene_importance(cells[1][:4].copy(), method="grad_x_input")
    assert net.training and [p.requires_grad for p in net.parameters()] == flags
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()


def test_markers_rank_in_their_type_top_genes(explained, trained):
    adata, _ = explained
    in_panel = {t: [g for g in gs if g in trained.genes] for t, gs in MARKERS.items()}
    assert all(in_panel.values()), f"test panel lacks markers: {in_panel}"
    rec = marker_recovery(GeneImportance.from_uns(adata.uns["canal_gene_importance"]), MARKERS)
    misses = {t: v["ranks"] for t, v in rec["per_type"].items() if v["status"] != "recovered"}
    assert rec["n_in_panel"] == 5
    assert rec["n_recovered"] >= 4, f"markers outside their type's top 20: {misses}"


def test_integrated_gradients_add_up_to_logit_difference(trained, cells):
    """Completeness: attributions sum to logit(cell) - logit(all genes unexpressed)."""
    net = trained.net
    data = trained.prepare(cells[1][::8])
    n = data.n_cells
    codes = np.arange(n) % len(trained.cell_types)
    (idx, attr), = explain.attribute(net, data, codes, steps=16, batch_size=n)
    tokens = data.tokens(idx)
    net.eval()
    with torch.no_grad():
        full = net(tokens).logits[np.arange(n), codes]
        empty = net(torch.zeros_like(tokens)).logits[np.arange(n), codes]
    np.testing.assert_allclose(attr.sum(1), (full - empty).numpy(), rtol=0.02, atol=0.02)
    assert np.all(attr[tokens[:, :-1].numpy() == 0] == 0)  # unexpressed genes get exactly 0
    gxi = next(explain.attribute(net, data, codes, method="grad_x_input", batch_size=n))[1]
    assert gxi.shape == attr.shape and not np.allclose(gxi, attr)


def test_groupby_none_uses_predictions_and_unknown_types_are_left_out(trained, cells, caplog):
    adata = cells[1][:20].copy()
    top = trained.gene_importance(adata, groupby=None, n_top=3, method="grad_x_input")
    _, logits = trained.outputs(trained.prepare(adata))
    pred = pd.Series(np.asarray(trained.cell_types)[logits.argmax(1).numpy()])
    entry = adata.uns["canal_gene_importance"]
    assert entry["params"]["groupby"] == "prediction"
    assert dict(zip(entry["types"], entry["n_cells"], strict=True)) == pred.value_counts().to_dict()
    assert set(top["type"]) == set(pred)
    adata.obs["other"] = np.where(np.arange(20) < 10, "beta", "not a type")
    trained.gene_importance(adata, groupby="other", method="grad_x_input")
    assert list(adata.uns["canal_gene_importance"]["types"]) == ["beta"]
    assert "unknown to the model" in caplog.text
    adata.obs["other"] = "not a type"
    with pytest.raises(ValueError, match="groupby=None"):
        trained.gene_importance(adata, groupby="other")


def test_marker_recovery_statuses():
    genes = ["INS", "GCG", "SST", "A", "B", "C"]
    scores = pd.DataFrame({"beta": [5, 1, 0, 2, 3, 4], "alpha": [0, -1, 0, 2, 3, 4],
                           "delta": [0, 0, 9, 0, 0, 0], "acinar": [1, 2, 3, 4, 5, 6]},
                          index=genes, dtype=float)
    rec = marker_recovery(scores, KNOWN_MARKERS["pancreas"], n_top=2)
    per = rec["per_type"]
    assert per["beta"] == {"status": "recovered", "best": "INS", "ranks": {"INS": 1}}
    assert per["alpha"]["status"] == "missed"  # GCG ranks last, with a negative score
    assert per["delta"]["status"] == "recovered"
    assert per["acinar"] == {"status": "not in panel", "best": None,
                             "ranks": {"PRSS1": None, "CPA1": None}}
    assert rec["absent_types"] == ["gamma", "ductal"]
    assert (rec["n_types"], rec["n_in_panel"], rec["n_recovered"]) == (4, 3, 2)
    assert rec["share"] == pytest.approx(2 / 3) and rec["share_raw"] == pytest.approx(0.5)
    assert marker_recovery(scores, {"beta": ["C"]}, n_top=1)["n_recovered"] == 0
    with pytest.raises(ValueError, match="genes x types"):
        marker_recovery(explain.top_genes(scores), KNOWN_MARKERS["pancreas"])


def test_rank_genes_baseline_finds_hormones(cells, panel):
    scores = explain.rank_genes_baseline(cells[0], panel)
    assert list(scores.index) == list(panel) and sorted(scores.columns) == TYPES
    rec = marker_recovery(scores, MARKERS)
    assert rec["per_type"]["beta"]["ranks"]["INS"] <= 5
    assert rec["per_type"]["alpha"]["ranks"]["GCG"] <= 5


def test_cli_explain_writes_tables_and_plot(trained, cells, tmp_path, capsys):
    ckpt = tmp_path / "model"
    trained.save(ckpt)
    src = tmp_path / "cells.h5ad"
    cells[1][:15].write_h5ad(src)
    out = tmp_path / "explain"
    assert main(["--quiet", "explain", "--model", str(ckpt), "--data", str(src), "--out",
                 str(out), "--n-top", "5", "--method", "grad_x_input", "--markers",
                 "pancreas"]) == 0
    assert "markers (pancreas)" in capsys.readouterr().out
    top = pd.read_csv(out / "top_genes.csv")
    assert list(top.columns) == ["type", "rank", "gene", "score"] and len(top) % 5 == 0
    full = pd.read_csv(out / "gene_importance.csv", index_col="gene")
    assert full.shape[0] == len(trained.genes) and set(full.columns) == set(top["type"])
    assert (out / "gene_importance.png").stat().st_size > 1000
    assert (out / "params.json").exists()
