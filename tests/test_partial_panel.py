"""A gene the data do not measure is unknown, not zero: masks from AnnData to the network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from canal import Annotator, GeneMatch, pp
from canal.data import CellData, concat, panel_dropout
from canal.train import StageConfig, run_stage
from tests.conftest import TINY

FAST = StageConfig(epochs=3, batch_size=32, lr=3e-3, patience=10, bank_size=60, seed=0,
                   trainable="all")


@pytest.fixture(scope="module")
def partial_panel(baron, seger):
    """120 genes Segerstolpe/Lawlor measures and 80 it does not (all measured in Baron)."""
    measured = [g for g in pp.select_panel(baron, n_genes=600) if g in set(seger.var_names)]
    missing = [g for g in pp.select_panel(baron, n_genes=600) if g not in set(seger.var_names)]
    return measured[:120] + missing[:80]


@pytest.fixture(scope="module")
def trained(baron, partial_panel):
    """A tiny model trained one stage on Baron human1 (every panel gene measured)."""
    model = Annotator.from_genes(partial_panel, config=TINY)
    stage = baron[(baron.obs["batch"] == "human1").to_numpy()
                  & baron.obs["cell_type"].isin(["alpha", "beta", "ductal"]).to_numpy()]
    return model.fit_stage(stage, config=FAST)


def _randomise(tokens: torch.Tensor, present: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, pp.N_TOKENS, tokens.shape, generator=gen)
    return torch.where(present, tokens, noise)


def test_cell_data_records_measured_genes(seger, partial_panel):
    data = CellData.from_adata(seger[:30], partial_panel)
    assert data.measured.shape == (1, 200)
    np.testing.assert_array_equal(data.measured[0], np.arange(200) < 120)
    present = data.present(np.arange(4))
    assert present.shape == (4, 201) and present[:, -1].all()  # the extra token is present
    assert not present[:, 120:200].any() and present[:, :120].all()
    # a measured zero stays bin 0 and present; an unmeasured gene is bin 0 but absent
    tokens = data.tokens(np.arange(4))
    zero_measured = (tokens[:, :120] == 0) & present[:, :120]
    assert zero_measured.any()
    # a fully measured dataset carries no mask at all (the fast path)
    full = CellData.from_adata(seger[:30], partial_panel[:120])
    assert full.fully_measured and full.present() is None


def test_logits_ignore_what_unmeasured_positions_hold(trained, seger):
    """Exactness: not-measured genes are absent from the computation, normaliser included."""
    net = trained.net.eval()
    data = trained.prepare(seger[:24])
    batch = data.batch(np.arange(24))
    assert batch.present is not None and not batch.present.all()
    with torch.no_grad():
        ref = net(batch.tokens, present=batch.present)
        # one dataset, one mask: its unmeasured genes are dropped from the sequence; the masked
        # full-length pass (what a batch mixing datasets runs) gives the same result
        masked = net.head(net.norm(net.encode(batch.tokens, present=batch.present)),
                          batch.present)
        torch.testing.assert_close(masked.logits, ref.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(masked.representation, ref.representation, rtol=1e-5,
                                   atol=1e-5)
        for seed in range(3):
            noisy = _randomise(batch.tokens, batch.present, seed)
            assert not torch.equal(noisy, batch.tokens)
            out = net(noisy, present=batch.present)
            torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.representation, ref.representation, rtol=1e-5,
                                       atol=1e-5)
            # resuming from cached layer states keeps the mask's meaning
            prefix = net.encode(noisy, present=batch.present, stop=1)
            resumed = net(hidden=prefix, present=batch.present, start=1)
            torch.testing.assert_close(resumed.logits, ref.logits, rtol=1e-5, atol=1e-5)
        # a change at measured positions does change the result (the test can fail)
        flipped = batch.tokens.clone()
        flipped[:, :120] = torch.where(flipped[:, :120] == 0, 3, 0)
        assert (net(flipped, present=batch.present).logits - ref.logits).abs().max() > 1e-2
        # and without the mask the same noise leaks in: the zero-fill semantics of old
        leak = net(_randomise(batch.tokens, batch.present, 0)).logits
        assert (leak - net(batch.tokens).logits).abs().max() > 1e-3


def test_shipped_weights_ignore_unmeasured_positions(seger):
    model = Annotator.from_pretrained()
    model.net.head.grow(3)
    model.cell_types = ["a", "b", "c"]
    data = model.prepare(seger[:8])
    assert not data.fully_measured
    batch = data.batch(np.arange(8))
    with torch.no_grad():
        ref = model.net.eval()(batch.tokens, present=batch.present).logits
        out = model.net(_randomise(batch.tokens, batch.present, 1), present=batch.present).logits
        # a batch mixing two masks runs the masked full-length pass: same logits per cell
        mixed = batch.present.clone()
        mixed[0, 0] = False
        tokens = batch.tokens.clone()
        alone = model.net(tokens[:1], present=mixed[:1]).logits
        both = model.net(tokens, present=mixed).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:], ref[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)


def test_predict_records_measured_share(trained, seger):
    res = trained.predict(seger[:40].copy(), novelty="none", inplace=False)
    assert len(res) == 40
    ad = seger[:40].copy()
    trained.predict(ad, novelty="none")
    params = ad.uns["canal"]["params"]
    assert params["n_genes_found"] == 120 and params["n_genes"] == 200
    assert params["fraction_genes_measured"] == pytest.approx(0.6)
    # Segerstolpe/Lawlor ships 1,213 genes, which hold about half of a Baron cell's counts:
    # its expression is scaled to a whole transcriptome (counts / total over 1,213 genes
    # would read every gene about twice as high as in the training cells)
    assert 0.35 < params["transcriptome_share"] < 0.65


def test_partial_transcriptome_is_scaled_full_one_is_not(trained, baron, seger, tmp_path):
    from canal.data import CellData

    assert trained.gene_shares is not None and trained.gene_shares.sum() == pytest.approx(1)
    # a full Baron donor: normalized exactly as scanpy's recipe (share 1, nothing scaled)
    donor = baron[(baron.obs["batch"] == "human4").to_numpy()][:50]
    np.testing.assert_allclose(trained.prepare(donor).X.toarray(),
                               CellData.from_adata(donor, trained.genes).X.toarray())
    # the same Baron cells cut to Segerstolpe's 1,213 genes read like the full cells
    cut = donor[:, [g for g in donor.var_names if g in set(seger.var_names)]].copy()
    full = trained.prepare(donor).X.toarray()[:, :120]
    scaled = trained.prepare(cut).X.toarray()[:, :120]
    naive = CellData.from_adata(cut, trained.genes).X.toarray()[:, :120]
    assert np.abs(scaled - full).mean() < 0.5 * np.abs(naive - full).mean()
    # stored with the model
    trained.save(tmp_path / "m")
    back = Annotator.from_pretrained(tmp_path / "m").gene_shares
    np.testing.assert_allclose(back.to_numpy(), trained.gene_shares[back.index].to_numpy(),
                               rtol=1e-5)


def test_stage_lacking_panel_genes_and_bank_mask_survive_save_load(trained, seger, baron,
                                                                   tmp_path):
    model = Annotator.from_pretrained(_save(trained, tmp_path / "s1"))
    cells = seger[seger.obs["cell_type"].isin(["alpha", "beta"]).to_numpy()][:120]
    model.fit_stage(cells, config=FAST)
    bank = model.bank
    from_seger = bank.obs["stage"].to_numpy() == 2
    assert from_seger.any() and (~from_seger).any()
    # Segerstolpe cells in the bank carry their dataset's mask; Baron cells measure everything
    assert not bank.measured[from_seger][:, 120:].any() and bank.measured[from_seger][:, :120].all()
    assert bank.measured[~from_seger].all()
    again = Annotator.from_pretrained(_save(model, tmp_path / "s2"))
    np.testing.assert_array_equal(again.bank.measured, bank.measured)
    replay = again.bank.replay(again.cell_types)
    assert len(replay.measured) == 2  # two groups: fully measured and Segerstolpe's panel
    np.testing.assert_array_equal(replay.measured_rows(), bank.measured)


def _save(model: Annotator, path):
    model.save(path)
    return path


def test_concat_keeps_each_part_mask(seger, baron, partial_panel):
    a = CellData.from_adata(seger[:5], partial_panel)
    b = CellData.from_adata(baron[:7], partial_panel)
    both = concat([a, b])
    rows = both.measured_rows()
    assert rows.shape == (12, 200)
    assert not rows[:5, 120:].any() and rows[5:].all()
    np.testing.assert_array_equal(both.subset(np.array([0, 6])).measured_rows(), rows[[0, 6]])


def test_panel_dropout_hides_measured_genes_only():
    gen = torch.Generator().manual_seed(0)
    base = torch.ones(400, 51, dtype=torch.bool)
    base[:, 10:20] = False  # not measured anyway
    present, changed = panel_dropout(base, 400, 50, rate=0.7, share=0.5, generator=gen)
    assert present[:, -1].all()  # the extra token is never hidden
    assert not present[:, 10:20].any()  # unmeasured stays unmeasured
    hidden = (base & ~present)[:, :50].float().mean(1)
    assert 0.35 < changed.float().mean() < 0.65
    assert (hidden[~changed] == 0).all()
    # rates drawn per cell in [0, 0.7]: mean hidden share of picked cells about 0.35
    assert 0.28 < hidden[changed].sum() / (changed.sum() * 40 / 50) < 0.42
    assert hidden.max() < 0.95
    assert panel_dropout(base, 400, 50, rate=0.0, share=0.5, generator=gen) == (base, None)


def test_panel_dropout_changes_training_deterministically(baron, partial_panel):
    cells = baron[(baron.obs["batch"] == "human2").to_numpy()
                  & baron.obs["cell_type"].isin(["alpha", "beta", "ductal"]).to_numpy()][:150]
    runs = []
    for rate in (0.0, 0.5, 0.5):
        model = Annotator.from_genes(partial_panel, config=TINY)
        data = model.prepare(cells)
        model.net.head.grow(3, generator=torch.Generator().manual_seed(0))
        data.labels = np.unique(cells.obs["cell_type"].astype(str), return_inverse=True)[1]
        config = FAST.replace(panel_dropout=rate, epochs=2, trainable="canal")
        run_stage(model.net, data, config=config)
        runs.append(model.net.head.fc1.weight.detach().clone())
    assert not torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[1], runs[2], rtol=0, atol=0)


def test_model_stores_its_gene_match(trained, tmp_path, baron_mouse):
    assert trained.match == GeneMatch()
    model = Annotator.from_pretrained(_save(trained, tmp_path / "m"))
    model.match = model.match.replace(min_overlap=0.01)
    again = Annotator.from_pretrained(_save(model, tmp_path / "m2"))
    assert again.match.min_overlap == 0.01


def test_one_stage_from_files_with_different_gene_sets(seger, baron, partial_panel):
    """A list of AnnData is one stage; each file keeps its own measured genes."""
    model = Annotator.from_genes(partial_panel, config=TINY)
    a = baron[(baron.obs["batch"] == "human2").to_numpy()
              & baron.obs["cell_type"].isin(["alpha", "beta"]).to_numpy()][:80]
    types = seger.obs["cell_type"].astype(str)
    b = seger[np.concatenate([np.flatnonzero(types == t)[:30] for t in ("alpha", "beta",
                                                                        "ductal")])]
    model.fit_stage([a, b], config=FAST.replace(epochs=1))
    h = model.history[-1]
    assert h["n_cells"] == 170 and model.cell_types == ["alpha", "beta", "ductal"]
    measured = model.bank.measured[model.bank.obs["cell"].isin(b.obs_names).to_numpy()]
    assert len(measured) and not measured[:, 120:].any()
    rest = model.bank.measured[model.bank.obs["cell"].isin(a.obs_names).to_numpy()]
    assert len(rest) and rest.all()
