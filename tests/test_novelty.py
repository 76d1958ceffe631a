from __future__ import annotations

import pytest
import torch

from canal import novelty


def _toy_classifier() -> torch.nn.Linear:
    lin = torch.nn.Linear(3, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(3))
        lin.bias.zero_()
    lin.eval()
    return lin


def _toy_hidden() -> torch.Tensor:
    """30 cells along 3 one-hot class directions, scales 5..15 (mean 10)."""
    scales = torch.linspace(5.0, 15.0, 10)
    eye = torch.eye(3)
    return torch.cat([scales[:, None] * eye[k] for k in range(3)])


def test_energy_matches_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    t = 0.8
    direct = torch.stack([
        -t * torch.log(torch.exp(row / t).sum()) for row in logits
    ])
    torch.testing.assert_close(novelty.energy_score(logits, temperature=t), direct)
    # flat logits of zeros: -T log(k)
    assert novelty.energy_score(logits)[1].item() == pytest.approx(-0.8 * torch.log(
        torch.tensor(3.0)).item(), rel=1e-6)


def test_confident_scores_lower_than_flat():
    confident = torch.tensor([[20.0, 0.0, 0.0], [0.0, 25.0, 0.0]])
    flat = torch.zeros(2, 3)
    scores = novelty.novelty_score(torch.cat([confident, flat]))
    assert scores.dtype == torch.float32
    assert scores[:2].max() < scores[2:].min()
    assert ((scores >= 0) & (scores <= 1)).all()
    # flat rows have the batch's max energy (norm 1) and max prob 1/3
    torch.testing.assert_close(scores[2:], torch.full((2,), 0.5 * (1 + 2 / 3)))


def test_score_is_permutation_equivariant():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=g) * 3
    perm = torch.randperm(12, generator=g)
    scores = novelty.novelty_score(logits)
    torch.testing.assert_close(novelty.novelty_score(logits[perm]), scores[perm])


def test_refs_make_single_cell_scores_batch_independent():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 5, generator=g) * 2
    energy = novelty.energy_score(logits)
    lo, hi = energy.min().item() + 0.1, energy.max().item() - 0.1
    batch = novelty.novelty_score(logits, ref_min=lo, ref_max=hi)
    for i in range(8):
        single = novelty.novelty_score(logits[i:i + 1], ref_min=lo, ref_max=hi)
        torch.testing.assert_close(single, batch[i:i + 1])
    assert ((batch >= 0) & (batch <= 1)).all()
    # with the batch's own extremes as refs, the result equals the transductive score
    torch.testing.assert_close(
        novelty.novelty_score(logits, ref_min=energy.min(), ref_max=energy.max()),
        novelty.novelty_score(logits))


def test_degenerate_energy_range_and_bad_refs():
    same = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    scores = novelty.novelty_score(same)
    assert torch.isfinite(scores).all()
    assert novelty.novelty_score(same, ref_min=1.0, ref_max=1.0).isfinite().all()
    with pytest.raises(ValueError, match="both ref_min and ref_max"):
        novelty.novelty_score(same, ref_min=0.0)
    with pytest.raises(ValueError, match="swap"):
        novelty.novelty_score(same, ref_min=1.0, ref_max=0.0)
    with pytest.raises(ValueError, match="2-D"):
        novelty.novelty_score(torch.zeros(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        novelty.energy_score([[1.0, 2.0]])  # type: ignore[arg-type]


def test_bf16_logits_scored_in_float32():
    logits = torch.tensor([[4.0, 1.0, 0.5], [0.2, 0.1, 0.0], [1.0, 3.0, 2.0]])
    bf = logits.to(torch.bfloat16)
    out = novelty.novelty_score(bf)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, novelty.novelty_score(bf.float()))


def test_mixup_threshold_deterministic_and_between():
    hidden = _toy_hidden()
    clf = _toy_classifier()
    t1 = novelty.mixup_threshold(hidden, clf, generator=torch.Generator().manual_seed(0))
    t2 = novelty.mixup_threshold(hidden, clf, generator=torch.Generator().manual_seed(0))
    assert t1 == t2
    # batching does not change the result
    t3 = novelty.mixup_threshold(hidden, clf, generator=torch.Generator().manual_seed(0),
                                 batch_size=7)
    assert t3 == pytest.approx(t1, abs=1e-6)
    t4 = novelty.mixup_threshold(hidden, clf, generator=torch.Generator().manual_seed(1))
    assert t4 != t1

    with torch.no_grad():
        logits = clf(hidden)
    energy = novelty.energy_score(logits)
    lo, hi = energy.min().item(), energy.max().item()
    confident = novelty.novelty_score(logits, ref_min=lo, ref_max=hi).mean().item()
    flat = novelty.novelty_score(torch.zeros(5, 3), ref_min=lo, ref_max=hi).mean().item()
    assert confident < t1 < flat
    # default refs are the original cells' energy range
    t5 = novelty.mixup_threshold(hidden, clf, generator=torch.Generator().manual_seed(0),
                                 ref_min=lo, ref_max=hi)
    assert t5 == pytest.approx(t1, abs=1e-6)


def test_mixup_never_pairs_a_cell_with_itself():
    # two cells: each must be mixed with the other, so any mixed cell lies between them
    hidden = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    seen = []

    def classify(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.clone())
        return h

    novelty.mixup_threshold(hidden, classify, generator=torch.Generator().manual_seed(3))
    mixed = seen[-1]
    torch.testing.assert_close(mixed.sum(dim=1), torch.full((2,), 10.0))
    # cell 0 mixed with cell 1 and vice versa: weights w0, w1 give (10 w0, 10 (1 - w0)) etc.
    assert mixed[0, 1] > 0 and mixed[1, 0] > 0


def test_calibrate_and_is_novel():
    hidden = _toy_hidden()
    clf = _toy_classifier()
    with torch.no_grad():
        logits = clf(hidden)
    cal = novelty.calibrate(hidden, logits, clf, generator=torch.Generator().manual_seed(0))
    assert set(cal) == {"energy_min", "energy_max", "threshold", "temperature", "n_cells"}
    energy = novelty.energy_score(logits)
    assert cal["energy_min"] == pytest.approx(energy.min().item())
    assert cal["energy_max"] == pytest.approx(energy.max().item())
    assert cal["n_cells"] == 30 and cal["temperature"] == 0.8
    expected = novelty.mixup_threshold(hidden, clf, generator=torch.Generator().manual_seed(0),
                                       ref_min=cal["energy_min"], ref_max=cal["energy_max"])
    assert cal["threshold"] == pytest.approx(expected)

    # the three most confident reference cells (largest scale) and two flat-logit cells
    query = torch.cat([logits[7:10], torch.zeros(2, 3)])
    scores = novelty.novelty_score(query, ref_min=cal["energy_min"], ref_max=cal["energy_max"])
    flags = novelty.is_novel(scores, cal["threshold"])
    assert flags.dtype == torch.bool
    assert flags.tolist() == [False, False, False, True, True]


def test_too_few_cells_raise():
    clf = _toy_classifier()
    with pytest.raises(ValueError, match="more cells or use a saved threshold"):
        novelty.mixup_threshold(torch.ones(1, 3), clf)
    with pytest.raises(ValueError, match="at least 2"):
        novelty.calibrate(torch.ones(1, 3), torch.ones(1, 3), clf)
    with pytest.raises(ValueError, match="same cells"):
        novelty.calibrate(torch.ones(3, 3), torch.ones(2, 3), clf)
