"""One self-contained HTML page for a stream run or a single prediction.

The page needs nothing beside itself: plots are embedded as base64 PNG data URIs, the style
sheet is inline, and there are no scripts or external references, so it can be mailed or
attached to a ticket and opened anywhere.

A stream report (:func:`write_report`) is built from what ``canal stream`` writes into its
output folder: ``results.json`` (stages, accuracy matrix, per-test-set metrics, timings) and
``predictions/*.h5ad`` (each test set's calls, novelty scores and ``X_canal`` after the last
stage). A prediction report (:func:`write_prediction_report`) is built from one annotated
AnnData, as ``canal evaluate`` has it.
"""

from __future__ import annotations

import base64
import html
import io as _bytes_io
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from canal import io, metrics

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = ["REPORT", "stream_report_html", "write_prediction_report", "write_report"]

#: File name of the page in a run's output folder.
REPORT = "report.html"

#: The metric columns of a test-set table: (results key, header).
METRIC_COLUMNS = (
    ("n_cells", "cells"), ("accuracy", "accuracy"), ("closed_accuracy", "closed-set acc"),
    ("macro_f1", "macro-F1"), ("ari", "ARI"), ("known_accuracy", "known acc"),
    ("unknown_accuracy", "unknown acc"), ("h_score", "H-score"),
    ("unassigned_known", "known cells Unassigned"),
)

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1100px; padding: 1.5em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; }
td.name, th.name { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.note { color: #666; font-size: 0.85em; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0.5em 0; max-width: 100%; }
figcaption { color: #666; font-size: 0.85em; }
"""


# --- building blocks ------------------------------------------------------------------------


def _png(fig: Figure, *, dpi: int = 100) -> str:
    """The figure as a ``data:image/png;base64,...`` URI."""
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Figure, alt: str, *, caption: str | None = None, width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="{_png(fig)}" alt="{html.escape(alt)}"{style}>{cap}</figure>')


def _number(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.3f}"
    return html.escape(str(v))


def _cell(v: Any, *, key: str | None = None) -> str:
    """A table cell; numbers carry their exact value in ``data-value`` (the shown one is
    rounded), so the page can be checked against the run's JSON."""
    attrs = f' data-key="{html.escape(key)}"' if key else ""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        attrs += f' data-value="{float(v)!r}"'
        return f"<td{attrs}>{_number(v)}</td>"
    return f'<td class="name"{attrs}>{_number(v)}</td>'


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], *,
           keys: Sequence[str | None] | None = None, table_id: str | None = None) -> str:
    keys = list(keys) if keys is not None else [None] * len(header)
    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    head = "".join(f'<th class="name">{html.escape(h)}</th>' if i == 0 else
                   f"<th>{html.escape(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(_cell(v, key=k) for v, k in zip(row, keys, strict=True))
                   + "</tr>" for row in rows)
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=\"note\">{html.escape(subtitle)}</p>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def _metric_rows(records: Iterable[dict[str, Any]], first: str) -> list[list[Any]]:
    return [[r[first], *(r.get(k) for k, _ in METRIC_COLUMNS)] for r in records]


def _metric_table(records: Sequence[dict[str, Any]], *, first: str, first_header: str,
                  table_id: str) -> str:
    header = [first_header, *(h for _, h in METRIC_COLUMNS)]
    keys = [first, *(k for k, _ in METRIC_COLUMNS)]
    return _table(header, _metric_rows(records, first), keys=keys, table_id=table_id)


# --- per test set: confusion, UMAP, novelty -------------------------------------------------


def _prediction_figures(adata, *, truth: str, key: str, novel_types: Sequence[str],
                        name: str, umap_cells: int,
                        drawn: dict[str, Figure] | None = None) -> dict[str, str]:
    """HTML of the confusion matrix, UMAP and novelty histogram of one annotated AnnData;
    a plot that cannot be drawn from the data is replaced by a note saying why. ``drawn``:
    figures already made (keys ``confusion``, ``umap``, ``novelty``), embedded as they are."""
    from canal import pl

    drawn = drawn or {}
    out: dict[str, str] = {}
    fig = drawn.get("confusion") or pl.confusion(adata, truth=truth, key=key).figure
    out["confusion"] = _img(fig, f"confusion matrix: {name}",
                            caption="rows: true types; columns: calls (share of each true type)")
    rep = f"X_{key}"
    if "umap" in drawn:
        out["umap"] = _img(drawn["umap"], f"UMAP of {rep}: {name}",
                           caption=f"UMAP of {rep}, {min(adata.n_obs, umap_cells)} of "
                                   f"{adata.n_obs} cells")
    elif rep not in adata.obsm:
        out["umap"] = f'<p class="note">no obsm[{rep!r}] in the predictions: no UMAP</p>'
    elif umap_cells <= 0:
        out["umap"] = '<p class="note">UMAP switched off (umap_cells=0)</p>'
    elif adata.n_obs < 3:
        out["umap"] = f'<p class="note">{adata.n_obs} cells: too few for a UMAP</p>'
    else:
        fig = pl.umap(adata, rep=rep, color=(key, truth), max_cells=umap_cells)
        fig.axes[0].set_title(f"prediction ({key})")
        fig.axes[1].set_title(f"truth ({truth})")
        shown = min(adata.n_obs, umap_cells)
        out["umap"] = _img(fig, f"UMAP of {rep}: {name}",
                           caption=f"UMAP of {rep}, {shown} of {adata.n_obs} cells")
    scores = f"{key}_novelty"
    if "novelty" in drawn or (scores in adata.obs and adata.obs[scores].notna().any()):
        # shares, not counts: a few novel cells stay visible beside many known ones
        fig = drawn.get("novelty") or pl.novelty_hist(adata, key=key, truth=truth,
                                                      novel_types=novel_types,
                                                      share=True).figure
        params = dict(dict(adata.uns.get(key, {})).get("params", {}))
        rule = params.get("novelty", "?")
        out["novelty"] = _img(fig, f"novelty scores: {name}",
                              caption=f"novelty rule: {rule}; dashed line: threshold")
    else:
        out["novelty"] = '<p class="note">no novelty scores (predicted with novelty="none")</p>'
    if "novelty_tradeoff" in drawn:
        out["novelty"] += _img(drawn["novelty_tradeoff"], f"novelty trade-off: {name}",
                               caption="known and novel cells called Unassigned as the "
                                       "level alpha varies (conformal p-values)")
    return out


def _test_blocks(name: str, figures: dict[str, str]) -> dict[str, str]:
    title = f"<h3>{html.escape(name)}</h3>"
    return {k: title + f'<div class="figs">{v}</div>' for k, v in figures.items()}


# --- stream report --------------------------------------------------------------------------


def _forgetting_rows(R: pd.DataFrame) -> list[list[Any]]:
    """Per stage j: accuracy on its held-out cells right after it, the best before the last
    stage, after the last stage, forgetting (best earlier - final) and final - right after."""
    values = R.to_numpy(dtype=float)
    T = values.shape[0]
    rows = []
    for j in range(values.shape[1]):
        learnt = values[j, j] if j < T else float("nan")
        earlier = values[: T - 1, j]
        earlier = earlier[np.isfinite(earlier)]
        final = values[T - 1, j]
        best = float(earlier.max()) if earlier.size and j < T - 1 else None
        rows.append([str(R.columns[j]), learnt, best, final,
                     best - final if best is not None else None,
                     final - learnt if j < T - 1 else None])
    return rows


def _forgetting_figure(R: pd.DataFrame) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    stages = list(R.index)
    for col in R.columns:
        ax.plot(stages, R[col].to_numpy(dtype=float), marker="o", label=str(col))
    ax.set_xlabel("after stage")
    ax.set_ylabel("accuracy on held-out cells")
    ax.set_xticks(stages)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, frameon=False, title="held-out cells of", title_fontsize=8,
              loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def _check_run(run_dir: Path) -> dict[str, Any]:
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir} does not exist; pass the output folder of a stream "
                                "run (canal stream CONFIG --out FOLDER)")
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a folder; pass the output folder of a "
                         "stream run (the one holding results.json)")
    path = run_dir / "results.json"
    if not path.exists():
        raise ValueError(f"{run_dir} is not the output of a stream run: it has no "
                         "results.json; run canal stream CONFIG --out "
                         f"{run_dir} first, or pass the folder that canal stream wrote")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-run canal stream to "
                         "rewrite it") from err
    missing = [k for k in ("name", "stages", "tests", "final") if k not in results] \
        if isinstance(results, dict) else ["name"]
    if missing:
        raise ValueError(f"{path} is not a stream run's results.json (it lacks {missing}); "
                         "pass the output folder of canal stream")
    return results


def _read_predictions(run_dir: Path, results: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    import anndata as ad

    out = {}
    for name, entry in (results.get("predictions") or {}).items():
        path = run_dir / entry["file"]
        if path.exists():
            out[name] = (ad.read_h5ad(path), entry["truth"])
        else:
            logger.warning("predictions of %r missing (%s); its plots are left out", name, path)
    return out


def stream_report_html(results: dict[str, Any], predictions: dict[str, tuple[Any, str]], *,
                       umap_cells: int = 5000) -> str:
    """The page of a stream run.

    Parameters
    ----------
    results
        The run's results (``results.json``, as :func:`canal.stream.run_stream` returns it).
    predictions
        ``{test set: (AnnData with the final predictions, truth column)}``.
    umap_cells
        UMAP of at most this many cells per test set (0: no UMAP).

    Returns
    -------
    The HTML text.
    """
    import matplotlib

    matplotlib.use("Agg")
    from canal import pl

    sections = []
    stages = results["stages"]
    rows = [[s["name"], s["stage"], s["n_cells"], ", ".join(s.get("new_types") or []) or "none",
             ", ".join(f"{k} {v}" for k, v in sorted((s.get("type_counts") or {}).items()))
             or "-"] for s in stages]
    body = _table(["stage", "#", "training cells", "new types", "cells per type"], rows,
                  keys=["name", "stage", "n_cells", None, None], table_id="stages-table")
    cfg = results.get("stage_config") or {}
    if cfg:
        body += ("<details><summary>stage configuration</summary>"
                 + _table(["setting", "value"], [[k, v if isinstance(v, (int, float)) else
                                                  json.dumps(v)] for k, v in cfg.items()])
                 + "</details>")
    sections.append(_section("stages", "Stages", body))

    types = results.get("cell_types") or []
    first_seen: dict[str, int] = {}
    for s in stages:
        for t in s.get("new_types") or []:
            first_seen.setdefault(t, s["stage"])
    sections.append(_section("library", f"Cell-type library ({len(types)} types)", _table(
        ["cell type", "learnt at stage"], [[t, first_seen.get(t, "-")] for t in types],
        table_id="library-table")))

    R = pd.DataFrame(**results["accuracy_matrix"]) if results.get("accuracy_matrix") else None
    if R is not None:
        R.index = [int(i) for i in R.index]
        R.index.name = "stage"
        body = _img(pl.accuracy_matrix(R), "accuracy matrix",
                    caption="R[t, j]: closed-set accuracy after stage t on stage j's held-out "
                            "cells")
        aa, bwt = results.get("average_accuracy"), results.get("backward_transfer")
        body += _table(["run", "average accuracy", "backward transfer", "forgetting"],
                       [[results["name"], aa, bwt, results.get("forgetting")]],
                       keys=["name", "average_accuracy", "backward_transfer", "forgetting"],
                       table_id="stream-summary")
        sections.append(_section("accuracy-matrix", "Accuracy matrix", body))
        body = ('<p class="note">forgetting: best accuracy before the last stage minus the '
                "accuracy after it; its mean over the earlier stages is the run's forgetting"
                "</p>")
        body += _table(["held-out cells of", "right after", "best before last", "after last",
                        "forgetting", "last - right after"], _forgetting_rows(R),
                       keys=["name", "learnt", "best", "final", "forgetting", "transfer"],
                       table_id="forgetting-table")
        if len(R) > 1:
            body += _img(_forgetting_figure(R), "held-out accuracy per stage")
        sections.append(_section("forgetting", "Forgetting per stage", body))
    else:
        sections.append(_section("accuracy-matrix", "Accuracy matrix",
                                 '<p class="note">no held-out cells (holdout = 0)</p>'))
        sections.append(_section("forgetting", "Forgetting per stage",
                                 '<p class="note">no held-out cells (holdout = 0)</p>'))

    final = results["final"]
    body = ('<p class="note">after the last stage; accuracy: with novelty detection (a known '
            "cell called Unassigned is wrong, a novel one is right only as Unassigned); "
            "closed-set acc: most probable known type on cells of known types</p>")
    body += _metric_table(final, first="test", first_header="test set", table_id="final-table")
    novel = [[r["test"], ", ".join(r.get("novel_types") or []) or "none",
              r.get("novelty", "-")] for r in final]
    body += _table(["test set", "novel types (not in the library)", "novelty rule"], novel)
    mix = [[r["test"], *(r["mixup"].get(k) for k in ("accuracy", "macro_f1", "h_score",
                                                     "unassigned_known"))]
           for r in final if r.get("mixup")]
    if mix:
        body += "<h3>CANAL's mixup rule on the same cells</h3>" + _table(
            ["test set", "accuracy", "macro-F1", "H-score", "known cells Unassigned"], mix,
            keys=["test", "mixup.accuracy", "mixup.macro_f1", "mixup.h_score",
                  "mixup.unassigned_known"], table_id="mixup-table")
    tests = results["tests"]
    if len({r["stage"] for r in tests}) > 1:
        body += "<h3>After every stage</h3>"
        for name in dict.fromkeys(r["test"] for r in tests):
            sub = [r for r in tests if r["test"] == name]
            body += f"<h3>{html.escape(name)}</h3>" + _metric_table(
                sub, first="stage", first_header="after stage",
                table_id=f"stages-{_ident(name)}")
        body += _img(pl.stream_accuracy(pd.DataFrame(tests)), "test-set accuracy per stage")
    sections.append(_section("test-sets", "Test sets", body))

    blocks: dict[str, list[str]] = {"confusion": [], "umap": [], "novelty": []}
    by_name = {r["test"]: r for r in final}
    for name, (adata, truth) in predictions.items():
        figs = _prediction_figures(adata, truth=truth, key="canal", name=name,
                                   novel_types=(by_name.get(name) or {}).get("novel_types", []),
                                   umap_cells=umap_cells)
        for k, v in _test_blocks(name, figs).items():
            blocks[k].append(v)
    missing = ('<p class="note">no saved predictions in this run folder '
               "(predictions/*.h5ad, written by canal stream since the report was added); "
               "re-run canal stream to get these plots</p>")
    titles = {"confusion": "Confusion matrices", "umap": "UMAP of X_canal",
              "novelty": "Novelty scores"}
    for k, title in titles.items():
        sections.append(_section(k, title, "".join(blocks[k]) or missing))

    rows = [[s["name"], s.get("seconds"), s.get("epochs_run"), s.get("train_cells_per_second")]
            for s in stages]
    rows.append(["whole run (loading, training, evaluation)", results.get("seconds"), None,
                 None])
    sections.append(_section("timings", "Timings", _table(
        ["stage", "seconds", "epochs run", "training cells / s"], rows,
        keys=["name", "seconds", "epochs_run", "train_cells_per_second"],
        table_id="timings-table")))
    sub = (f"strategy {results.get('strategy')}, seed {results.get('seed')}, "
           f"{len(stages)} stages, {len(final)} test sets, {len(types)} cell types")
    return _page(f"canal stream: {results['name']}", sub, sections)


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(name)).strip("-").lower()


def write_report(run_dir: str | Path, *, out: str | Path | None = None,
                 umap_cells: int = 5000) -> Path:
    """Write the self-contained ``report.html`` of a stream run's output folder.

    Parameters
    ----------
    run_dir
        The folder ``canal stream`` (``run_stream``) wrote: ``results.json`` and
        ``predictions/*.h5ad``.
    out
        The page to write (default ``run_dir/report.html``).
    umap_cells
        UMAP of at most this many cells per test set (0: no UMAP).

    Returns
    -------
    The path of the page.

    Raises
    ------
    FileNotFoundError
        If ``run_dir`` does not exist.
    ValueError
        If ``run_dir`` holds no stream run's ``results.json``.
    """
    run_dir = Path(run_dir)
    results = _check_run(run_dir)
    page = stream_report_html(results, _read_predictions(run_dir, results),
                              umap_cells=umap_cells)
    return io.write_text(Path(out) if out is not None else run_dir / REPORT, page)


# --- prediction report (canal evaluate) -----------------------------------------------------


def write_prediction_report(adata, out: str | Path, *, truth: str, key: str = "canal",
                            novel_types: Sequence[str] = (), scores: dict[str, Any] | None = None,
                            title: str | None = None, umap_cells: int = 5000,
                            figures: dict[str, Figure] | None = None) -> Path:
    """Write a self-contained page for one annotated AnnData (``canal evaluate``).

    Parameters
    ----------
    adata
        Cells annotated by ``Annotator.predict`` (``obs[key]``, ``obsm[f"X_{key}"]``, ...), in
        memory or backed.
    out
        The page to write (``.html``).
    truth
        ``adata.obs`` column of true labels.
    key
        ``key_added`` of the prediction.
    novel_types
        True labels the model never saw.
    scores
        The metrics (default :func:`canal.metrics.evaluate` of ``adata``).
    title
        Page title (default: the number of cells).
    umap_cells
        UMAP of at most this many cells (0: no UMAP).
    figures
        Plots already drawn (``"confusion"``, ``"umap"``, ``"novelty"``: the Figures of
        :func:`canal.pl.confusion`, :func:`canal.pl.umap`, :func:`canal.pl.novelty_hist`),
        embedded instead of drawn again.

    Returns
    -------
    The path of the page.
    """
    import matplotlib

    matplotlib.use("Agg")
    if scores is None:
        scores = metrics.evaluate(adata, truth=truth, key=key, novel_types=novel_types)
    name = title or f"{adata.n_obs} cells"
    rec = {"test": name, **scores}
    body = _metric_table([rec], first="test", first_header="cells", table_id="final-table")
    body += _table(["setting", "value"], [["truth column", truth], ["prediction key", key],
                                          ["novel types", ", ".join(novel_types) or "none"]])
    params = dict(dict(adata.uns.get(key, {})).get("params", {}))
    if params:
        body += ("<details><summary>prediction parameters</summary>"
                 + _table(["parameter", "value"], [[k, v.item() if hasattr(v, "item") else v]
                                                   for k, v in params.items()])
                 + "</details>")
    sections = [_section("test-sets", "Metrics", body)]
    figs = _prediction_figures(adata, truth=truth, key=key, novel_types=list(novel_types),
                               name=name, umap_cells=umap_cells, drawn=figures)
    titles = {"confusion": "Confusion matrix", "umap": f"UMAP of X_{key}",
              "novelty": "Novelty scores"}
    sections += [_section(k, t, f'<div class="figs">{figs[k]}</div>') for k, t in titles.items()]
    return io.write_text(out, _page(f"canal evaluate: {name}",
                                    f"{adata.n_obs} cells, truth obs[{truth!r}], "
                                    f"predictions obs[{key!r}]", sections))
