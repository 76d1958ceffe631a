"""The task panel: a first stage chooses the model's genes from its own data (highly variable
genes, a list, or the pre-trained panel); gene vectors come from the vocabulary, genes outside
it from co-expression; later stages keep the panel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from canal import Annotator, StageConfig, pp
from canal.cli import main
from canal.model import DEFAULT_WEIGHTS
from tests.conftest import TINY

TYPES = ["alpha", "beta", "delta", "ductal", "endothelial"]
ORTHOLOGS = {"orthologs": True}
FAST = StageConfig(epochs=8, lr=3e-3, patience=10, bank_size=100, seed=0)


@pytest.fixture(scope="module")
def shipped_genes() -> list[str]:
    return json.loads((DEFAULT_WEIGHTS / "config.json").read_text())["genes"]


@pytest.fixture(scope="module")
def mouse(baron_mouse):
    """Baron mouse, five common types: 500 cells of mouse1 train, 400 of mouse2 (another
    animal) test."""
    keep = baron_mouse[baron_mouse.obs["cell_type"].astype(str).isin(TYPES)]
    train = keep[keep.obs["batch"].astype(str) == "mouse1"]
    test = keep[keep.obs["batch"].astype(str) == "mouse2"]
    rng = np.random.default_rng(0)
    return (train[np.sort(rng.choice(train.n_obs, 500, replace=False))].copy(),
            test[np.sort(rng.choice(test.n_obs, 400, replace=False))].copy())


@pytest.fixture
def on_shipped_panel(shipped_genes) -> Annotator:
    """A tiny model on the shipped 1,000-gene panel, no vocabulary (as the shipped weights)."""
    return Annotator.from_genes(shipped_genes, config=TINY)


def _rows_equal(model: Annotator, vocab_genes: list[str], vocab_emb: torch.Tensor) -> int:
    lookup = {g.upper(): i for i, g in enumerate(vocab_genes)}
    emb = model.net.pos_emb.emb.weight.detach()
    n = 0
    for i, g in enumerate(model.genes):
        if g.upper() in lookup:
            assert torch.equal(emb[i], vocab_emb[lookup[g.upper()]]), g
            n += 1
    return n


def test_hvg_panel_from_mouse_data_trains_predicts_and_round_trips(on_shipped_panel, mouse,
                                                                   shipped_genes, tmp_path):
    train, test = mouse
    model = on_shipped_panel
    vocab_genes, vocab_emb = model.vocabulary_embedding()
    assert vocab_genes == shipped_genes  # no vocabulary: the panel is the vocabulary
    extra = model.net.pos_emb.emb.weight[-1].detach().clone()
    model.fit_stage(train, config=FAST.replace(n_panel=300), match=ORTHOLOGS, panel="hvg")

    # the panel is the data's own highly variable genes, in human symbols, mostly new
    expected = pp.highly_variable_panel(train, n_genes=300, match=pp.GeneMatch(orthologs=True))
    assert model.genes == expected and len(model.genes) == 300
    in_shipped = np.mean([g in set(shipped_genes) for g in model.genes])
    assert in_shipped < 0.35
    assert "INS1" not in model.genes and "Ins1" not in model.genes  # translated or human-named
    # vocabulary genes keep their vectors (the encoder's layers are frozen in CANAL's stages);
    # the others start from co-expression at the vocabulary's median norm
    n_known = _rows_equal(model, vocab_genes, vocab_emb)
    rec = model.meta["panel"]
    assert rec["source"] == "hvg" and rec["n_from_vocabulary"] == n_known > 0
    assert rec["n_coexpression"] == 300 - n_known and rec["vocabulary_size"] == 1000
    lookup = {g.upper() for g in vocab_genes}
    new = [i for i, g in enumerate(model.genes) if g.upper() not in lookup]
    norms = model.net.pos_emb.emb.weight[new].detach().norm(dim=1)
    assert torch.allclose(norms, vocab_emb.norm(dim=1).median().expand_as(norms), rtol=1e-4)
    assert torch.equal(model.net.pos_emb.emb.weight[-1].detach(), extra)  # the extra token
    assert model.net.head.fc1.in_features == 301 and model.net.config.n_genes == 300
    assert model.bank.X.shape[1] == 300

    # it learnt the types: held-out cells of another mouse, well above chance
    # (a tiny random encoder; chance 0.2 balanced)
    pred = model.predict(test, novelty="none", inplace=False)
    truth, called = (test.obs["cell_type"].astype(str).to_numpy(),
                     pred["canal"].astype(str).to_numpy())
    majority = test.obs["cell_type"].value_counts(normalize=True).max()
    balanced = np.mean([np.mean(called[truth == t] == t) for t in TYPES])
    assert np.mean(called == truth) > majority and balanced > 0.45, balanced

    # save -> load keeps the panel, its record and the predictions
    model.save(tmp_path / "m")
    back = Annotator.from_pretrained(tmp_path / "m")
    assert back.genes == model.genes and back.meta["panel"] == rec
    back.predict(test, novelty="none")
    assert (test.obs["canal"] == pred["canal"]).all()
    assert test.uns["canal"]["params"]["panel"] == "hvg"

    # a later stage keeps the panel; panel= there is refused and leaves the model as it was
    before = back.net.state_dict()["head.fc1.weight"].clone()
    with pytest.raises(ValueError, match="chosen at the first stage"):
        back.fit_stage(train, config=FAST, match=ORTHOLOGS, panel="hvg")
    assert back.stage == 1 and back.genes == model.genes
    assert torch.equal(back.net.state_dict()["head.fc1.weight"], before)


def test_panel_list_pretrained_and_default(tiny_model, baron, panel):
    stage = baron[(baron.obs["batch"].astype(str) == "human1")
                  & baron.obs["cell_type"].astype(str).isin(["alpha", "beta", "ductal"])].copy()
    vocab_genes, vocab_emb = tiny_model.vocabulary_embedding()
    # a list: half from the model's vocabulary, half not in it
    others = [g for g in pp.highly_variable_panel(stage, n_genes=400) if g not in set(panel)]
    genes = panel[:60] + others[:60]
    m = Annotator.from_genes(panel, config=TINY)
    m.fit_stage(stage, config=FAST.replace(epochs=1), panel=genes)
    assert m.genes == genes and m.meta["panel"]["source"] == "list"
    assert _rows_equal(m, vocab_genes, vocab_emb) == 60
    assert m.meta["panel"]["n_coexpression"] == 60

    # "pretrained" and the default (no vocabulary) keep the panel and the network exactly
    for choice in ("pretrained", None):
        m = Annotator.from_genes(panel, config=TINY)
        net = m.net
        state = {k: v.clone() for k, v in net.state_dict().items()}
        m.fit_stage(stage, config=FAST.replace(epochs=1, trainable="head"), panel=choice)
        assert m.genes == panel and m.net is net and m.meta["panel"]["source"] == "pretrained"
        assert torch.equal(net.pos_emb.emb.weight, state["pos_emb.emb.weight"])

    m = Annotator.from_genes(panel, config=TINY)
    for bad, msg in ((["INS", "INS"], "twice"), ([], "empty"), ("variable", "must be")):
        with pytest.raises(ValueError, match=msg):
            m.fit_stage(stage, config=FAST, panel=bad)
    assert m.stage == 0 and m.genes == panel and "panel" not in m.meta


def test_cli_fit_panel_file_and_hvg(tmp_path, data_root, panel, capsys):
    src = data_root / "pancreas" / "baron_human.h5ad"
    init = tmp_path / "init"
    Annotator.from_genes(panel, config=TINY).save(init)
    wanted = list(dict.fromkeys(["INS", "GCG", "SST", "KRT19", "PRSS1", *panel[:95]]))
    genes = tmp_path / "genes.txt"
    genes.write_text("# my panel\n" + "\n".join(wanted) + "\n")
    out = tmp_path / "fit"
    common = ["--where", "batch=human1", "--types", "alpha,beta,ductal", "--epochs", "1",
              "--quiet"]
    assert main(["fit", "--data", str(src), "--from", str(init), "--out", str(out), "--panel",
                 str(genes), *common]) == 0
    model = Annotator.from_pretrained(out)
    assert model.genes == wanted and model.meta["panel"]["source"] == "list"
    out2 = tmp_path / "fit2"
    assert main(["fit", "--data", str(src), "--from", str(init), "--out", str(out2), "--panel",
                 "hvg", "--n-panel", "150", *common]) == 0
    capsys.readouterr()
    assert main(["info", str(out2)]) == 0
    info = capsys.readouterr().out
    assert "panel chosen at stage 1: hvg, 150 genes" in info
    # a later stage refuses --panel with the fix in the message
    assert main(["fit", "--data", str(src), "--from", str(out2), "--out", str(tmp_path / "s2"),
                 "--panel", "hvg", *common]) == 2
    assert "drop panel=" in capsys.readouterr().err


def test_shipped_weights_fine_tune_on_a_panel_of_mouse_hvgs(mouse, shipped_genes):
    """The done-when of issue 16 with the shipped weights (a short stage, to stay fast)."""
    train, test = mouse
    rng = np.random.default_rng(0)
    train = train[np.sort(rng.choice(train.n_obs, 400, replace=False))].copy()
    test = test[np.sort(rng.choice(test.n_obs, 200, replace=False))].copy()
    model = Annotator.from_pretrained()
    vocab_genes, vocab_emb = model.vocabulary_embedding()
    model.fit_stage(train, config=StageConfig(epochs=3, patience=10, seed=0, n_panel=500),
                    match=ORTHOLOGS, panel="hvg")
    assert np.mean([g in set(shipped_genes) for g in model.genes]) < 0.35
    assert _rows_equal(model, vocab_genes, vocab_emb) == model.meta["panel"]["n_from_vocabulary"]
    pred = model.predict(test, novelty="none", inplace=False)
    acc = float(np.mean(pred["canal"].astype(str).to_numpy()
                        == test.obs["cell_type"].astype(str).to_numpy()))
    majority = test.obs["cell_type"].value_counts(normalize=True).max()
    assert acc > majority + 0.1, acc
