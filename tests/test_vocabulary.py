"""The gene vocabulary: pre-training over varying gene sets drawn from the corpus' genes, and
the checkpoints written before it (their vocabulary is their panel)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch

from canal import Annotator, ModelConfig, StageConfig, io
from canal.cli import main
from canal.data import CellData, concat
from canal.model import VOCABULARY_WEIGHTS
from canal.nn import CanalNet
from canal.pretrain import GeneSetSampler, PretrainConfig
from tests.conftest import TINY


@pytest.fixture(scope="module")
def two_files(baron, data_root):
    """300 Baron human cells (20,125 genes) and 300 Kang PBMCs (1,287 genes)."""
    kang = ad.read_h5ad(data_root / "immune" / "kang_ctrl_8donors.h5ad")
    rng = np.random.default_rng(0)
    human = baron[np.sort(rng.choice(baron.n_obs, 300, replace=False))].copy()
    kang = kang[np.sort(rng.choice(kang.n_obs, 300, replace=False))].copy()
    return human, kang


def _expressed(adata) -> set[str]:
    return set(adata.var_names[np.asarray((adata.X > 0).sum(axis=0)).ravel() > 0])


def test_pretraining_over_a_vocabulary_of_two_files(two_files, tmp_path, capsys):
    human, kang = two_files
    model = Annotator.create([human, kang], n_genes=100, config=TINY, gene_embedding="corpus",
                             combine="interleave", vocabulary=True)
    vocab = model.vocabulary
    # the vocabulary covers both files' genes, including each one's own
    assert _expressed(human) | _expressed(kang) <= set(vocab)
    only_kang = _expressed(kang) - set(human.var_names)
    only_human = _expressed(human) - set(kang.var_names)
    assert only_kang and only_human and set(model.genes) <= set(vocab)
    assert model.net.vocab.weight.shape == (len(vocab), TINY.dim)
    where = {g: i for i, g in enumerate(vocab)}
    rows = [where[g] for g in model.genes]
    assert torch.equal(model.net.pos_emb.emb.weight[:100], model.net.vocab.weight[rows])

    # each cell's panel is drawn from the genes its file measures, anew for every batch
    data = concat([CellData.from_adata(a, vocab, match=model.match.replace(min_overlap=0,
                                                                       warn_overlap=0))
                   for a in (human, kang)])
    sampler = GeneSetSampler(data, 100)
    idx = np.r_[0:8, 300:308]  # 8 cells of each file
    t1, p1, g1 = sampler.draw(idx, torch.Generator().manual_seed(1))
    _t2, _p2, g2 = sampler.draw(idx, torch.Generator().manual_seed(2))
    assert p1 is None and g1.shape == (16, 100) and t1.shape == (16, 101)
    assert not torch.equal(g1, g2)  # batches' panels vary
    assert set(g1[0].tolist()) != set(g1[8].tolist())  # files read different panels
    measured = data.measured_rows(idx)
    assert all(measured[r, g1[r].numpy()].all() for r in range(16))
    dense = data.X[idx].toarray()
    expect = np.floor(np.clip(np.take_along_axis(dense, g1.numpy(), axis=1), 0, 5))
    assert np.array_equal(t1[:, :-1].numpy(), expect)
    # weighted toward variable genes: the drawn genes vary more than the file's average gene
    # (Kang's 1,287 genes are already a variable subset, hence the smaller margin there)
    for cells, margin in ((slice(0, 8), 2.0), (slice(8, 16), 1.1)):
        var = data.X[300:].toarray().var(axis=0) if cells.start else \
            data.X[:300].toarray().var(axis=0)
        assert var[g1[cells].numpy().ravel()].mean() > margin * var[measured[cells][0]].mean()

    before = model.net.vocab.weight.detach().clone()
    out = tmp_path / "pre"
    cfg = PretrainConfig(max_steps=30, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=15,
                         checkpoint_every=15, seed=0)
    rec = model.pretrain([human, kang], config=cfg, out=out, names=["baron", "kang"])
    val = rec["history"]["val"]
    assert rec["vocabulary_size"] == len(vocab) and rec["step"] == 30
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    changed = (model.net.vocab.weight.detach() - before).abs().sum(1) > 0
    assert changed.sum() > 300  # many more genes than one panel's 100 were trained
    assert torch.equal(model.net.pos_emb.emb.weight[:100], model.net.vocab.weight[rows])

    # stored with the weights: the state dict holds the embeddings, config.json the genes
    meta = json.loads((out / io.CONFIG).read_text())
    assert meta["vocabulary"] == vocab and meta["model_config"]["n_vocab"] == len(vocab)
    back = Annotator.from_pretrained(out)
    assert back.vocabulary == vocab
    assert torch.equal(back.net.vocab.weight, model.net.vocab.weight)
    assert main(["info", str(out)]) == 0
    assert f"gene vocabulary: {len(vocab)} genes" in capsys.readouterr().out

    # fine-tuning from it chooses the stage's own panel by default, vectors from the vocabulary
    stage = human[human.obs["cell_type"].astype(str).isin(["alpha", "beta", "ductal"])].copy()
    vocab_emb = back.net.vocab.weight.detach().clone()
    back.fit_stage(stage, config=StageConfig(epochs=1, n_panel=120, bank_size=30, seed=0))
    assert back.meta["panel"]["source"] == "hvg" and len(back.genes) == 120
    assert back.vocabulary is None and back.net.vocab is None  # a task model keeps its panel
    assert back.meta["panel"]["n_from_vocabulary"] == 120
    for i, g in enumerate(back.genes):
        assert torch.equal(back.net.pos_emb.emb.weight[i].detach(), vocab_emb[where[g]])
    back.save(tmp_path / "fine")
    assert Annotator.from_pretrained(tmp_path / "fine").genes == back.genes


def test_the_vocabulary_weights_carry_a_vocabulary():
    # `canal pretrain --vocabulary` on the corpus (issue #16): every corpus gene has a vector
    model = Annotator.from_pretrained(VOCABULARY_WEIGHTS)
    meta = json.loads((VOCABULARY_WEIGHTS / io.CONFIG).read_text())
    assert model.vocabulary is not None and len(model.vocabulary) > 15_000
    assert model.net.config.n_vocab == len(model.vocabulary) == meta["model_config"]["n_vocab"]
    assert set(model.genes) <= set(model.vocabulary)  # its 1,000-gene panel is in it
    for g in ("INS", "GCG", "CD3E", "MS4A1", "CD8A"):  # CD8A was not in the old panel
        assert g in model.vocabulary


def test_checkpoints_without_a_vocabulary_are_unchanged(tmp_path):
    # weights written before the vocabulary (or without one): their vocabulary is their panel
    Annotator.from_genes([f"G{i}" for i in range(TINY.n_genes)], config=TINY).save(tmp_path)
    model = Annotator.from_pretrained(tmp_path)
    assert model.vocabulary is None and model.net.vocab is None
    genes, emb = model.vocabulary_embedding()
    assert genes == model.genes and torch.equal(emb, model.net.pos_emb.emb.weight[:TINY.n_genes])
    meta = json.loads((tmp_path / io.CONFIG).read_text())
    assert model.net.config.to_dict() == meta["model_config"]  # no n_vocab key written
    assert "vocab.weight" not in model.net.state_dict()
    # a vocabulary is created after every other module: the rest initialises as before
    plain, with_vocab = CanalNet(TINY), CanalNet(TINY.replace(n_vocab=50))
    for k, v in plain.state_dict().items():
        assert torch.equal(v, with_vocab.state_dict()[k]), k
    assert ModelConfig.from_dict(TINY.to_dict()).n_vocab == 0
    with pytest.raises(ValueError, match="vocabulary"):
        plain.embed(torch.zeros(1, TINY.seq_len, dtype=torch.long),
                    torch.zeros(TINY.n_genes, dtype=torch.long))
