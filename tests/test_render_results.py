"""benchmarks/render_results.py: the README's results tables are the JSON's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "render_results.py"


@pytest.fixture(scope="module")
def render():
    return load_script(SCRIPT, "render_results")


def test_readme_results_match_their_json(render):
    text = render.README.read_text()
    names = [m.group("name") for m in render.MARKER.finditer(text)]
    # every generated table is marked in the README, once
    assert sorted(names) == sorted([*render.TABLES, *render.CUSTOM])
    assert render.render_readme(text) == text, "run python benchmarks/render_results.py"


def test_results_md_match_their_json(render):
    files, _ = render.render_result_files()
    assert render.RESULTS / "reference_hour.md" in files
    for path, text in files.items():
        assert path.read_text() == text, path


def test_a_typed_number_is_caught(render, capsys):
    text = render.README.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| naive fine-tuning |"))
    edited = text.replace(row, row.replace("0.", "0.9", 1), 1)
    assert render.render_readme(edited) == text  # rendering puts the JSON's number back
    with pytest.raises(KeyError, match="known:"):
        render.render_readme(text.replace("results:begin reference_hour/immune",
                                          "results:begin reference_hour/typo"))
    with pytest.raises(ValueError, match="no <!-- results:begin"):
        render.render_readme("no markers")


def test_check_exits_nonzero_when_readme_differs(render, tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    text = render.README.read_text()
    readme.write_text(text.replace("| 0.697 ± 0.053 |", "| 0.700 ± 0.053 |", 1))
    monkeypatch.setattr(render, "README", readme)
    monkeypatch.setattr(render, "render_result_files", lambda **kw: ({}, []))
    assert render.main(["--check"]) == 1
    out = capsys.readouterr()
    assert "-| canal (replay + distillation) | 0.700" in out.out and "README.md" in out.err
    assert readme.read_text() != text  # --check writes nothing
    assert render.main([]) == 0 and readme.read_text() == text
    assert render.main(["--check"]) == 0


def _grid(tmp_path, name, *, init, commit, accs):
    """A reference.json with one canal run per seed on one test set (accuracy ``accs[seed]``)."""
    import json

    runs = [{"experiment": "pancreas", "method": "canal", "seed": s, "git_commit": commit,
             "tests": {"human4": {"accuracy": a, "macro_f1": a - 0.1, "closed_accuracy": a}}}
            for s, a in enumerate(accs)]
    runs.append({"experiment": "pancreas", "method": "celltypist", "seed": 0,
                 "git_commit": commit, "tests": {"human4": {"accuracy": 1.0, "macro_f1": 1.0,
                                                            "closed_accuracy": 1.0}}})
    payload = {"settings": {"epochs": None, "weights": {"init": init}}, "runs": runs}
    (tmp_path / name).write_text(json.dumps(payload))
    return name


def test_pretrain_vs_random_is_paired_by_seed(render, tmp_path, monkeypatch):
    monkeypatch.setattr(render, "RESULTS", tmp_path)
    pre = _grid(tmp_path, "pre.json", init="pretrained", commit="abc", accs=[0.8, 0.9, 0.7])
    # seed 2 is missing from the random arm: it is left out of both
    twin = _grid(tmp_path, "twin.json", init="twin", commit="abc", accs=[0.75, 0.8])
    (row,) = render.pretrain_vs_random_rows([(pre, twin)])
    assert row["seeds"] == [0, 1] and row["test"] == "human4"
    acc = row["accuracy"]
    assert acc["pretrained"] == pytest.approx(0.85) and acc["random"] == pytest.approx(0.775)
    assert acc["gain"] == pytest.approx(0.075)
    assert acc["gain_std"] == pytest.approx(0.05 / 2 ** 0.5)  # std of (0.05, 0.10)
    # the two arms must be one code version, and the second a --init twin run
    other = _grid(tmp_path, "other.json", init="twin", commit="def", accs=[0.7, 0.7])
    with pytest.raises(ValueError, match="different git commits"):
        render.pretrain_vs_random_rows([(pre, other)])
    assert render.pretrain_vs_random_rows([(pre, other)], allow_mixed=True)
    with pytest.raises(ValueError, match="not a reference.py --init twin"):
        render.pretrain_vs_random_rows([(pre, pre)])
