"""Which novelty score should be canal's default? Measured on the three novel-cell experiments.

What it measures
----------------
For each experiment and seed the stream is trained with the public API (``Annotator`` +
``fit_stage`` per stage, exactly the stages and 20% holdout of :func:`canal.stream.run_stream`),
then every cell that matters is passed once through the final model
(:func:`model_outputs`, the only model-facing code) and the representations / logits are saved
(``OUT/dumps/<experiment>_seed<k>.npz``). Everything after that is numpy over the dumps:

- **calibration cells**: known cells the model never trained on, i.e. the cells of each stage
  (new cells and replayed bank cells) that fell in the validation split
  ``canal.train.stratified_split(labels, 0.2, seed)`` of that stage and were not trained on in
  any later stage either (a validation cell can enter the bank and be replayed later);
- **reference set** for kNN / Mahalanobis: the final example bank (``model.bank``);
- **test cells**: the experiments' test sets plus the stages' held-out 20% (all known types).

Scores (``canal.novelty.SCORES``) are calibrated split-conformally at ``--fpr`` (default 0.05,
per class where a predicted class has >= 50 calibration cells, pooled otherwise) and compared to
CANAL's mixup rule as shipped (``predict(novelty="energy")``, transductive per test set).

Per test set and score: ``unassigned_known`` (share of known-type cells called novel; target
<= fpr), ``accuracy`` with novelty vs ``closed_accuracy`` (novel-type cells count as correct
only when ``Unassigned``; closed-set accuracy is on known-type cells), known / unknown accuracy
and H-score (:func:`canal.metrics.novel_scores`), and AUROC known vs novel (threshold-free).

How to run
----------
::

    PYTHONPATH=src python benchmarks/novelty.py dump --experiment novel_pancreas --seed 0 \\
        --epochs 6 --out /tmp/nov
    PYTHONPATH=src python benchmarks/novelty.py evaluate --out /tmp/nov \\
        --results benchmarks/results

``dump`` trains (minutes to tens of minutes on a 2-core CPU); ``evaluate`` takes seconds and
writes ``novelty_<experiment>.json`` / ``.md`` and ``novelty_summary.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from canal import Annotator

EXPERIMENTS = {
    "novel_pancreas": "novel_pancreas",
    "novel_immune": "novel_immune",
    "kang_stim": "immune",
}

logger = logging.getLogger("canal.benchmarks.novelty")


# -------------------------------------------------------------------------------------------
# the model-facing part (adapt this after the forward-pass refactor)
# -------------------------------------------------------------------------------------------

def model_outputs(model, adata) -> tuple[np.ndarray, np.ndarray]:
    """Representations and logits of every cell of ``adata`` from a trained Annotator."""
    rep, logits = model.outputs(model.prepare(adata))
    return rep.numpy().astype(np.float32), logits.numpy().astype(np.float32)


def train_stream(config: str, *, seed: int, epochs: int | None, root: Path | None = None):
    """Train a stream's stages like ``run_stream`` and track which cells were trained on.

    Returns the model, the stage and test AnnDatas (obs names made unique per stage), the set of
    every cell ever trained on and the set of every cell that was a stage's candidate.
    """
    import anndata as ad

    from canal._settings import data_dir
    from canal.continual import ExampleBank
    from canal.data import encode_labels
    from canal.stream import StreamConfig, _init_model, load_cells, stratified_part
    from canal.train import StageConfig, stratified_split

    cfg = StreamConfig.from_toml(config)
    root = root or data_dir()
    train = dict(cfg.train) | {"seed": seed}
    if epochs is not None:
        train["epochs"] = epochs
    stage_config = StageConfig(**train)
    cache: dict = {}
    stages, holds = [], []
    for t, spec in enumerate(cfg.stages, start=1):
        cells = load_cells(spec, root=root, cache=cache)
        cells.obs_names = [f"s{t}:{n}" for n in cells.obs_names]
        labels = cells.obs[spec.labels_key].astype(str).to_numpy()
        keep = stratified_part(labels, 1 - cfg.holdout, seed)
        stages.append(cells[keep].copy())
        holds.append(cells[~keep].copy())
    tests = [(spec.name, load_cells(spec, root=root, cache=cache)) for spec in cfg.tests]
    del cache
    model: Annotator = _init_model(cfg, stages, seed=seed)
    trained, seen = set(), set()
    for t, (spec, adata) in enumerate(zip(cfg.stages, stages, strict=True), start=1):
        prev = ExampleBank.from_anndata(model.bank) if (
            stage_config.uses_replay and model.bank is not None and model.bank.n_obs) else None
        t0 = time.perf_counter()
        model.fit_stage(adata, labels_key=spec.labels_key, config=stage_config)
        logger.info("stage %d %s: %.0f s", t, spec.name, time.perf_counter() - t0)
        # the same split run_stage drew over new + replayed cells
        labels = list(adata.obs[spec.labels_key].astype(str))
        names = list(adata.obs_names)
        if prev is not None:
            labels += list(prev.labels)
            names += list(prev.obs["cell"])
        codes = encode_labels(labels, model.cell_types)
        tr, val = stratified_split(codes, stage_config.val_fraction, stage_config.seed)
        names = np.asarray(names, dtype=str)
        trained |= set(names[tr])
        seen |= set(names)
        last_val = set(names[val])
    bank = model.bank
    if not isinstance(bank, ad.AnnData):
        raise RuntimeError("the model has no example bank; use a replay strategy")
    return model, cfg, stages, holds, tests, trained, seen, last_val


def dump(experiment: str, *, seed: int, epochs: int | None, out: Path) -> Path:
    """Train and save the outputs of every cell the evaluation needs as one npz."""

    from canal.metrics import UNASSIGNED

    config = EXPERIMENTS[experiment]
    t0 = time.perf_counter()
    model, _cfg, stages, holds, tests, trained, seen, last_val = train_stream(
        config, seed=seed, epochs=epochs)
    train_seconds = time.perf_counter() - t0
    arrays: dict[str, np.ndarray] = {}
    calib = seen - trained
    # one entry per part: files differ in genes, so parts are never concatenated as AnnData
    sets: dict[str, list] = {
        "calibration": [a[a.obs_names.isin(list(calib))].copy() for a in stages],
        # what fit_stage itself holds after the last stage: that stage's validation cells
        # (new cells and replayed bank cells, the latter trained on in earlier stages)
        "calibration_last": [a[a.obs_names.isin(list(last_val))].copy() for a in stages],
        "bank": [model.bank],
        "heldout": holds,
    }
    for name, adata in tests:
        sets[f"test:{name}"] = [adata]
    for key, parts in sets.items():
        parts = [a for a in parts if a.n_obs]
        cols: dict[str, list] = {}
        for adata in parts:
            rep, logits = model_outputs(model, adata)
            cols.setdefault("rep", []).append(rep)
            cols.setdefault("logits", []).append(logits)
            cols.setdefault("label", []).append(adata.obs["cell_type"].astype(str).to_numpy())
            batch = adata.obs["batch"] if "batch" in adata.obs else adata.obs["cell_type"]
            cols.setdefault("batch", []).append(batch.astype(str).to_numpy())
            if key.startswith("test:") or key == "heldout":
                # CANAL's mixup rule as shipped: transductive over the cells it is given
                res = model.predict(adata, novelty="energy", inplace=False)
                cols.setdefault("mixup_pred", []).append(res["canal"].astype(str).to_numpy())
                cols.setdefault("mixup_score", []).append(
                    res["canal_novelty"].to_numpy(dtype=np.float32))
        for col, values in cols.items():
            v = np.concatenate(values)
            arrays[f"{key}/{col}"] = v.astype(str) if v.dtype == object else v
    meta = {"experiment": experiment, "config": config, "seed": seed, "epochs": epochs,
            "cell_types": list(model.cell_types), "train_seconds": train_seconds,
            "n_trained": len(trained), "n_calibration": len(calib),
            "sets": list(sets), "unassigned": UNASSIGNED,
            "stage_config": model.history[-1]["config"]}
    (out / "dumps").mkdir(parents=True, exist_ok=True)
    path = out / "dumps" / f"{experiment}_seed{seed}.npz"
    np.savez_compressed(path, meta=json.dumps(meta), **arrays)
    logger.info("wrote %s (%.0f s)", path, time.perf_counter() - t0)
    return path


# -------------------------------------------------------------------------------------------
# evaluation over the dumps (numpy only)
# -------------------------------------------------------------------------------------------

#: The candidate rules: (label, score, kwargs). kNN at several k; the rest as defined.
CANDIDATES: list[tuple[str, str, dict]] = [
    ("knn k=1", "knn", {"k": 1}),
    ("knn k=5", "knn", {"k": 5}),
    ("knn k=10", "knn", {"k": 10}),
    ("knn k=20", "knn", {"k": 20}),
    ("knn k=50", "knn", {"k": 50}),
    ("mahalanobis", "mahalanobis", {}),
    ("relative mahalanobis", "relative_mahalanobis", {}),
    ("energy", "energy", {}),
    ("max logit", "max_logit", {}),
    ("msp", "msp", {}),
]
MIXUP = "mixup (CANAL, transductive)"


def load_dump(path: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    z = np.load(path, allow_pickle=True)  # our own dumps; early ones hold object string arrays
    meta = json.loads(str(z["meta"]))
    sets: dict[str, dict[str, np.ndarray]] = {}
    for key in z.files:
        if key == "meta":
            continue
        name, col = key.rsplit("/", 1)
        sets.setdefault(name, {})[col] = z[key]
    return meta, sets


def _rule(score: str, kw: dict, cal_set: dict, bank: dict, classes: list[str], fpr: float,
          min_class_cells: int):
    from canal import novelty as nv

    params = {"k": kw.get("k", 10), "temperature": 0.8}
    if "mahalanobis" in score:
        params["mahalanobis"] = nv.fit_mahalanobis(bank["rep"], bank["label"], classes=classes,
                                                   relative=score == "relative_mahalanobis")
    scorer = nv.NoveltyCalibration(score=score, fpr=fpr, min_class_cells=min_class_cells,
                                   thresholds={}, calibration={}, n_cells={}, params=params)
    # the bank may hold calibration cells (it is refilled from a stage's training *and*
    # validation cells): a calibration cell must not be its own neighbour
    cal_scores = scorer.scores(representation=cal_set["rep"], logits=cal_set["logits"],
                               reference=bank["rep"], exclude_self=True)
    pred = np.asarray(classes)[cal_set["logits"].argmax(1)]
    cal = nv.fit_calibration(cal_scores, pred, score=score, fpr=fpr,
                             min_class_cells=min_class_cells, params=params)
    return cal


def _metrics(truth: np.ndarray, pred: np.ndarray, closed: np.ndarray, known: np.ndarray,
             score: np.ndarray | None) -> dict:
    from sklearn.metrics import roc_auc_score

    from canal import metrics
    from canal.metrics import UNASSIGNED

    novel_types = sorted(set(truth[~known]))
    out = metrics.summarize(truth, pred, novel_types=novel_types) if novel_types else \
        metrics.summarize(truth, pred)
    out["unassigned_known"] = float(np.mean(pred[known] == UNASSIGNED))
    out["closed_accuracy"] = metrics.accuracy(truth[known], closed[known])
    out["accuracy_known_cells"] = metrics.accuracy(truth[known], pred[known])
    if novel_types and score is not None:
        out["auroc"] = float(roc_auc_score(~known, score))
    return out


def evaluate_dump(path: Path, *, fpr: float, min_class_cells: int = 50,
                  vote: bool = True) -> dict:
    """Every candidate rule on one dump: per test set metrics, plus curves for the plots."""
    from canal import novelty as nv
    from canal.metrics import UNASSIGNED

    meta, sets = load_dump(path)
    classes = meta["cell_types"]
    bank = sets["bank"]
    tests = {k: v for k, v in sets.items() if k.startswith("test:") or k == "heldout"}
    groups = {k: nv.neighbour_groups(v["rep"]) for k, v in tests.items()} if vote else {}
    rows: dict[str, dict] = {}
    curves: dict[str, dict] = {}
    variants = [("", "calibration", min_class_cells), (" pooled", "calibration", 10**9)]
    if "calibration_last" in sets:
        variants.append((" last-stage val", "calibration_last", min_class_cells))
    for label, score, kw in CANDIDATES:
        for suffix, cal_key, mcc in variants:
            main = suffix == ""
            name = label + suffix
            cal = _rule(score, kw, sets[cal_key], bank, classes, fpr, mcc)
            rows[name] = {"dict_floats": _n_floats(cal.to_dict()),
                          "n_calibration": int(len(sets[cal_key]["label"]))}
            for tname, t in tests.items():
                truth = t["label"]
                known = np.isin(truth, classes)
                closed = np.asarray(classes)[t["logits"].argmax(1)]
                s = cal.scores(representation=t["rep"], logits=t["logits"],
                               reference=bank["rep"])
                novel = cal.is_novel(s, closed)
                pred = np.where(novel, UNASSIGNED, closed)
                m = _metrics(truth, pred, closed, known, s)
                if vote and main:
                    vl, _ = nv.cluster_vote(closed, novel, groups[tname])
                    m["vote"] = _metrics(truth, vl, closed, known, None)
                rows[name][tname] = m
                if main:
                    p = cal.p_values(s, closed)
                    alphas = np.round(np.arange(0.01, 0.31, 0.01), 2)
                    curves.setdefault(name, {})[tname] = {
                        "alpha": alphas.tolist(),
                        "false_rejection": [float(np.mean(p[known] <= a)) for a in alphas],
                        "detection": ([float(np.mean(p[~known] <= a)) for a in alphas]
                                      if (~known).any() else None),
                    }
    rows[MIXUP] = {}
    for tname, t in tests.items():
        truth = t["label"]
        known = np.isin(truth, classes)
        closed = np.asarray(classes)[t["logits"].argmax(1)]
        rows[MIXUP][tname] = _metrics(truth, t["mixup_pred"].astype(str), closed, known,
                                      t["mixup_score"])
    return {"meta": meta, "rows": rows, "curves": curves}


def _n_floats(d) -> int:
    if isinstance(d, dict):
        return sum(_n_floats(v) for v in d.values())
    if isinstance(d, list):
        return sum(_n_floats(v) for v in d)
    return 1 if isinstance(d, float) else 0


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def markdown(experiment: str, runs: list[dict], *, fpr: float) -> str:
    """One table per test set: each rule's read-outs, mean ± std over seeds."""
    first = runs[0]
    tests = [k for k in first["rows"][MIXUP]]
    meta = first["meta"]
    lines = [f"## {experiment} (config `{meta['config']}`)", "",
             f"seeds {[r['meta']['seed'] for r in runs]}; epochs per stage "
             f"{meta['epochs'] or 'config default'}; calibration cells: "
             f"{[r['meta']['n_calibration'] for r in runs]}; target fpr {fpr}.", "",
             "Trained by " + ", ".join(
                 f"`python benchmarks/novelty.py dump --experiment {experiment} --seed "
                 f"{r['meta']['seed']} --epochs {r['meta']['epochs']}` "
                 f"({r['meta']['train_seconds'] / 60:.0f} min)" for r in runs) + ".", ""]
    for tname in tests:
        ex = first["rows"][MIXUP][tname]
        n_novel = ex.get("n_novel", 0)
        novel_types = sorted(set(load_dump_types(first, tname)))
        lines += [f"### {tname.removeprefix('test:')} ({ex['n_cells']} cells, {n_novel} of "
                  f"novel types {novel_types})", ""]
        head = "| rule | known called novel | acc (novelty) | closed acc | acc on known cells |"
        sep = "|---|---:|---:|---:|---:|"
        if n_novel:
            head += " known acc | unknown acc | H | AUROC | H (cluster vote) |"
            sep += "---:|---:|---:|---:|---:|"
        else:
            head += " known called novel (cluster vote) |"
            sep += "---:|"
        lines += [head, sep]
        for rule in first["rows"]:
            ms = [r["rows"][rule][tname] for r in runs if tname in r["rows"].get(rule, {})]
            row = (f"| {rule} | {_fmt([m['unassigned_known'] for m in ms])} | "
                   f"{_fmt([m['accuracy'] for m in ms])} | "
                   f"{_fmt([m['closed_accuracy'] for m in ms])} | "
                   f"{_fmt([m['accuracy_known_cells'] for m in ms])} |")
            vs = [m["vote"] for m in ms if "vote" in m]
            if n_novel:
                row += (f" {_fmt([m['known_accuracy'] for m in ms])} | "
                        f"{_fmt([m['unknown_accuracy'] for m in ms])} | "
                        f"{_fmt([m['h_score'] for m in ms])} | "
                        f"{_fmt([m.get('auroc') for m in ms])} | "
                        f"{_fmt([v['h_score'] for v in vs])} |")
            else:
                row += f" {_fmt([v['unassigned_known'] for v in vs])} |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def summary(by_exp: dict[str, list[dict]], *, fpr: float) -> str:
    """One row per rule: H-score where a test set has novel types, else the share of known cells
    called novel and the accuracy lost to novelty calls (closed-set minus with-novelty)."""
    cols, head = [], ["rule"]
    for exp, runs in by_exp.items():
        for tname in runs[0]["rows"][MIXUP]:
            has_novel = runs[0]["rows"][MIXUP][tname].get("n_novel", 0) > 0
            short = tname.removeprefix("test:")
            cols.append((exp, tname, has_novel))
            head += [f"{exp}: {short} H", f"{exp}: {short} called novel"] if has_novel else \
                [f"{exp}: {short} called novel", f"{exp}: {short} acc loss"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    rules = [r for r in next(iter(by_exp.values()))[0]["rows"]]
    for rule in rules:
        cells = [rule]
        for exp, tname, has_novel in cols:
            ms = [r["rows"][rule][tname] for r in by_exp[exp] if rule in r["rows"]]
            if has_novel:
                cells += [_fmt([m["h_score"] for m in ms]),
                          _fmt([m["unassigned_known"] for m in ms])]
            else:
                cells += [_fmt([m["unassigned_known"] for m in ms]),
                          _fmt([m["closed_accuracy"] - m["accuracy"] for m in ms])]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = {exp: [r["meta"]["seed"] for r in runs] for exp, runs in by_exp.items()}
    epochs = {exp: runs[0]["meta"]["epochs"] for exp, runs in by_exp.items()}
    return "\n".join([
        f"Target fpr {fpr}; seeds {seeds}; epochs per stage {epochs} (reduced for time).", "",
        *lines, "",
        "H: harmonic mean of known accuracy (a known cell called Unassigned is wrong) and the "
        "share of novel-type cells called Unassigned. called novel: share of known-type cells "
        f"called Unassigned (target <= {fpr}). acc loss: closed-set accuracy minus accuracy "
        "with novelty on, on known-type cells (target <= 0.03). Rules without a suffix: "
        "per-class thresholds (>= 50 calibration cells), calibrated on every stage's never-"
        "trained validation cells; `pooled`: one threshold; `last-stage val`: calibrated on the "
        "last stage's validation split only (what fit_stage holds; its replayed bank cells were "
        "trained on earlier)."])


def load_dump_types(run: dict, tname: str) -> list[str]:
    return run["novel_types"].get(tname, [])


def evaluate(out: Path, *, results: Path, fpr: float, command: str, machine: str) -> int:
    """Score every dump under ``out/dumps`` and write the tables and figures."""
    import matplotlib

    matplotlib.use("Agg")
    from canal import pl

    results.mkdir(parents=True, exist_ok=True)
    dumps = sorted((out / "dumps").glob("*.npz"))
    if not dumps:
        raise SystemExit(f"no dumps under {out / 'dumps'}; run the dump step first")
    by_exp: dict[str, list[dict]] = {}
    for path in dumps:
        run = evaluate_dump(path, fpr=fpr)
        _, sets = load_dump(path)
        classes = run["meta"]["cell_types"]
        run["novel_types"] = {k: sorted(set(v["label"]) - set(classes)) for k, v in sets.items()
                              if k.startswith("test:") or k == "heldout"}
        by_exp.setdefault(run["meta"]["experiment"], []).append(run)
        if run["meta"]["seed"] == 0:
            _figure(pl, path, run, results, fpr=fpr)
    (results / "novelty_summary.md").write_text("\n".join(
        ["# novelty rules: summary", "", f"Generated {time.strftime('%Y-%m-%dT%H:%M:%S%z')} by "
         f"`{command}`.", "", summary(by_exp, fpr=fpr)]))
    header = [f"Generated {time.strftime('%Y-%m-%dT%H:%M:%S%z')} by `{command}` on {machine}, "
              f"torch {torch.__version__} (1 thread).", ""]
    for exp, runs in by_exp.items():
        md = markdown(exp, runs, fpr=fpr)
        (results / f"novelty_{exp}.md").write_text("\n".join(["# novelty rules", ""] + header
                                                              + [md]))
        (results / f"novelty_{exp}.json").write_text(json.dumps(
            {"command": command, "machine": machine, "fpr": fpr, "runs": runs}, indent=1,
            default=float))
        print(md)
    return 0


def _figure(pl, path: Path, run: dict, results: Path, *, fpr: float,
            rule: tuple[str, str, dict] = ("knn k=10", "knn", {"k": 10})) -> None:
    """Score histogram + trade-off curve of one rule on each test set with novel cells."""
    meta, sets = load_dump(path)
    classes = meta["cell_types"]
    cal = _rule(rule[1], rule[2], sets["calibration"], sets["bank"], classes, fpr, 50)
    for tname, t in sets.items():
        if not tname.startswith("test:"):
            continue
        known = np.isin(t["label"], classes)
        if known.all():
            continue
        s = cal.scores(representation=t["rep"], logits=t["logits"], reference=sets["bank"]["rep"])
        closed = np.asarray(classes)[t["logits"].argmax(1)]
        fig = pl.novelty_calibration(s, ~known, cal, predicted=closed,
                                     title=f"{meta['experiment']}: {tname[5:]} ({rule[0]})")
        safe = "".join(c if c.isalnum() else "_" for c in tname[5:])
        fig.savefig(results / f"novelty_{meta['experiment']}_{safe}.png", dpi=110,
                    bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="train one experiment/seed and save the cells' outputs")
    d.add_argument("--experiment", choices=sorted(EXPERIMENTS), required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=int, default=None)
    d.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("evaluate", help="score the dumps and write the tables")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    e.add_argument("--fpr", type=float, default=0.05)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from canal._settings import settings

    settings.progress = False
    if args.cmd == "dump":
        dump(args.experiment, seed=args.seed, epochs=args.epochs, out=args.out)
        return 0
    return evaluate(args.out, results=args.results, fpr=args.fpr,
                    command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                    machine=platform.platform())


if __name__ == "__main__":
    raise SystemExit(main())
