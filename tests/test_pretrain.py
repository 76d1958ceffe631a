"""Masked-expression pre-training on real cells: learning, masking, resume, gene embeddings,
the shipped weights and the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from canal import Annotator, ModelConfig, io, pp
from canal.cli import main
from canal.model import DEFAULT_WEIGHTS
from canal.pretrain import (
    PretrainConfig,
    corpus_gene_embedding,
    mask_tokens,
    read_gene_embedding,
)
from canal.train import StageConfig
from tests.conftest import TINY

SMALL = ModelConfig(dim=32, depth=2, heads=2, dim_head=8, head_hidden=32, rep_dim=16, seed=0)


@pytest.fixture(scope="module")
def corpus(baron):
    """Baron human donors 1-3 (the unseen donor human4 stays out, as in the shipped corpus)."""
    return baron[baron.obs["batch"].astype(str) != "human4"].copy()


def test_pretraining_learns_beyond_majority_bin(corpus, panel):
    model = Annotator.create(corpus, genes=panel, config=SMALL, gene_embedding="corpus")
    before = copy.deepcopy(model.net.state_dict())
    rec = model.pretrain(corpus, config=PretrainConfig(epochs=4, lr=3e-3, warmup_steps=10,
                                                       eval_every=100, seed=0))
    val = rec["history"]["val"]
    first, last = val[0], val[-1]
    assert first["step"] == 0 and last["step"] == rec["step"] == rec["total_steps"]
    # the masked-token loss falls and held-out accuracy beats always guessing the commonest bin
    assert last["val_loss"] < 0.6 * first["val_loss"]
    assert last["val_accuracy"] > last["val_baseline_accuracy"] + 0.03
    train = [h["loss"] for h in rec["history"]["train"]]
    assert train[-1] < train[0]
    # the encoder changed, the classification head (not used) did not
    after = model.net.state_dict()
    assert not torch.equal(before["performer.net.layers.0.0.fn.to_q.weight"],
                           after["performer.net.layers.0.0.fn.to_q.weight"])
    assert torch.equal(before["head.fc1.weight"], after["head.fc1.weight"])
    assert model.meta["pretrain"]["n_cells"] == corpus.n_obs
    assert rec["cells_per_second"] > 0


def test_mask_tokens_shares_and_determinism(baron, panel):
    tokens = pp.bin_tokens(pp.prepare(baron[:300], panel))
    n_genes = tokens.shape[1] - 1
    for mode in ("all", "expressed", "balanced"):
        cfg = PretrainConfig(mask_on=mode, mask_prob=0.15, replace_prob=0.8,
                             random_token_prob=0.1)
        a_in, a_hid = mask_tokens(tokens, cfg, generator=torch.Generator().manual_seed(1))
        b_in, b_hid = mask_tokens(tokens, cfg, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a_in, b_in) and torch.equal(a_hid, b_hid)
        assert not a_hid[:, -1].any(), "the extra per-cell token is never hidden"
        assert a_hid.any(1).all(), "every cell has a hidden token"
        assert torch.equal(a_in[~a_hid], tokens[~a_hid]), "visible tokens are untouched"
        share_masked = (a_in[a_hid] == pp.MASK_TOKEN).float().mean()
        assert 0.7 < share_masked < 0.9
        expressed = tokens[:, :-1] >= 1
        hid = a_hid[:, :-1]
        if mode == "all":
            assert abs(hid.float().mean() - 0.15) < 0.01
        elif mode == "expressed":
            assert not (hid & ~expressed).any()
            assert abs(hid[expressed].float().mean() - 0.15) < 0.02
        else:
            n_expr, n_zero = int((hid & expressed).sum()), int((hid & ~expressed).sum())
            assert 0.8 < n_zero / n_expr < 1.25
    assert n_genes == len(panel)


def _small_run(tmp_path, baron, panel, name):
    cells = baron[:240].copy()
    model = Annotator.from_genes(panel[:120], config=TINY)
    cfg = PretrainConfig(epochs=2, batch_size=32, lr=3e-3, warmup_steps=2, checkpoint_every=3,
                         eval_every=4, val_fraction=0.1, seed=3)
    return model, cells, cfg, tmp_path / name


def test_resume_equals_uninterrupted_run(tmp_path, baron, panel, monkeypatch):
    model, cells, cfg, full_dir = _small_run(tmp_path, baron, panel, "full")
    full = model.pretrain(cells, config=cfg, out=full_dir)
    assert full["done"] and not (full_dir / io.OPTIMIZER).exists()

    killed, cells, cfg, part_dir = _small_run(tmp_path, baron, panel, "part")
    real_save = Annotator.save
    calls = {"n": 0}

    def save_then_die(self, path, **kw):
        out = real_save(self, path, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed midway")
        return out

    monkeypatch.setattr(Annotator, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        killed.pretrain(cells, config=cfg, out=part_dir)
    monkeypatch.setattr(Annotator, "save", real_save)
    meta = io.read_meta(part_dir)
    assert meta["pretrain"]["step"] == 6 and not meta["pretrain"]["done"]
    assert (part_dir / io.OPTIMIZER).exists()

    resumed, cells, cfg, _ = _small_run(tmp_path, baron, panel, "part")
    rec = resumed.pretrain(cells, config=cfg, out=part_dir)
    assert rec["step"] == full["step"] and rec["done"]
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    assert rec["history"]["val"][-1]["val_loss"] == full["history"]["val"][-1]["val_loss"]
    # the finished run is loaded, not redone; another config is refused
    again, cells, cfg, _ = _small_run(tmp_path, baron, panel, "part")
    assert again.pretrain(cells, config=cfg, out=part_dir)["step"] == full["step"]
    with pytest.raises(ValueError, match="another config"):
        again.pretrain(cells, config=PretrainConfig(epochs=1), out=part_dir)


def test_corpus_gene_embedding_reflects_coexpression(corpus, panel):
    X = pp.prepare(corpus, panel)
    emb = corpus_gene_embedding(X, 32, seed=0)
    assert emb.shape == (len(panel), 32) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, corpus_gene_embedding(X, 32, seed=0))
    dense = X.toarray()
    corr = np.corrcoef(dense.T)
    np.fill_diagonal(corr, np.nan)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = unit @ unit.T
    live = np.isfinite(corr)
    top = live & (corr > np.nanquantile(corr, 0.99))
    low = live & (np.abs(corr) < np.nanquantile(np.abs(corr), 0.5))
    assert cos[top].mean() > cos[low].mean() + 0.3
    i, j = panel.index("INS"), panel.index("IAPP")  # beta-cell genes, strongly co-expressed
    assert cos[i, j] > 0.5
    model = Annotator.create(corpus, genes=panel, config=SMALL, gene_embedding="corpus")
    np.testing.assert_allclose(model.net.pos_emb.emb.weight[:len(panel)].detach().numpy(),
                               corpus_gene_embedding(pp.prepare(corpus, panel), SMALL.dim))


def test_read_gene2vec_file(tmp_path, panel):
    rng = np.random.default_rng(0)
    known = panel[:150]
    vecs = rng.normal(size=(150, 24)).astype(np.float32)
    path = tmp_path / "gene2vec.txt"
    with open(path, "w") as fh:
        fh.write("151 24\n")
        for g, v in zip(known, vecs, strict=True):
            fh.write(g + "\t" + " ".join(f"{x:.6f}" for x in v) + "\n")
        fh.write("NOT_IN_PANEL " + " ".join(["0.5"] * 24) + "\n")
    emb = read_gene_embedding(path, panel, dim=24)
    assert emb.shape == (len(panel), 24)
    scale = vecs.std()
    np.testing.assert_allclose(emb[:150], vecs / scale, rtol=1e-4, atol=1e-5)
    assert np.abs(emb[150:]).max() < 1.0  # missing genes: small random vectors
    reduced = read_gene_embedding(path, panel, dim=8)
    assert reduced.shape == (len(panel), 8)
    with pytest.raises(ValueError, match="ModelConfig"):
        read_gene_embedding(path, panel, dim=64)
    bad = tmp_path / "bad.txt"
    bad.write_text("INS 0.1 0.2\nGCG 0.1\n")
    with pytest.raises(ValueError, match="malformed"):
        read_gene_embedding(bad, panel)
    model = Annotator.from_genes(panel, config=TINY.replace(dim=24), gene_embedding=path)
    np.testing.assert_allclose(model.net.pos_emb.emb.weight[:150].detach().numpy(),
                               vecs / scale, rtol=1e-4, atol=1e-5)


def test_shipped_weights_load_and_fine_tune(baron):
    meta = json.loads((DEFAULT_WEIGHTS / io.CONFIG).read_text())
    assert meta["pretrain"]["done"] and meta["stage"] == 0 and meta["cell_types"] == []
    assert not (DEFAULT_WEIGHTS / io.OPTIMIZER).exists()
    card = (DEFAULT_WEIGHTS / "MODEL_CARD.md").read_text()
    assert "canal pretrain" in card
    model = Annotator.from_pretrained()
    assert model.net.config == ModelConfig.from_dict(meta["model_config"])
    assert model.stage == 0 and len(model.genes) == model.net.config.n_genes
    final = meta["pretrain"]["final"]
    assert final["val_accuracy"] > final["val_baseline_accuracy"]
    cells = baron[baron.obs["batch"].astype(str) == "human1"]
    cells = cells[cells.obs["cell_type"].isin(["alpha", "beta", "ductal"])].copy()
    model.fit_stage(cells, config=StageConfig(epochs=3, lr=2e-3, warmup_epochs=0.5, seed=0))
    assert model.stage == 1 and model.cell_types == ["alpha", "beta", "ductal"]
    out = model.predict(cells, novelty="none", inplace=False)
    assert (out["canal"].astype(str) == cells.obs["cell_type"].astype(str)).mean() > 0.8


def test_cli_pretrain_and_resume_message(tmp_path, data_root, capsys):
    src = data_root / "pancreas" / "segerstolpe_lawlor.h5ad"
    out = tmp_path / "pt"
    args = ["--quiet", "pretrain", "--data", str(src), "--out", str(out), "--n-genes", "100",
            "--max-steps", "3", "--batch-size", "16", "--eval-every", "2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "3 steps" in text and "majority bin" in text
    meta = io.read_meta(out)
    assert meta["pretrain"]["corpus"] == [{"name": "segerstolpe_lawlor", "n_cells": 593}]
    assert len(meta["genes"]) == 100
    assert main(args) == 0  # finished: loaded, not redone
    assert "3 steps" in capsys.readouterr().out
    assert main(["pretrain", "--out", str(out)]) == 2
    assert "--data" in capsys.readouterr().err
