"""benchmarks/parallel_grid.py: one process per run, joined per experiment, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "parallel_grid.py"


@pytest.fixture(scope="module")
def grid():
    return load_script(SCRIPT, "parallel_grid_bench")


def test_jobs_go_experiment_by_experiment_slowest_first(grid):
    jobs = grid.jobs(["immune", "pancreas"], ["naive", "celltypist", "joint", "canal"], [0, 1])
    assert len(jobs) == 16
    assert [j[0] for j in jobs[:8]] == ["immune"] * 8  # whole tables finish first
    assert [j[1] for j in jobs[:4]] == ["joint", "canal", "naive", "celltypist"]
    assert [j[2] for j in jobs[:8]] == [0] * 4 + [1] * 4


def test_two_seeds_side_by_side_join_into_one_table_and_resume(grid, tmp_path, data_root,
                                                               capsys):
    """Two real CellTypist runs of the immune stream (every file capped at 3,000 cells) in two
    processes, merged into OUT/reference.json; a second call finds both done and runs nothing."""
    out = tmp_path / "grid"
    args = ["--experiments", "immune", "--strategies", "celltypist", "--seeds", "0", "1",
            "--jobs", "2", "--threads", "1", "--out", str(out), "--",
            "--max-cells", "3000", "--celltypist-max-iter", "50", "--data-dir", str(data_root)]
    assert grid.main(args) == 0
    merged = json.loads((out / "reference.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in merged["runs"]) == [
        ("celltypist", 0), ("celltypist", 1), ("celltypist prob", 0), ("celltypist prob", 1)]
    assert len(merged["sources"]) == 2
    assert all(r["device"].startswith("cpu: ") for r in merged["runs"])  # CellTypist: CPU
    stats = merged["summary"]["immune"]["celltypist"]
    assert stats["seeds"] == [0, 1] and stats["kang unseen donors/accuracy"]["n"] == 2
    assert "| celltypist (n=2) |" in (out / "reference.md").read_text()
    first = {(r["method"], r["seed"]): r["seconds"] for r in merged["runs"]}
    capsys.readouterr()
    assert grid.main(args) == 0  # --resume in every part: nothing re-run
    again = json.loads((out / "reference.json").read_text())
    assert {(r["method"], r["seed"]): r["seconds"] for r in again["runs"]} == first

