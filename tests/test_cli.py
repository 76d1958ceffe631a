from __future__ import annotations

import anndata as ad
import pytest

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


def test_fit_flags_come_from_stage_config_and_reach_the_model(tmp_path, data_root, capsys):
    from canal import Annotator, StageConfig

    src = data_root / "pancreas" / "baron_human.h5ad"
    init = tmp_path / "init"
    assert main(["--quiet", "init", "--data", str(src), "--out", str(init), "--n-genes",
                 "100"]) == 0
    out = tmp_path / "fit"
    # flags after the subcommand; every StageConfig field has one
    assert main(["fit", "--data", str(src), "--from", str(init), "--out", str(out),
                 "--where", "batch=human1", "--types", "alpha,beta,ductal", "--epochs", "1",
                 "--panel-dropout", "0.3", "--label-smoothing", "0.05", "--bank-size", "30",
                 "--min-overlap", "0.02", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "stage 1:" in said and f"written to {out}" in said
    model = Annotator.from_pretrained(out)
    cfg = model.history[-1]["config"]
    assert cfg["panel_dropout"] == 0.3 and cfg["label_smoothing"] == 0.05 and cfg["epochs"] == 1
    assert set(cfg) == set(StageConfig().to_dict())
    assert model.cell_types == ["alpha", "beta", "ductal"] and len(model.bank) == 30
    assert model.match.min_overlap == 0.02  # the gene match is stored with the model
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "stage 1:" in info and "example bank: 30 cells, 3 types" in info
    assert "min_overlap=0.02" in info
    # a bad choice is refused by argparse with the allowed values
    with pytest.raises(SystemExit) as err:
        main(["fit", "--data", str(src), "--out", str(out), "--strategy", "bogus"])
    assert err.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_non_h5ad_input_is_named(tmp_path, capsys):
    csv = tmp_path / "cells.csv"
    csv.write_text("a,b\n1,2\n")
    assert main(["embed", "--model", "nope", "--data", str(csv), "--out",
                 str(tmp_path / "o.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err or "not a readable .h5ad" in err
    from canal.model import DEFAULT_WEIGHTS

    assert main(["embed", "--model", str(DEFAULT_WEIGHTS), "--data", str(csv), "--out",
                 str(tmp_path / "o.h5ad")]) == 2
    assert "not a readable .h5ad file" in capsys.readouterr().err
    assert csv.read_text() == "a,b\n1,2\n"
