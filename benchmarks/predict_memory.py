"""Prediction memory and speed.

1. Memory: the Kang control PBMC file is tiled to ``--cells`` cells (default 100,000) in a
   temporary .h5ad; a child process opens it backed and runs ``Annotator.predict`` on it, and
   reports its resident memory before predicting and at its peak (``VmHWM``, the kernel's
   peak-RSS mark, reset just before; see :func:`_peak_rss_mb`). The same is measured for a
   prediction of 256 cells; the script asserts that the 100k cells add less than a quarter of
   the dense matrix size on top of that (a dense load would add the whole matrix).
   The model is a small one (``--memory-model tiny``, default) because the default model runs at
   ~30 cells/s on one CPU thread (an hour for 100k cells); memory per batch is what matters and
   ``--memory-model default`` runs the same check with the default model.
2. Speed: prediction cells/s of the default model and the paper's (scBERT) size on Baron human
   pancreas cells (``--speed-cells``, default 2,000; the paper size on ``--paper-cells``, default
   64, as it runs at ~1-2 cells/s), fp32 and bf16, plus the label agreement fp32 vs bf16. With a
   trained model (``fit_stage`` on Baron donors 1-3, a few epochs) the agreement is measured on
   the unseen donor 4; untrained heads give near-uniform probabilities, where agreement means
   little.

Run: ``python benchmarks/predict_memory.py [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TINY = dict(dim=16, depth=2, heads=2, dim_head=8, head_hidden=32, rep_dim=16, seed=0)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    """Current resident set size in MiB."""
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    """Peak resident set size in MiB since start or the last :func:`_reset_peak`.

    ``resource.getrusage().ru_maxrss`` would be the natural call, but Linux keeps it across
    fork/exec: a child started by this script inherits the parent's peak (the parent built the
    tiled matrix), and resetting the peak mark does not lower it. ``VmHWM`` is the same
    high-water mark for this process's memory only, and it can be reset.
    """
    hwm = _status_mb("VmHWM")
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(genes, cell_types, size: str):
    import torch

    from canal import Annotator, ModelConfig
    from canal.nn import CanalNet

    config = {"tiny": ModelConfig(**TINY), "default": ModelConfig(),
              "paper": ModelConfig.paper()}[size].replace(n_genes=len(genes))
    net = CanalNet(config, n_classes=0)
    net.head.grow(len(cell_types), generator=torch.Generator().manual_seed(0))
    return Annotator(net, genes, cell_types=cell_types)


def _reset_peak() -> bool:
    """Reset this process's peak-RSS mark (``VmHWM``; Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child_predict(ckpt: str, path: str, batch_size: int) -> None:
    """Open ``path`` backed, predict, print a JSON line with memory and speed."""
    import anndata as ad

    from canal import Annotator, settings

    settings.progress = False
    model = Annotator.from_pretrained(ckpt)
    adata = ad.read_h5ad(path, backed="r")
    # Warm-up on 256 cells: torch maps its kernels' code pages and sets up thread pools on first
    # use; that one-off cost is not memory that grows with the data. Then the same 256 cells
    # again, to measure what one small prediction adds (the per-batch working memory).
    head = ad.AnnData(X=adata.X[:256], var=adata.var[[]].copy())
    model.predict(head.copy(), batch_size=batch_size)
    small_before = _rss_mb()
    reset = _reset_peak()
    model.predict(head, batch_size=batch_size)
    small_peak = _peak_rss_mb()
    del head
    before = _rss_mb()
    _reset_peak()
    t0 = time.perf_counter()
    model.predict(adata, batch_size=batch_size)
    dt = time.perf_counter() - t0
    counts = adata.obs["canal"].value_counts()
    print(json.dumps({"small_added_mb": small_peak - small_before, "rss_before_mb": before,
                      "peak_rss_mb": _peak_rss_mb(), "peak_reset": reset, "seconds": dt,
                      "cells": adata.n_obs, "unassigned": int(counts.get("Unassigned", 0)),
                      "rep_shape": list(adata.obsm["X_canal"].shape)}))


def memory(args) -> None:
    import anndata as ad
    import scipy.sparse as sp

    from canal import pp
    from canal._settings import data_dir

    kang = ad.read_h5ad(data_dir() / "immune" / "kang_ctrl_8donors.h5ad")
    genes = pp.select_panel(kang, n_genes=1000)
    types = sorted(kang.obs["cell_type"].astype(str).unique())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _model(genes, types, args.memory_model).save(Path(tmp) / "model")
        reps = int(np.ceil(args.cells / kang.n_obs))
        x = sp.vstack([kang.X] * reps, format="csr")[:args.cells]
        obs_names = [f"{name}-{i}" for i in range(reps) for name in kang.obs_names][:args.cells]
        big = ad.AnnData(X=x, var=kang.var[[]].copy())
        big.obs_names = obs_names
        path = Path(tmp) / "tiled.h5ad"
        big.write_h5ad(path)
        dense_mb = big.n_obs * big.n_vars * 4 / 2**20
        file_mb = path.stat().st_size / 2**20
        del big, x
        out = subprocess.run([sys.executable, __file__, "--child", str(ckpt), str(path),
                              "--batch-size", str(args.batch_size), "--threads",
                              str(args.threads)], check=True, capture_output=True, text=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    if not res["peak_reset"]:
        raise SystemExit("cannot reset the peak-RSS mark (/proc/self/clear_refs); run on Linux")
    grown = res["peak_rss_mb"] - res["rss_before_mb"]
    small = res["small_added_mb"]
    print(f"\n## memory: {res['cells']:,} cells x {kang.n_vars:,} genes, backed, "
          f"{args.memory_model} model, batch {args.batch_size}, {args.threads} thread(s)")
    print(f"file on disk (sparse CSR)              {file_mb:6.0f} MiB")
    print(f"X as dense float32                     {dense_mb:6.0f} MiB")
    print(f"RSS before predict (imports, warm-up)  {res['rss_before_mb']:6.0f} MiB")
    print(f"peak RSS during predict                {res['peak_rss_mb']:6.0f} MiB")
    print(f"added by predict, {res['cells']:,} cells        {grown:6.0f} MiB")
    print(f"added by predict, 256 cells            {small:6.0f} MiB  (per-batch working memory)")
    print(f"speed                                  {res['cells'] / res['seconds']:6.0f} cells/s "
          f"({res['seconds']:.0f} s)")
    print(f"Unassigned                             {res['unassigned']:6d}")
    if grown - small >= dense_mb / 4:
        raise SystemExit(f"FAIL: {res['cells']:,} cells added {grown - small:.0f} MiB more "
                         f"than 256 cells, not below a quarter of the dense matrix "
                         f"({dense_mb / 4:.0f} MiB)")
    print(f"OK: bounded; {res['cells']:,} cells need {grown - small:+.0f} MiB vs 256 cells "
          f"(< dense/4 = {dense_mb / 4:.0f} MiB)")


def _time_predict(model, adata, precision: str, batch_size: int):
    t0 = time.perf_counter()
    df = model.predict(adata, precision=precision, batch_size=batch_size, inplace=False,
                       novelty="none")
    return adata.n_obs / (time.perf_counter() - t0), df


def _agreement(a, b) -> tuple[float, float]:
    same = float((a["canal"].astype(str) == b["canal"].astype(str)).mean())
    types = [c for c in a.columns if not c.startswith("canal")]
    diff = float(np.abs(a[types].to_numpy() - b[types].to_numpy()).max())
    return same, diff


def speed(args) -> None:
    import anndata as ad

    from canal import Annotator, pp
    from canal._settings import data_dir

    baron = ad.read_h5ad(data_dir() / "pancreas" / "baron_human.h5ad")
    genes = pp.select_panel(baron, n_genes=1000)
    types = sorted(baron.obs["cell_type"].astype(str).unique())
    cells = baron[:args.speed_cells].copy()
    print(f"\n## prediction speed ({args.threads} thread(s), batch {args.batch_size}, "
          "novelty='none')")
    print("| model | cells | fp32 cells/s | bf16 cells/s | labels equal | max |dp| |")
    print("|---|---|---|---|---|---|")
    for size, n in (("default", args.speed_cells), ("paper", args.paper_cells)):
        model = _model(genes, types, size)
        sub = cells[:n]
        model.predict(sub[:8], novelty="none", inplace=False)  # warm-up
        r32, p32 = _time_predict(model, sub, "fp32", args.batch_size)
        r16, p16 = _time_predict(model, sub, "bf16", args.batch_size)
        same, diff = _agreement(p32, p16)
        print(f"| {size} (untrained head) | {sub.n_obs} | {r32:.1f} | {r16:.1f} | "
              f"{same:.1%} | {diff:.2e} |", flush=True)

    if not hasattr(Annotator, "fit_stage"):
        print("\n(no Annotator.fit_stage: trained-model agreement skipped)")
        return
    from canal.train import StageConfig

    donor = baron.obs["batch"].astype(str)
    train = baron[donor != "human4"]
    keep = train.obs["cell_type"].map(train.obs["cell_type"].value_counts()) >= 10
    train = train[keep.to_numpy()]
    idx = np.random.default_rng(0).choice(train.n_obs, min(args.train_cells, train.n_obs),
                                          replace=False)
    train = train[np.sort(idx)].copy()
    test = baron[donor == "human4"].copy()
    model = Annotator.from_genes(genes)
    t0 = time.perf_counter()
    model.fit_stage(train, config=StageConfig(epochs=args.train_epochs, seed=0))
    fit_s = time.perf_counter() - t0
    r32, p32 = _time_predict(model, test, "fp32", args.batch_size)
    r16, p16 = _time_predict(model, test, "bf16", args.batch_size)
    same, diff = _agreement(p32, p16)
    acc32 = float((p32["canal"].astype(str) == test.obs["cell_type"].astype(str)).mean())
    acc16 = float((p16["canal"].astype(str) == test.obs["cell_type"].astype(str)).mean())
    print(f"\n## bf16 vs fp32, default model trained on {train.n_obs} cells of donors 1-3 "
          f"({args.train_epochs} epochs, {fit_s:.0f} s), {test.n_obs} cells of donor 4")
    print(f"labels equal {same:.2%}; max |p_fp32 - p_bf16| {diff:.3e}; accuracy fp32 "
          f"{acc32:.3f}, bf16 {acc16:.3f}; speed fp32 {r32:.1f}, bf16 {r16:.1f} cells/s")
    for mode in ("energy", "calibrated"):
        a = model.predict(test, novelty=mode, inplace=False)
        b = model.predict(test, novelty=mode, inplace=False, precision="bf16")
        same, _ = _agreement(a, b)
        print(f"novelty={mode}: calls equal fp32 vs bf16 {same:.2%} (Unassigned fp32 "
              f"{int((a['canal'] == 'Unassigned').sum())}, bf16 "
              f"{int((b['canal'] == 'Unassigned').sum())})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--memory-model", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--speed-cells", type=int, default=2000)
    parser.add_argument("--paper-cells", type=int, default=64)
    parser.add_argument("--train-cells", type=int, default=600)
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("CKPT", "H5AD"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from canal import settings

    settings.progress = False
    if args.child:
        child_predict(*args.child, batch_size=args.batch_size)
        return
    if not args.skip_memory:
        memory(args)
    if not args.skip_speed:
        speed(args)


if __name__ == "__main__":
    main()
