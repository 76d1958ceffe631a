"""Experiment runner: fine-tune over a stream of stages, evaluate every test set after each stage.

A stream is described in TOML (see ``src/canal/configs/*.toml``)::

    name = "pancreas"
    [model]
    init = "pretrained"          # or "random" (HVG panel from the stages; n_genes, size =
                                 # "default"/"paper" and ModelConfig fields; panel_from =
                                 # "stages" (all, default) or "first" (the first stage's
                                 # cells only, as `canal fit` on a first dataset)), or a
                                 # checkpoint
    panel = "auto"               # the first stage's panel= (Annotator.fit_stage): "auto",
                                 # "hvg", "pretrained" or a list of gene symbols
    [train]                      # any canal.train.StageConfig field
    strategy = "canal"
    epochs = 15
    [[stages]]
    file = "pancreas/baron_human.h5ad"
    where = { batch = ["human1"] }
    types = ["acinar", "alpha", "beta", "delta", "ductal", "gamma"]
    [[tests]]
    name = "baron human4"
    file = "pancreas/baron_human.h5ad"
    where = { batch = ["human4"] }

Each stage keeps ``holdout`` (default 20%, stratified, seeded) of its cells aside: the accuracy
matrix ``R[t, j]`` is the (closed-set) accuracy after stage ``t`` on stage ``j``'s held-out
cells, from which average accuracy and backward transfer (forgetting) follow. Test sets are
annotated after every stage with novelty detection; true types missing from the model's library
at that point count as novel (known/unknown accuracy and H-score).
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd

from canal import io, metrics
from canal._settings import data_dir, settings
from canal.datasets import (  # noqa: F401  (re-exported: the runner's public names)
    CONFIGS,
    MIN_CELLS_PER_TYPE,
    DataSpec,
    holdout_split,
    load_cells,
    load_corpus,
    stratified_part,
)
from canal.model import Annotator, PanelChoice
from canal.nn import ModelConfig
from canal.train import StageConfig

logger = logging.getLogger(__name__)



@dataclass
class StreamConfig:
    """A parsed stream: model initialisation, stage config, stages and test sets."""

    name: str
    stages: list[DataSpec]
    tests: list[DataSpec]
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    holdout: float = 0.2
    novelty: str = "calibrated"

    @classmethod
    def from_toml(cls, path: str | Path) -> StreamConfig:
        path = Path(path)
        if not path.exists() and (CONFIGS / f"{path.stem}.toml").exists():
            path = CONFIGS / f"{path.stem}.toml"
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as err:
            names = sorted(p.stem for p in CONFIGS.glob("*.toml"))
            raise FileNotFoundError(f"no stream config {path}; shipped configs: {names}") from err
        stages = [DataSpec.from_dict(s, default_min_cells=MIN_CELLS_PER_TYPE)
                  for s in raw.get("stages", [])]
        tests = [DataSpec.from_dict(t) for t in raw.get("tests", [])]
        if not stages:
            raise ValueError(f"{path}: a stream needs at least one [[stages]] entry")
        return cls(name=raw.get("name", Path(path).stem), stages=stages, tests=tests,
                   model=raw.get("model", {}), train=raw.get("train", {}),
                   holdout=float(raw.get("holdout", 0.2)),
                   novelty=raw.get("novelty", "calibrated"))


def _init_model(cfg: StreamConfig, stages: list, *, seed: int) -> Annotator:
    init = cfg.model.get("init", "pretrained")
    if init == "pretrained":
        return Annotator.from_pretrained()
    if init == "random":
        size = cfg.model.get("size", "default")
        mc = ModelConfig.paper() if size == "paper" else ModelConfig()
        sizes = {f.name for f in fields(ModelConfig)} - {"n_genes", "seed"}
        mc = mc.replace(seed=seed, **{k: v for k, v in cfg.model.items() if k in sizes})
        panel_from = cfg.model.get("panel_from", "stages")
        if panel_from not in ("stages", "first"):
            raise ValueError(f"[model] panel_from must be 'stages' or 'first', got "
                             f"{panel_from!r}")
        return Annotator.create(stages[:1] if panel_from == "first" else stages,
                                n_genes=int(cfg.model.get("n_genes", 1000)), config=mc)
    return Annotator.from_pretrained(init)


def _first_panel(cfg: StreamConfig) -> str | list[str] | None:
    """``[model] panel``: the first stage's ``panel=`` (``None``/``"auto"``: the model's rule)."""
    panel = cfg.model.get("panel", "auto")
    if isinstance(panel, list) and all(isinstance(g, str) for g in panel):
        return panel
    if panel not in get_args(PanelChoice):
        raise ValueError(f"[model] panel must be 'auto', 'hvg', 'pretrained' or a list of gene "
                         f"symbols, got {panel!r}")
    return None if panel == "auto" else panel


def _novelty_metrics(truth: np.ndarray, pred: np.ndarray, types: list[str]) -> dict[str, Any]:
    novel = sorted(set(truth) - set(types))
    out = metrics.summarize(truth, pred, novel_types=novel) if novel else \
        metrics.summarize(truth, pred)
    out["novel_types"] = novel
    known = np.isin(truth, types)
    # the share of cells of known types called Unassigned (the false-rejection rate)
    out["unassigned_known"] = float((pred[known] == metrics.UNASSIGNED).mean()) \
        if known.any() else None
    return out


def _evaluate(model: Annotator, adata, spec: DataSpec, *, novelty: str) -> dict[str, Any]:
    """Metrics of the test set ``adata``; its predictions are written into it (``obs["canal"]``,
    ``obsm["X_canal"]``, ...: the run's own copy), for :func:`_save_predictions`."""
    match = spec.match(model.match)
    model.predict(adata, novelty=novelty, inplace=True, match=match)
    truth = adata.obs[spec.labels_key].astype(str).to_numpy()
    types = list(model.cell_types)
    out = _novelty_metrics(truth, adata.obs["canal"].astype(str).to_numpy(), types)
    out["novelty"] = novelty
    # closed-set read-out from the same pass: the most probable known type, novelty ignored,
    # on the cells whose true type the model knows
    known = np.isin(truth, types)
    if known.any() and types:
        probs = adata.obsm["canal_probabilities"][types].to_numpy()
        closed = np.asarray(types)[probs.argmax(axis=1)]
        out["closed_accuracy"] = metrics.accuracy(truth[known], closed[known])
    if novelty != "mixup" and adata.n_obs >= 2:
        # CANAL's own (transductive) rule on the same cells, for comparison
        mix = model.predict(adata, novelty="mixup", inplace=False, match=match)
        m = _novelty_metrics(truth, mix["canal"].astype(str).to_numpy(), types)
        out["mixup"] = {k: m.get(k) for k in ("accuracy", "macro_f1", "known_accuracy",
                                              "unknown_accuracy", "h_score",
                                              "unassigned_known")}
    return out


@contextmanager
def _each_warning_once():
    """Let each distinct canal warning through once: a stream annotates the same test sets
    with the same panel after every stage, and their warnings (a partial panel, TPM-like
    values) would otherwise repeat once per stage."""
    seen: set[tuple[str, str]] = set()

    def once(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in seen:
            return False
        seen.add(key)
        return True

    names = [n for n in list(logging.root.manager.loggerDict)
             if n == "canal" or n.startswith("canal.")]
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addFilter(once)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(once)


def run_stream(config: StreamConfig | str | Path, *, out_dir: str | Path,
               root: str | Path | None = None, strategy: str | None = None,
               seed: int = 0, epochs: int | None = None, plots: bool = True,
               save_model: bool = True, test_every_stage: bool = True) -> dict[str, Any]:
    """Run a stream; write ``results.json``, CSV tables, plots, ``report.html`` (see
    :mod:`canal.report`), each test set's final predictions (``predictions/*.h5ad``: obs calls
    and scores, ``obsm["X_canal"]``, no expression) and the final model to ``out_dir``.

    Parameters
    ----------
    config
        A :class:`StreamConfig`, a TOML path, or a shipped config name (``"pancreas"``).
    out_dir
        Output folder (created).
    root
        Folder the config's relative ``file`` paths resolve against (default: the shared data
        folder, ``$CANAL_DATA`` or ``../shared/data``).
    strategy, seed, epochs
        Override the config's ``[train]`` strategy, the seed and the epochs.
    plots
        Write the PNG plots and the self-contained ``report.html``.
    test_every_stage
        Annotate the test sets after every stage (their accuracy over the stream); ``False``
        annotates them after the last stage only, which is all the final table needs. The
        stages' held-out cells (accuracy matrix, forgetting) are scored after every stage either
        way.
    save_model
        Save the final model (with its example bank) as the checkpoint ``out_dir/model``, for
        ``canal predict`` / ``canal explain`` afterwards.

    Returns
    -------
    The results dictionary (also written to ``out_dir/results.json``).
    """
    with _each_warning_once():
        return _run_stream(config, out_dir=out_dir, root=root, strategy=strategy, seed=seed,
                           epochs=epochs, plots=plots, save_model=save_model,
                           test_every_stage=test_every_stage)


def _run_stream(config, *, out_dir, root, strategy, seed, epochs, plots, save_model,
                test_every_stage) -> dict[str, Any]:
    cfg = config if isinstance(config, StreamConfig) else StreamConfig.from_toml(config)
    root = Path(root) if root is not None else data_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = dict(cfg.train) | {"seed": seed}
    if strategy is not None:
        train["strategy"] = strategy
    if epochs is not None:
        train["epochs"] = epochs
    stage_config = StageConfig(**train)
    t0 = time.perf_counter()
    cache: dict = {}
    panel = _first_panel(cfg)  # a bad value fails before any data is read
    stage_train, stage_hold = [], []
    for spec in cfg.stages:
        train, hold = holdout_split(load_cells(spec, root=root, cache=cache),
                                    labels_key=spec.labels_key, holdout=cfg.holdout, seed=seed)
        stage_train.append(train)
        stage_hold.append(hold)
    tests = [(spec, load_cells(spec, root=root, cache=cache)) for spec in cfg.tests]
    del cache
    model = _init_model(cfg, stage_train, seed=seed)
    records, matrix, stage_info = [], [], []
    for t, (spec, adata) in enumerate(zip(cfg.stages, stage_train, strict=True), start=1):
        logger.info("stage %d/%d: %s (%d cells)", t, len(cfg.stages), spec.name, adata.n_obs)
        ts = time.perf_counter()
        model.fit_stage(adata, labels_key=spec.labels_key, config=stage_config,
                        match=spec.match(model.match), panel=panel if t == 1 else None)
        h = model.history[-1]
        counts = adata.obs[spec.labels_key].astype(str).value_counts()
        stage_info.append({"stage": t, "name": spec.name, "n_cells": adata.n_obs,
                           "new_types": h["new_types"], "seconds": time.perf_counter() - ts,
                           "type_counts": {str(k): int(v) for k, v in counts.items()},
                           "epochs_run": h["epochs_run"],
                           "train_cells_per_second": h["train_cells_per_second"]})
        for j, hold in enumerate(stage_hold, start=1):
            if hold is None or j > t:
                continue
            res = model.predict(hold, novelty="none", inplace=False,
                                match=cfg.stages[j - 1].match(model.match))
            acc = metrics.accuracy(hold.obs[cfg.stages[j - 1].labels_key].astype(str),
                                   res["canal"].astype(str))
            matrix.append({"stage": t, "test": f"stage {j}", "accuracy": acc})
        for tspec, tdata in tests if test_every_stage or t == len(cfg.stages) else ():
            m = _evaluate(model, tdata, tspec, novelty=cfg.novelty)
            records.append({"stage": t, "test": tspec.name, **m})
        if settings.progress:
            # the test sets when they were scored after this stage, else the held-out cells
            last = [(r["test"], r["accuracy"]) for r in records if r["stage"] == t] or \
                [(r["test"] + " held-out", r["accuracy"]) for r in matrix if r["stage"] == t]
            print(f"[{cfg.name}] stage {t}/{len(cfg.stages)} {spec.name}: "
                  + "; ".join(f"{name} acc {acc:.3f}" for name, acc in last), flush=True)
    R = metrics.accuracy_matrix(matrix) if matrix else pd.DataFrame()
    final = [r for r in records if r["stage"] == len(cfg.stages)]
    results = {
        "name": cfg.name, "strategy": stage_config.strategy, "seed": seed,
        "stage_config": stage_config.to_dict(), "stages": stage_info,
        "accuracy_matrix": R.to_dict(orient="split") if len(R) else None,
        "average_accuracy": metrics.average_accuracy(R) if len(R) else None,
        "backward_transfer": metrics.backward_transfer(R) if len(R) > 1 else None,
        "forgetting": metrics.forgetting(R) if len(R) > 1 else None,
        "tests": records, "final": final, "seconds": time.perf_counter() - t0,
        "cell_types": list(model.cell_types),
    }
    if save_model:
        model.save(out / "model")
        results["model"] = str(out / "model")
    results["predictions"] = _save_predictions(tests, out)
    io.write_text(out / "results.json", json.dumps(results, indent=2, default=io.to_jsonable))
    if len(R):
        io.write_csv(R, out / "accuracy_matrix.csv")
    table = pd.DataFrame(records)
    for name, sub in table.groupby("test", sort=False):
        io.write_csv(sub.drop(columns=["test"]), out / f"test_{_safe(name)}.csv", index=False)
    if plots:
        _plots(results, R, table, out)
        from canal import report

        results["report"] = str(report.write_report(out))
    return results


#: Folder of a stream run's saved test-set predictions (after the last stage).
PREDICTIONS = "predictions"


def _save_predictions(tests: list, out: Path) -> dict[str, dict[str, str]]:
    """Write each test set's final predictions (no expression: obs, ``X_canal``, params) to
    ``out/predictions/<test>.h5ad``; returns ``{test: {"file": relative path, "truth": obs
    column}}`` for ``results.json``."""
    import anndata as ad

    saved = {}
    for spec, adata in tests:
        if "canal" not in adata.obs:
            continue
        cols = [spec.labels_key] + [c for c in adata.obs.columns if c.startswith("canal")]
        light = ad.AnnData(obs=adata.obs[cols].copy(),
                           obsm={k: adata.obsm[k] for k in ("X_canal", "canal_probabilities")
                                 if k in adata.obsm},
                           uns={k: adata.uns[k] for k in ("canal", "canal_colors")
                                if k in adata.uns})
        rel = Path(PREDICTIONS) / f"test_{_safe(spec.name)}.h5ad"
        (out / PREDICTIONS).mkdir(exist_ok=True)
        io.write_h5ad(light, out / rel)
        saved[spec.name] = {"file": rel.as_posix(), "truth": spec.labels_key}
    return saved


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _plots(results: dict, R: pd.DataFrame, table: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from canal import pl

    if len(R):
        fig = pl.accuracy_matrix(R)
        io.save_figure(fig, out / "accuracy_matrix.png", dpi=120, bbox_inches="tight")
    fig = pl.stream_accuracy(table)
    io.save_figure(fig, out / "test_accuracy.png", dpi=120, bbox_inches="tight")


def _share(v) -> str:
    return f" {v:.1%} |" if v is not None else " - |"


def _mixup_cell(m) -> str:
    if not m:
        return " - |"
    h = m.get("h_score")
    return f" {m['accuracy']:.3f} / " + (f"{h:.3f} |" if h is not None else "- |")


def format_table(results: dict) -> str:
    """The final per-test-set table (accuracy, closed-set accuracy, macro-F1, ARI, H-score)."""
    rows = ["| test set | accuracy | closed-set acc | macro-F1 | ARI | known acc | unknown acc "
            "| H-score | known cells Unassigned | CANAL mixup: acc / H |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["final"]:
        h = r.get("h_score")
        closed = r.get("closed_accuracy")
        rows.append(f"| {r['test']} | {r['accuracy']:.3f} | "
                    + (f"{closed:.3f}" if closed is not None else "-")
                    + f" | {r['macro_f1']:.3f} | {r['ari']:.3f} | "
                    + (f"{r['known_accuracy']:.3f} | {r['unknown_accuracy']:.3f} | {h:.3f} |"
                       if h is not None else "- | - | - |")
                    + _share(r.get("unassigned_known")) + _mixup_cell(r.get("mixup")))
    rows.append("")
    rows.append("accuracy: with novelty detection (a known cell called Unassigned is wrong); "
                "closed-set acc: most probable known type, on the cells of known types; "
                "known cells Unassigned: the false-rejection rate; CANAL mixup: the paper's "
                "transductive rule on the same cells")
    bwt = results.get("backward_transfer")
    rows.append("")
    rows.append(f"average accuracy over stages' held-out cells: "
                f"{results['average_accuracy']:.3f}; backward transfer: "
                + (f"{bwt:+.3f}" if bwt is not None else "n/a"))
    return "\n".join(rows)
