from __future__ import annotations

import numpy as np
import pytest
import torch

from canal import Annotator
from canal.cli import main
from canal.continual import ExampleBank
from canal.continual.bank import prototype_distance, quotas
from canal.train import StageConfig
from tests.conftest import TINY

FAST = StageConfig(epochs=8, batch_size=32, lr=3e-3, patience=10, bank_size=60, seed=0)


@pytest.fixture(scope="module")
def donors(baron):
    keep = baron.obs["cell_type"].isin(["alpha", "beta", "ductal", "acinar", "delta"])
    b = baron[keep.to_numpy()]
    return {d: b[(b.obs["batch"] == d).to_numpy()] for d in ["human1", "human2", "human3", "human4"]}


def _acc_on(model, adata, types):
    sub = adata[adata.obs["cell_type"].isin(types).to_numpy()]
    _, logits = model.outputs(model.prepare(sub))
    pred = np.asarray(model.cell_types)[logits.argmax(1).numpy()]
    return float((pred == sub.obs["cell_type"].to_numpy()).mean())


def test_quotas_balanced_within_one():
    q = quotas({"a": 400, "b": 400, "c": 400}, 1000)
    assert sum(q.values()) == 1000 and max(q.values()) - min(q.values()) <= 1
    q = quotas({"a": 5, "b": 400, "c": 400, "d": 0}, 100)  # small types keep all, rest share
    assert q == {"a": 5, "b": 48, "c": 47, "d": 0}
    assert quotas({"a": 7, "b": 9}, None) == {"a": 7, "b": 9}


def test_bank_holds_best_ranked_cells_and_round_trips(tiny_model, donors):
    data = tiny_model.prepare(donors["human1"])
    labels = donors["human1"].obs["cell_type"].astype(str).to_numpy()
    rep, _ = tiny_model.outputs(data)
    library = sorted(set(labels))
    for proto in ("classifier", "mean"):
        weight = torch.randn(len(library), rep.shape[1], generator=torch.Generator().manual_seed(0))
        bank = ExampleBank(50, prototype=proto)
        bank.update(data, labels, rep, library=library, classifier_weight=weight,
                    stage=np.ones(len(labels), int), cell_names=donors["human1"].obs_names)
        counts = bank.counts()
        assert len(bank) == 50 and max(counts.values()) - min(counts.values()) <= 1
        for i, t in enumerate(library):
            ix = np.flatnonzero(labels == t)
            p = weight[i] if proto == "classifier" else rep[ix].mean(0)
            dist = prototype_distance(rep[ix], p).numpy()
            best = set(donors["human1"].obs_names[ix[np.argsort(dist, kind="stable")[:counts[t]]]])
            kept = bank.obs[bank.obs["cell_type"] == t]
            assert set(kept["cell"]) == best
            assert kept["rank"].tolist() == list(range(counts[t]))
    back = ExampleBank.from_anndata(bank.to_anndata(tiny_model.genes))
    assert back.obs.equals(bank.obs) and (back.X != bank.X).nnz == 0


def test_stages_grow_head_keep_old_types_and_distill(tiny_model, donors, tmp_path):
    model = tiny_model
    s1 = donors["human1"][donors["human1"].obs["cell_type"].isin(["alpha", "beta", "ductal"])]
    model.fit_stage(s1, config=FAST)
    assert model.cell_types == ["alpha", "beta", "ductal"] and model.stage == 1
    h1 = model.history[-1]
    assert all(d == 0 for d in h1["distill_loss"])  # no teacher at stage 1
    w_before = model.net.head.classifier.weight.detach().clone()
    bank1 = ExampleBank.from_anndata(model.bank).counts()
    s2 = donors["human2"][donors["human2"].obs["cell_type"].isin(["beta", "delta", "acinar"])]
    path = model.save(tmp_path / "s1")
    model.fit_stage(s2, config=FAST)
    assert model.cell_types == ["alpha", "beta", "ductal", "acinar", "delta"]
    assert model.net.head.n_classes == 5
    h2 = model.history[-1]
    assert all(d > 0 for d in h2["distill_loss"]) and h2["n_replayed"] > 0
    assert h2["cached_layers"] == TINY.depth - 2
    # the bank covers every type, is class-balanced within one cell and never exceeds L
    bank = ExampleBank.from_anndata(model.bank)
    counts = bank.counts()
    assert set(counts) == set(model.cell_types)
    candidates = s2.obs["cell_type"].value_counts().to_dict()
    candidates = {t: candidates.get(t, 0) + bank1.get(t, 0) for t in counts}
    balanced = [c for t, c in counts.items() if c < candidates[t]]  # not short of cells
    assert len(bank) == FAST.bank_size and max(balanced) - min(balanced) <= 1
    assert all(counts[t] == candidates[t] for t in counts if counts[t] < min(balanced))
    # types absent from stage 2 are still predicted on unseen donors
    assert _acc_on(model, donors["human4"], ["alpha", "ductal"]) > 0.5
    assert not torch.equal(w_before, model.net.head.classifier.weight[:3])
    # the bank and calibration survive save/load
    again = Annotator.from_pretrained(model.save(tmp_path / "s2"))
    assert ExampleBank.from_anndata(again.bank).obs.equals(bank.obs)
    assert again.meta["novelty"] == model.meta["novelty"]
    # resume: re-running stage 2 from the stage-1 checkpoint gives the same model
    rerun = Annotator.from_pretrained(path).fit_stage(s2, config=FAST)
    for (k, v), w in zip(rerun.net.state_dict().items(), model.net.state_dict().values(),
                         strict=True):
        assert torch.equal(v, w), k


def test_naive_forgets_more_than_canal(panel, donors):
    s1 = donors["human1"]
    s2 = donors["human3"][donors["human3"].obs["cell_type"].isin(["beta", "delta"])]
    test = donors["human4"]
    old = ["alpha", "ductal", "acinar"]
    accs = {}
    for strategy in ("naive", "canal"):
        model = Annotator.from_genes(panel, config=TINY)
        cfg = StageConfig(**(FAST.to_dict() | {"strategy": strategy, "bank_size": 200}))
        model.fit_stage(s1, config=cfg)
        before = _acc_on(model, test, old)
        model.fit_stage(s2, config=cfg)
        accs[strategy] = (before, _acc_on(model, test, old))
    naive_drop = accs["naive"][0] - accs["naive"][1]
    canal_drop = accs["canal"][0] - accs["canal"][1]
    assert accs["canal"][0] > 0.6, accs
    assert naive_drop > canal_drop + 0.2, accs


def test_joint_keeps_every_cell(tiny_model, donors):
    cfg = StageConfig(**(FAST.to_dict() | {"strategy": "joint", "epochs": 1}))
    tiny_model.fit_stage(donors["human1"], config=cfg)
    assert tiny_model.bank.n_obs == donors["human1"].n_obs
    tiny_model.fit_stage(donors["human2"], config=cfg)
    assert tiny_model.bank.n_obs == donors["human1"].n_obs + donors["human2"].n_obs


def test_bad_labels(tiny_model, donors):
    a = donors["human1"].copy()
    with pytest.raises(KeyError, match="labels_key"):
        tiny_model.fit_stage(a, labels_key="nope", config=FAST)
    a.obs["cell_type"] = a.obs["cell_type"].astype(object)
    a.obs.iloc[3, a.obs.columns.get_loc("cell_type")] = np.nan
    with pytest.raises(ValueError, match="missing label"):
        tiny_model.fit_stage(a, config=FAST)
    assert tiny_model.stage == 0 and tiny_model.cell_types == []


def test_cli_fits_the_three_pancreas_stages(tmp_path, data_root, panel):
    start = Annotator.from_genes(panel, config=TINY).save(tmp_path / "s0")
    src = str(data_root / "pancreas" / "baron_human.h5ad")
    six = "acinar,alpha,beta,delta,ductal,gamma"
    stages = [["--where", "batch=human1", "--types", six],
              ["--where", "batch=human2", "--types", six],
              ["--where", "batch=human3", "--min-cells", "10"]]
    prev = start
    for i, extra in enumerate(stages, 1):
        out = tmp_path / f"s{i}"
        assert main(["--quiet", "fit", "--data", src, "--from", str(prev), "--out", str(out),
                     "--epochs", "1", "--bank-size", "90", *extra]) == 0
        prev = out
    model = Annotator.from_pretrained(prev)
    assert model.stage == 3
    assert {"activated_stellate", "endothelial", "quiescent_stellate"} <= set(model.cell_types)
    assert "mast" not in model.cell_types  # < 10 cells in human3
    assert len(model.history) == 3


def test_failed_stage_leaves_the_model_exactly_as_it_was(tiny_model, donors):
    before = {k: v.clone() for k, v in tiny_model.net.state_dict().items()}
    with pytest.raises(ValueError, match="learning rate"):
        tiny_model.fit_stage(donors["human1"], config=FAST.replace(lr=float("nan")))
    assert tiny_model.stage == 0 and tiny_model.cell_types == [] and tiny_model.bank is None
    after = tiny_model.net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    tiny_model.fit_stage(donors["human1"], config=FAST.replace(epochs=1))
    assert tiny_model.history[-1]["new_types"] == sorted(set(donors["human1"].obs["cell_type"]))


def test_unassigned_training_label_is_refused(tiny_model, donors):
    cells = donors["human1"].copy()
    cells.obs["cell_type"] = cells.obs["cell_type"].astype(str)
    cells.obs.iloc[:3, cells.obs.columns.get_loc("cell_type")] = "Unassigned"
    with pytest.raises(ValueError, match="Unassigned"):
        tiny_model.fit_stage(cells, config=FAST)
    assert tiny_model.stage == 0


def test_replay_refused_when_the_bank_file_is_missing(tiny_model, donors, tmp_path):
    from canal import io

    tiny_model.fit_stage(donors["human1"], config=FAST.replace(epochs=1))
    tiny_model.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / io.BANK).unlink()
    model = Annotator.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(io.CheckpointError, match="bank.h5ad is missing"):
        model.fit_stage(donors["human2"], config=FAST.replace(epochs=1))
    assert model.stage == 1
    model.fit_stage(donors["human2"], config=FAST.replace(epochs=1, strategy="distill"))
    assert model.stage == 2
