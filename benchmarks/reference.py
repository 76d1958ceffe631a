"""Reference experiments: canal's continual strategies against CellTypist, side by side.

What it measures
----------------
For each shipped stream config (``pancreas``, ``immune``, ``novel_pancreas``, ``novel_immune``,
``cross_species``; see ``src/canal/configs``) and each seed, every method is trained on the
same cells and scored on the same test sets:

- canal strategies ``canal`` (replay + distillation), ``naive`` (sequential fine-tuning),
  ``replay``, ``distill`` and ``joint`` (all stages' cells at every stage: the upper bound), each
  one call of :func:`canal.stream.run_stream`. Their test sets are annotated after the last stage
  with novelty detection (``Unassigned`` for novel cells); the stream also gives the average
  accuracy over the stages' held-out cells and the backward transfer (forgetting).
- CellTypist 1.7 (logistic regression, ``celltypist.train``) trained once on all stages'
  training cells together, i.e. the cells each stage keeps after the stream's stratified,
  seeded 20% holdout split (the split of :func:`canal.stream.run_stream` for the same seed). It
  is an offline, non-continual reference like ``joint``. Two read-outs of the same model:
  ``celltypist`` (``mode="best match"``: every cell gets a known type, so on novel cells its
  unknown accuracy, and hence its H-score, is 0 by construction) and ``celltypist prob`` (``mode=
  "prob match"``: cells with no type above ``--p-thres`` are ``Unassigned``; cells with several
  types above it get a label ``"A|B"`` that counts as wrong). Its "average accuracy" is the
  best-match accuracy on the same held-out cells of the stages (closed-set, as canal's).

CellTypist input: each file's counts are normalized on all of its genes (scanpy
``normalize_total`` to 1e4, ``log1p``), then the training matrix is restricted to the genes
shared by all training files (``--celltypist-genes train``, the default; ``common`` also
intersects with the genes of every test set). Because the restricted rows no longer sum to
1e4, ``celltypist.train`` runs with ``check_expression=False``. Test sets keep all their genes;
CellTypist uses the overlap with its model's genes. Mouse test sets (``orthologs = true``) are
renamed to human symbols through :func:`canal.pp.orthologs` (genes without a 1:1 ortholog keep
a ``mouse:`` prefix, so they match nothing but still count in the 1e4 normalization).

Scores (:func:`canal.metrics.summarize`): accuracy, macro-F1 and ARI per test set; where a
test set holds true types that the method never trained on, those cells count as correct only
when ``Unassigned``, and known accuracy, unknown accuracy and H-score are added.

Output (``--out``, default ``benchmarks/results``): one Markdown table per experiment printed
and written to ``reference.md``; ``reference.json`` with every per-seed number, wall times and
the machine; per-run canal folders under ``runs/``. The JSON is rewritten after every run, and
``--resume`` skips the runs it already holds. Every run records the git commit it was made at;
``--resume`` from another commit, and a table whose runs come from several commits, are refused
unless ``--allow-mixed-commits`` is given (the table then says which commits it mixes).
``--merge A B ... --out OUT`` runs nothing and joins the runs of several ``--out`` folders into
one ``OUT/reference.json`` (seeds run side by side, one torch thread each, or over several
sittings), under the same checks.

How to run
----------
::

    .venv/bin/python benchmarks/reference.py --hour --out OUT       # the one-hour grid
    .venv/bin/python benchmarks/reference.py --full                 # everything, seeds 0 1 2
    .venv/bin/python benchmarks/reference.py --quick                # smoke: see below
    .venv/bin/python benchmarks/reference.py --experiments immune --strategies canal celltypist
    .venv/bin/python benchmarks/reference.py --init random --quick  # tiny random model (dev)

``--init`` defaults to the configs' ``pretrained`` (the shipped weights); ``random`` swaps in a
tiny randomly initialised model for development; ``twin`` starts every run from random weights
of the shipped model's size and gene panel, drawn from the run's seed (the no-pre-training arm
of ``benchmarks/pretrain_vs_random.py``); ``hvg`` starts from random weights of canal's default
size on a panel of the first stage's 1,000 most variable genes; a path uses that checkpoint.

``--quick`` is a smoke run, not a result: seed 0, 1 epoch per stage, and every data file cut to
at most 3,000 randomly chosen cells (``--max-cells``; only the immune ``kang_ctrl_8donors`` file
is larger), written to ``OUT/data_max<N>`` and used by every method alike.

``--hour`` is the grid that fits in about an hour on a 2-core CPU: every method on
``cross_species`` (the pancreas stream plus the Baron mouse test set, so it also gives the
pancreas table), ``novel_pancreas``, ``immune`` and ``novel_immune``, seeds 0 1 2, 3 epochs per
stage, every data file cut to at most 800 random cells (seed 0; the same cells for every method
and seed). It is a reduced version of the experiments, not the experiments themselves.

Cost on a 2-core CPU, measured with two runs side by side at one torch thread each
(``--threads 1``; benchmarks/results/reference_full*.json): a full-data ``canal`` run of
``cross_species`` or ``novel_pancreas`` takes 8-19 minutes, of ``immune`` at 3 epochs per stage
9-32 minutes (``naive`` 7-8, ``joint`` 11-19 on either); CellTypist takes 20-35 s (pancreas,
20,125 genes) and about 5 s (immune, 1,287 genes) per seed. The full default (5 experiments x 5
strategies x 3 seeds at the configs' recipe) is therefore more than a day of this CPU: run it
over several sittings with ``--resume``, or split it into ``--out`` folders by seed or method
and join them with ``--merge`` (``benchmarks/parallel_grid.py`` does both: one process per run);
on a GPU machine use ``--device cuda``: there the whole grid takes minutes. A copy of the tree
sent to another machine records the commit named by ``CANAL_GIT_COMMIT`` (the copy may carry no
``.git``, or a stale one); each run records the device it computed on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger("reference")

EXPERIMENTS = ("pancreas", "immune", "novel_pancreas", "novel_immune", "cross_species")
CANAL_STRATEGIES = ("canal", "naive", "replay", "distill", "joint")
METHODS = (*CANAL_STRATEGIES, "celltypist")
CT_BEST, CT_PROB = "celltypist", "celltypist prob"
TINY_MODEL = {"init": "random", "n_genes": 300, "dim": 16, "depth": 2, "heads": 2, "dim_head": 8,
              "head_hidden": 32, "rep_dim": 16}
"""Model of ``--init random``: small enough that a stream runs in seconds (development only)."""
HVG_MODEL = {"init": "random", "panel_from": "first", "n_genes": 1000}
"""Model of ``--init hvg``: canal's default size, random weights, a panel of the first stage's
1,000 most variable genes (what ``canal fit`` on a first dataset without ``--from`` would
start from)."""
TEST_METRICS = ("accuracy", "closed_accuracy", "macro_f1", "ari", "known_accuracy",
                "unknown_accuracy", "h_score", "unassigned_known")
MIXUP_METRICS = ("accuracy", "h_score", "unassigned_known")
"""CANAL's mixup novelty rule, scored on the same predictions next to the default rule
(summary keys ``"<test set>/mixup_<metric>"``)."""
QUICK_EPOCHS = 1
QUICK_MAX_CELLS = 3000
HOUR_EXPERIMENTS = ("cross_species", "novel_pancreas", "immune", "novel_immune")
"""``--hour``: ``cross_species`` is the pancreas stream with a third test set (Baron mouse), so it
stands for both; the ``pancreas`` table is its first two test sets."""
HOUR_EPOCHS = 3
HOUR_MAX_CELLS = 800


# --------------------------------------------------------------------------------------------
# data: the stream's own splits
# --------------------------------------------------------------------------------------------


def stream_config(name: str, *, init: str | None, panel: str | None = None):
    """The shipped stream config ``name``, its model swapped according to ``init`` and its
    first stage's panel set to ``panel``.

    Parameters
    ----------
    name
        A shipped config name or a TOML path.
    init
        ``None`` keeps the config's ``[model]``; ``"random"`` uses :data:`TINY_MODEL`; any other
        string is a checkpoint directory to start from (``"twin"`` is resolved per seed by
        :func:`random_twin` before this is called).
    panel
        ``[model] panel`` (``"auto"``, ``"hvg"``, ``"pretrained"``); ``None`` keeps the
        config's.

    Returns
    -------
    canal.stream.StreamConfig
    """
    from canal.stream import StreamConfig

    cfg = StreamConfig.from_toml(name)
    if init == "hvg":
        cfg = replace(cfg, model=dict(HVG_MODEL))
    elif init is not None:
        cfg = replace(cfg, model=dict(TINY_MODEL) if init == "random" else {"init": init})
    if panel is not None:
        cfg = replace(cfg, model={**cfg.model, "panel": panel})
    return cfg


def random_twin(path: Path, *, seed: int) -> Path:
    """A checkpoint with the shipped model's gene panel and size but fresh random weights
    (random gene embeddings too) drawn from ``seed``: ``--init twin``, the "no pre-training"
    arm of the pretrained-vs-random comparison. Written once per seed and reused."""
    from canal import Annotator
    from canal.nn import CanalNet

    if not (path / "config.json").exists():
        shipped = Annotator.from_pretrained()
        Annotator(CanalNet(shipped.net.config.replace(seed=seed)), shipped.genes).save(path)
    return path


def stream_data(cfg, *, root: Path, seed: int) -> tuple[list, list, list]:
    """The cells a stream run with ``seed`` trains on, holds out and tests on.

    The same selection and split as :func:`canal.stream.run_stream` (both call
    :func:`canal.datasets.load_cells` and :func:`canal.datasets.holdout_split`).

    Returns
    -------
    ``(train, hold, tests)``: lists of ``(DataSpec, AnnData)``; ``hold`` is empty when the
    config has no holdout.
    """
    from canal.datasets import holdout_split, load_cells

    cache: dict = {}
    train, hold = [], []
    for spec in cfg.stages:
        t, h = holdout_split(load_cells(spec, root=root, cache=cache),
                             labels_key=spec.labels_key, holdout=cfg.holdout, seed=seed)
        train.append((spec, t))
        if h is not None:
            hold.append((spec, h))
    tests = [(spec, load_cells(spec, root=root, cache=cache)) for spec in cfg.tests]
    return train, hold, tests


def capped_data(cfgs: list, *, root: Path, max_cells: int, out: Path) -> Path:
    """A data folder where every file the streams read has at most ``max_cells`` cells.

    Larger files get a seeded random subset (rows kept in order) written once to ``out``;
    the others, and the ortholog table, are linked to the originals.

    Returns
    -------
    The folder to pass as ``root``.
    """
    import anndata as ad

    files = {spec.file for cfg in cfgs for spec in (*cfg.stages, *cfg.tests)}
    for rel in sorted(files):
        src, dst = root / rel, out / rel
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        adata = ad.read_h5ad(src)
        if adata.n_obs <= max_cells:
            dst.symlink_to(src.resolve())
            continue
        keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, max_cells, replace=False))
        adata[keep].copy().write_h5ad(dst)
    if (root / "homologs").exists() and not (out / "homologs").exists():
        (out / "homologs").symlink_to((root / "homologs").resolve())
    return out


def log1p_cells(adata, *, labels_key: str, orthologs: pd.DataFrame | None = None):
    """A new AnnData with CellTypist's input: counts normalized to 1e4 per cell, then log1p.

    Parameters
    ----------
    adata
        Cells with counts (or un-logged values) in ``X``; not modified.
    labels_key
        ``obs`` column kept in the result.
    orthologs
        Table with columns ``human`` and ``mouse``: rename mouse genes to their human 1:1
        ortholog (other genes get a ``mouse:`` prefix and still count in the normalization).

    Returns
    -------
    anndata.AnnData
        CSR float32 ``X``; ``obs[labels_key]`` as strings.
    """
    import anndata as ad
    import scanpy as sc

    genes = pd.Index(adata.var_names.astype(str))
    if orthologs is not None:
        to_human = dict(zip(orthologs["mouse"], orthologs["human"], strict=True))
        genes = pd.Index([to_human.get(g, f"mouse:{g}") for g in genes])
    obs = pd.DataFrame({labels_key: adata.obs[labels_key].astype(str).to_numpy()},
                       index=adata.obs_names.astype(str))
    out = ad.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32), obs=obs,
                     var=pd.DataFrame(index=genes))
    out.var_names_make_unique()
    out.obs_names_make_unique()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


def _test_record(truth: np.ndarray, pred: np.ndarray, known_types: set[str], *,
                 closed: bool = False) -> dict[str, Any]:
    """:func:`canal.metrics.summarize` with the test set's novel types (types never trained).

    ``closed``: ``pred`` never says ``Unassigned`` (best match), so its accuracy on the cells
    of known types is also the closed-set accuracy (``closed_accuracy``, as canal's).
    """
    from canal import metrics

    novel = sorted(set(truth) - known_types)
    out = metrics.summarize(truth, pred, novel_types=novel) if novel else \
        metrics.summarize(truth, pred)
    out["novel_types"] = novel
    out["n_unassigned"] = int(np.sum(pred == metrics.UNASSIGNED))
    known = np.isin(truth, sorted(known_types))
    if closed and known.any():
        out["closed_accuracy"] = metrics.accuracy(truth[known], pred[known])
    return out


def run_canal(cfg, *, strategy: str, seed: int, epochs: int | None, root: Path, out: Path,
              plots: bool) -> dict[str, Any]:
    """One :func:`canal.stream.run_stream` call, reduced to the numbers the tables need.

    Returns
    -------
    dict
        ``tests`` (final metrics per test set), ``average_accuracy``, ``backward_transfer``,
        ``forgetting``, ``n_train_cells`` (per stage), ``stage_seconds``, ``epochs_run``,
        ``seconds``.
    """
    from canal.stream import run_stream

    res = run_stream(cfg, out_dir=out, root=root, strategy=strategy, seed=seed, epochs=epochs,
                     plots=plots, test_every_stage=False)
    tests = {r["test"]: {k: v for k, v in r.items() if k not in ("stage", "test")}
             for r in res["final"]}
    return {"tests": tests, "average_accuracy": res["average_accuracy"],
            "backward_transfer": res["backward_transfer"], "forgetting": res["forgetting"],
            "n_train_cells": [s["n_cells"] for s in res["stages"]],
            "stage_seconds": [s["seconds"] for s in res["stages"]],
            "epochs_run": [s["epochs_run"] for s in res["stages"]],
            "seconds": res["seconds"]}


def run_celltypist(cfg, *, seed: int, root: Path, genes_mode: str, p_thres: float,
                   max_iter: int | None, use_sgd: bool, feature_selection: bool,
                   n_jobs: int) -> dict[str, dict[str, Any]]:
    """Train CellTypist on all stages' training cells; annotate the held-out and test cells.

    Returns
    -------
    dict
        ``{"celltypist": record, "celltypist prob": record}``; a record holds ``tests``,
        ``average_accuracy`` (best match on the stages' held-out cells; ``None`` for prob match),
        ``n_train_cells``, ``n_genes``, ``converged``, ``train_seconds`` and ``seconds``
        (training plus annotation, shared by both read-outs).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # celltypist reads scanpy.__version__
        import celltypist

    from canal import metrics
    from canal.pp import orthologs as ortholog_table

    t0 = time.perf_counter()
    train, hold, tests = stream_data(cfg, root=root, seed=seed)
    table = ortholog_table() if any(spec.orthologs for spec, _ in tests) else None
    normed = [log1p_cells(a, labels_key=s.labels_key) for s, a in train]
    normed_tests = [(s, log1p_cells(a, labels_key=s.labels_key,
                                    orthologs=table if s.orthologs else None))
                    for s, a in tests]
    shared = set(normed[0].var_names)
    for a in normed[1:]:
        shared &= set(a.var_names)
    if genes_mode == "common":
        for _, a in normed_tests:
            shared &= set(a.var_names)
    genes = [g for g in normed[0].var_names if g in shared]
    if not genes:
        raise ValueError(f"{cfg.name}: the training files share no genes")
    X = sp.vstack([a[:, genes].X for a in normed], format="csr")
    labels = np.concatenate([a.obs[s.labels_key].to_numpy() for (s, _), a
                             in zip(train, normed, strict=True)])
    ts = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn: multi_class="ovr" deprecated
        model = celltypist.train(X, labels=labels, genes=genes, check_expression=False,
                                 max_iter=max_iter, use_SGD=use_sgd,
                                 feature_selection=feature_selection, n_jobs=n_jobs)
    train_seconds = time.perf_counter() - ts
    # n_iter_ rather than ConvergenceWarning: warnings raised in joblib workers are lost
    n_iter = int(np.max(model.classifier.n_iter_))
    converged = n_iter < model.classifier.max_iter
    known = {str(c) for c in model.cell_types}

    def annotate(adata, mode: str) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            res = celltypist.annotate(adata, model=model, majority_voting=False, mode=mode,
                                      p_thres=p_thres)
        return res.predicted_labels["predicted_labels"].astype(str).to_numpy()

    best: dict[str, Any] = {}
    prob: dict[str, Any] = {}
    for spec, adata in normed_tests:
        truth = adata.obs[spec.labels_key].to_numpy()
        best[spec.name] = _test_record(truth, annotate(adata, "best match"), known,
                                       closed=True)
        pred = annotate(adata, "prob match")
        prob[spec.name] = _test_record(truth, pred, known)
        prob[spec.name]["n_multiple"] = int(sum("|" in p for p in pred))
    hold_acc = []
    for spec, adata in hold:
        cells = log1p_cells(adata, labels_key=spec.labels_key)
        hold_acc.append(metrics.accuracy(cells.obs[spec.labels_key].to_numpy(),
                                         annotate(cells, "best match")))
    common = {"n_train_cells": [a.n_obs for _, a in train], "n_genes": len(genes),
              "genes_mode": genes_mode, "n_iter": n_iter,
              "converged": converged, "train_seconds": train_seconds,
              "seconds": time.perf_counter() - t0, "backward_transfer": None,
              "forgetting": None}
    return {CT_BEST: {"tests": best, **common,
                      "average_accuracy": float(np.mean(hold_acc)) if hold_acc else None},
            CT_PROB: {"tests": prob, **common, "average_accuracy": None, "p_thres": p_thres}}


# --------------------------------------------------------------------------------------------
# summary and report
# --------------------------------------------------------------------------------------------


def _mean_std(values: list) -> tuple[float, float, int]:
    vals = np.asarray([v for v in values if v is not None], dtype=float)
    vals = vals[~np.isnan(vals)]
    if vals.size == 0:
        return float("nan"), float("nan"), 0
    std = float(vals.std(ddof=1)) if vals.size > 1 else float("nan")
    return float(vals.mean()), std, int(vals.size)


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean, std (ddof 1) and count over seeds: ``{experiment: {method: {metric: stats}}}``.

    Test-set metrics are keyed ``"<test set>/<metric>"``; failed runs are left out.
    """
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    ok = [r for r in runs if "error" not in r]
    for exp in dict.fromkeys(r["experiment"] for r in ok):
        summary[exp] = {}
        for method in dict.fromkeys(r["method"] for r in ok if r["experiment"] == exp):
            rs = [r for r in ok if r["experiment"] == exp and r["method"] == method]
            values: dict[str, list] = {}
            for r in rs:
                for test, m in r["tests"].items():
                    for k in TEST_METRICS:
                        values.setdefault(f"{test}/{k}", []).append(m.get(k))
                    for k in MIXUP_METRICS:
                        values.setdefault(f"{test}/mixup_{k}", []).append(
                            (m.get("mixup") or {}).get(k))
                for k in ("average_accuracy", "backward_transfer", "forgetting", "seconds"):
                    values.setdefault(k, []).append(r.get(k))
                values.setdefault("minutes", []).append(
                    None if r.get("seconds") is None else r["seconds"] / 60)
            stats = {}
            for k, v in values.items():
                mean, std, n = _mean_std(v)
                stats[k] = {"mean": mean, "std": std, "n": n}
            stats["seeds"] = sorted(r["seed"] for r in rs)
            summary[exp][method] = stats
    return summary


def _fmt(stat: dict[str, Any] | None, *, signed: bool = False, digits: int = 3) -> str:
    if not stat or stat["n"] == 0:
        return "-"
    spec = f"{'+' if signed else ''}.{digits}f"
    text = format(stat["mean"], spec)
    if stat["n"] > 1:
        text += f" ± {stat['std']:.{digits}f}"
    return text


def experiment_table(exp: str, runs: list[dict[str, Any]], stats: dict[str, Any]) -> str:
    """The Markdown table of one experiment (rows: methods; columns: test-set metrics)."""
    ok = [r for r in runs if r["experiment"] == exp and "error" not in r]
    tests = list(dict.fromkeys(t for r in ok for t in r["tests"]))
    novel = {t: sorted({n for r in ok for n in r["tests"].get(t, {}).get("novel_types", [])})
             for t in tests}
    header, sep = ["method"], ["---"]
    for t in tests:
        cols = ["acc", "closed acc", "F1", "ARI"] + (["H"] if novel[t] else [])
        header += [f"{t} {c}" for c in cols]
        sep += ["---:"] * len(cols)
    header += ["avg acc (held-out)", "BWT", "time (s)"]
    sep += ["---:"] * 3
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    order = [m for m in (*CANAL_STRATEGIES, CT_BEST, CT_PROB) if m in stats]
    for method in order:
        s = stats[method]
        cells = [f"{method} (n={len(s['seeds'])})"]
        for t in tests:
            keys = ["accuracy", "closed_accuracy", "macro_f1", "ari"] + \
                (["h_score"] if novel[t] else [])
            cells += [_fmt(s.get(f"{t}/{k}")) for k in keys]
        cells += [_fmt(s.get("average_accuracy")), _fmt(s.get("backward_transfer"), signed=True),
                  _fmt(s.get("seconds"), digits=0)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{t}: novel types {', '.join(v)}" for t, v in novel.items() if v]
    if notes:
        lines += ["", "Novel (never trained) types, scored as correct only when `Unassigned`: "
                  + "; ".join(notes) + "."]
    ct = [r for r in ok if r["method"] == CT_BEST]
    if ct:
        n_genes = sorted({r["n_genes"] for r in ct})
        conv = all(r["converged"] for r in ct)
        shared = "training and test" if ct[0].get("genes_mode") == "common" else "training"
        secs = np.mean([r["train_seconds"] for r in ct])
        lines += ["", f"CellTypist: trained on {'/'.join(map(str, n_genes))} genes shared by the "
                  f"{shared} files; mean training time {secs:.0f} s; "
                  f"{'converged' if conv else 'did NOT converge (max_iter reached)'}."]
    failed = [r for r in runs if r["experiment"] == exp and "error" in r]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(f"{r['method']} seed {r['seed']}: "
                                                  f"{r['error'].splitlines()[-1]}" for r in failed)]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """CPU, OS, library versions, torch threads, git commit and the shipped weights' identity."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for pkg in ("canal", "celltypist", "scikit-learn", "scanpy", "anndata", "numpy", "torch"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(),
        "processor": platform.processor(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(), "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "versions": versions,
    }
    sent = os.environ.get("CANAL_GIT_COMMIT")
    if sent:
        # a copy of a clean checkout sent to another machine (a GPU's): the copy may carry no
        # .git, or a stale one, so the sender names the commit it copied
        info["git_commit"], info["git_dirty"] = sent, False
    else:
        try:
            repo = Path(__file__).resolve().parent.parent
            info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo,
                                                capture_output=True, text=True,
                                                check=True).stdout.strip()
            info["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain"],
                                                    cwd=repo, capture_output=True,
                                                    text=True).stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            info["git_commit"] = None
    info["device"] = device_name()
    return info


def device_name() -> str:
    """What canal's runs compute on: the GPU's name under CUDA, else the CPU."""
    import torch

    import canal

    dev = canal.settings.torch_device()
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return _cpu_name()


def _cpu_name() -> str:
    return f"cpu: {platform.processor() or platform.machine()}"


def weights_info(init: str | None) -> dict[str, Any]:
    """Where the starting weights come from (and a hash of ``model.pt`` when there is one)."""
    import hashlib

    if init == "random":
        return {"init": "random", "model": TINY_MODEL}
    if init == "hvg":
        return {"init": "hvg", "model": HVG_MODEL}
    if init == "twin":
        return {"init": "twin", **{k: v for k, v in weights_info(None).items()
                                   if k in ("path", "model_config")}}
    if init is None:
        from canal.model import DEFAULT_WEIGHTS

        path = Path(DEFAULT_WEIGHTS)
    else:
        path = Path(init)
    out: dict[str, Any] = {"init": "pretrained" if init is None else "checkpoint",
                           "path": str(path)}
    pt = path / "model.pt"
    if pt.exists():
        out["model_pt_sha256"] = hashlib.sha256(pt.read_bytes()).hexdigest()[:16]
        out["model_pt_mtime"] = datetime.fromtimestamp(pt.stat().st_mtime, UTC).isoformat()
    if (path / "config.json").exists():
        meta = json.loads((path / "config.json").read_text())
        out["model_config"] = meta.get("model_config")
    return out


def run_commit(run: dict[str, Any], payload: dict[str, Any]) -> str | None:
    """The git commit a run was made at: its own record, else (runs written before commits
    were recorded per run) the commit of the machine record that wrote the file."""
    return run.get("git_commit") or payload.get("machine", {}).get("git_commit")


class MixedCommitsError(ValueError):
    """Runs of one table come from different git commits."""


def check_commits(payload: dict[str, Any], *, allow_mixed: bool = False) -> dict[str, list[str]]:
    """``{experiment: [commits]}`` of the (successful) runs; raises :class:`MixedCommitsError`
    when one experiment's runs come from several commits and ``allow_mixed`` is false."""
    commits: dict[str, list[str]] = {}
    for r in payload["runs"]:
        c = run_commit(r, payload) or "unknown"
        commits.setdefault(r["experiment"], [])
        if c not in commits[r["experiment"]]:
            commits[r["experiment"]].append(c)
    mixed = {e: c for e, c in commits.items() if len(c) > 1}
    if mixed and not allow_mixed:
        detail = "; ".join(f"{e}: {', '.join(x[:10] for x in c)}" for e, c in mixed.items())
        raise MixedCommitsError(f"runs from different git commits in one table ({detail}); "
                                "re-run them at one commit (another --out), or pass "
                                "--allow-mixed-commits to mix them knowingly")
    return commits


#: Settings that must agree for runs to share one table (``--resume``, ``--merge``).
SAME_SETTINGS = ("epochs", "max_cells", "weights", "panel", "celltypist_genes",
                 "celltypist_max_iter", "p_thres")


def _setting(settings: dict[str, Any], key: str) -> Any:
    """A setting as compared across files: the weights by what they are (hash and model
    config), not by where the checkout lay or when its files were written."""
    value = settings.get(key)
    if key == "weights" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("path", "model_pt_mtime")}
    return value


def same_settings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The :data:`SAME_SETTINGS` in which two ``settings`` records differ."""
    return [k for k in SAME_SETTINGS if _setting(a, k) != _setting(b, k)]


def merge_results(sources: list[Path], *, allow_mixed: bool = False) -> dict[str, Any]:
    """One payload from the ``reference.json`` of several ``--out`` folders (or the JSON files
    themselves): e.g. seeds run side by side in separate processes, or over several sittings.

    Refuses (``ValueError``) sources made with different :data:`SAME_SETTINGS`, the same
    (experiment, method, seed) in two sources, and, unless ``allow_mixed``, runs of one
    experiment from different git commits. Failed runs are left out.
    """
    if len(sources) < 2:
        raise ValueError("--merge takes at least two reference.json files or --out folders")
    payloads = []
    for src in sources:
        path = src / "reference.json" if src.is_dir() else src
        if not path.exists():
            raise ValueError(f"--merge: {path} not found (give --out folders of reference.py "
                             "runs or their reference.json files)")
        payloads.append((path, json.loads(path.read_text())))
    first_path, first = payloads[0]
    runs: list[dict[str, Any]] = []
    where: dict[tuple[str, str, int], Path] = {}
    for path, payload in payloads:
        differ = same_settings(payload["settings"], first["settings"])
        if differ:
            raise ValueError(f"--merge: {path} and {first_path} were made with different "
                             f"settings ({', '.join(differ)}); their runs do not share a table")
        for r in payload["runs"]:
            if "error" in r:
                continue
            key = (r["experiment"], r["method"], r["seed"])
            if key in where:
                raise ValueError(f"--merge: {key[0]} {key[1]} seed {key[2]} is in both "
                                 f"{where[key]} and {path}; keep one of them")
            where[key] = path
            runs.append(r | {"git_commit": run_commit(r, payload)})

    def union(key: str) -> list:
        seen: list = []
        for _, payload in payloads:
            seen += [v for v in payload["settings"].get(key) or [] if v not in seen]
        return seen

    settings = dict(first["settings"]) | {k: union(k) for k in
                                          ("experiments", "strategies", "seeds")}
    settings["allow_mixed_commits"] = allow_mixed
    merged = {"command": "python benchmarks/reference.py --merge "
                         + " ".join(str(s) for s in sources),
              "sources": [p["command"] for _, p in payloads],
              "started": min(p["started"] for _, p in payloads),
              "finished": max(p["finished"] or p["started"] for _, p in payloads),
              "machine": first["machine"], "settings": settings, "runs": runs}
    machines = [p["machine"] for _, p in payloads]
    distinct = [m for i, m in enumerate(machines) if m not in machines[:i]]
    if len(distinct) > 1:
        merged["machines"] = distinct
    check_commits(merged, allow_mixed=allow_mixed)
    return merged


def write_report(out: Path, payload: dict[str, Any], *, allow_mixed: bool = False) -> str:
    """Write ``reference.json`` and ``reference.md``; return the Markdown.

    Raises :class:`MixedCommitsError` (before writing anything) when one experiment's runs
    come from different git commits, unless ``allow_mixed``.
    """
    from canal.io import to_jsonable

    text = render_markdown(payload, allow_mixed=allow_mixed)
    (out / "reference.json").write_text(json.dumps(payload, indent=1, default=to_jsonable))
    (out / "reference.md").write_text(text)
    return text


def render_markdown(payload: dict[str, Any], *, allow_mixed: bool = False) -> str:
    """``reference.md`` of a ``reference.json`` payload (sets ``payload["summary"]``)."""
    commits = check_commits(payload, allow_mixed=allow_mixed)
    runs = payload["runs"]
    payload["summary"] = summarize_runs(runs)
    a = payload["settings"]
    parts = [
        "# canal reference experiments: continual strategies vs CellTypist", "",
        f"Generated {payload['finished'] or payload['started']} by "
        f"`{payload['command']}`.", "",
    ]
    for m in payload.get("machines") or [payload["machine"]]:
        parts += [
            f"Machine: {m['platform']}, {m['cpus_available']} of {m['cpu_count']} CPUs, torch "
            f"{m['torch']} ({m['torch_threads']} threads), CUDA {m['cuda']}, celltypist "
            f"{m['versions']['celltypist']}, scikit-learn {m['versions']['scikit-learn']}; git "
            f"{(m.get('git_commit') or '?')[:10]}{' (dirty)' if m.get('git_dirty') else ''}.",
            ""]
    parts += [
        f"Start: {a['weights'].get('init')} "
        f"{a['weights'].get('path', '')} {a['weights'].get('model_pt_sha256', '')}; epochs: "
        f"{a['epochs'] or 'config default'}; seeds: {a['seeds']}; cells per data file: "
        f"{'at most ' + str(a['max_cells']) if a.get('max_cells') else 'all'}; CellTypist genes: "
        f"{a['celltypist_genes']}, prob-match threshold {a['p_thres']}.", "",
        "Cells are mean ± std over seeds (std with ddof 1). acc/F1/ARI: accuracy, macro-F1, "
        "adjusted Rand index on a test set after the last stage, with novelty detection (a "
        "cell of a known type called `Unassigned` is wrong); closed acc: accuracy on the "
        "cells of known types when each gets its most probable known type (no novelty "
        "detection: canal's argmax, CellTypist's best match); H: harmonic mean of known and "
        "unknown accuracy (shown where the test set has types the methods never trained on); "
        "avg acc: closed-set accuracy on the stages' held-out cells after the last stage; BWT: "
        "backward transfer (negative = forgetting); time: wall seconds per run (canal: loading, "
        "every stage with the scoring of the held-out cells after it, and the test sets after "
        "the last stage; CellTypist: "
        "training plus annotation, shared by its two read-outs). `celltypist` (best match) never "
        "says `Unassigned`, so its unknown accuracy and H-score are 0 by construction; "
        "`celltypist prob` calls `Unassigned` when no type reaches the threshold.",
    ]
    if a.get("hour"):
        parts += ["", "`--hour` grid: `cross_species` is the pancreas stream with the Baron "
                  "mouse test set added, so its first two test sets are the pancreas "
                  "experiment."]
    for exp, stats in payload["summary"].items():
        parts += ["", f"## {exp}", "", experiment_table(exp, runs, stats)]
        if len(commits.get(exp, [])) > 1:
            parts += ["", "**Mixed commits** (--allow-mixed-commits): "
                      + ", ".join(c[:10] for c in commits[exp]) + "."]
        devices = {}
        for r in runs:
            if r["experiment"] == exp and "error" not in r and r.get("device"):
                devices.setdefault(r["device"], set()).add(r["method"])
        if devices:
            parts += ["", "Computed on: " + "; ".join(
                f"{', '.join(sorted(ms))} on {d}" for d, ms in devices.items()) + "."]
    total = sum(r.get("seconds") or 0 for r in runs if r["method"] != CT_PROB)
    parts += ["", f"Total wall time of the runs: {total / 60:.1f} min.", ""]
    return "\n".join(parts)



# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiments", nargs="+", default=None,
                   help="shipped stream configs (or TOML paths); default: all five (--hour: "
                        "the four of HOUR_EXPERIMENTS)")
    p.add_argument("--strategies", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods; 'celltypist' gives both its best-match and prob-match rows")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds (split, batch order, init); default 0 1 2 (--quick: 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"max epochs per stage; default the config's (--quick: {QUICK_EPOCHS})")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: seed 0, {QUICK_EPOCHS} epoch(s), at most "
                        f"{QUICK_MAX_CELLS} cells per data file")
    p.add_argument("--full", action="store_true",
                   help="the full-data grid: every cell, the configs' recipe, seeds 0 1 2 (what "
                        "runs without --quick/--hour; the flag makes it explicit and refuses "
                        "--max-cells/--epochs)")
    p.add_argument("--hour", action="store_true",
                   help=f"the one-hour grid on a 2-core CPU: experiments "
                        f"{' '.join(HOUR_EXPERIMENTS)}, every method, seeds 0 1 2, "
                        f"{HOUR_EPOCHS} epochs, at most {HOUR_MAX_CELLS} cells per data file")
    p.add_argument("--max-cells", type=int, default=None,
                   help="cut every data file to at most this many random cells (seeded)")
    p.add_argument("--init", default=None,
                   help="'random' (tiny random model, for development), 'twin' (the shipped "
                        "model's panel and size, random weights drawn from each run's seed: "
                        "no pre-training), 'hvg' (default size, random weights, the first stage's "
                        "1,000 HVGs as panel) or a checkpoint directory; default: the configs' "
                        "shipped pre-trained weights")
    p.add_argument("--panel", choices=("auto", "hvg", "pretrained"), default=None,
                   help="the first stage's gene panel ([model] panel of the stream configs; "
                        "default: the configs' own, 'auto': hvg for weights with a gene "
                        "vocabulary, else the weights' panel)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="shared data folder (default $CANAL_DATA or ../shared/data)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--device", default="cpu", help="canal's device (default cpu)")
    p.add_argument("--celltypist-genes", choices=("train", "common"), default="train",
                   help="train CellTypist on the genes shared by the training files ('train') "
                        "or by the training and test files ('common')")
    p.add_argument("--celltypist-max-iter", type=int, default=None,
                   help="logistic-regression iterations (default celltypist's: 1000)")
    p.add_argument("--celltypist-sgd", action="store_true", help="use_SGD=True")
    p.add_argument("--celltypist-feature-selection", action="store_true",
                   help="feature_selection=True (two passes, top 300 genes per type)")
    p.add_argument("--p-thres", type=float, default=0.5,
                   help="CellTypist prob-match threshold (default 0.5)")
    p.add_argument("--plots", action="store_true", help="let run_stream draw its plots")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in OUT/reference.json and skip them")
    p.add_argument("--allow-mixed-commits", action="store_true",
                   help="with --resume or --merge: keep runs made at another git commit in the "
                        "same tables (refused by default: a table compares one code version)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="SOURCE",
                   help="run nothing: merge the reference.json of these --out folders (e.g. "
                        "seeds run in parallel) into OUT/reference.json and reference.md; "
                        "refused when their settings differ, a run is in two of them, or "
                        "(without --allow-mixed-commits) their commits differ")
    p.add_argument("--verbose", action="store_true", help="canal's and CellTypist's info logs")
    args = p.parse_args(argv)
    if sum((args.quick, args.hour, args.full)) > 1:
        p.error("--quick, --hour and --full are alternatives; pass one")
    if args.full and (args.max_cells is not None or args.epochs is not None):
        p.error("--full runs every cell with the configs' epochs; drop --max-cells/--epochs "
                "(or drop --full for a reduced run)")
    if args.experiments is None:
        args.experiments = list(HOUR_EXPERIMENTS if args.hour else EXPERIMENTS)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.hour:
        args.epochs = HOUR_EPOCHS if args.epochs is None else args.epochs
        args.max_cells = HOUR_MAX_CELLS if args.max_cells is None else args.max_cells
    if args.epochs is None and args.quick:
        args.epochs = QUICK_EPOCHS
    if args.max_cells is None and args.quick:
        args.max_cells = QUICK_MAX_CELLS
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 when every run succeeded, 1 otherwise."""
    args = parse_args(argv)
    if args.merge is not None:
        try:
            payload = merge_results(args.merge, allow_mixed=args.allow_mixed_commits)
        except ValueError as err:
            print(err, file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        write_report(args.out, payload, allow_mixed=args.allow_mixed_commits)
        print(f"merged {len(payload['runs'])} runs into {args.out / 'reference.json'} and "
              f"{args.out / 'reference.md'}")
        return 0
    # Configure logging before celltypist is imported: it calls logging.basicConfig(INFO).
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_OnlyOnce())
    for name in ("canal", "celltypist", "reference"):
        logging.getLogger(name).setLevel(logging.INFO if args.verbose else logging.WARNING)
    logger.setLevel(logging.INFO)

    import torch

    import canal
    from canal._settings import data_dir

    torch.set_num_threads(args.threads)
    canal.settings.num_threads = args.threads
    canal.settings.device = args.device
    canal.settings.progress = args.verbose
    root = args.data_dir if args.data_dir is not None else data_dir()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    wants_canal = any(s in CANAL_STRATEGIES for s in args.strategies)
    if wants_canal and args.init in (None, "twin"):
        from canal.model import DEFAULT_WEIGHTS

        if not (Path(DEFAULT_WEIGHTS) / "config.json").exists():
            print(f"no shipped weights at {DEFAULT_WEIGHTS}: wait for pre-training to write "
                  "them, or pass --init random (development) or --init CHECKPOINT_DIR",
                  file=sys.stderr)
            return 2
    settings = {"experiments": args.experiments, "strategies": args.strategies,
                "seeds": args.seeds, "epochs": args.epochs, "quick": args.quick,
                "hour": args.hour,
                "max_cells": args.max_cells,
                "weights": weights_info(args.init), "panel": args.panel,
                "celltypist_genes": args.celltypist_genes,
                "celltypist_max_iter": args.celltypist_max_iter,
                "celltypist_sgd": args.celltypist_sgd,
                "celltypist_feature_selection": args.celltypist_feature_selection,
                "p_thres": args.p_thres, "device": args.device, "threads": args.threads}
    runs: list[dict[str, Any]] = []
    if args.resume and (out / "reference.json").exists():
        old = json.loads((out / "reference.json").read_text())
        differ = same_settings(old["settings"], settings)
        if differ:
            print(f"--resume: {out}/reference.json was made with other settings "
                  f"({', '.join(differ)}); pass another --out", file=sys.stderr)
            return 2
        # runs written before commits were recorded per run: the commit that wrote the file
        runs = [r | {"git_commit": run_commit(r, old)} for r in old["runs"] if "error" not in r]
    machine = machine_info()
    commit = machine.get("git_commit")
    other = sorted({r["git_commit"] or "unknown" for r in runs} - {commit})
    if other and not args.allow_mixed_commits:
        print(f"--resume: {out}/reference.json holds runs made at git commit(s) "
              f"{', '.join(c[:10] for c in other)}, this checkout is at "
              f"{(commit or 'unknown')[:10]}; re-run them here (another --out), or pass "
              "--allow-mixed-commits to mix commits in one table", file=sys.stderr)
        return 2
    settings["allow_mixed_commits"] = args.allow_mixed_commits
    payload = {"command": "python benchmarks/reference.py " + " ".join(sys.argv[1:] if argv
                                                                        is None else argv),
               "started": datetime.now(UTC).isoformat(timespec="seconds"), "finished": None,
               "machine": machine, "settings": settings, "runs": runs}
    stamp = {"git_commit": commit, "git_dirty": machine.get("git_dirty")}
    done = {(r["experiment"], r["method"], r["seed"]) for r in runs}
    cfgs = [stream_config(exp, init=None if args.init == "twin" else args.init,
                          panel=args.panel) for exp in args.experiments]
    if args.max_cells is not None:
        root = capped_data(cfgs, root=root, max_cells=args.max_cells,
                           out=out / f"data_max{args.max_cells}")
    t_all = time.perf_counter()
    for cfg in cfgs:
        for seed in args.seeds:
            for method in args.strategies:
                if (cfg.name, method, seed) in done:
                    continue
                ts = time.perf_counter()
                try:
                    if method == "celltypist":
                        res = run_celltypist(cfg, seed=seed, root=root,
                                             genes_mode=args.celltypist_genes,
                                             p_thres=args.p_thres,
                                             max_iter=args.celltypist_max_iter,
                                             use_sgd=args.celltypist_sgd,
                                             feature_selection=args.celltypist_feature_selection,
                                             n_jobs=args.threads)
                        new = [{"experiment": cfg.name, "method": m, "seed": seed, **r}
                               for m, r in res.items()]
                    else:
                        run_cfg = cfg if args.init != "twin" else replace(cfg, model={
                            **cfg.model,
                            "init": str(random_twin(out / "twins" / f"seed{seed}", seed=seed))})
                        r = run_canal(run_cfg, strategy=method, seed=seed, epochs=args.epochs,
                                      root=root, plots=args.plots,
                                      out=out / "runs" / cfg.name / f"{method}_seed{seed}")
                        new = [{"experiment": cfg.name, "method": method, "seed": seed, **r}]
                except Exception:
                    err = traceback.format_exc()
                    print(err, file=sys.stderr)
                    new = [{"experiment": cfg.name, "method": method, "seed": seed,
                            "error": err, "seconds": time.perf_counter() - ts}]
                # CellTypist runs on the CPU whatever canal's device
                where = machine["device"] if method != "celltypist" else _cpu_name()
                runs += [r | stamp | {"device": where} for r in new]
                _check_splits(runs, cfg.name, seed)
                write_report(out, payload, allow_mixed=args.allow_mixed_commits)
                for r in new:
                    accs = "; ".join(f"{t} acc {m['accuracy']:.3f}"
                                     for t, m in r.get("tests", {}).items())
                    print(f"[{cfg.name}] seed {seed} {r['method']}: "
                          f"{'FAILED' if 'error' in r else accs} ({r['seconds']:.1f} s; total "
                          f"{(time.perf_counter() - t_all) / 60:.1f} min)", flush=True)
    payload["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    text = write_report(out, payload, allow_mixed=args.allow_mixed_commits)
    print()
    print(text)
    print(f"wrote {out / 'reference.md'} and {out / 'reference.json'}")
    return 1 if any("error" in r for r in runs) else 0


class _OnlyOnce(logging.Filter):
    """Let each distinct log message through once (canal warns per stage and test set)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _check_splits(runs: list[dict[str, Any]], exp: str, seed: int) -> None:
    """Warn when two methods of one experiment and seed trained on different cell counts."""
    counts = {r["method"]: tuple(r["n_train_cells"]) for r in runs
              if r["experiment"] == exp and r["seed"] == seed and "n_train_cells" in r}
    if len(set(counts.values())) > 1:
        logger.warning("%s seed %d: methods trained on different cells per stage: %s", exp,
                       seed, counts)


if __name__ == "__main__":
    sys.exit(main())
