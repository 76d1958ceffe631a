"""Data-parallel training: helpers in one process, and two real gloo processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import canal
from canal import Annotator, distributed
from canal.cli import main
from canal.continual import ExampleBank
from tests.conftest import TINY

SRC = Path(canal.__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def _torchrun(*args: str, nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (rendezvous on a free localhost port) on this source tree."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(SRC), str(HERE.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stage_files(baron, panel, tmp_path_factory):
    """240 Baron human1 cells in an .h5ad and a tiny untrained checkpoint on the panel."""
    root = tmp_path_factory.mktemp("ddp_inputs")
    donor = baron[(baron.obs["batch"] == "human1").to_numpy()]
    rng = np.random.default_rng(0)
    sub = donor[np.sort(rng.choice(donor.n_obs, 240, replace=False))].copy()
    sub.write_h5ad(root / "cells.h5ad")
    Annotator.from_genes(panel, config=TINY).save(root / "init")
    return root / "cells.h5ad", root / "init", sub


# --------------------------------------------------------------------------------------------
# one process: the helpers are the identity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [11, 12, 240])
@pytest.mark.parametrize("world", [2, 3])
def test_shard_deals_every_cell_once_and_pads_to_equal_length(n, world):
    cells = np.arange(100, 100 + n)
    plain = [distributed.shard(cells, seed=5, pad=False, rank=r, world_size=world)
             for r in range(world)]
    assert sorted(np.concatenate(plain).tolist()) == cells.tolist()
    padded = [distributed.shard(cells, seed=5, rank=r, world_size=world) for r in range(world)]
    assert {len(p) for p in padded} == {-(-n // world)}
    for p, q in zip(padded, plain, strict=True):
        assert set(p) == set(q)  # padding repeats the rank's own cells only
    other_seed = distributed.shard(cells, seed=6, pad=False, rank=0, world_size=world)
    assert not np.array_equal(other_seed, plain[0])


def test_shard_in_one_process_and_errors():
    cells = np.array([4, 2, 9])
    assert distributed.shard(cells, seed=0) is cells
    with pytest.raises(ValueError, match="at most 3 processes"):
        distributed.shard(cells, seed=0, rank=0, world_size=4)
    with pytest.raises(ValueError, match="outside world size"):
        distributed.shard(cells, seed=0, rank=2, world_size=2)


@pytest.mark.parametrize(("n", "multiple", "world"),
                         [(240, 48, 2), (241, 48, 2), (240, 1, 3), (10, 64, 3), (0, 8, 2)])
def test_block_cuts_contiguous_whole_batches(n, multiple, world):
    blocks = [distributed.block(n, multiple=multiple, rank=r, world_size=world)
              for r in range(world)]
    rows = np.concatenate([np.arange(n)[b] for b in blocks])
    assert rows.tolist() == list(range(n))  # in rank order, each cell once
    assert all(b.start % multiple == 0 for b in blocks)  # single-process batch boundaries
    sizes = [b.stop - b.start for b in blocks]
    assert max(sizes) - min(sizes) <= multiple
    assert distributed.block(n, multiple=multiple) == slice(0, n)  # one process: everything
    with pytest.raises(ValueError, match="outside world size"):
        distributed.block(n, rank=world, world_size=world)


def test_helpers_without_a_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    with distributed.session() as joined:
        assert joined is False
    assert distributed.sum_across([1, 2.5]) == [1.0, 2.5]
    rows = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_cells(np.arange(3), rows, 3) is rows
    shuffled = distributed.gather_cells(np.array([2, 0, 1]), rows, 3)
    assert shuffled.tolist() == [[2.0, 3.0], [4.0, 5.0], [0.0, 1.0]]
    with pytest.raises(RuntimeError, match="computed by no rank"):
        distributed.gather_cells(np.array([0, 1]), rows[:2], 3)
    net = nn.Linear(2, 2)
    assert distributed.wrap(net) is net and distributed.unwrap(net) is net
    assert distributed.on_main(lambda a, *, b: a + b, 1, b=2) == 3
    assert distributed.broadcast_object({"x": 1}) == {"x": 1}
    assert distributed.gather_blocks(rows) is rows
    assert distributed.agree(lambda a: a * 2, 4) == 8
    with pytest.raises(KeyError):
        distributed.agree(dict().__getitem__, "x")
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda")


# --------------------------------------------------------------------------------------------
# two processes (gloo) under torchrun
# --------------------------------------------------------------------------------------------


@pytest.mark.torchrun
def test_two_ranks_agree_and_ddp_averages_gradients(stage_files, tmp_path):
    data, init, _ = stage_files
    prefix = tmp_path / "rank"
    proc = _torchrun(str(HERE / "ddp_worker.py"), str(data), str(init), str(prefix))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank.{r}.json").read_text()) for r in (0, 1)]
    expected = [[10.0 * i, -float(i)] for i in range(11)]
    for r, res in enumerate(ranks):
        c = res["collectives"]
        assert (c["rank"], c["world_size"], c["is_main"]) == (r, 2, r == 0)
        assert c["gathered"] == expected  # cell order restored on every rank
        assert c["sum"] == pytest.approx([1.2, 2.0])
        assert c["broadcast"] == {"from": 0} and c["on_main"] == 0
        assert c["wrapped"]
        np.testing.assert_allclose(c["grad"], c["grad_full_batch"], rtol=1e-5, atol=1e-6)
    assert [r["collectives"]["block"] for r in ranks] == [[0, 6], [6, 11]]
    for res in ranks:
        assert res["collectives"]["gathered_blocks"] == [float(i) for i in range(11)]
    assert [r["collectives"]["agree"] for r in ranks] == [0, 10]
    assert ranks[1]["collectives"]["agree_error"] == "ValueError: cell 7 has no counts"
    assert ranks[0]["collectives"]["agree_error"] == \
        "RuntimeError: rank 1 failed: ValueError: cell 7 has no counts"
    assert ranks[0]["collectives"]["on_main_error"] == "ValueError: disk full"
    assert ranks[1]["collectives"]["on_main_error"] == \
        "RuntimeError: rank 0 failed: ValueError: disk full"
    # two stages (replay + distillation): every rank ends with the same weights, history, bank
    s0, s1 = ranks[0]["stages"], ranks[1]["stages"]
    assert s0 == s1
    assert s0["world_size"] == [2, 2]
    assert s0["bank_stages"] == [1, 2] and len(s0["bank"]) == 40


@pytest.mark.torchrun
def test_torchrun_fit_matches_single_process(stage_files, tmp_path):
    data, init, cells = stage_files
    out = tmp_path / "runs" / "ddp"
    args = ["--quiet", "fit", "--data", str(data), "--labels", "cell_type", "--from", str(init),
            "--epochs", "2", "--lr", "3e-3", "--bank-size", "60", "--min-cells", "1"]
    proc = _torchrun("-m", "canal", *args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("stage 1:") == 1 and "on 2 processes" in proc.stdout
    # no temp or stale dirs (the lock file of the writers' queue stays)
    assert sorted(p.name for p in out.parent.iterdir() if p.suffix != ".lock") == ["ddp"]
    single = tmp_path / "runs_single" / "one"
    assert main([*args, "--out", str(single)]) == 0

    model = Annotator.from_pretrained(out)
    ref = Annotator.from_pretrained(single)
    h = model.history[-1]
    assert h["world_size"] == 2 and h["n_train"] + h["n_val"] == cells.n_obs
    assert ref.history[-1]["world_size"] == 1
    assert model.cell_types == ref.cell_types
    # same size and class balance as one process
    assert model.bank.n_obs == ref.bank.n_obs == 60
    counts = model.bank.obs["cell_type"].value_counts().to_dict()
    assert counts == ref.bank.obs["cell_type"].value_counts().to_dict()
    # the bank is what the saved model's own representations of the cells select
    prepared = model.prepare(cells)
    rep, logits = model.outputs(prepared)
    assert logits.shape == (cells.n_obs, len(model.cell_types)) and torch.isfinite(logits).all()
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    again = ExampleBank(60)
    again.update(prepared, labels, rep, library=model.cell_types,
                 classifier_weight=model.net.head.classifier.weight.detach(),
                 stage=np.ones(cells.n_obs, int), cell_names=cells.obs_names)
    assert again.obs["cell"].tolist() == model.bank.obs["cell"].tolist()
    truth = dict(zip(cells.obs_names, labels, strict=True))
    assert all(truth[c] == t for c, t in zip(model.bank.obs["cell"], model.bank.obs["cell_type"],
                                             strict=True))


def test_cli_refuses_commands_that_are_not_data_parallel(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["evaluate", "--pred", str(tmp_path / "x.h5ad"), "--truth", "cell_type"])
    assert code == 2
    assert "without torchrun" in capsys.readouterr().err


@pytest.mark.torchrun
def test_torchrun_pretrain(stage_files, tmp_path):
    data, init, cells = stage_files
    out = tmp_path / "pt"
    proc = _torchrun("-m", "canal", "--quiet", "pretrain", "--data", str(data), "--from",
                     str(init), "--out", str(out), "--max-steps", "4", "--batch-size", "16",
                     "--eval-every", "2", "--checkpoint-every", "2", "--lr", "3e-3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("4 steps") == 1  # rank 0 reports
    assert sorted(p.name for p in out.parent.iterdir() if p.suffix != ".lock") == ["pt"]
    model = Annotator.from_pretrained(out)
    rec = model.meta["pretrain"]
    assert rec["done"] and rec["step"] == 4 and rec["world_size"] == 2
    assert rec["n_train"] + rec["n_val"] == cells.n_obs
    assert [v["step"] for v in rec["history"]["val"]] == [0, 2, 4]
    assert np.isfinite(rec["final"]["val_loss"])
    start = Annotator.from_pretrained(init).net.state_dict()
    moved = model.net.state_dict()
    assert not torch.equal(start["performer.net.layers.0.0.fn.to_q.weight"],
                           moved["performer.net.layers.0.0.fn.to_q.weight"])


# --------------------------------------------------------------------------------------------
# sharded prediction and embedding: torchrun output == single-process output
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_model(stage_files, tmp_path_factory):
    """The tiny checkpoint after one quick stage on the 240 cells (types + calibration)."""
    from canal.train import StageConfig

    _, init, cells = stage_files
    model = Annotator.from_pretrained(init)
    model.fit_stage(cells, config=StageConfig(epochs=4, lr=1e-2, bank_size=40, seed=0))
    return model.save(tmp_path_factory.mktemp("ddp_trained") / "model")


def _assert_same_h5ad(path, ref_path, key: str = "canal") -> None:
    """Two output files hold the same cells, calls and outputs (floats to 1e-5)."""
    import anndata as ad

    out, ref = ad.read_h5ad(path), ad.read_h5ad(ref_path)
    assert out.obs_names.tolist() == ref.obs_names.tolist()
    assert list(out.obs.columns) == list(ref.obs.columns)
    for col in ref.obs.columns:
        a, b = out.obs[col], ref.obs[col]
        if isinstance(b.dtype, pd.CategoricalDtype):
            assert a.tolist() == b.tolist(), col
            assert a.cat.categories.tolist() == b.cat.categories.tolist(), col
        elif b.dtype == object:
            assert a.tolist() == b.tolist(), col
        else:
            np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-5, atol=1e-6,
                                       equal_nan=True, err_msg=col)
    assert sorted(out.obsm) == sorted(ref.obsm)
    for k in ref.obsm:
        a, b = out.obsm[k], ref.obsm[k]
        if hasattr(b, "columns"):
            assert list(a.columns) == list(b.columns)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                   err_msg=k)
    assert sorted(out.uns) == sorted(ref.uns)
    if key in ref.uns:
        pa, pb = dict(out.uns[key]["params"]), dict(ref.uns[key]["params"])
        assert sorted(pa) == sorted(pb)
        for k, v in pb.items():
            if isinstance(v, float) and np.isnan(v):
                assert np.isnan(pa[k]), k
            else:
                assert pa[k] == v, k
    assert (out.X != ref.X).nnz == 0  # the cells themselves are written through


@pytest.mark.torchrun
@pytest.mark.parametrize(("novelty", "groupby"), [("calibrated", "auto"), ("mixup", None)])
def test_torchrun_predict_matches_single_process(stage_files, trained_model, tmp_path,
                                                 novelty, groupby):
    data, _, cells = stage_files
    # 240 cells in batches of 48: 5 batches, 2 on rank 0 and 3 on rank 1
    args = ["--quiet", "predict", "--model", str(trained_model), "--data", str(data),
            "--novelty", novelty, "--batch-size", "48"]
    if groupby:
        args += ["--groupby", groupby]
    proc = _torchrun("-m", "canal", *args, "--out", str(tmp_path / "ddp.h5ad"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("cells annotated on 2 processes") == 1  # rank 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.h5ad"]  # rank 0 writes, once
    assert main([*args, "--out", str(tmp_path / "one.h5ad")]) == 0
    _assert_same_h5ad(tmp_path / "ddp.h5ad", tmp_path / "one.h5ad")
    import anndata as ad

    pred = ad.read_h5ad(tmp_path / "ddp.h5ad")
    assert pred.n_obs == cells.n_obs and pred.obsm["X_canal"].shape == (cells.n_obs, TINY.rep_dim)
    assert pred.uns["canal"]["params"]["novelty"] == novelty
    # a real prediction: several types called, not every cell Unassigned
    assert pred.obs["canal_closed"].nunique() > 1
    assert (pred.obs["canal"] != "Unassigned").sum() > 0


@pytest.mark.torchrun
def test_torchrun_embed_matches_single_process(stage_files, trained_model, tmp_path):
    data, _, cells = stage_files
    args = ["--quiet", "embed", "--model", str(trained_model), "--data", str(data),
            "--batch-size", "32"]
    proc = _torchrun("-m", "canal", *args, "--out", str(tmp_path / "ddp.h5ad"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("embedding written") == 1
    assert main([*args, "--out", str(tmp_path / "one.h5ad")]) == 0
    _assert_same_h5ad(tmp_path / "ddp.h5ad", tmp_path / "one.h5ad")
    # embed and predict give every cell the same representation
    ref = cells.copy()
    Annotator.from_pretrained(trained_model).predict(ref)
    import anndata as ad

    emb = ad.read_h5ad(tmp_path / "ddp.h5ad").obsm["X_canal"]
    np.testing.assert_allclose(emb, ref.obsm["X_canal"], rtol=1e-5, atol=1e-6)
