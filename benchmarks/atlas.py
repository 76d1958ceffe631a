"""A million cells: ``canal predict`` end to end on a backed atlas, CellTypist on the same file.

1. **Atlas.** The Kang control PBMC cells of the six donors not used for training (7,415 cells,
   1,287 genes, log-normalized: normalize_total 1e4 + log1p, so that canal and CellTypist read
   the very same file) are tiled to ``--n-cells`` cells (default 1,000,000) in a backed-readable
   ``.h5ad`` under ``--work-dir`` (default: a temporary folder, removed afterwards unless
   ``--keep``). The file is written a tile at a time (appended to the on-disk CSR matrix), so
   building it never holds the whole matrix. A second, small file (``--small-cells``, default
   10,000) is built the same way: the difference of the two runs is the per-cell rate with the
   start-up (imports, model loading) excluded.
2. **Models.** canal: the default model (``--model-size``; or ``--model`` a checkpoint) on a
   1,000-gene panel of the training donors (1015, 1256), ``fit_stage`` for ``--train-epochs``
   epochs on ``--train-cells`` cells. CellTypist: ``celltypist.train`` (logistic regression,
   its defaults) on the same cells. Its annotate scales the query densely (1M x 1,287 float64 is
   10 GB; ``with_mean=False``, CellTypist's advice for large data, fails in celltypist 1.7.1 with
   this scipy: a COO matrix does not support item assignment), so ``--celltypist-chunk N``
   annotates N cells per call, read from the backed file, when memory does not allow one call.
3. **Annotation, each in its own process, as a user runs it.** ``python -m canal predict`` (so
   the allocator and environment are what the ``canal`` command sets up; ``--nproc N`` runs it
   under ``torchrun`` with N processes, see docs/distributed.md), then a CellTypist process that
   calls ``celltypist.annotate`` on the same file and writes its labels and probabilities. canal
   shows its progress bar (cells/s, time left) on stderr. Each process is started by a small
   launcher process that reports its peak resident memory (``ru_maxrss`` of the waited child: a
   child started straight from this script would inherit this script's high-water mark, which
   holds the training data; the launcher's own is ~20 MB). Under ``--nproc N`` it is the peak
   of the largest single process (``ru_maxrss`` of the waited descendants is their maximum).

Printed and written to ``--results`` (default benchmarks/results/atlas.json): wall seconds,
cells/s end to end and from the slope (large minus small file), peak RSS (goal: under 4 GB for
canal), the canal/CellTypist ratios, and the two tools' accuracy on the atlas's labels and their
agreement (a sanity check, not a benchmark of accuracy: the atlas repeats 7,415 cells).

Run (the full size takes hours on a 2-core CPU; check the script first at a small size)::

    OMP_NUM_THREADS=2 python benchmarks/atlas.py                     # 1,000,000 cells
    OMP_NUM_THREADS=1 python benchmarks/atlas.py --n-cells 20000 --small-cells 2000 \\
        --model-size tiny --results /tmp/atlas_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAIN_DONORS = ("1015", "1256")
TINY = dict(dim=16, depth=2, heads=2, dim_head=8, head_hidden=32, rep_dim=16, seed=0)

#: Runs the command in argv[2:], then writes its wall time and peak RSS as JSON to fd argv[1].
_LAUNCHER = """
import json, os, resource, subprocess, sys, time
t0 = time.perf_counter()
code = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
with os.fdopen(int(sys.argv[1]), "w") as fh:
    fh.write(json.dumps({"returncode": code, "seconds": wall, "peak_rss_mb": peak}))
sys.exit(code)
"""

_CELLTYPIST = """
import sys, time
import anndata as ad, pandas as pd
import celltypist
path, model, out, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
def table(result):
    return result.predicted_labels.join(result.probability_matrix)
if chunk <= 0:  # as a user calls it: the whole file
    tables = [table(celltypist.annotate(path, model=model, majority_voting=False))]
else:
    cells = ad.read_h5ad(path, backed="r")
    tables = [table(celltypist.annotate(cells[i:i + chunk].to_memory(), model=model,
                                        majority_voting=False))
              for i in range(0, cells.n_obs, chunk)]
pd.concat(tables).to_csv(out)
print(f"celltypist annotate + write: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
"""


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _log_normalize(x):
    """normalize_total(1e4) + log1p of a CSR count matrix (float32)."""
    import scipy.sparse as sp

    x = sp.csr_matrix(x, dtype=np.float32, copy=True)
    totals = np.asarray(x.sum(axis=1)).ravel()
    x.data *= np.repeat(1e4 / totals, np.diff(x.indptr)).astype(np.float32)
    np.log1p(x.data, out=x.data)
    return x


def load_source():
    """Kang control cells, log-normalized: (training donors, the others)."""
    import anndata as ad

    from canal._settings import data_dir

    kang = ad.read_h5ad(data_dir() / "immune" / "kang_ctrl_8donors.h5ad")
    kang.X = _log_normalize(kang.X)
    train = kang.obs["batch"].astype(str).isin(TRAIN_DONORS).to_numpy()
    keep = ["cell_type", "batch"]
    out = []
    for mask in (train, ~train):
        part = kang[mask].copy()
        part.obs = part.obs[keep].copy()
        out.append(part)
    return out[0], out[1]


def build_atlas(source, path: Path, n_cells: int) -> Path:
    """Tile ``source`` to ``n_cells`` rows in a new .h5ad at ``path``, one tile at a time.

    Cell ``i`` is ``source`` cell ``i % source.n_obs``, named ``<name>-<tile>``; obs keeps the
    source's columns (``cell_type``: the truth for a sanity check).
    """
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    n_src = source.n_obs
    reps = -(-n_cells // n_src)
    rows = np.arange(n_cells) % n_src
    tile = np.arange(n_cells) // n_src
    names = pd.Index(np.asarray(source.obs_names)[rows]).str.cat(tile.astype(str), sep="-")
    obs = source.obs.iloc[rows].set_axis(names)
    x = sp.csr_matrix(source.X, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", obs)
        write_elem(f, "var", source.var[[]])
        write_elem(f, "X", x[:min(n_src, n_cells)])
        matrix = sparse_dataset(f["X"])
        for r in range(1, reps):
            matrix.append(x[:min(n_src, n_cells - r * n_src)])
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, key, {})
        write_elem(f, "uns", {})
    return path


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def train_canal(train, out: Path, *, size: str, n_cells: int, epochs: int, seed: int) -> dict:
    from canal import Annotator, ModelConfig, pp
    from canal.train import StageConfig

    cells = train[np.sort(np.random.default_rng(seed).choice(train.n_obs, min(n_cells,
                                                                               train.n_obs),
                                                               replace=False))].copy()
    genes = pp.select_panel(cells, n_genes=1000)
    config = {"tiny": ModelConfig(**TINY), "default": ModelConfig(),
              "paper": ModelConfig.paper()}[size]
    model = Annotator.from_genes(genes, config=config)
    t0 = time.perf_counter()
    model.fit_stage(cells, config=StageConfig(epochs=epochs, seed=seed))
    seconds = time.perf_counter() - t0
    model.save(out)
    return {"model_size": size, "train_cells": cells.n_obs, "train_epochs": epochs,
            "train_seconds": seconds, "genes": len(genes), "cell_types": model.cell_types}


def train_celltypist(train, out: Path, *, n_cells: int, seed: int, threads: int) -> dict:
    import celltypist

    cells = train[np.sort(np.random.default_rng(seed).choice(train.n_obs, min(n_cells,
                                                                               train.n_obs),
                                                               replace=False))].copy()
    t0 = time.perf_counter()
    model = celltypist.train(cells, labels="cell_type", n_jobs=threads)
    seconds = time.perf_counter() - t0
    model.write(str(out))
    return {"train_cells": cells.n_obs, "train_seconds": seconds}


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------


def _launch(cmd: list[str], *, env: dict[str, str], log: Path | None = None) -> dict:
    """Run ``cmd`` through the launcher; stderr passes through (canal's progress bar)."""
    read, write = os.pipe()
    stdout = open(log, "w") if log is not None else None  # noqa: SIM115 -- closed below
    try:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(write), *cmd], env=env,
                                stdout=stdout, pass_fds=(write,))
        os.close(write)
        with os.fdopen(read) as fh:
            report = fh.read()
        proc.wait()
    finally:
        if stdout is not None:
            stdout.close()
    if proc.returncode != 0 or not report:
        tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
        raise SystemExit(f"FAIL: {' '.join(cmd)} exited with {proc.returncode}\n{tail}")
    return json.loads(report)


def run_canal(model: Path, data: Path, out: Path, *, novelty: str, batch_size: int,
              precision: str, nproc: int, env: dict[str, str], log: Path) -> dict:
    prefix = [sys.executable, "-m", "canal"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", "-m", "canal"]
    cmd = [*prefix, "predict", "--model", str(model), "--data", str(data), "--out", str(out),
           "--novelty", novelty, "--batch-size", str(batch_size), "--precision", precision]
    res = _launch(cmd, env=env, log=log)
    res["command"] = " ".join(cmd)
    return res


def run_celltypist(model: Path, data: Path, out: Path, *, chunk: int, env: dict[str, str],
                   log: Path) -> dict:
    res = _launch([sys.executable, "-c", _CELLTYPIST, str(data), str(model), str(out),
                   str(chunk)], env=env, log=log)
    res["command"] = f"celltypist.annotate({data.name}, model=..., majority_voting=False)" + \
        (f" per {chunk:,} cells" if chunk > 0 else "")
    return res


def _scores(canal_out: Path, celltypist_out: Path, truth) -> dict:
    import anndata as ad
    import pandas as pd

    pred = ad.read_h5ad(canal_out, backed="r")
    canal = pred.obs["canal"].astype(str).to_numpy()
    closed = pred.obs["canal_closed"].astype(str).to_numpy()
    pred.file.close()
    ct = pd.read_csv(celltypist_out, index_col=0, usecols=[0, 1])["predicted_labels"]
    ct = ct.astype(str).to_numpy()
    truth = np.asarray(truth, dtype=str)
    return {"canal_accuracy": float((canal == truth).mean()),
            "canal_closed_accuracy": float((closed == truth).mean()),
            "canal_unassigned": int((canal == "Unassigned").sum()),
            "celltypist_accuracy": float((ct == truth).mean()),
            "closed_agreement": float((closed == ct).mean())}


def _rates(big: dict, small: dict | None, n_big: int, n_small: int) -> dict:
    out = {"cells_per_s": n_big / big["seconds"]}
    if small is not None and big["seconds"] > small["seconds"]:
        out["cells_per_s_slope"] = (n_big - n_small) / (big["seconds"] - small["seconds"])
    return out


def _environment(threads: str) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "omp_num_threads": threads,
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "canal_no_tcmalloc": os.environ.get("CANAL_NO_TCMALLOC", ""),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "load_average": list(os.getloadavg()), "machine": platform.machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=1_000_000)
    parser.add_argument("--small-cells", type=int, default=10_000,
                        help="also run both tools on this many cells (0: skip); the difference "
                             "gives the rate without start-up")
    parser.add_argument("--novelty", choices=["calibrated", "mixup", "none"],
                        default="calibrated")
    parser.add_argument("--model", default=None, help="a canal checkpoint to use (its genes must "
                        "be among the Kang file's); default: train one")
    parser.add_argument("--model-size", choices=["default", "tiny", "paper"], default="default")
    parser.add_argument("--train-cells", type=int, default=2000)
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--nproc", type=int, default=1,
                        help="run canal predict under torchrun with this many processes")
    parser.add_argument("--skip-celltypist", action="store_true")
    parser.add_argument("--celltypist-chunk", type=int, default=0,
                        help="annotate this many cells per CellTypist call (0: the whole file "
                             "in one call, as users do; it needs ~25 GB for 1M cells)")
    parser.add_argument("--work-dir", default=None,
                        help="folder for the atlas files, models and outputs (default: a "
                             "temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep --work-dir's files")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "atlas.json"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    threads = os.environ.get("OMP_NUM_THREADS", "")
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    from canal import settings

    settings.progress = False  # this process trains quietly; the canal child shows its bar
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p))

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="canal_atlas_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        record = _run(args, work, env, threads)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nresults: {args.results}")


def _run(args, work: Path, env: dict[str, str], threads: str) -> dict:
    train, test = load_source()
    sizes = [n for n in (args.small_cells, args.n_cells) if n > 0]
    record: dict = {"n_cells": args.n_cells, "small_cells": args.small_cells,
                    "source": f"kang_ctrl_8donors, donors not in {list(TRAIN_DONORS)} "
                              f"({test.n_obs} cells x {test.n_vars} genes, log-normalized), "
                              "tiled",
                    "novelty": args.novelty, "batch_size": args.batch_size,
                    "celltypist_chunk": args.celltypist_chunk,
                    "precision": args.precision, "nproc": args.nproc,
                    "environment": _environment(threads)}
    print(f"building {' and '.join(f'{n:,}' for n in sizes)}-cell atlas file(s) in {work}",
          flush=True)
    files = {}
    for n in sizes:
        t0 = time.perf_counter()
        files[n] = build_atlas(test, work / f"atlas_{n}.h5ad", n)
        print(f"  {n:,} cells: {files[n].stat().st_size / 2**20:,.0f} MiB on disk, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    if args.model:
        ckpt = Path(args.model)
        record["canal_model"] = {"checkpoint": str(ckpt)}
    else:
        ckpt = work / "canal_model"
        print(f"training canal ({args.model_size} model, {args.train_epochs} epochs)", flush=True)
        record["canal_model"] = train_canal(train, ckpt, size=args.model_size,
                                            n_cells=args.train_cells, epochs=args.train_epochs,
                                            seed=args.seed)
    ct_model = work / "celltypist_model.pkl"
    if not args.skip_celltypist:
        print("training CellTypist", flush=True)
        record["celltypist_model"] = train_celltypist(
            train, ct_model, n_cells=args.train_cells, seed=args.seed,
            threads=int(threads or 1))

    runs: dict[str, dict[int, dict]] = {"canal": {}, "celltypist": {}}
    for n in sizes:
        print(f"\ncanal predict on {n:,} cells", flush=True)
        runs["canal"][n] = run_canal(ckpt, files[n], work / f"canal_{n}.h5ad",
                                     novelty=args.novelty, batch_size=args.batch_size,
                                     precision=args.precision, nproc=args.nproc, env=env,
                                     log=work / f"canal_{n}.log")
        print(f"  {runs['canal'][n]['seconds']:.1f} s, peak RSS "
              f"{runs['canal'][n]['peak_rss_mb']:,.0f} MiB", flush=True)
        if not args.skip_celltypist:
            print(f"celltypist annotate on {n:,} cells", flush=True)
            runs["celltypist"][n] = run_celltypist(ct_model, files[n],
                                                   work / f"celltypist_{n}.csv",
                                                   chunk=args.celltypist_chunk, env=env,
                                                   log=work / f"celltypist_{n}.log")
            print(f"  {runs['celltypist'][n]['seconds']:.1f} s, peak RSS "
                  f"{runs['celltypist'][n]['peak_rss_mb']:,.0f} MiB", flush=True)

    big, small = args.n_cells, args.small_cells if args.small_cells > 0 else None
    for tool, by_size in runs.items():
        if not by_size:
            continue
        record[tool] = {"runs": {str(n): r for n, r in by_size.items()},
                        **_rates(by_size[big], by_size.get(small), big, small or 0),
                        "seconds": by_size[big]["seconds"],
                        "peak_rss_mb": by_size[big]["peak_rss_mb"]}
    record["canal"]["peak_rss_goal_mb"] = 4096
    record["canal"]["peak_rss_goal_met"] = record["canal"]["peak_rss_mb"] < 4096
    if runs["celltypist"]:
        c, t = record["canal"], record["celltypist"]
        record["celltypist_over_canal_seconds"] = c["seconds"] / t["seconds"]
        if "cells_per_s_slope" in c and "cells_per_s_slope" in t:
            record["celltypist_over_canal_slope"] = t["cells_per_s_slope"] / c["cells_per_s_slope"]
        truth = np.resize(test.obs["cell_type"].astype(str).to_numpy(), big)
        record["scores"] = _scores(work / f"canal_{big}.h5ad", work / f"celltypist_{big}.csv",
                                   truth)
    _print(record, big, small)
    return record


def _print(record: dict, big: int, small: int | None) -> None:
    env = record["environment"]
    print(f"\n## {big:,} cells, backed .h5ad ({record['source']}); canal novelty="
          f"{record['novelty']}, batch {record['batch_size']}, {record['precision']}, "
          f"{record['nproc']} process(es); OMP_NUM_THREADS={env['omp_num_threads'] or 'unset'}, "
          f"{env['cpu_count']} CPUs, commit {env['commit']}")
    slope = f"cells/s without start-up ({small:,} -> {big:,})" if small else "-"
    print(f"| tool | wall s | cells/s end to end | {slope} | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for tool in ("canal", "celltypist"):
        if tool not in record:
            continue
        r = record[tool]
        s = f"{r['cells_per_s_slope']:,.0f}" if "cells_per_s_slope" in r else "-"
        print(f"| {tool} | {r['seconds']:,.1f} | {r['cells_per_s']:,.0f} | {s} | "
              f"{r['peak_rss_mb']:,.0f} |")
    c = record["canal"]
    print(f"canal peak RSS {c['peak_rss_mb']:,.0f} MiB: goal < 4,096 MiB "
          f"{'met' if c['peak_rss_goal_met'] else 'NOT met'}")
    if "celltypist_over_canal_seconds" in record:
        line = f"CellTypist is {record['celltypist_over_canal_seconds']:.1f}x faster end to end"
        if "celltypist_over_canal_slope" in record:
            line += f", {record['celltypist_over_canal_slope']:.1f}x without start-up"
        print(line)
        s = record["scores"]
        print(f"sanity (atlas labels): canal accuracy {s['canal_accuracy']:.3f} (closed "
              f"{s['canal_closed_accuracy']:.3f}, {s['canal_unassigned']:,} Unassigned), "
              f"CellTypist {s['celltypist_accuracy']:.3f}, closed-set agreement "
              f"{s['closed_agreement']:.3f}")


if __name__ == "__main__":
    main()
