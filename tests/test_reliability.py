"""Faults of issue 19: atomic outputs, same-file --out, checkpoints under concurrency and in the
rename window, disk-full and permission errors, a missing bank, an edited panel.

Each test reproduces the fault on small real subsets first (see docs/reliability.md).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from canal import Annotator, io
from canal.cli import main
from canal.train import StageConfig


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): _sha(p) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def cells(baron, tmp_path) -> Path:
    """100 Baron cells (raw counts) as an .h5ad."""
    path = tmp_path / "cells.h5ad"
    baron[:100].copy().write_h5ad(path)
    return path


@pytest.fixture
def typed_model(tiny_model, tmp_path) -> Path:
    """A tiny untrained checkpoint with three cell types (enough to predict)."""
    tiny_model.net.head.grow(3)
    tiny_model.cell_types = ["alpha", "beta", "delta"]
    tiny_model.stage = 1
    return tiny_model.save(tmp_path / "model")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- 2. atomic outputs ------------------------------------------------------------------------


def test_predict_over_existing_h5ad_from_backed_input(baron, cells, typed_model, tmp_path):
    # before: anndata appended to the existing file (backed input): its 200-cell raw survived
    # next to the new 100-cell X and the file could not be read back
    out = tmp_path / "out.h5ad"
    old = baron[:200].copy()
    old.raw = old
    old.write_h5ad(out)
    assert main(["--quiet", "predict", "--model", str(typed_model), "--data", str(cells),
                 "--out", str(out), "--novelty", "none"]) == 0
    res = ad.read_h5ad(out)
    assert res.n_obs == 100 and res.raw is None and "canal" in res.obs
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("link", ["path", "symlink", "hardlink"])
def test_out_equal_to_an_input_is_refused_everywhere(cells, typed_model, tmp_path, link,
                                                     capsys):
    # before: embed wrote over its own input (a kill then left it at 0 bytes); predict compared
    # resolved paths only, so a hard link slipped through
    out = {"path": cells, "symlink": tmp_path / "sym.h5ad",
           "hardlink": tmp_path / "hard.h5ad"}[link]
    if link == "symlink":
        out.symlink_to(cells)
    elif link == "hardlink":
        os.link(cells, out)
    before = _sha(cells)
    m, d, o = str(typed_model), str(cells), str(out)
    commands = [
        ["embed", "--model", m, "--data", d, "--out", o],
        ["predict", "--model", m, "--data", d, "--out", o],
        ["explain", "--model", m, "--data", d, "--out", o],
        ["evaluate", "--pred", d, "--truth", "cell_type", "--out", o],
        ["fit", "--from", m, "--data", d, "--out", o],
        ["init", "--data", d, "--out", o],
        ["pretrain", "--data", d, "--out", o],
    ]
    for argv in commands:
        assert main(["--quiet", *argv]) == 2, argv
        assert "is the input" in capsys.readouterr().err, argv
    # and the model directory is an input too
    assert main(["--quiet", "predict", "--model", m, "--data", d, "--out", m]) == 2
    assert "is the input" in capsys.readouterr().err
    assert _sha(cells) == before


def test_disk_full_is_named_and_previous_output_kept(cells, typed_model, tmp_path, monkeypatch,
                                                     capsys):
    out = tmp_path / "emb.h5ad"
    assert main(["--quiet", "embed", "--model", str(typed_model), "--data", str(cells),
                 "--out", str(out)]) == 0
    before = _sha(out)

    # a disk without room: refused before writing (a full disk inside an HDF5 write can crash)
    real = io.shutil.disk_usage
    monkeypatch.setattr(io.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=100_000))
    assert main(["--quiet", "embed", "--model", str(typed_model), "--data", str(cells),
                 "--out", str(out)]) == 2
    assert "no space left" in capsys.readouterr().err
    monkeypatch.undo()

    # the disk fills during the write: the partial file goes, the old output stays
    def full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89HDF partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", full)
    assert main(["--quiet", "embed", "--model", str(typed_model), "--data", str(cells),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device writing" in err and "Traceback" not in err
    assert _sha(out) == before and _leftovers(tmp_path) == []

    # a kill (here an interrupt) in the middle of the write: same
    def killed(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89HDF partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ad.AnnData, "write_h5ad", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["--quiet", "embed", "--model", str(typed_model), "--data", str(cells),
              "--out", str(out)])
    assert _sha(out) == before and _leftovers(tmp_path) == []


def test_evaluate_and_explain_write_through_temporaries(cells, typed_model, tmp_path):
    pred, report, expl = tmp_path / "pred.h5ad", tmp_path / "report", tmp_path / "explain"
    assert main(["--quiet", "predict", "--model", str(typed_model), "--data", str(cells),
                 "--out", str(pred), "--novelty", "none"]) == 0
    for _ in range(2):  # the second run replaces the first one's files
        assert main(["--quiet", "evaluate", "--pred", str(pred), "--truth", "cell_type",
                     "--out", str(report), "--umap-cells", "0"]) == 0
        assert main(["--quiet", "explain", "--model", str(typed_model), "--data", str(cells),
                     "--out", str(expl), "--method", "grad_x_input", "--n-top", "3"]) == 0
    assert json.loads((report / "metrics.json").read_text())["truth"] == "cell_type"
    assert (report / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in expl.iterdir()} == {"top_genes.csv", "gene_importance.csv",
                                                "gene_importance.png", "params.json"}
    assert sorted(p.name for p in report.iterdir()) == ["confusion.png", "metrics.json",
                                                         "report.html"]


def test_permission_and_missing_folder_are_named(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("previous")
    with pytest.raises(io.OutputError, match="permission denied writing"), \
            io.atomic_path(target) as tmp:  # noqa: PT012 (the write and the failure belong together)
        tmp.write_text("new")
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))
    assert target.read_text() == "previous" and _leftovers(tmp_path) == []
    with pytest.raises(io.OutputError, match="does not exist"):
        io.write_text(tmp_path / "no" / "such" / "folder.json", "{}")
    (tmp_path / "adir").mkdir()
    with pytest.raises(io.OutputError, match="is a directory"):
        io.write_text(tmp_path / "adir", "{}")
    assert _leftovers(tmp_path) == []


# --- 3. checkpoints under concurrency and in the rename window ---------------------------------


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from canal import io
    path, stage, me, other = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    ckpt = io.load_checkpoint(path)
    ckpt.meta["stage"] = stage
    fill = io._fill
    def slow(*args):  # widen the write so the two runs overlap
        time.sleep(1.0)
        fill(*args)
    io._fill = slow
    me.touch()
    while not other.exists():
        time.sleep(0.05)
    try:
        io.save_checkpoint(path, ckpt)
        print("saved")
    except io.CheckpointError as err:
        print("refused:", err)
""")


def test_two_runs_into_one_checkpoint(tiny_model, tmp_path):
    # before: both printed "written to" and one model was silently lost; overlapping, one died
    # with "OSError: Directory not empty" and its model was deleted
    path = tiny_model.save(tmp_path / "ckpt")
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(io.__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    runs = [subprocess.Popen([sys.executable, str(script), str(path), str(stage),
                              str(tmp_path / f"ready{stage}"), str(tmp_path / f"ready{3 - stage}")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for stage in (1, 2)]
    outs = [r.communicate(timeout=180) for r in runs]
    assert all(r.returncode == 0 for r in runs), [e for _, e in outs]
    said = sorted(o.strip().split(":")[0] for o, _ in outs)
    assert said == ["refused", "saved"], outs
    refused = next(o for o, _ in outs if o.startswith("refused"))
    assert "written by another canal run" in refused
    kept = next(tmp_path.glob("ckpt.unsaved-*"))
    assert str(kept) in refused
    stages = {io.load_checkpoint(path).meta["stage"], io.load_checkpoint(kept).meta["stage"]}
    assert stages == {1, 2}  # neither run's model is lost
    assert _leftovers(tmp_path) == []


def test_saves_queue_on_the_lock(tiny_model, tmp_path):
    import threading

    path = tiny_model.save(tmp_path / "ckpt")
    done = threading.Event()
    with io._lock(path):
        worker = threading.Thread(target=lambda: (tiny_model.save(path), done.set()))
        worker.start()
        assert not done.wait(0.5)  # waits for the holder
    worker.join(30)
    assert done.is_set()


def test_kill_between_renames_is_recovered(tiny_model, tmp_path, caplog):
    # before: nothing at --out, the old checkpoint only as a hidden .X.old-*, and .X.tmp-*
    # leftovers were never cleaned
    path = tiny_model.save(tmp_path / "ckpt")
    before = _tree(path)
    os.replace(path, tmp_path / ".ckpt.old-deadbeef")  # the first rename ran, the second not
    (tmp_path / ".ckpt.tmp-deadbeef").mkdir()
    (tmp_path / ".ckpt.tmp-deadbeef" / "model.pt").write_bytes(b"partial")
    with caplog.at_level(logging.INFO, logger="canal"):
        ckpt = io.load_checkpoint(path)
    assert "recovered" in caplog.text and ckpt.meta["stage"] == 0
    assert _tree(path) == before and _leftovers(tmp_path) == []
    # the same on save, with a stale temporary beside a complete checkpoint
    os.replace(path, tmp_path / ".ckpt.old-cafef00d")
    (tmp_path / ".ckpt.tmp-cafef00d").mkdir()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="canal"):
        tiny_model.save(path)
    assert "interrupted write" in caplog.text
    assert _leftovers(tmp_path) == [] and io.load_checkpoint(path).meta["stage"] == 0
    assert Annotator.from_pretrained(path).stage == 0


def test_disk_full_checkpoint_is_kept_elsewhere(tiny_model, tmp_path, monkeypatch):
    # before: torch's "unexpected pos" traceback, and the trained model was lost
    path = tiny_model.save(tmp_path / "ckpt")
    before = _tree(path)
    spare = tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr(io.tempfile, "tempdir", str(spare))
    monkeypatch.setattr(io, "same_device", lambda a, b: False)  # spare stands for another disk
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if Path(f).parent.parent == tmp_path:  # the checkpoint's folder is full
            raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos "
                               "4416 vs 4310")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(io.torch, "save", full_disk)
    tiny_model.stage = 3
    with pytest.raises(io.OutputError, match="no space left") as err:
        tiny_model.save(path)
    kept = next(spare.glob("canal-unsaved-ckpt-*"))
    assert f"written to {kept} instead" in str(err.value)
    assert Annotator.from_pretrained(kept).stage == 3
    assert _tree(path) == before and _leftovers(tmp_path) == []
    # a disk known to be too small is refused before anything is written
    real = io.shutil.disk_usage
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    monkeypatch.setattr(io.torch, "save", real_save)
    with pytest.raises(io.OutputError, match=r"needs about \d+ MiB"):
        tiny_model.save(path)
    assert _tree(path) == before and _leftovers(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk(tiny_model, baron, typed_model, small_disk, tmp_path, capsys,
                        monkeypatch):
    # before: a full disk ended in a segmentation fault and a partial file (predict/embed) or
    # a torch "unexpected pos" traceback and a lost model (fit)
    out = small_disk / "emb.h5ad"
    big = tmp_path / "big.h5ad"
    baron[:1500].copy().write_h5ad(big)
    assert main(["--quiet", "embed", "--model", str(typed_model), "--data", str(big),
                 "--out", str(out)]) == 2
    assert "no space left on the device" in capsys.readouterr().err
    assert list(small_disk.iterdir()) == []
    # a checkpoint too big for what is left, found only while writing: torch fails mid-file
    free = io.shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 16_384))
    spare = tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr(io.tempfile, "tempdir", str(spare))
    monkeypatch.setattr(io, "_check_space", lambda *a, **k: None)
    with pytest.raises(io.OutputError, match="no space left") as err:
        tiny_model.save(small_disk / "ckpt")
    kept = next(spare.glob("canal-unsaved-ckpt-*"))
    assert str(kept) in str(err.value)
    assert Annotator.from_pretrained(kept).genes == tiny_model.genes
    assert sorted(p.name for p in small_disk.iterdir()) == [".ckpt.lock", "filler"]


# --- 6. a missing bank, an edited panel ---------------------------------------------------------


def test_missing_bank_is_recorded(tiny_model, baron, tmp_path, caplog):
    # before: a checkpoint without bank.h5ad loaded silently and the next stage trained
    # without replay
    cells = baron[baron.obs["cell_type"].isin(["alpha", "beta", "ductal"]).to_numpy()][:90]
    tiny_model.fit_stage(cells.copy(), config=StageConfig(epochs=1, batch_size=32, seed=0))
    assert tiny_model.bank is not None
    path = tiny_model.save(tmp_path / "ckpt")
    assert io.load_checkpoint(path).bank_missing is False
    (path / io.BANK).unlink()
    with caplog.at_level(logging.WARNING, logger="canal"):
        ckpt = io.load_checkpoint(path)
    assert ckpt.bank_missing and "no bank.h5ad" in caplog.text
    # checkpoints written before config.json recorded the bank: told from the last stage
    meta = json.loads((path / io.CONFIG).read_text())
    del meta["bank_cells"], meta["checksum"]
    (path / io.CONFIG).write_text(json.dumps(meta))
    assert io.load_checkpoint(path).bank_missing
    assert io.load_checkpoint(path, with_bank=False).bank_missing is False  # not asked for
    err = io.bank_missing_error(path, "canal")
    assert isinstance(err, io.CheckpointError) and "--strategy distill" in str(err)
    # a model that never kept a bank is not missing one
    assert io.load_checkpoint(tiny_model.__class__.create(None, genes=tiny_model.genes,
                                                          config=tiny_model.net.config)
                              .save(tmp_path / "fresh")).bank_missing is False


def test_edited_panel_or_library_is_refused(typed_model, tmp_path):
    # before: a shuffled panel loaded and changed labels silently
    meta = json.loads((typed_model / io.CONFIG).read_text())
    assert len(meta["checksum"]) == 64
    shuffled = dict(meta, genes=list(np.random.default_rng(0).permutation(meta["genes"])))
    (typed_model / io.CONFIG).write_text(json.dumps(shuffled))
    with pytest.raises(io.CheckpointError, match="edited after training"):
        Annotator.from_pretrained(typed_model)
    renamed = dict(meta, cell_types=["alpha", "beta", "gamma"])
    (typed_model / io.CONFIG).write_text(json.dumps(renamed))
    with pytest.raises(io.CheckpointError, match="edited after training"):
        Annotator.from_pretrained(typed_model)
    # checkpoints from before the checksum still load, the shipped weights among them
    del renamed["checksum"]
    (typed_model / io.CONFIG).write_text(json.dumps(renamed))
    assert Annotator.from_pretrained(typed_model).cell_types == ["alpha", "beta", "gamma"]
    shipped = Annotator.from_pretrained()
    assert "checksum" not in shipped.meta and len(shipped.genes) > 0
