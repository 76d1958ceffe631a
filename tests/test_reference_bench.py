"""benchmarks/reference.py: normalization, ortholog renaming, summary tables, one tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "reference.py"

TINY_STREAM = """
name = "tiny_reference"
holdout = 0.25
[train]
lr = 3e-3
bank_size = 60
[[stages]]
file = "immune/kang_ctrl_8donors.h5ad"
where = { batch = ["1015"] }
types = ["B", "NK", "CD14 Mono"]
[[stages]]
file = "immune/kang_ctrl_8donors.h5ad"
where = { batch = ["1256"] }
types = ["B", "NK", "FCGR3A Mono"]
[[tests]]
name = "donor 101"
file = "immune/kang_ctrl_8donors.h5ad"
where = { batch = ["101"] }
types = ["B", "NK", "CD14 Mono", "FCGR3A Mono", "DC"]
"""


@pytest.fixture(scope="module")
def reference():
    return load_script(SCRIPT, "reference_bench")


def test_log1p_cells_renames_orthologs_and_keeps_totals(reference):
    counts = sp.csr_matrix(np.array([[1, 3, 0, 6], [0, 2, 2, 0]], dtype=np.float32))
    adata = ad.AnnData(counts, obs=pd.DataFrame({"cell_type": ["a", "b"]}, index=["c1", "c2"]),
                       var=pd.DataFrame(index=["Gcg", "Ins1", "Xyz", "Sst"]))
    table = pd.DataFrame({"human": ["GCG", "SST"], "mouse": ["Gcg", "Sst"]})
    out = reference.log1p_cells(adata, labels_key="cell_type", orthologs=table)
    assert list(out.var_names) == ["GCG", "mouse:Ins1", "mouse:Xyz", "SST"]
    np.testing.assert_allclose(np.expm1(out.X.toarray()).sum(axis=1), 1e4, rtol=1e-5)
    assert adata.X[0, 0] == 1  # input untouched


def test_summary_mean_std_and_table(reference):
    def run(method, seed, acc, h=None):
        test = {"accuracy": acc, "closed_accuracy": acc + 0.05, "macro_f1": acc, "ari": acc,
                "novel_types": []}
        if h is not None:
            test |= {"h_score": h, "novel_types": ["gamma"]}
        return {"experiment": "x", "method": method, "seed": seed, "seconds": 1.0,
                "average_accuracy": 0.9, "backward_transfer": -0.1, "tests": {"t": test}}

    runs = [run("canal", 0, 0.8, 0.5), run("canal", 1, 0.9, 0.7), run("celltypist", 0, 0.7, 0.0)]
    runs[-1] |= {"n_genes": 123, "converged": True, "train_seconds": 2.0}
    summary = reference.summarize_runs(runs)
    stat = summary["x"]["canal"]["t/accuracy"]
    assert stat["n"] == 2 and stat["mean"] == pytest.approx(0.85)
    assert stat["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    table = reference.experiment_table("x", runs, summary["x"])
    assert table.splitlines()[0].startswith(
        "| method | t acc | t closed acc | t F1 | t ARI | t H |")
    assert "0.850 ± 0.071 | 0.900 ± 0.071" in table and "-0.100 ± 0.000" in table
    assert "novel types gamma" in table and "trained on 123 genes" in table
    # CANAL's mixup rule, scored on the same predictions, and the run time in minutes
    runs[0]["tests"]["t"]["mixup"] = {"accuracy": 0.6, "h_score": 0.4}
    runs[1]["tests"]["t"]["mixup"] = {"accuracy": 0.8, "h_score": 0.6}
    canal = reference.summarize_runs(runs)["x"]["canal"]
    assert canal["t/mixup_h_score"]["mean"] == pytest.approx(0.5)
    assert canal["t/mixup_unassigned_known"]["n"] == 0 and canal["minutes"]["mean"] == 1 / 60
    assert reference.summarize_runs(runs)["x"]["celltypist"]["t/mixup_accuracy"]["n"] == 0


def test_full_grid_flag(reference):
    args = reference.parse_args(["--full"])
    assert args.experiments == list(reference.EXPERIMENTS) and args.seeds == [0, 1, 2]
    assert args.epochs is None and args.max_cells is None
    for extra in (["--epochs", "3"], ["--max-cells", "800"], ["--hour"], ["--quick"]):
        with pytest.raises(SystemExit):
            reference.parse_args(["--full", *extra])


@pytest.fixture
def restore_globals():
    """main() sets torch threads, canal.settings and logger levels: put them back."""
    import logging

    import torch

    from canal import settings

    threads = torch.get_num_threads()
    saved = (settings.num_threads, settings.device, settings.progress)
    levels = {n: logging.getLogger(n).level for n in ("canal", "celltypist", "reference")}
    yield
    torch.set_num_threads(threads)
    settings.num_threads, settings.device, settings.progress = saved
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_tiny_run_writes_report(reference, tmp_path, data_root, capsys, restore_globals):
    cfg = tmp_path / "tiny_reference.toml"
    cfg.write_text(TINY_STREAM)
    out = tmp_path / "out"
    rc = reference.main(["--experiments", str(cfg), "--strategies", "naive", "celltypist",
                         "--init", "random", "--epochs", "1", "--seeds", "0",
                         "--celltypist-max-iter", "50", "--data-dir", str(data_root),
                         "--max-cells", "3000",
                         "--threads", "1", "--out", str(out)])
    assert rc == 0
    payload = json.loads((out / "reference.json").read_text())
    methods = {r["method"] for r in payload["runs"]}
    assert methods == {"naive", "celltypist", "celltypist prob"}
    # every run records the commit it was made at
    assert {r["git_commit"] for r in payload["runs"]} == {payload["machine"]["git_commit"]}
    assert len(payload["machine"]["git_commit"]) == 40
    counts = {tuple(r["n_train_cells"]) for r in payload["runs"]}
    assert len(counts) == 1  # CellTypist trained on the stream's own training split
    ct = next(r for r in payload["runs"] if r["method"] == "celltypist")
    assert ct["tests"]["donor 101"]["novel_types"] == ["DC"]
    assert ct["tests"]["donor 101"]["unknown_accuracy"] == 0.0  # best match: no Unassigned
    assert ct["n_genes"] == 1287 and ct["average_accuracy"] > 0.5
    assert payload["machine"]["cpu_count"] and payload["machine"]["torch"]
    capped = ad.read_h5ad(out / "data_max3000" / "immune" / "kang_ctrl_8donors.h5ad")
    assert capped.n_obs == 3000
    text = (out / "reference.md").read_text()
    assert "## tiny_reference" in text and "| naive (n=1) |" in text
    assert "## tiny_reference" in capsys.readouterr().out


def _payload(commits):
    test = {"accuracy": 0.8, "closed_accuracy": 0.9, "macro_f1": 0.7, "ari": 0.6,
            "novel_types": []}
    runs = [{"experiment": "x", "method": "canal", "seed": s, "seconds": 1.0,
             "average_accuracy": 0.9, "backward_transfer": 0.0, "tests": {"t": test},
             **({"git_commit": c} if c else {})} for s, c in enumerate(commits)]
    return {"command": "reference.py", "started": "now", "finished": "now",
            "machine": {"platform": "p", "cpus_available": 2, "cpu_count": 2, "torch": "t",
                        "torch_threads": 2, "cuda": False, "git_commit": "a" * 40,
                        "versions": {"celltypist": "1", "scikit-learn": "1"}},
            "settings": {"weights": {"init": "random"}, "epochs": 1, "seeds": [0, 1],
                         "max_cells": None, "celltypist_genes": "train", "p_thres": 0.5},
            "runs": runs}


def test_tables_refuse_mixed_commits(reference):
    # runs without their own commit (older files) take the file's machine commit
    assert reference.check_commits(_payload([None, "a" * 40])) == {"x": ["a" * 40]}
    mixed = _payload(["a" * 40, "b" * 40])
    with pytest.raises(reference.MixedCommitsError,
                       match=r"x: aaaaaaaaaa, bbbbbbbbbb.*--allow-mixed-commits"):
        reference.render_markdown(mixed)
    text = reference.render_markdown(mixed, allow_mixed=True)
    assert "**Mixed commits** (--allow-mixed-commits): aaaaaaaaaa, bbbbbbbbbb." in text


def test_resume_refuses_runs_of_another_commit(reference, tmp_path, capsys, restore_globals):
    payload = _payload(["0" * 40])
    payload["settings"] |= {"weights": reference.weights_info("random"), "epochs": 1,
                            "celltypist_max_iter": None}
    (tmp_path / "reference.json").write_text(json.dumps(payload))
    args = ["--experiments", "pancreas", "--strategies", "naive", "--init", "random",
            "--epochs", "1", "--seeds", "0", "--threads", "1", "--out", str(tmp_path),
            "--resume"]
    assert reference.main(args) == 2
    err = capsys.readouterr().err
    assert "runs made at git commit(s) 0000000000" in err and "--allow-mixed-commits" in err
    assert json.loads((tmp_path / "reference.json").read_text()) == payload  # untouched


def test_merge_joins_seeds_run_apart_and_refuses_what_does_not_share_a_table(
        reference, tmp_path, capsys):
    """Seeds of the full-data grid run in separate processes merge back into the table that
    one process would have written (real results: benchmarks/results/reference_full.json)."""
    whole = json.loads((Path(reference.__file__).parent / "results"
                        / "reference_full.json").read_text())
    dirs = []
    for seed in whole["settings"]["seeds"]:
        part = whole | {"runs": [r for r in whole["runs"] if r["seed"] == seed],
                        "settings": whole["settings"] | {"seeds": [seed]}}
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "reference.json").write_text(json.dumps(part))
        dirs.append(str(tmp_path / f"s{seed}"))
    assert reference.main(["--merge", *dirs, "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "reference.json").read_text())
    assert merged["settings"]["seeds"] == whole["settings"]["seeds"]
    assert len(merged["sources"]) == 3 and len(merged["runs"]) == len(whole["runs"])
    assert merged["summary"] == json.loads(json.dumps(reference.summarize_runs(whole["runs"])))
    assert (tmp_path / "all" / "reference.md").read_text() == reference.render_markdown(merged)
    # the same run twice, other settings, other commits: refused, nothing written
    assert reference.main(["--merge", dirs[0], dirs[0], "--out", str(tmp_path / "x")]) == 2
    assert "cross_species canal seed 0 is in both" in capsys.readouterr().err
    other = json.loads((tmp_path / "s1" / "reference.json").read_text())
    other["settings"]["epochs"] = 3
    (tmp_path / "s1" / "reference.json").write_text(json.dumps(other))
    assert reference.main(["--merge", dirs[0], dirs[1], "--out", str(tmp_path / "x")]) == 2
    assert "different settings (epochs)" in capsys.readouterr().err
    for r in other["runs"]:
        r["git_commit"] = "b" * 40
    other["settings"]["epochs"] = whole["settings"]["epochs"]
    (tmp_path / "s1" / "reference.json").write_text(json.dumps(other))
    assert reference.main(["--merge", dirs[0], dirs[1], "--out", str(tmp_path / "x")]) == 2
    assert "--allow-mixed-commits" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_merge_compares_weights_by_hash_not_by_checkout(reference, tmp_path, capsys):
    """Parts run from another checkout (a worktree, a GPU machine's copy) hold the same
    weights at another path and file time: they share a table; other weights do not."""
    whole = json.loads((Path(reference.__file__).parent / "results"
                        / "reference_full.json").read_text())
    dirs = []
    for seed in (0, 1):
        part = whole | {"runs": [r for r in whole["runs"] if r["seed"] == seed],
                        "settings": json.loads(json.dumps(whole["settings"]))}
        if seed == 1:
            part["settings"]["weights"] |= {"path": "/elsewhere/weights/default",
                                            "model_pt_mtime": "2030-01-01T00:00:00+00:00"}
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "reference.json").write_text(json.dumps(part))
        dirs.append(str(tmp_path / f"s{seed}"))
    assert reference.main(["--merge", *dirs, "--out", str(tmp_path / "ok")]) == 0
    other = json.loads((tmp_path / "s1" / "reference.json").read_text())
    other["settings"]["weights"]["model_pt_sha256"] = "0" * 16
    (tmp_path / "s1" / "reference.json").write_text(json.dumps(other))
    assert reference.main(["--merge", *dirs, "--out", str(tmp_path / "x")]) == 2
    assert "different settings (weights)" in capsys.readouterr().err


def test_machine_info_takes_the_sent_commit(reference, monkeypatch):
    """A tree copied to another machine may carry no .git or a stale one: the commit the
    sender names wins, and such a copy is clean by construction."""
    monkeypatch.setenv("CANAL_GIT_COMMIT", "c" * 40)
    info = reference.machine_info()
    assert info["git_commit"] == "c" * 40 and info["git_dirty"] is False
    assert info["device"].startswith("cpu")
    monkeypatch.delenv("CANAL_GIT_COMMIT")
    assert len(reference.machine_info()["git_commit"]) == 40
