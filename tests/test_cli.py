from __future__ import annotations

import anndata as ad

from canal.cli import main


def test_init_info_embed(tmp_path, data_root, capsys):
    src = data_root / "pancreas" / "segerstolpe_lawlor.h5ad"
    out = tmp_path / "ckpt"
    assert main(["--quiet", "init", "--data", str(src), "--out", str(out), "--n-genes", "100"]) == 0
    assert main(["info", str(out)]) == 0
    assert "genes=100" in capsys.readouterr().out
    emb = tmp_path / "emb.h5ad"
    assert main(["--quiet", "embed", "--model", str(out), "--data", str(src), "--out",
                 str(emb)]) == 0
    res = ad.read_h5ad(emb)
    assert res.obsm["X_canal"].shape == (593, 64)


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
