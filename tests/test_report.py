"""The run report (canal.report): checked without a browser, on a tiny real stream run."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser

import anndata as ad
import numpy as np
import pytest

from canal import metrics, report
from canal.cli import main
from canal.stream import run_stream
from tests.test_stream import TINY_STREAM

STREAM_SECTIONS = ("stages", "library", "accuracy-matrix", "forgetting", "test-sets",
                   "confusion", "umap", "novelty", "timings")


class _Page(HTMLParser):
    """Section ids, image sources, and the numeric cells of every table with an id."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.tables: dict[str, list[dict[str, float]]] = {}
        self._table: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"])
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "table":
            self._table = a.get("id")
            if self._table:
                self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append({})
        elif tag == "td" and self._table and "data-value" in a and "data-key" in a:
            self.tables[self._table][-1][a["data-key"]] = float(a["data-value"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    """A two-stage stream on Baron human (one epoch per stage), tests after every stage."""
    folder = tmp_path_factory.mktemp("report")
    cfg = folder / "tiny.toml"
    cfg.write_text(TINY_STREAM.replace("epochs = 3", "epochs = 1"))
    res = run_stream(cfg, out_dir=folder / "out", root=data_root, save_model=False)
    return folder / "out", res


def _png_ok(src: str) -> bool:
    prefix = "data:image/png;base64,"
    return src.startswith(prefix) and \
        base64.b64decode(src[len(prefix):], validate=True).startswith(b"\x89PNG\r\n\x1a\n")


def _no_outside_references(text: str) -> None:
    assert not re.search(r"https?://|<script|<link|<iframe|url\(|@import", text, re.I)
    # every src/href is an embedded data URI
    for ref in re.findall(r'(?:src|href)="([^"]*)"', text):
        assert ref.startswith("data:image/png;base64,"), ref[:60]


def test_stream_writes_a_self_contained_report(run):
    out, res = run
    page = out / report.REPORT
    assert res["report"] == str(page)
    text = page.read_text()
    parsed = _Page(text)
    assert parsed.sections == list(STREAM_SECTIONS)
    _no_outside_references(text)
    # accuracy matrix, forgetting curve, test accuracy over stages, and per test set a
    # confusion matrix, a UMAP and a novelty histogram
    assert len(parsed.images) == 6 and all(_png_ok(src) for src in parsed.images)
    for section in ("confusion", "umap", "novelty"):
        body = text.split(f'<section id="{section}">')[1].split("</section>")[0]
        assert "<img" in body and "human4" in body
    assert "acinar, gamma" in text  # the novel types of the test set
    assert "threshold" in text or "novelty rule: calibrated" in text


def test_report_tables_equal_the_run_json(run):
    out, _ = run
    saved = json.loads((out / "results.json").read_text())
    tables = _Page((out / report.REPORT).read_text()).tables
    (final,) = [r for r in tables["final-table"] if r]
    for key, _ in report.METRIC_COLUMNS:
        value = saved["final"][0].get(key)
        if value is None:
            assert key not in final
        else:
            assert final[key] == value, key
    (mixup,) = [r for r in tables["mixup-table"] if r]
    for key in ("accuracy", "macro_f1", "h_score", "unassigned_known"):
        assert mixup[f"mixup.{key}"] == saved["final"][0]["mixup"][key]
    per_stage = [r for r in tables["stages-human4"] if r]
    assert [r["stage"] for r in per_stage] == [1, 2]
    for row, rec in zip(per_stage, saved["tests"], strict=True):
        assert row["accuracy"] == rec["accuracy"] and row["h_score"] == rec["h_score"]
    (summary,) = [r for r in tables["stream-summary"] if r]
    for key in ("average_accuracy", "backward_transfer", "forgetting"):
        assert summary[key] == saved[key]
    # per-stage forgetting: the matrix's entries, and its mean is the run's forgetting
    R = np.array(saved["accuracy_matrix"]["data"], dtype=float)
    rows = [r for r in tables["forgetting-table"] if r]
    assert [r["learnt"] for r in rows] == [R[0, 0], R[1, 1]]
    assert rows[0]["final"] == R[1, 0] and rows[0]["forgetting"] == R[0, 0] - R[1, 0]
    assert np.mean([r["forgetting"] for r in rows if "forgetting" in r]) == \
        pytest.approx(saved["forgetting"])
    timings = [r for r in tables["timings-table"] if r]
    assert [r["seconds"] for r in timings] == [s["seconds"] for s in saved["stages"]] + \
        [saved["seconds"]]
    stages = [r for r in tables["stages-table"] if r]
    assert [r["n_cells"] for r in stages] == [s["n_cells"] for s in saved["stages"]]


def test_saved_predictions_are_the_final_calls(run):
    """predictions/*.h5ad hold the calls the final metrics were computed from."""
    out, res = run
    entry = res["predictions"]["human4"]
    cells = ad.read_h5ad(out / entry["file"])
    final = res["final"][0]
    truth = cells.obs[entry["truth"]].astype(str).to_numpy()
    s = metrics.summarize(truth, cells.obs["canal"].astype(str).to_numpy(),
                          novel_types=final["novel_types"])
    assert s["accuracy"] == final["accuracy"] and s["h_score"] == final["h_score"]
    assert cells.obsm["X_canal"].shape == (final["n_cells"], 16) and cells.n_vars == 0


def test_report_from_results_alone_says_what_is_missing(run, tmp_path):
    out, _ = run
    shutil.copy(out / "results.json", tmp_path / "results.json")
    page = report.write_report(tmp_path)
    text = page.read_text()
    assert _Page(text).sections == list(STREAM_SECTIONS)
    assert text.count("no saved predictions") == 3 and "re-run canal stream" in text


def test_report_bad_input_names_problem_and_fix(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist.*canal stream CONFIG --out"):
        report.write_report(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not the output of a stream run: it has no "
                                         "results.json; run canal stream"):
        report.write_report(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON.*re-run canal stream"):
        report.write_report(tmp_path)
    # canal evaluate's metrics.json under the wrong name
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {"accuracy": 0.5}}))
    with pytest.raises(ValueError, match=r"lacks \['name', 'stages', 'tests', 'final'\]"):
        report.write_report(tmp_path)
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "canal report: error:" in capsys.readouterr().err
    assert not (tmp_path / report.REPORT).exists()


def test_cli_evaluate_writes_the_page_for_one_prediction(run, tmp_path, capsys):
    out, res = run
    pred = out / res["predictions"]["human4"]["file"]
    assert main(["evaluate", "--pred", str(pred), "--truth", "cell_type", "--novel-types",
                 "acinar,gamma", "--out", str(tmp_path / "eval"), "--umap-cells", "200"]) == 0
    page = tmp_path / "eval" / report.REPORT
    assert str(page) in capsys.readouterr().out
    text = page.read_text()
    parsed = _Page(text)
    assert parsed.sections == ["test-sets", "confusion", "umap", "novelty"]
    _no_outside_references(text)
    # confusion, UMAP, novelty histogram, novelty trade-off (calibrated p-values)
    assert len(parsed.images) == 4 and all(_png_ok(src) for src in parsed.images)
    assert "200 of 284 cells" in text
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    (row,) = [r for r in parsed.tables["final-table"] if r]
    assert row["accuracy"] == scores["accuracy"] == res["final"][0]["accuracy"]
    assert row["h_score"] == scores["h_score"]
