"""canal.novelty: CANAL's energy / mixup rule (toy tensors) and the calibrated rule (real cells).

The calibrated tests use the tiny model of tests/pancreas.py (trained on at most 90 cells per
type of donors human1-3, alpha withheld). Calibration and "held-out known" cells are the other
known cells of those donors, split in two at random (exchangeable with each other, so the
conformal guarantee applies); human4 is an unseen donor whose alpha cells are novel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from canal import novelty, pl
from canal import novelty as nv
from tests.pancreas import NOVEL, novel_split


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


# ------------------------------------------------------------------------------------------
# calibrated (split-conformal) novelty on real cells
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split(data_root):
    return novel_split(data_root)


@pytest.fixture(scope="module")
def outs(split, baron):
    """Representations / logits of bank, calibration, held-out known and human4 cells."""
    model = split.model
    donor = baron.obs["batch"].astype(str).to_numpy()
    types = baron.obs["cell_type"].astype(str).to_numpy()
    unused = ((donor != "human4") & np.isin(types, model.cell_types)
              & ~baron.obs_names.isin(split.train.obs_names))
    idx = np.random.default_rng(0).permutation(np.flatnonzero(unused))
    half = len(idx) // 2
    sets = {"cal": baron[np.sort(idx[:half])], "held": baron[np.sort(idx[half:])],
            "test": split.test, "bank": model.bank.to_anndata(model.genes)}
    out = {}
    for name, adata in sets.items():
        rep, logits = model.outputs(model.prepare(adata))
        out[name] = {"rep": rep, "logits": logits,
                     "pred": np.asarray(model.cell_types)[logits.argmax(1).numpy()],
                     "label": adata.obs["cell_type"].astype(str).to_numpy()}
    return out


def _calibrate(outs, score="knn", *, fpr=0.05, min_class_cells=50, **kw):
    bank = outs["bank"]
    params = {"k": kw.get("k", 10), "temperature": 0.8}
    if "mahalanobis" in score:
        params["mahalanobis"] = nv.fit_mahalanobis(bank["rep"], bank["label"],
                                                   classes=sorted(set(bank["label"])))
    probe = nv.NoveltyCalibration(score, fpr, min_class_cells, {}, {}, {}, params)
    cal = outs["cal"]
    s = probe.scores(representation=cal["rep"], logits=cal["logits"], reference=bank["rep"])
    return nv.fit_calibration(s, cal["pred"], score=score, fpr=fpr,
                              min_class_cells=min_class_cells, params=params)


def _scores(cal, part, outs):
    return cal.scores(representation=part["rep"], logits=part["logits"],
                      reference=outs["bank"]["rep"])


def test_split_sizes(outs):
    # enough cells for the statistics below to mean something
    assert len(outs["cal"]["label"]) > 300 and len(outs["held"]["label"]) > 300
    assert len(outs["bank"]["label"]) >= 100


@pytest.mark.parametrize("score", ["knn", "energy", "relative_mahalanobis"])
@pytest.mark.parametrize("min_class_cells", [50, 10**9])
def test_false_rejection_on_held_out_known_cells_is_about_alpha(outs, score, min_class_cells):
    """THE conformal test: the share of held-out known cells called novel is about alpha."""
    held = outs["held"]
    n = len(held["label"])
    for alpha in (0.05, 0.1, 0.2):
        cal = _calibrate(outs, score, fpr=alpha, min_class_cells=min_class_cells)
        rate = cal.is_novel(_scores(cal, held, outs), held["pred"]).mean()
        tol = 3 * np.sqrt(alpha * (1 - alpha) / n) + 0.01
        assert abs(rate - alpha) < tol, (score, alpha, rate)


def test_p_values_uniform_on_known_cells(outs):
    from scipy import stats

    cal = _calibrate(outs, "knn")
    held = outs["held"]
    p = cal.p_values(_scores(cal, held, outs), held["pred"])
    assert ((p > 0) & (p <= 1)).all()
    ks = stats.kstest(p, "uniform")
    assert ks.statistic < 0.1, ks
    # a threshold on p-values at the calibrated level is the same rule as the thresholds
    s = _scores(cal, held, outs)
    agree = (p <= cal.fpr) == cal.is_novel(s, held["pred"])
    assert agree.mean() > 0.99
    # on the novel cells the p-values are small
    test = outs["test"]
    p_test = cal.p_values(_scores(cal, test, outs), test["pred"])
    novel = test["label"] == NOVEL
    assert np.median(p_test[novel]) < 0.05 < np.median(p_test[~novel])


def test_one_cell_alone_gets_the_same_call_as_in_a_batch(split, outs):
    model = split.model
    cal = _calibrate(outs, "knn")
    test = split.test[::7][:20]
    rep, logits = model.outputs(model.prepare(test))
    pred = np.asarray(model.cell_types)[logits.argmax(1).numpy()]
    s = cal.scores(representation=rep, logits=logits, reference=outs["bank"]["rep"])
    batch_calls = cal.is_novel(s, pred)
    for i in range(test.n_obs):
        r1, l1 = model.outputs(model.prepare(test[i:i + 1]))
        s1 = cal.scores(representation=r1, logits=l1, reference=outs["bank"]["rep"])
        p1 = np.asarray(model.cell_types)[l1.argmax(1).numpy()]
        assert p1[0] == pred[i]
        np.testing.assert_allclose(s1, s[i:i + 1], rtol=1e-5, atol=1e-6)
        assert cal.is_novel(s1, p1)[0] == batch_calls[i]
        assert cal.p_values(s1, p1)[0] == pytest.approx(cal.p_values(s, pred)[i], abs=1e-4)


def test_alpha_detected_on_unseen_donor(outs):
    """Novel cells must score higher: most alpha cells called novel, few known cells."""
    cal = _calibrate(outs, "knn")
    test = outs["test"]
    calls = cal.is_novel(_scores(cal, test, outs), test["pred"])
    novel = test["label"] == NOVEL
    assert calls[novel].mean() > 0.6
    assert calls[~novel].mean() < 0.2


def test_dict_round_trip_is_json_small_and_identical(outs):
    for score in ("knn", "relative_mahalanobis"):
        cal = _calibrate(outs, score)
        d = json.loads(json.dumps(cal.to_dict()))
        back = nv.NoveltyCalibration.from_dict(d)
        assert back == cal
        test = outs["test"]
        s = _scores(back, test, outs)
        np.testing.assert_array_equal(back.is_novel(s, test["pred"]),
                                      cal.is_novel(s, test["pred"]))
        n_cal = sum(len(v) for v in d["calibration"].values())
        assert n_cal <= 200 * len(d["calibration"])
    with pytest.raises(ValueError, match="to_dict"):
        nv.NoveltyCalibration.from_dict({"score": "knn"})


def test_quantile_sketch_keeps_p_values(outs):
    held = outs["held"]
    exact = _calibrate(outs, "energy", min_class_cells=10**9)
    probe = nv.NoveltyCalibration("energy", 0.05, 10**9, {}, {}, {}, {})
    cal = outs["cal"]
    s_cal = probe.scores(logits=cal["logits"])
    sketch = nv.fit_calibration(s_cal, cal["pred"], score="energy", min_class_cells=10**9,
                                max_scores=20)
    assert len(sketch.calibration[nv.POOLED]) == 20
    assert sketch.thresholds == exact.thresholds  # thresholds come from every score
    s = _scores(exact, held, outs)
    np.testing.assert_allclose(sketch.p_values(s, held["pred"]), exact.p_values(s, held["pred"]),
                               atol=0.03)


def test_per_class_thresholds_and_pooled_fallback(outs):
    cal = _calibrate(outs, "knn", min_class_cells=50)
    counts = dict(zip(*np.unique(outs["cal"]["pred"], return_counts=True), strict=True))
    own = {c for c, n in counts.items() if n >= 50}
    assert set(cal.thresholds) == own | {nv.POOLED}
    assert own and own != set(counts)  # some classes own, some pooled
    rare = next(c for c, n in counts.items() if n < 50)
    s = np.array([cal.thresholds[nv.POOLED] + 1e-9, cal.thresholds[nv.POOLED] - 1e-9])
    assert cal.is_novel(s, [rare, rare]).tolist() == [True, False]
    # a type the calibration never saw also uses the pooled threshold
    assert cal.is_novel(s, ["never seen"] * 2).tolist() == [True, False]


def test_fit_calibration_rejects_bad_input():
    s = np.linspace(0, 1, 100)
    with pytest.raises(ValueError, match="fpr"):
        nv.fit_calibration(s, ["a"] * 100, score="knn", fpr=0.0)
    with pytest.raises(ValueError, match="predicted classes"):
        nv.fit_calibration(s, ["a"] * 99, score="knn")
    with pytest.raises(ValueError, match="score must be"):
        nv.fit_calibration(s, ["a"] * 100, score="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no calibration cells"):
        nv.fit_calibration([], [], score="knn")
    with pytest.raises(ValueError, match="reference"):
        nv.novelty_scores("knn", representation=np.ones((2, 3)))
    with pytest.raises(ValueError, match="k must be"):
        nv.knn_score(np.ones((2, 3)), np.ones((4, 3)), k=5)


def test_scores_match_their_definitions():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 4))
    x = rng.normal(size=(6, 4))
    d = np.linalg.norm(x[:, None] / np.linalg.norm(x, axis=1)[:, None, None]
                       - ref[None] / np.linalg.norm(ref, axis=1)[None, :, None], axis=2)
    np.testing.assert_allclose(nv.knn_score(x, ref, k=3), np.sort(d, axis=1)[:, 2])
    # a cell that is in the reference does not count itself when exclude_self is set
    inside = np.concatenate([ref, x])
    np.testing.assert_allclose(nv.knn_score(inside[:50], inside, k=1)[:5], 0.0, atol=1e-6)
    loo = [np.sort(np.delete(np.linalg.norm(
        inside / np.linalg.norm(inside, axis=1, keepdims=True)
        - inside[i] / np.linalg.norm(inside[i]), axis=1), i))[1] for i in range(5)]
    np.testing.assert_allclose(nv.knn_score(inside[:5], inside, k=2, exclude_self=True), loo)
    logits = rng.normal(size=(6, 3))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(nv.msp_score(logits), 1 - p.max(1))
    np.testing.assert_allclose(nv.max_logit_score(logits), -logits.max(1))
    labels = np.array(["a"] * 25 + ["b"] * 25)
    stats = nv.fit_mahalanobis(ref, labels, classes=["a", "b", "c"], shrinkage=0.0)
    assert stats["means"][2] is None
    mu = ref[:25].mean(0), ref[25:].mean(0)
    within = np.concatenate([ref[:25] - mu[0], ref[25:] - mu[1]])
    prec = np.linalg.inv(within.T @ within / 49)
    md = np.stack([np.einsum("ij,jk,ik->i", x - m, prec, x - m) for m in mu], 1).min(1)
    np.testing.assert_allclose(nv.mahalanobis_score(x, stats), md, rtol=1e-8)


def test_cluster_vote():
    labels = ["B", "B", "T", "B", "NK", "NK", "T"]
    novel = [False, False, False, True, True, True, False]
    groups = ["1", "1", "1", "1", "2", "2", "3"]
    lab, nov = nv.cluster_vote(labels, novel, groups)
    # group 1: 1 of 4 novel -> known, majority B; group 2: all novel; group 3: T alone
    assert lab.tolist() == ["B", "B", "B", "B", "Unassigned", "Unassigned", "T"]
    assert nov.tolist() == [False] * 4 + [True, True, False]
    # exactly half is not "most"
    lab, nov = nv.cluster_vote(["A", "A"], [True, False], ["g", "g"])
    assert not nov.any() and lab.tolist() == ["A", "A"]
    with pytest.raises(ValueError, match="one entry per cell"):
        nv.cluster_vote(["A"], [True, False], ["g", "g"])


def test_cluster_vote_on_real_clusters_removes_scattered_calls(outs):
    cal = _calibrate(outs, "knn")
    test = outs["test"]
    calls = cal.is_novel(_scores(cal, test, outs), test["pred"])
    groups = nv.neighbour_groups(test["rep"], resolution=1.0)
    assert 2 <= len(set(groups)) < len(groups) // 5
    lab, nov = nv.cluster_vote(test["pred"], calls, groups)
    novel = test["label"] == NOVEL
    # per cluster: known cells scattered-called novel mostly come back, alpha stays novel
    assert nov[~novel].mean() <= calls[~novel].mean()
    assert nov[novel].mean() > 0.6
    assert (lab[nov] == "Unassigned").all() and (lab[~nov] != "Unassigned").all()


def test_plot_returns_figure(outs):
    cal = _calibrate(outs, "knn")
    test = outs["test"]
    fig = pl.novelty_calibration(_scores(cal, test, outs), test["label"] == NOVEL, cal,
                                 predicted=test["pred"], title="alpha withheld")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="is_novel_type"):
        pl.novelty_calibration([0.1, 0.2], [True], cal)
