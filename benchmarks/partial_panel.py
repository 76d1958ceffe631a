"""Partial gene panels: closed-set accuracy on other technologies, and a robustness curve.

For each seed and panel-dropout rate, runs a reference stream (``cross_species``: the pancreas
stages tested on Baron human4, Segerstolpe/Lawlor and Baron mouse; or ``immune``) with
:func:`canal.stream.run_stream`, then removes 0, 25, 50, 75 and 90% of the model's panel genes
from a test set at random (seeded; the same genes are removed from the query for canal and for
CellTypist) and annotates it again: canal's closed-set accuracy (novelty off) next to
CellTypist's best match, CellTypist trained on the same stage cells (``reference.py``'s recipe).

Usage::

    python benchmarks/partial_panel.py --experiment cross_species --seeds 0 1 2 \\
        --panel-dropout 0 0.5 --out benchmarks/results/partial_panel

Results are written per run (resumable: finished runs are kept) to ``OUT/runs/*.json``, and the
summary to ``OUT/partial_panel_<experiment>.{json,md,png}``; ``--reuse-streams`` scores the curve
of a stream already trained in ``--work`` instead of training it again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))

REMOVED = (0.0, 0.25, 0.5, 0.75, 0.9)
CURVE_TESTS = {"cross_species": ["baron human4"], "pancreas": ["baron human4"],
               "immune": ["kang unseen donors"]}


def remove_panel_genes(adata, panel: list[str], fraction: float, seed: int):
    """``adata`` without a random ``fraction`` of the panel genes it measures (a new AnnData)."""
    present = [g for g in panel if g in set(adata.var_names)]
    rng = np.random.default_rng([seed, int(round(fraction * 1000))])
    drop = set(rng.choice(present, size=int(round(fraction * len(present))), replace=False))
    keep = np.array([g not in drop for g in adata.var_names])
    return adata[:, keep].copy(), len(drop)


def celltypist_model(train: list, *, seed: int):
    """CellTypist (logistic regression, default settings) on the stages' training cells."""
    import celltypist
    from reference import log1p_cells

    normed = [log1p_cells(a, labels_key=s.labels_key) for s, a in train]
    shared = set(normed[0].var_names)
    for a in normed[1:]:
        shared &= set(a.var_names)
    genes = [g for g in normed[0].var_names if g in shared]
    X = sp.vstack([a[:, genes].X for a in normed], format="csr")
    labels = np.concatenate([a.obs[s.labels_key].to_numpy() for (s, _), a
                             in zip(train, normed, strict=True)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return celltypist.train(X, labels=labels, genes=genes, check_expression=False,
                                n_jobs=1)


def celltypist_closed(model, adata, labels_key: str) -> float:
    import celltypist
    from reference import log1p_cells

    from canal import metrics

    cells = log1p_cells(adata, labels_key=labels_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pred = celltypist.annotate(cells, model=model, majority_voting=False,
                                   mode="best match").predicted_labels["predicted_labels"]
    truth = cells.obs[labels_key].to_numpy()
    known = np.isin(truth, [str(c) for c in model.cell_types])
    return metrics.accuracy(truth[known], pred.astype(str).to_numpy()[known])


def canal_closed(model, adata, labels_key: str, match) -> float:
    """canal's closed-set accuracy; the curve goes below the overlap floor on purpose (Kang
    measures 429 panel genes, so 90% removed leaves 43: below ``min_overlap``, which
    ``predict`` refuses by default)."""
    from canal import metrics

    res = model.predict(adata, novelty="none", inplace=False,
                        match=replace(match, min_overlap=0.0))
    truth = adata.obs[labels_key].astype(str).to_numpy()
    known = np.isin(truth, model.cell_types)
    return metrics.accuracy(truth[known], res["canal"].astype(str).to_numpy()[known])


def one_run(experiment: str, *, seed: int, panel_dropout: float, epochs: int | None,
            root: Path, work: Path, reuse: bool = False) -> dict:
    from reference import stream_config, stream_data

    from canal import Annotator
    from canal.stream import run_stream

    cfg = stream_config(experiment, init=None)
    cfg = replace(cfg, train=dict(cfg.train) | {"panel_dropout": panel_dropout})
    run_dir = work / f"{experiment}_pd{panel_dropout:g}_s{seed}"
    t0 = time.perf_counter()
    if reuse and (run_dir / "results.json").exists() and (run_dir / "model").exists():
        # the stream of an interrupted curve: same config, seed and work folder
        res = json.loads((run_dir / "results.json").read_text())
        print(f"  reusing the trained stream in {run_dir}", flush=True)
    else:
        res = run_stream(cfg, out_dir=run_dir, root=root, seed=seed, epochs=epochs,
                         plots=False, test_every_stage=False)
    record = {"experiment": experiment, "seed": seed, "panel_dropout": panel_dropout,
              "epochs": epochs, "stream_seconds": res["seconds"],
              "average_accuracy": res["average_accuracy"],
              "backward_transfer": res["backward_transfer"],
              "tests": {r["test"]: {k: r.get(k) for k in ("accuracy", "closed_accuracy",
                                                          "macro_f1", "h_score")}
                        for r in res["final"]}}
    model = Annotator.from_pretrained(run_dir / "model")
    train, _, tests = stream_data(cfg, root=root, seed=seed)
    ct = celltypist_model(train, seed=seed)
    curve = []
    for spec, adata in tests:
        if spec.name not in CURVE_TESTS.get(experiment, []):
            continue
        for frac in REMOVED:
            query, n_removed = remove_panel_genes(adata, model.genes, frac, seed)
            curve.append({"test": spec.name, "removed": frac, "n_removed": n_removed,
                          "canal": canal_closed(model, query, spec.labels_key,
                                                spec.match(model.match)),
                          "celltypist": celltypist_closed(ct, query, spec.labels_key)})
            print(f"  {spec.name} {frac:.0%} removed: canal {curve[-1]['canal']:.3f}, "
                  f"CellTypist {curve[-1]['celltypist']:.3f}", flush=True)
    record["curve"] = curve
    record["celltypist_tests"] = {
        spec.name: celltypist_closed(ct, adata if not spec.orthologs else _to_human(adata),
                                     spec.labels_key) for spec, adata in tests}
    record["seconds"] = time.perf_counter() - t0
    return record


def _to_human(adata):
    from canal.pp import orthologs

    table = orthologs()
    to_human = dict(zip(table["mouse"], table["human"], strict=True))
    out = adata.copy()
    out.var_names = [to_human.get(g, f"mouse:{g}") for g in adata.var_names]
    out.var_names_make_unique()
    return out


def summarize(records: list[dict], experiment: str) -> tuple[dict, str]:
    rows = []
    for r in records:
        for test, m in r["tests"].items():
            rows.append({"panel_dropout": r["panel_dropout"], "seed": r["seed"], "test": test,
                         "canal closed": m["closed_accuracy"],
                         "CellTypist best": r["celltypist_tests"].get(test)})
    tests = pd.DataFrame(rows)
    curve = pd.DataFrame([c | {"panel_dropout": r["panel_dropout"], "seed": r["seed"]}
                          for r in records for c in r["curve"]])

    def ms(s: pd.Series) -> str:
        s = s.dropna()
        return f"{s.mean():.3f} ± {s.std(ddof=0):.3f} (n={len(s)})" if len(s) else "-"

    lines = [f"## {experiment}: closed-set accuracy (mean ± std over seeds)", "",
             "| panel dropout | test set | canal | CellTypist best match |", "|---|---|---|---|"]
    for (pdo, test), g in tests.groupby(["panel_dropout", "test"], sort=True):
        lines.append(f"| {pdo:g} | {test} | {ms(g['canal closed'])} | "
                     f"{ms(g['CellTypist best'])} |")
    if len(curve):
        lines += ["", "## Robustness: panel genes removed from the query at random", "",
                  "| panel dropout | test set | removed | canal | CellTypist | canal loss vs 0% |",
                  "|---|---|---|---|---|---|"]
        for (pdo, test), g in curve.groupby(["panel_dropout", "test"], sort=True):
            base = g[g["removed"] == 0].set_index("seed")["canal"]
            for frac, h in g.groupby("removed"):
                loss = (base - h.set_index("seed")["canal"]).dropna()
                lines.append(f"| {pdo:g} | {test} | {frac:.0%} | {ms(h['canal'])} | "
                             f"{ms(h['celltypist'])} | {loss.mean():+.3f} |")
    summary = {"tests": tests.to_dict(orient="records"), "curve": curve.to_dict(orient="records")}
    return summary, "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = pd.DataFrame([c | {"panel_dropout": r["panel_dropout"]} for r in records
                          for c in r["curve"]])
    if not len(curve):
        return
    tests = sorted(curve["test"].unique())
    fig, axes = plt.subplots(1, len(tests), figsize=(5 * len(tests), 3.8), squeeze=False)
    for ax, test in zip(axes[0], tests, strict=True):
        sub = curve[curve["test"] == test]
        for pdo, g in sub.groupby("panel_dropout"):
            m = g.groupby("removed")["canal"].agg(["mean", "std"])
            ax.errorbar(m.index * 100, m["mean"], yerr=m["std"].fillna(0), marker="o",
                        capsize=3, label=f"canal (panel dropout {pdo:g})")
        m = sub.groupby("removed")["celltypist"].agg(["mean", "std"])
        ax.errorbar(m.index * 100, m["mean"], yerr=m["std"].fillna(0), marker="s", capsize=3,
                    color="grey", label="CellTypist (best match)")
        ax.set_xlabel("panel genes removed from the query (%)")
        ax.set_ylabel("closed-set accuracy")
        ax.set_title(test)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", default="cross_species")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--panel-dropout", nargs="+", type=float, default=[0.0, 0.5])
    p.add_argument("--epochs", type=int, default=None, help="override the stream's epochs")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "partial_panel")
    p.add_argument("--work", type=Path, default=Path("runs") / "partial_panel",
                   help="folder for the stream runs and their models (not committed)")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse-streams", action="store_true",
                   help="reuse a stream already trained in --work (a curve that stopped after "
                   "training) instead of training it again")
    args = p.parse_args(argv)

    import torch

    from canal._settings import data_dir, settings

    torch.set_num_threads(args.threads)
    settings.progress = False
    root = args.data_dir or data_dir()
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for pdo in args.panel_dropout:
        for seed in args.seeds:
            path = runs / f"{args.experiment}_pd{pdo:g}_s{seed}.json"
            if path.exists():
                print(f"{path.name}: done, kept", flush=True)
                continue
            print(f"{args.experiment} panel_dropout={pdo:g} seed={seed}", flush=True)
            rec = one_run(args.experiment, seed=seed, panel_dropout=pdo, epochs=args.epochs,
                          root=root, work=args.work, reuse=args.reuse_streams)
            path.write_text(json.dumps(rec, indent=2))
            print(json.dumps(rec["tests"], indent=1), flush=True)
    records = [json.loads(f.read_text()) for f in sorted(runs.glob(f"{args.experiment}_*.json"))]
    summary, md = summarize(records, args.experiment)
    stem = args.out / f"partial_panel_{args.experiment}"
    stem.with_suffix(".json").write_text(json.dumps(summary | {"runs": records}, indent=2))
    stem.with_suffix(".md").write_text(md)
    plot(records, stem.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
