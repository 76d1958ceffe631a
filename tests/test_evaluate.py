"""Evaluation of stored predictions: metrics.evaluate, pl plots, `canal evaluate` / `predict`."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, adjusted_rand_score, f1_score

from canal import metrics, pl
from canal.cli import main
from canal.metrics import UNASSIGNED
from tests.pancreas import NOVEL, novel_split


def _annotated(n: int = 60, seed: int = 0) -> ad.AnnData:
    """Cells with true types a/b/c (c: 'novel'), predictions and a 2-cluster representation."""
    rng = np.random.default_rng(seed)
    truth = np.array(["a", "b", "c"])[rng.integers(0, 3, n)]
    pred = truth.astype(object)
    flip = rng.random(n) < 0.2
    pred[flip] = np.where(truth[flip] == "a", "b", "a")
    pred[(truth == "c") & (rng.random(n) < 0.8)] = UNASSIGNED
    pred[(truth == "c") & (pred == "c")] = "a"  # the model does not know c
    codes = {"a": 0, "b": 1, "c": 2}
    rep = rng.normal(size=(n, 8)).astype(np.float32)
    rep[:, 0] += 4 * np.vectorize(codes.get)(truth)
    adata = ad.AnnData(obs=pd.DataFrame({
        "cell_type": pd.Categorical(truth),
        "canal": pd.Categorical(pred, categories=["a", "b", UNASSIGNED]),
        "canal_novelty": np.where(truth == "c", 0.7, 0.3) + rng.normal(0, 0.05, n),
    }, index=[f"cell{i}" for i in range(n)]))
    adata.obsm["X_canal"] = rep
    adata.uns["canal"] = {"params": {"novelty": "energy", "threshold": 0.5}}
    return adata


def test_evaluate_agrees_with_sklearn():
    adata = _annotated()
    t = adata.obs["cell_type"].astype(str).to_numpy()
    p = adata.obs["canal"].astype(str).to_numpy()
    s = metrics.evaluate(adata, truth="cell_type", key="canal")
    assert s["accuracy"] == pytest.approx(accuracy_score(t, p))
    assert s["macro_f1"] == pytest.approx(f1_score(t, p, labels=sorted(set(t)), average="macro"))
    assert s["ari"] == pytest.approx(adjusted_rand_score(t, p))
    assert s["n_unassigned"] == int((p == UNASSIGNED).sum()) > 0
    # with c declared novel, a c cell is right iff it is Unassigned
    s = metrics.evaluate(adata, truth="cell_type", novel_types=["c"])
    t_n = np.where(t == "c", UNASSIGNED, t)
    assert s["accuracy"] == pytest.approx(accuracy_score(t_n, p))
    assert s["unknown_accuracy"] == pytest.approx(np.mean(p[t == "c"] == UNASSIGNED))
    assert s["known_accuracy"] == pytest.approx(np.mean(p[t != "c"] == t[t != "c"]))
    k, u = s["known_accuracy"], s["unknown_accuracy"]
    assert s["h_score"] == pytest.approx(2 * k * u / (k + u))


def test_evaluate_names_missing_columns():
    adata = _annotated()
    with pytest.raises(KeyError, match="truth column 'label'"):
        metrics.evaluate(adata, truth="label")
    with pytest.raises(KeyError, match="prediction column 'other'"):
        metrics.evaluate(adata, truth="cell_type", key="other")


def test_plots_return_figures_and_leave_adata_alone():
    adata = _annotated()
    before = adata.copy()
    ax = pl.confusion(adata, truth="cell_type")
    assert isinstance(ax, Axes)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c", UNASSIGNED]
    ax = pl.novelty_hist(adata, truth="cell_type", novel_types=["c"])
    assert isinstance(ax, Axes)
    assert len(ax.patches) == 2 * 40  # two histograms of 40 bins
    # share=True: each group's bars sum to 1 whatever its size
    ax = pl.novelty_hist(adata, truth="cell_type", novel_types=["c"], share=True)
    heights = np.array([p.get_height() for p in ax.patches]).reshape(2, 40)
    np.testing.assert_allclose(heights.sum(axis=1), 1.0, rtol=1e-6)
    fig = pl.umap(adata, color=("canal", "cell_type"), n_neighbors=5)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    # the same category has the same colour in both panels
    colours = [{h.get_label(): tuple(h.get_facecolor()[0]) for h in a.collections}
               for a in fig.axes]
    assert colours[0]["a"] == colours[1]["a"]
    assert list(adata.obs.columns) == list(before.obs.columns)
    assert list(adata.obsm) == ["X_canal"] and not adata.obsp
    adata.obs["canal_novelty"] = np.nan
    with pytest.raises(ValueError, match="novelty='none'"):
        pl.novelty_hist(adata)


def test_cli_evaluate_writes_metrics_and_plots(tmp_path, capsys):
    adata = _annotated()
    path = tmp_path / "pred.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(path), "--truth", "cell_type", "--novel-types", "c",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "h_score" in printed and "macro_f1" in printed
    report = json.loads((out / "metrics.json").read_text())
    expected = metrics.evaluate(adata, truth="cell_type", novel_types=["c"])
    assert report["metrics"]["h_score"] == pytest.approx(expected["h_score"])
    assert report["params"]["threshold"] == 0.5
    for name in ("confusion.png", "umap.png", "novelty.png"):
        assert (out / name).stat().st_size > 1000, name
    assert main(["evaluate", "--pred", str(path), "--truth", "nope"]) == 2
    assert "not in adata.obs" in capsys.readouterr().err


def test_cli_predict_then_evaluate(data_root, tmp_path, capsys):
    split = novel_split(data_root)
    split.model.save(tmp_path / "ckpt")
    data, pred = tmp_path / "test.h5ad", tmp_path / "pred.h5ad"
    test = split.test[::2].copy()
    test.write_h5ad(data)
    assert main(["--quiet", "predict", "--model", str(tmp_path / "ckpt"), "--data", str(data),
                 "--out", str(pred), "--batch-size", "32"]) == 0
    assert "Unassigned" in capsys.readouterr().out
    res = ad.read_h5ad(pred)
    expected = split.model.predict(test, inplace=False)
    assert (res.obs["canal"].astype(str) == expected["canal"].astype(str)).all()
    assert res.obsm["X_canal"].shape == (test.n_obs, split.model.net.config.rep_dim)
    assert res.uns["canal"]["params"]["batch_size"] == 32

    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--truth", "cell_type", "--novel-types", NOVEL,
                 "--out", str(out), "--umap-cells", "0"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    direct = metrics.novel_scores(test.obs["cell_type"], expected["canal"],
                                  novel_types=NOVEL)
    assert report["metrics"]["h_score"] == pytest.approx(direct["h_score"])
    assert report["params"]["novelty"] == "calibrated"
    assert {p.name for p in out.iterdir()} == {"metrics.json", "confusion.png", "novelty.png",
                                               "novelty_tradeoff.png", "report.html"}
    # closed-set accuracy: the best known type of every cell of a known type
    truth = test.obs["cell_type"].astype(str).to_numpy()
    known = truth != NOVEL
    closed = res.obs["canal_closed"].astype(str).to_numpy()
    assert report["metrics"]["closed_accuracy"] == pytest.approx((closed == truth)[known].mean())
    # never-trained true types are pointed at --novel-types when not given
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(pred), "--truth", "cell_type", "--out",
                 str(tmp_path / "eval2"), "--umap-cells", "0"]) == 0
    assert "--novel-types alpha" in capsys.readouterr().err
    # the input file is never overwritten
    assert main(["predict", "--model", str(tmp_path / "ckpt"), "--data", str(data), "--out",
                 str(data)]) == 2
