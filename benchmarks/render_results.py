"""Render the README's results tables and benchmarks/results/*.md from the JSON of the runs.

Every number in a rendered table is read from a JSON file in ``benchmarks/results/`` (through
``benchmarks/reference.py``'s summary: mean ± std over seeds), so it traces to a run. In the
README a generated table sits between markers naming its source::

    <!-- results:begin reference_hour/cross_species -->
    | method | ... |
    <!-- results:end -->

and the text between them is replaced. ``benchmarks/results/reference_*.md`` are rendered from
their ``.json`` with ``reference.py``'s own renderer (files that JSON written by an older
``reference.py`` cannot reproduce are listed as legacy and left as they are).

    python benchmarks/render_results.py          # rewrite README.md and the .md files
    python benchmarks/render_results.py --check  # exit 1 when any of them differs
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

MARKER = re.compile(r"(<!-- results:begin (?P<name>[\w./-]+) -->\n)(?P<body>.*?)"
                    r"(<!-- results:end -->)", re.S)

#: Row order and the names the README gives the methods (``{p}``: the prob-match threshold).
METHOD_NAMES = {"canal": "canal (replay + distillation)", "naive": "naive fine-tuning",
                "replay": "replay", "distill": "distillation",
                "joint": "joint (all stages at once)", "celltypist": "CellTypist (best match)",
                "celltypist prob": "CellTypist (prob match {p})"}

#: A column: (header, summary key, signed, digits, with std).
Column = tuple[str, str, bool, int, bool]


def _test_cols(test: str, label: str, metrics: list[tuple[str, str]]) -> list[Column]:
    return [(f"{label} {h}".strip() if label else h, f"{test}/{k}", False, 3, True)
            for h, k in metrics]


_STREAM_COLS: list[Column] = [("held-out", "average_accuracy", False, 3, True),
                              ("BWT", "backward_transfer", True, 3, True),
                              ("s/run", "seconds", False, 0, False)]

#: README tables: name -> (JSON file in benchmarks/results, experiment, columns).
TABLES: dict[str, tuple[str, str, list[Column]]] = {
    "reference_hour/cross_species": ("reference_hour.json", "cross_species", [
        *_test_cols("baron human4", "human4", [("acc", "accuracy"), ("closed", "closed_accuracy"),
                                               ("H", "h_score")]),
        *_test_cols("segerstolpe_lawlor", "Seg./Lawlor", [("acc", "accuracy"),
                                                          ("closed", "closed_accuracy")]),
        *_test_cols("baron mouse", "mouse", [("acc", "accuracy"), ("closed", "closed_accuracy")]),
        *_STREAM_COLS]),
    "reference_hour/novel_pancreas": ("reference_hour.json", "novel_pancreas", [
        *_test_cols("baron human4", "human4", [("acc", "accuracy"), ("closed", "closed_accuracy"),
                                               ("unknown", "unknown_accuracy"),
                                               ("H", "h_score")]),
        *_test_cols("segerstolpe_lawlor", "Seg./Lawlor", [("closed", "closed_accuracy"),
                                                          ("unknown", "unknown_accuracy"),
                                                          ("H", "h_score")]),
        *_STREAM_COLS]),
    "reference_hour/immune": ("reference_hour.json", "immune", [
        *_test_cols("kang unseen donors", "Kang unseen donors", [("acc", "accuracy")]),
        *_test_cols("kang unseen donors", "", [("closed", "closed_accuracy")]),
        *_test_cols("pbmc3k 20%", "pbmc3k 20%", [("acc", "accuracy")]),
        *_test_cols("pbmc3k 20%", "", [("closed", "closed_accuracy")]),
        *_test_cols("kang_stim", "kang_stim", [("acc", "accuracy")]),
        *_test_cols("kang_stim", "", [("closed", "closed_accuracy"), ("H", "h_score")]),
        *_STREAM_COLS]),
    "reference_hour/novel_immune": ("reference_hour.json", "novel_immune", [
        *_test_cols("kang unseen donors", "Kang unseen donors", [("acc", "accuracy")]),
        *_test_cols("kang unseen donors", "", [("closed", "closed_accuracy"), ("H", "h_score")]),
        *_test_cols("pbmc3k 20%", "pbmc3k 20%", [("acc", "accuracy")]),
        *_test_cols("pbmc3k 20%", "", [("closed", "closed_accuracy"), ("H", "h_score")]),
        *_STREAM_COLS]),
}


_FULL_STREAM_COLS: list[Column] = [("held-out", "average_accuracy", False, 3, True),
                                   ("BWT", "backward_transfer", True, 3, True),
                                   ("min/run", "minutes", False, 1, False)]

#: Columns of the novel-cell tables (CPU grids and the full grid alike): each H beside the mixup H.
_NOVEL_PANCREAS_COLS: list[Column] = [
    *_test_cols("baron human4", "human4", [("acc", "accuracy"), ("closed", "closed_accuracy"),
                                           ("known→Unassigned", "unassigned_known"),
                                           ("H", "h_score"), ("mixup H", "mixup_h_score")]),
    *_test_cols("segerstolpe_lawlor", "Seg./Lawlor", [("closed", "closed_accuracy"),
                                                      ("H", "h_score"),
                                                      ("mixup H", "mixup_h_score")]),
    *_FULL_STREAM_COLS]
_NOVEL_IMMUNE_COLS: list[Column] = [
    *_test_cols("kang unseen donors", "Kang unseen donors",
                [("acc", "accuracy"), ("closed", "closed_accuracy"),
                 ("known→Unassigned", "unassigned_known"), ("H", "h_score"),
                 ("mixup H", "mixup_h_score")]),
    *_test_cols("pbmc3k 20%", "pbmc3k 20%",
                [("acc", "accuracy"), ("closed", "closed_accuracy"), ("H", "h_score"),
                 ("mixup H", "mixup_h_score")]),
    *_FULL_STREAM_COLS]

#: The full-data grid (issue #20): every experiment, canal next to the other strategies where run.
TABLES |= {
    "reference_full/novel_pancreas": ("reference_full_novel_pancreas.json", "novel_pancreas",
                                      _NOVEL_PANCREAS_COLS),
    "reference_full_strategies/cross_species": (
        "reference_full_strategies.json", "cross_species", [
            *_test_cols("baron human4", "human4", [("acc", "accuracy"),
                                                   ("closed", "closed_accuracy"),
                                                   ("F1", "macro_f1")]),
            *_test_cols("segerstolpe_lawlor", "Seg./Lawlor", [("acc", "accuracy"),
                                                              ("closed", "closed_accuracy"),
                                                              ("F1", "macro_f1")]),
            *_test_cols("baron mouse", "mouse", [("acc", "accuracy"),
                                                 ("closed", "closed_accuracy"),
                                                 ("H", "h_score")]),
            *_FULL_STREAM_COLS]),
    "reference_full_immune3_strategies/immune": (
        "reference_full_immune3_strategies.json", "immune", [
            *_test_cols("kang unseen donors", "Kang unseen donors",
                        [("acc", "accuracy"), ("closed", "closed_accuracy")]),
            *_test_cols("pbmc3k 20%", "pbmc3k 20%",
                        [("acc", "accuracy"), ("closed", "closed_accuracy")]),
            *_test_cols("kang_stim", "kang_stim",
                        [("acc", "accuracy"), ("closed", "closed_accuracy"), ("H", "h_score")]),
            *_FULL_STREAM_COLS]),
    "reference_full_novel_immune3/novel_immune": (
        "reference_full_novel_immune3.json", "novel_immune", _NOVEL_IMMUNE_COLS),
}


#: The full grid at the configs' recipe, every experiment, at one commit (issue #20):
#: ``benchmarks/parallel_grid.py``, canal's strategies on a GPU, CellTypist on this CPU.
GRID_FILE = "reference_grid.json"
TABLES |= {
    "reference_grid/cross_species": (GRID_FILE, "cross_species", [
        *_test_cols("baron human4", "human4", [("acc", "accuracy"), ("closed", "closed_accuracy"),
                                               ("F1", "macro_f1")]),
        *_test_cols("segerstolpe_lawlor", "Seg./Lawlor", [
            ("acc", "accuracy"), ("closed", "closed_accuracy"),
            ("known→Unassigned", "unassigned_known")]),
        *_test_cols("baron mouse", "mouse", [("acc", "accuracy"), ("closed", "closed_accuracy"),
                                             ("H", "h_score")]),
        *_FULL_STREAM_COLS]),
    "reference_grid/novel_pancreas": (GRID_FILE, "novel_pancreas", _NOVEL_PANCREAS_COLS),
    "reference_grid/immune": (GRID_FILE, "immune", [
        *_test_cols("kang unseen donors", "Kang unseen donors",
                    [("acc", "accuracy"), ("closed", "closed_accuracy")]),
        *_test_cols("pbmc3k 20%", "pbmc3k 20%", [("acc", "accuracy"),
                                                 ("closed", "closed_accuracy")]),
        *_test_cols("kang_stim", "kang_stim", [("acc", "accuracy"), ("closed", "closed_accuracy"),
                                               ("H", "h_score"), ("mixup H", "mixup_h_score")]),
        *_FULL_STREAM_COLS]),
    "reference_grid/novel_immune": (GRID_FILE, "novel_immune", _NOVEL_IMMUNE_COLS),
}


def reference_module():
    """``benchmarks/reference.py`` as a module (its summary and Markdown renderer)."""
    name = "reference_bench"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load(file: str, *, allow_mixed: bool) -> dict[str, Any]:
    path = RESULTS / file
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a README table names it as its source; "
                                "run the benchmark that writes it or fix the marker")
    payload = json.loads(path.read_text())
    ref = reference_module()
    ref.check_commits(payload, allow_mixed=allow_mixed)
    payload["summary"] = ref.summarize_runs(payload["runs"])
    return payload


def _stat(stat: dict[str, Any] | None, *, signed: bool, digits: int, std: bool) -> str:
    if not stat or stat["n"] == 0:
        return "-"
    text = format(stat["mean"], f"{'+' if signed else ''}.{digits}f")
    if std and stat["n"] > 1:
        text += f" ± {stat['std']:.{digits}f}"
    return text


def robustness_table(file: str = "partial_panel_final/partial_panel_cross_species.json", *,
                     test: str = "baron human4") -> str:
    """Closed-set accuracy on ``test`` as a share of the panel genes is removed from the query
    (``benchmarks/partial_panel.py``'s curve): canal without and with panel dropout, and
    CellTypist (same genes removed; from the run without panel dropout)."""
    path = RESULTS / file
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run benchmarks/partial_panel.py")
    curve = [c for c in json.loads(path.read_text())["curve"] if c["test"] == test]
    if not curve:
        raise KeyError(f"{file} has no robustness curve on {test!r}")
    shares = sorted({c["removed"] for c in curve})
    by = {(c["panel_dropout"], c["removed"]): c for c in curve}
    rows = [("canal", 0.0, "canal"), ("canal, panel dropout 0.5", 0.5, "canal"),
            ("CellTypist", 0.0, "celltypist")]
    lines = ["| panel genes removed | " + " | ".join(f"{x:.0%}" for x in shares) + " |",
             "|" + "---|" * (len(shares) + 1)]
    for label, dropout, key in rows:
        if not any((dropout, x) in by for x in shares):
            continue
        lines.append(f"| {label} | " + " | ".join(
            f"{by[dropout, x][key]:.3f}" if (dropout, x) in by else "-" for x in shares) + " |")
    return "\n".join(lines) + "\n"


#: The pretrained-vs-random grid: (JSON of runs from the shipped weights, JSON of the same runs
#: from ``reference.py --init twin``). Only the ``canal`` method's runs are compared.
PRETRAIN_PAIRS = [("reference_full.json", "reference_full_twin.json"),
                  ("reference_full_immune3.json", "reference_full_immune3_twin.json")]

#: The vocabulary weights (``canal pretrain --vocabulary --mask-on balanced``) against random
#: weights: with the default ``auto`` panel (the first stage's 1,000 HVGs) against
#: ``--init hvg``, and on the weights' own panel (``--panel pretrained``) against
#: ``--init twin``. The random arms were run at earlier commits that changed no training code;
#: the table names each run's commit.
VOCAB_PAIRS = [("reference_full_vocab.json", "reference_full_hvg.json"),
               ("reference_full_immune3_vocab.json", "reference_full_immune3_hvg.json")]
VOCAB_PANEL_PAIRS = [("reference_full_vocab_panel.json", "reference_full_twin.json"),
                     ("reference_full_immune3_vocab_panel.json",
                      "reference_full_immune3_twin.json")]

#: The two random starts next to the shipped weights on the pancreas stream: the same panel
#: (``--init twin``) and the first stage's own HVG panel (``--init hvg``).
RANDOM_PANEL_FILES = {"pretrained": "reference_full.json",
                      "random, shipped panel": "reference_full_twin.json",
                      "random, first stage's 1,000 HVGs": "reference_full_hvg.json"}

#: Test-set metrics of the pretrained-vs-random table: (header, key).
PRETRAIN_METRICS = [("acc", "accuracy"), ("macro-F1", "macro_f1"), ("closed", "closed_accuracy")]


def _canal_runs(payload: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["experiment"], r["seed"]): r for r in payload["runs"]
            if r.get("method") == "canal" and "error" not in r}


def pretrain_vs_random_rows(pairs: list[tuple[str, str]] | None = None, *,
                            allow_mixed: bool = False, skip_missing: bool = False
                            ) -> list[dict[str, Any]]:
    """Per test set: the paired (same experiment, seed, splits) difference pretrained - random
    for each metric of :data:`PRETRAIN_METRICS`, with both arms' means, the seeds used and the
    git commits of the two arms. ``skip_missing``: leave out a pair whose pretrained file is
    not there yet."""
    rows = []
    for pre_file, twin_file in PRETRAIN_PAIRS if pairs is None else pairs:
        if skip_missing and not (RESULTS / pre_file).exists():
            continue
        pre, twin = (_load(f, allow_mixed=allow_mixed) for f in (pre_file, twin_file))
        commits = {r.get("git_commit") for p in (pre, twin) for r in p["runs"]}
        if len(commits) > 1 and not allow_mixed:
            raise ValueError(f"{pre_file} and {twin_file} come from different git commits "
                             f"({', '.join(sorted(str(c)[:10] for c in commits))}); re-run one "
                             "of them or pass --allow-mixed-commits")
        if twin["settings"]["weights"].get("init") not in ("twin", "hvg"):
            raise ValueError(f"{twin_file} is not a reference.py --init twin (or hvg) run")
        if pre["settings"]["epochs"] != twin["settings"]["epochs"]:
            raise ValueError(f"{pre_file} and {twin_file} ran different epochs")
        a, b = _canal_runs(pre), _canal_runs(twin)
        for exp in dict.fromkeys(e for e, _ in a):
            seeds = sorted(s for e, s in a if e == exp and (e, s) in b)
            if not seeds:
                continue
            for test in a[exp, seeds[0]]["tests"]:
                row = {"experiment": exp, "test": test, "seeds": seeds,
                       "epochs": pre["settings"]["epochs"],
                       "commits": [sorted({str(run[exp, s].get("git_commit"))[:7]
                                           for s in seeds}) for run in (a, b)]}
                for _, key in PRETRAIN_METRICS:
                    x = np.array([a[exp, s]["tests"][test][key] for s in seeds], dtype=float)
                    y = np.array([b[exp, s]["tests"][test][key] for s in seeds], dtype=float)
                    d = x - y
                    row[key] = {"pretrained": float(x.mean()), "random": float(y.mean()),
                                "gain": float(d.mean()),
                                "gain_std": float(d.std(ddof=1)) if d.size > 1 else None}
                rows.append(row)
    return rows


def pretrain_vs_random_table(pairs: list[tuple[str, str]] | None = None, *,
                             mixed: bool = False) -> str:
    """Pretrained minus random initialisation, per cross-study test set (mean over seeds of the
    paired difference ± its std), and the mean gain over the test sets. ``mixed``: the arms may
    come from different git commits; a column then names them (pretrained / random)."""
    rows = pretrain_vs_random_rows(pairs, allow_mixed=mixed, skip_missing=pairs is not None)
    if not rows:
        files = ", ".join(f"`{pre}`" for pre, _ in pairs or PRETRAIN_PAIRS)
        return f"(not measured yet: no {files} in benchmarks/results)\n"
    head = ["test set", "epochs", "seeds"] + (["commits"] if mixed else [])
    for h, _ in PRETRAIN_METRICS:
        head += [f"{h} pretrained", f"{h} random", f"{h} gain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def gain(m: dict[str, Any]) -> str:
        text = f"{m['gain']:+.3f}"
        return text + (f" ± {m['gain_std']:.3f}" if m["gain_std"] is not None else "")

    for r in rows:
        cells = [r["test"], "config" if r["epochs"] is None else str(r["epochs"]),
                 " ".join(map(str, r["seeds"]))]
        if mixed:
            cells.append(" / ".join(" ".join(c) for c in r["commits"]))
        for _, key in PRETRAIN_METRICS:
            m = r[key]
            cells += [f"{m['pretrained']:.3f}", f"{m['random']:.3f}", gain(m)]
        lines.append("| " + " | ".join(cells) + " |")
    mean = ["**mean over test sets**", "", ""] + ([""] if mixed else [])
    for _, key in PRETRAIN_METRICS:
        mean += ["", "", f"**{np.mean([r[key]['gain'] for r in rows]):+.3f}**"]
    lines.append("| " + " | ".join(mean) + " |")
    return "\n".join(lines) + "\n"


def random_panel_table(files: dict[str, str] | None = None, *,
                       experiment: str = "cross_species") -> str:
    """Accuracy and closed-set accuracy per test set for each start of
    :data:`RANDOM_PANEL_FILES` (mean ± std over seeds), with the git commit of each arm: the
    HVG arm was run later than the other two (the commits between them change no training
    code; the table says which they are)."""
    files = RANDOM_PANEL_FILES if files is None else files
    arms = {label: _load(f, allow_mixed=False) for label, f in files.items()}
    tests = list(next(iter(arms.values()))["summary"][experiment]["canal"])
    tests = list(dict.fromkeys(k.split("/")[0] for k in tests if "/" in k))
    head = ["start", "git commit"] + [f"{t} {h}" for t in tests for h in ("acc", "closed")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, payload in arms.items():
        stats = payload["summary"][experiment]["canal"]
        commit = sorted({str(r.get("git_commit"))[:7] for r in payload["runs"]})
        cells = [f"{label} (n={len(stats['seeds'])})", " ".join(commit)]
        cells += [_stat(stats.get(f"{t}/{k}"), signed=False, digits=3, std=True)
                  for t in tests for k in ("accuracy", "closed_accuracy")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: README tables drawn by their own function (name -> function).
CUSTOM = {"partial_panel_final/robustness": robustness_table,
          "partial_panel_immune/robustness": lambda: robustness_table(
              "partial_panel_immune/partial_panel_immune.json", test="kang unseen donors"),
          "pretrain_vs_random/grid": pretrain_vs_random_table,
          "pretrain_vs_random/vocabulary": lambda: pretrain_vs_random_table(VOCAB_PAIRS,
                                                                           mixed=True),
          "pretrain_vs_random/vocabulary_panel": lambda: pretrain_vs_random_table(
              VOCAB_PANEL_PAIRS, mixed=True),
          "pretrain_vs_random/panel": random_panel_table}


def render_table(name: str, *, allow_mixed: bool = False,
                 cache: dict[str, dict] | None = None) -> str:
    """The Markdown of the README table ``name`` (a key of :data:`TABLES` or
    :data:`CUSTOM`)."""
    if name in CUSTOM:
        return CUSTOM[name]()
    if name not in TABLES:
        raise KeyError(f"README marker names table {name!r}; known: "
                       f"{sorted([*TABLES, *CUSTOM])}")
    file, exp, cols = TABLES[name]
    cache = {} if cache is None else cache
    if file not in cache:
        cache[file] = _load(file, allow_mixed=allow_mixed)
    payload = cache[file]
    if exp not in payload["summary"]:
        raise KeyError(f"{file} has no runs of experiment {exp!r} (it has "
                       f"{sorted(payload['summary'])})")
    stats = payload["summary"][exp]
    lines = ["| method | " + " | ".join(c[0] for c in cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    p = payload["settings"].get("p_thres", 0.5)
    for method, label in METHOD_NAMES.items():
        if method not in stats:
            continue
        s = stats[method]
        cells = [_stat(s.get(key), signed=signed, digits=digits, std=std)
                 for _, key, signed, digits, std in cols]
        lines.append(f"| {label.format(p=p)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_readme(text: str, *, allow_mixed: bool = False) -> str:
    """``text`` with every marked results table re-rendered."""
    cache: dict[str, dict] = {}
    if not MARKER.search(text):
        raise ValueError("README.md has no <!-- results:begin NAME --> ... <!-- results:end "
                         "--> markers; put them around the tables to generate")
    return MARKER.sub(lambda m: m.group(1) + render_table(m.group("name"),
                                                          allow_mixed=allow_mixed,
                                                          cache=cache) + m.group(4), text)


def _legacy(payload: dict[str, Any]) -> bool:
    """JSON from a reference.py before closed-set accuracy was recorded: today's renderer
    would add columns those runs never had, so their .md stays the record."""
    return not any("closed_accuracy" in t for r in payload["runs"] if "error" not in r
                   for t in r.get("tests", {}).values())


def render_result_files(*, allow_mixed: bool = False) -> tuple[dict[Path, str], list[Path]]:
    """``({.md path: rendered text}, [legacy .json files left alone])``."""
    ref = reference_module()
    rendered, legacy = {}, []
    for path in sorted(RESULTS.glob("reference_*.json")):
        payload = json.loads(path.read_text())
        if _legacy(payload):
            legacy.append(path)
            continue
        rendered[path.with_suffix(".md")] = ref.render_markdown(payload,
                                                                allow_mixed=allow_mixed)
    return rendered, legacy


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when README.md or a results .md differs")
    p.add_argument("--allow-mixed-commits", action="store_true",
                   help="render tables whose runs come from different git commits")
    args = p.parse_args(argv)
    files, legacy = render_result_files(allow_mixed=args.allow_mixed_commits)
    files[README] = render_readme(README.read_text(), allow_mixed=args.allow_mixed_commits)
    stale = []
    for path, text in files.items():
        old = path.read_text() if path.exists() else ""
        if old == text:
            continue
        stale.append(path)
        if args.check:
            diff = difflib.unified_diff(old.splitlines(), text.splitlines(),
                                        _rel(path), "rendered", lineterm="",
                                        n=0)
            print("\n".join(list(diff)[:40]))
        else:
            path.write_text(text)
    for path in legacy:
        print(f"left as is (JSON from an older reference.py): {_rel(path)}")
    if args.check and stale:
        print(f"{len(stale)} file(s) differ from their JSON: "
              f"{', '.join(_rel(s) for s in stale)}; run python "
              "benchmarks/render_results.py", file=sys.stderr)
        return 1
    print(("up to date: " if not stale else "rewrote: ")
          + ", ".join(_rel(s) for s in (stale or files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
