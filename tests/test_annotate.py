"""Annotator.predict / canal.annotate on real pancreas cells with a tiny trained model."""

from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from canal import Annotator, metrics
from canal.metrics import UNASSIGNED
from tests.pancreas import NOVEL, novel_split

FIELDS_OBS = ("canal", "canal_confidence", "canal_novelty", "canal_novelty_p", "canal_closed")


@pytest.fixture(scope="module")
def split(data_root):
    return novel_split(data_root)


@pytest.fixture
def model(split) -> Annotator:
    """A private copy of the trained model (tests may change it)."""
    return copy.deepcopy(split.model)


@pytest.fixture
def cells(split) -> ad.AnnData:
    """90 test cells (every 3rd cell of donor human4, alpha included)."""
    return split.test[::3][:90].copy()


def _same(a: pd.DataFrame, b: pd.DataFrame, *, atol: float = 1e-5) -> None:
    assert a.index.equals(b.index)
    assert (a["canal"].astype(str) == b["canal"].astype(str)).all()
    assert (a["canal_closed"].astype(str) == b["canal_closed"].astype(str)).all()
    floats = [c for c in a.columns if c not in ("canal", "canal_closed")]
    np.testing.assert_allclose(a[floats].to_numpy(), b[floats].to_numpy(), atol=atol)


def test_alpha_withheld_comes_out_unassigned(split):
    """THE novelty test: alpha was never trained on; it must come out Unassigned."""
    test = split.test
    truth = test.obs["cell_type"].astype(str)
    scores, rejected = {}, {}
    for mode in ("mixup", "calibrated", "none"):
        pred = split.model.predict(test, novelty=mode, inplace=False)["canal"].astype(str)
        scores[mode] = metrics.novel_scores(truth, pred, novel_types=NOVEL)
        rejected[mode] = float((pred[truth != NOVEL] == UNASSIGNED).mean())
    none, mixup, cal = scores["none"], scores["mixup"], scores["calibrated"]
    assert none["unknown_accuracy"] == 0 and none["h_score"] == 0
    assert mixup["unknown_accuracy"] > 0.75  # alpha mostly Unassigned
    assert mixup["known_accuracy"] > 0.65  # known types mostly right
    assert mixup["h_score"] > 0.7
    # the calibrated rule (fpr 0.05 on 118 held-out cells of donors 1-3) rejects few known
    # cells of the unseen donor (measured 8.9%; mixup 13.1%) and still finds most alpha cells
    assert rejected["calibrated"] < 0.12 and rejected["calibrated"] < rejected["mixup"]
    assert cal["unknown_accuracy"] > 0.5 and cal["h_score"] > 0.65
    # the known types lose little to the novelty calls
    assert cal["known_accuracy"] > none["known_accuracy"] - 0.1


def test_batched_equals_one_by_one_and_after_save_load(model, cells, tmp_path):
    big = model.predict(cells, inplace=False, batch_size=64)
    one = model.predict(cells, inplace=False, batch_size=1)
    _same(big, one)
    assert big["canal"].nunique() > 2  # a real prediction, not one constant call
    model.save(tmp_path / "ckpt")
    loaded = Annotator.from_pretrained(tmp_path / "ckpt")
    again = loaded.predict(cells, inplace=False, batch_size=64)
    pd.testing.assert_frame_equal(big, again)
    for mode in ("calibrated", "none"):
        _same(model.predict(cells, novelty=mode, inplace=False, batch_size=7),
              loaded.predict(cells, novelty=mode, inplace=False, batch_size=64))


def test_fields_types_and_h5ad_round_trip(model, cells, tmp_path):
    model.predict(cells)
    obs = cells.obs
    assert isinstance(obs["canal"].dtype, pd.CategoricalDtype)
    # the types called, in library order, Unassigned last; unused ones are not listed
    cats = list(obs["canal"].cat.categories)
    assert cats == [c for c in [*model.cell_types, UNASSIGNED] if c in set(obs["canal"])]
    assert list(obs["canal_closed"].cat.categories) == model.cell_types
    called = obs["canal"].astype(str) != UNASSIGNED
    assert (obs["canal_closed"].astype(str)[called] == obs["canal"].astype(str)[called]).all()
    colors = dict(zip(cats, cells.uns["canal_colors"], strict=True))
    assert colors.get(UNASSIGNED, "#bdbdbd") == "#bdbdbd"
    assert obs["canal_confidence"].dtype == np.float32
    assert obs["canal_novelty"].dtype == np.float32
    assert ((obs["canal_confidence"] > 0) & (obs["canal_confidence"] <= 1)).all()
    rep = cells.obsm["X_canal"]
    assert isinstance(rep, np.ndarray) and rep.dtype == np.float32
    assert rep.shape == (cells.n_obs, model.net.config.rep_dim)
    probs = cells.obsm["canal_probabilities"]
    assert isinstance(probs, pd.DataFrame)
    assert list(probs.columns) == model.cell_types and probs.index.equals(cells.obs_names)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(probs.max(axis=1), obs["canal_confidence"], rtol=1e-6)
    # a called cell's type is its most probable one
    called = obs["canal"].astype(str) != UNASSIGNED
    assert (probs.idxmax(axis=1)[called] == obs["canal"].astype(str)[called]).all()
    params = cells.uns["canal"]["params"]
    assert params["novelty"] == "calibrated" and params["stage"] == model.stage == 1
    assert params["fpr"] == 0.05 and params["score"] == model.novelty_calibration.score
    assert params["n_genes_found"] == len(model.genes) and params["batch_size"] == 64
    # Unassigned exactly where the conformal p-value is at most fpr; re-thresholding later
    # needs only the stored p-values
    unassigned = (obs["canal"] == UNASSIGNED).to_numpy()
    p = obs["canal_novelty_p"].to_numpy()
    assert ((p > 0) & (p <= 1)).all() and unassigned.any()
    np.testing.assert_array_equal(unassigned, p <= params["fpr"])
    stricter = model.predict(cells.copy(), novelty_fpr=0.01, inplace=False)
    np.testing.assert_array_equal(stricter["canal"].astype(str) == UNASSIGNED, p <= 0.01)

    cells.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    pd.testing.assert_frame_equal(back.obs[list(FIELDS_OBS)], obs[list(FIELDS_OBS)])
    np.testing.assert_array_equal(back.obsm["X_canal"], rep)
    pd.testing.assert_frame_equal(back.obsm["canal_probabilities"], probs)
    assert back.uns["canal"]["params"] == params

    sc.pp.neighbors(back, use_rep="X_canal", n_neighbors=10)
    assert back.obsp["connectivities"].shape == (cells.n_obs, cells.n_obs)


def test_inplace_false_leaves_adata_alone(model, cells):
    before = cells.copy()
    df = model.predict(cells, inplace=False, key_added="pred")
    assert list(df.columns) == ["pred", "pred_confidence", "pred_novelty", "pred_novelty_p",
                                "pred_closed", *model.cell_types]
    assert df.index.equals(cells.obs_names)
    assert list(cells.obs.columns) == list(before.obs.columns)
    assert list(cells.obsm) == list(before.obsm) and list(cells.uns) == list(before.uns)
    assert (cells.X != before.X).nnz == 0
    model.predict(cells, key_added="pred")
    cols = ["pred", "pred_confidence", "pred_novelty", "pred_novelty_p", "pred_closed"]
    pd.testing.assert_frame_equal(cells.obs[cols], df[cols])
    pd.testing.assert_frame_equal(cells.obsm["pred_probabilities"], df[model.cell_types])


def test_backed_input(model, cells, tmp_path):
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    model.predict(backed, batch_size=16)
    assert backed.isbacked
    expected = model.predict(cells, inplace=False)
    got = pd.concat([backed.obs[list(FIELDS_OBS)], backed.obsm["canal_probabilities"]], axis=1)
    _same(got, expected)
    backed.write_h5ad(tmp_path / "annotated.h5ad")  # the result can be saved to a new file
    assert ad.read_h5ad(tmp_path / "annotated.h5ad").obsm["X_canal"].shape[0] == cells.n_obs


def test_calibrated_mode_scores_each_cell_alone(model, cells):
    assert model.novelty_calibration is not None
    batch = model.predict(cells, novelty="calibrated", inplace=False)
    for i in (0, 1, 57):
        alone = model.predict(cells[i:i + 1], novelty="calibrated", inplace=False)
        _same(alone, batch.iloc[i:i + 1])
    # and a subset of cells gets the same calls as inside the whole file
    _same(model.predict(cells[::2], novelty="calibrated", inplace=False), batch.iloc[::2])


def test_mixup_rule_needs_cells_and_calibrated_needs_a_calibration(model, cells):
    with pytest.raises(ValueError, match="single cell"):
        model.predict(cells[:1].copy(), novelty="mixup", inplace=False)
    # "energy" is the mixup rule's former name
    a = model.predict(cells, novelty="energy", inplace=False)
    _same(a, model.predict(cells, novelty="mixup", inplace=False))
    del model.meta["novelty"]
    with pytest.raises(ValueError, match="calibrate_novelty"):
        model.predict(cells, inplace=False)


def test_calibrate_novelty_is_saved_and_deterministic(model, split, tmp_path):
    held_out = split.test[split.test.obs["cell_type"].astype(str) != "alpha"][::4]
    cal = model.calibrate_novelty(held_out, fpr=0.1)
    assert cal == model.calibrate_novelty(held_out, fpr=0.1)
    assert cal.fpr == 0.1 and cal.n_cells["__pooled__"] == held_out.n_obs
    model.save(tmp_path / "ckpt")
    assert Annotator.from_pretrained(tmp_path / "ckpt").novelty_calibration == cal
    # on the cells it was calibrated on, about fpr of them are rejected
    pred = model.predict(held_out, inplace=False)["canal"].astype(str)
    assert 0.03 <= (pred == UNASSIGNED).mean() <= 0.17


def test_mixup_threshold_is_seeded(model, cells):
    few = cells[:40]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        c = few.copy()
        model.predict(c, novelty="mixup", seed=seed)
        runs[name] = c.uns["canal"]["params"]["threshold"]
    assert runs["a"] == runs["b"] != runs["c"]


def test_cluster_vote(model, cells):
    groups = cells.copy()
    groups.obs["cluster"] = groups.obs["cell_type"].astype(str)
    df = model.predict(groups, groupby="cluster", inplace=False)
    # one call per cluster: every cluster's cells share their call
    per = df.assign(cluster=groups.obs["cluster"]).groupby("cluster")["canal"].nunique()
    assert (per == 1).all()
    assert (df.loc[groups.obs["cluster"] == "alpha", "canal"].astype(str) == UNASSIGNED).all()
    with pytest.raises(KeyError, match="groupby"):
        model.predict(groups, groupby="nope")
    # "auto": clusters of the representation from the same pass; calls are per cluster
    auto = cells.copy()
    model.predict(auto, groupby="auto")
    assert auto.uns["canal"]["params"]["groupby"] == "auto"
    assert auto.obs["canal"].nunique() <= auto.obs["canal_closed"].nunique() + 1


def test_bf16_keeps_the_calls(model, split):
    test = split.test[::2]
    fp32 = model.predict(test, novelty="none", inplace=False)
    bf16 = model.predict(test, novelty="none", inplace=False, precision="bf16")
    same = (fp32["canal"].astype(str) == bf16["canal"].astype(str)).mean()
    assert same >= 0.98
    np.testing.assert_allclose(fp32[model.cell_types], bf16[model.cell_types], atol=0.05)


def test_errors_name_the_fix(model, cells):
    with pytest.raises(ValueError, match="novelty must be"):
        model.predict(cells, novelty="maybe")
    with pytest.raises(ValueError, match="precision must be"):
        model.predict(cells, precision="fp16")
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(cells, batch_size=0)
    untrained = Annotator.from_genes(model.genes, config=model.net.config)
    with pytest.raises(ValueError, match="fit_stage"):
        untrained.predict(cells)
    with pytest.raises(ValueError, match="key_added"):
        model.predict(cells, inplace=False, key_added=model.cell_types[0])
    mouse_like = cells.copy()
    mouse_like.var_names = [g.capitalize() for g in cells.var_names]
    with pytest.raises(ValueError, match="orthologs=True"):
        model.predict(mouse_like)
