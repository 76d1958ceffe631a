from __future__ import annotations

import json

import anndata as ad
import pandas as pd
import pytest

from canal.cli import main
from canal.stream import StreamConfig, run_stream

TINY_STREAM = """
name = "tiny"
holdout = 0.25
[model]
init = "random"
n_genes = 150
dim = 16
depth = 2
heads = 2
dim_head = 8
head_hidden = 32
rep_dim = 16
[train]
epochs = 3
lr = 3e-3
bank_size = 60
[[stages]]
file = "pancreas/baron_human.h5ad"
where = { batch = ["human1"] }
types = ["alpha", "beta", "ductal"]
[[stages]]
file = "pancreas/baron_human.h5ad"
where = { batch = ["human2"] }
types = ["beta", "delta", "acinar"]
[[tests]]
name = "human4"
file = "pancreas/baron_human.h5ad"
where = { batch = ["human4"] }
types = ["alpha", "beta", "ductal", "delta", "acinar", "gamma"]
"""


def test_tiny_stream_writes_results(tmp_path, data_root):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_STREAM)
    res = run_stream(cfg, out_dir=tmp_path / "out", root=data_root)
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["name"] == "tiny" and len(saved["stages"]) == 2
    R = pd.read_csv(out / "accuracy_matrix.csv", index_col=0)
    assert R.shape == (2, 2) and pd.isna(R.iloc[0, 1]) and R.notna().iloc[1].all()
    assert res["backward_transfer"] == R.iloc[1, 0] - R.iloc[0, 0]
    # gamma never trained, acinar left out (< 10 cells in human2): novel types of the test set
    final = res["final"][0]
    assert final["novel_types"] == ["acinar", "gamma"] and 0 <= final["h_score"] <= 1
    # closed-set read-out: argmax over known types agrees with every non-Unassigned call, so it
    # is right on at least the known cells that the novelty-aware call got right
    assert final["known_accuracy"] <= final["closed_accuracy"] <= 1
    assert {r["stage"] for r in res["tests"]} == {1, 2}
    assert (out / "accuracy_matrix.png").stat().st_size > 0
    assert (out / "test_accuracy.png").exists() and (out / "test_human4.csv").exists()


def test_tests_after_last_stage_only(tmp_path, data_root, capsys, monkeypatch):
    from canal import settings

    monkeypatch.setattr(settings, "progress", True)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_STREAM.replace("epochs = 3", "epochs = 1"))
    res = run_stream(cfg, out_dir=tmp_path / "out", root=data_root, test_every_stage=False,
                     plots=False, save_model=False)
    assert [r["stage"] for r in res["tests"]] == [2] and res["final"] == res["tests"]
    # progress after stage 1 reports the held-out cells, after the last stage the test sets
    out = capsys.readouterr().out
    assert "stage 1/2 " in out and "stage 1 held-out acc" in out and "human4 acc" in out
    # the stages' held-out cells are still scored after every stage (forgetting needs them)
    assert res["backward_transfer"] is not None


def test_shipped_configs_parse():
    for name in ("pancreas", "immune", "novel_pancreas", "novel_immune", "cross_species"):
        cfg = StreamConfig.from_toml(name)
        assert cfg.stages and cfg.tests
    assert StreamConfig.from_toml("cross_species").tests[-1].orthologs


def test_cli_stream(tmp_path, data_root, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_STREAM.replace("epochs = 3", "epochs = 1"))
    assert main(["--quiet", "stream", str(cfg), "--out", str(tmp_path / "o"), "--data-dir",
                 str(data_root), "--strategy", "naive", "--tests-last"]) == 0
    text = capsys.readouterr().out
    assert "| human4 |" in text and "backward transfer" in text
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert {r["stage"] for r in saved["tests"]} == {2}  # --tests-last


MOUSE_STAGE_STREAM = """
name = "mouse stage"
holdout = 0.25
[model]
init = "{init}"
[train]
epochs = 1
lr = 3e-3
bank_size = 40
[[stages]]
file = "pancreas/baron_mouse.h5ad"
types = ["alpha", "beta", "delta"]
orthologs = true
[[tests]]
name = "mouse"
file = "pancreas/baron_mouse.h5ad"
types = ["alpha", "beta", "delta"]
orthologs = true
"""


def test_mouse_stage_is_matched_through_orthologs(tmp_path, data_root, panel):
    """A stage entry's `orthologs = true` reaches fit_stage and the held-out predict (it once
    reached only the test sets: a mouse stage was matched to human genes by exact symbol)."""
    from canal import Annotator
    from tests.conftest import TINY

    Annotator.from_genes(panel, config=TINY).save(tmp_path / "human")
    cfg = tmp_path / "mouse.toml"
    cfg.write_text(MOUSE_STAGE_STREAM.format(init=tmp_path / "human"))
    res = run_stream(cfg, out_dir=tmp_path / "out", root=data_root, plots=False)
    model = Annotator.from_pretrained(tmp_path / "out" / "model")
    assert model.match.orthologs is True  # stored with the model, reused by later calls
    assert model.cell_types == ["alpha", "beta", "delta"]
    assert res["accuracy_matrix"] is not None and res["final"][0]["accuracy"] > 0
    # read without orthologs, the human model finds almost none of its genes in mouse data
    cells = ad.read_h5ad(data_root / "pancreas" / "baron_mouse.h5ad")[:50]
    with pytest.raises(ValueError, match="orthologs"):
        model.predict(cells, match={"orthologs": False}, novelty="none")


def test_a_test_sets_warning_is_logged_once_per_stream(tmp_path, data_root, monkeypatch):
    # Segerstolpe/Lawlor holds TPM-like values: every stage's test pass warns about them, but
    # the stream logs each distinct warning once
    import contextlib
    import logging

    from canal import stream

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_STREAM.replace("epochs = 3", "epochs = 1") + """
[[tests]]
name = "segerstolpe"
file = "pancreas/segerstolpe_lawlor.h5ad"
""")

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    def tpm_warnings() -> int:
        # a handler on canal.pp itself: other tests (the CLI's) change propagation and levels
        pp_logger, handler = logging.getLogger("canal.pp"), Collect()
        level, pp_logger.level = pp_logger.level, logging.WARNING
        pp_logger.addHandler(handler)
        try:
            res = run_stream(cfg, out_dir=tmp_path / "out", root=data_root, plots=False,
                             save_model=False)
        finally:
            pp_logger.removeHandler(handler)
            pp_logger.setLevel(level)
        assert {r["stage"] for r in res["tests"] if r["test"] == "segerstolpe"} == {1, 2}
        return sum("TPM/CPM-like" in m for m in handler.messages)

    assert tpm_warnings() == 1
    # outside a stream nothing is filtered any more
    assert not any(logging.getLogger(n).filters for n in ("canal", "canal.pp"))
    # without the filter the same stream repeats it (the check above can fail)
    monkeypatch.setattr(stream, "_each_warning_once", contextlib.nullcontext)
    assert tpm_warnings() > 1


def test_random_init_panel_from_the_first_stage(tmp_path, data_root):
    from dataclasses import replace

    from canal.model import Annotator
    from canal.stream import _init_model, load_cells

    cfg = StreamConfig.from_toml(_write(tmp_path, TINY_STREAM))
    stages = [load_cells(s, root=data_root) for s in cfg.stages]
    first = _init_model(replace(cfg, model=cfg.model | {"panel_from": "first"}), stages, seed=0)
    both = _init_model(cfg, stages, seed=0)
    # the first stage's HVGs only (what `canal fit` on a first dataset picks), not both stages'
    assert first.genes == Annotator.create(stages[0], n_genes=150).genes
    assert first.genes != both.genes and len(first.genes) == len(both.genes) == 150
    with pytest.raises(ValueError, match="panel_from must be 'stages' or 'first'"):
        _init_model(replace(cfg, model=cfg.model | {"panel_from": "last"}), stages, seed=0)


def _write(tmp_path, text: str):
    path = tmp_path / "stream.toml"
    path.write_text(text)
    return path


def test_model_panel_chooses_the_first_stages_panel(tmp_path, data_root):
    from canal import Annotator, pp
    from canal.stream import load_cells

    text = TINY_STREAM.replace('rep_dim = 16\n', 'rep_dim = 16\npanel = "hvg"\n').replace(
        "epochs = 3\n", "epochs = 1\nn_panel = 120\n")
    cfg = _write(tmp_path, text)
    run_stream(cfg, out_dir=tmp_path / "out", root=data_root, seed=0)
    model = Annotator.from_pretrained(tmp_path / "out" / "model")
    # the random model's 150-gene panel (both stages' HVGs) replaced at stage 1 by the first
    # stage's own 120 most variable genes, kept at stage 2
    first = StreamConfig.from_toml(cfg).stages[0]
    from canal.datasets import holdout_split

    train, _ = holdout_split(load_cells(first, root=data_root), labels_key=first.labels_key,
                             holdout=0.25, seed=0)
    assert model.genes == pp.highly_variable_panel([train], n_genes=120)
    assert model.meta["panel"]["source"] == "hvg" and model.stage == 2
    bad = _write(tmp_path, TINY_STREAM.replace('rep_dim = 16\n', 'rep_dim = 16\npanel = "all"\n'))
    with pytest.raises(ValueError, match="panel must be 'auto', 'hvg', 'pretrained'"):
        run_stream(bad, out_dir=tmp_path / "bad", root=tmp_path / "no-data-here")
