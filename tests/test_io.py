from __future__ import annotations

import json

import pytest
import torch

from canal import Annotator, io


def test_save_load_identical_outputs(tiny_model, baron, tmp_path):
    tiny_model.net.head.grow(3)
    tiny_model.cell_types = ["alpha", "beta", "delta"]
    tiny_model.stage = 2
    data = tiny_model.prepare(baron[:40])
    rep, logits = tiny_model.outputs(data, batch_size=16)
    path = tiny_model.save(tmp_path / "ckpt")
    meta = json.loads((path / "config.json").read_text())
    assert meta["cell_types"] == ["alpha", "beta", "delta"] and meta["stage"] == 2
    assert meta["genes"] == tiny_model.genes and meta["versions"]["torch"] == torch.__version__
    # weights-only loadable
    assert isinstance(torch.load(path / "model.pt", weights_only=True), dict)
    loaded = Annotator.from_pretrained(path)
    rep2, logits2 = loaded.outputs(loaded.prepare(baron[:40]), batch_size=7)
    assert torch.equal(logits, logits2) or torch.allclose(logits, logits2, atol=1e-6)
    torch.testing.assert_close(rep, rep2, atol=1e-6, rtol=1e-5)
    assert loaded.cell_types == tiny_model.cell_types and loaded.stage == 2


def test_atomic_overwrite_leaves_no_temp(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "ckpt")
    tiny_model.stage = 5
    tiny_model.save(tmp_path / "ckpt")
    assert Annotator.from_pretrained(tmp_path / "ckpt").stage == 5
    # only the checkpoint and its (empty) lock file beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.lock", "ckpt"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("user file")
    with pytest.raises(io.CheckpointError, match="not a canal checkpoint"):
        tiny_model.save(tmp_path / "other")
    assert (tmp_path / "other" / "data.txt").read_text() == "user file"


def test_corrupt_foreign_and_newer_checkpoints(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError):
        Annotator.from_pretrained(tmp_path / "missing")
    (tmp_path / "foreign").mkdir()
    with pytest.raises(io.CheckpointError, match="not a canal checkpoint"):
        Annotator.from_pretrained(tmp_path / "foreign")
    meta = json.loads((path / "config.json").read_text())
    meta["format_version"] = io.FORMAT_VERSION + 1
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(io.CheckpointError, match="upgrade canal"):
        Annotator.from_pretrained(path)
    path = tiny_model.save(tmp_path / "ckpt")
    (path / "model.pt").write_bytes((path / "model.pt").read_bytes()[:500])
    with pytest.raises(io.CheckpointError, match="corrupt"):
        Annotator.from_pretrained(path)
    path = tiny_model.save(tmp_path / "ckpt")
    (path / "config.json").write_text("{not json")
    with pytest.raises(io.CheckpointError, match="corrupt"):
        Annotator.from_pretrained(path)
    # a pickled (non weights-only) payload is refused
    path = tiny_model.save(tmp_path / "ckpt")
    torch.save({"x": object()}, path / "model.pt")
    with pytest.raises(io.CheckpointError):
        Annotator.from_pretrained(path)


def test_write_h5ad_of_backed_data_copies_x_and_raw(baron, tmp_path):
    """A backed AnnData written by io.write_h5ad (X and raw copied by HDF5) reads back as the
    same AnnData written from memory."""
    import anndata as ad
    import numpy as np

    cells = baron[:300].copy()
    cells.raw = cells
    cells = cells[:, :2000].copy()
    cells.layers["counts"] = cells.X.copy()
    src = tmp_path / "in.h5ad"
    cells.write_h5ad(src)
    backed = ad.read_h5ad(src, backed="r")
    score = np.random.default_rng(0).random(cells.n_obs).astype(np.float32)
    for a in (backed, cells):
        a.obs["score"] = score
        a.obsm["X_rep"] = np.arange(a.n_obs * 3, dtype=np.float32).reshape(-1, 3)
        a.uns["params"] = {"k": 1}
    io.write_h5ad(backed, tmp_path / "backed.h5ad")
    io.write_h5ad(cells, tmp_path / "memory.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backed.h5ad", "in.h5ad",
                                                           "memory.h5ad"]
    out, ref = ad.read_h5ad(tmp_path / "backed.h5ad"), ad.read_h5ad(tmp_path / "memory.h5ad")
    assert out.shape == ref.shape == (300, 2000)
    assert (out.X != ref.X).nnz == 0 and out.X.dtype == ref.X.dtype
    assert (out.raw.X != ref.raw.X).nnz == 0 and out.raw.shape == (300, baron.n_vars)
    assert out.raw.var_names.equals(ref.raw.var_names)
    assert (out.layers["counts"] != ref.layers["counts"]).nnz == 0
    assert out.obs.equals(ref.obs) and out.var.equals(ref.var)
    np.testing.assert_array_equal(out.obsm["X_rep"], ref.obsm["X_rep"])
    assert out.uns["params"] == ref.uns["params"] == {"k": 1}
    assert (backed.X[:5] != cells.X[:5]).nnz == 0  # the input stays readable
