"""Training step time of one stage with 1 process vs N data-parallel processes (torchrun, DDP).

Each configuration fine-tunes the CPU default model (1,000 genes, dim 64, depth 4) on the same
real Baron human cells for a fixed number of epochs (no early stopping) and reports, from the
stage history: seconds per optimizer step, training cells per second over all processes, the
frozen-prefix cache time and the wall time of the stage. Every process takes ``--batch-size``
cells per step, so N processes take N times as many cells per step.

On a GPU node, one process per GPU is the point; on a small CPU, processes compete for the same
cores, so expect no speed-up there: the CPU run checks that the distributed path works and what
its overhead is (gradient all-reduce, per-epoch metric exchange, final gathering).

Run: ``python benchmarks/ddp_step.py [--cells 600] [--epochs 2] [--procs 1 2] [--threads 1]
[--device cpu] [--out ddp_step.json]``. The script launches ``torchrun --standalone`` itself.

Measured on the shared 2-core CPU (load average 6-8 from other jobs; defaults, threads 1 and 2),
before issue #17, with libtcmalloc preloaded into every process (the script no longer preloads
anything: it runs as a fresh install does, with ``canal.runtime.keep_heap``):

    600 Baron human cells, CPU default model, 2 epochs, 32 cells per step per process, device cpu
    trainable procs threads steps   s/step  cells/s  cache s  stage s val acc
    -------------------------------------------------------------------------
    canal         1       1    30    1.034     30.9     8.99     53.6   0.867
    canal         2       1    16    1.282     46.8     6.53     37.2   0.808
    canal         1       2    30    3.517      9.1    16.12    150.7   0.867
    canal         2       2    16    4.540     13.2    14.81    108.9   0.808
    all           1       1    30    1.829     17.5     0.00     77.7   0.900
    all           2       1    16    2.496     24.0     0.00     53.4   0.833
    all           1       2    30    4.765      6.7     0.00    196.2   0.900
    all           2       2    16   11.249      5.3     0.00    218.3   0.833

A second run with 1 thread: canal 1.032 / 1.393 s per step (1 / 2 processes), all layers
2.559 / 3.499 s per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(args: argparse.Namespace) -> None:
    """One rank: fit one stage and (rank 0) write its timings."""
    import anndata as ad
    import torch

    from canal import Annotator, distributed, settings
    from canal.train import StageConfig

    settings.progress = False
    torch.set_num_threads(args.threads)
    with distributed.session(device=args.device):
        model = Annotator.from_pretrained(args.checkpoint)
        adata = ad.read_h5ad(args.data)
        config = StageConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3,
                             patience=args.epochs + 1, trainable=args.trainable, seed=0)
        model.fit_stage(adata, config=config, device=args.device)
        h = model.history[-1]
        world = distributed.world_size()
        steps = h["epochs_run"] * math.ceil(math.ceil(h["n_train"] / world) / args.batch_size)
        row = {"processes": world, "threads": torch.get_num_threads(),
               "trainable": args.trainable, "steps": steps,
               "seconds_per_step": h["train_seconds"] / steps,
               "train_cells_per_second": h["train_cells_per_second"],
               "cache_seconds": h["cache_seconds"], "stage_seconds": h["wall_seconds"],
               "best_val_accuracy": h["best_val_accuracy"]}
        if distributed.is_main():
            Path(args.result).write_text(json.dumps(row))


def prepare(root: Path, n_cells: int) -> tuple[Path, Path]:
    """A seeded subset of Baron human cells and a fresh CPU-default model on a 1,000-gene panel."""
    import anndata as ad
    import numpy as np

    from canal import Annotator
    from canal._settings import data_dir

    baron = ad.read_h5ad(data_dir() / "pancreas" / "baron_human.h5ad")
    rng = np.random.default_rng(0)
    sub = baron[np.sort(rng.choice(baron.n_obs, min(n_cells, baron.n_obs), replace=False))]
    sub = sub.copy()
    sub.write_h5ad(root / "cells.h5ad")
    Annotator.create(baron, n_genes=1000).save(root / "model")
    return root / "cells.h5ad", root / "model"


def launch(procs: int, threads: int, trainable: str, data: Path, ckpt: Path, args,
           root: Path) -> dict:
    result = root / f"result_{procs}_{threads}_{trainable}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(HERE.parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", str(HERE), "--worker", "--data", str(data),
           "--checkpoint", str(ckpt), "--result", str(result), "--threads", str(threads),
           "--trainable", trainable, "--epochs", str(args.epochs), "--batch-size",
           str(args.batch_size), "--device", args.device]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="threads per process (each is run with every --procs)")
    parser.add_argument("--trainable", nargs="+", default=["canal", "all"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        args.trainable = args.trainable[0]
        worker(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, ckpt = prepare(root, args.cells)
        for trainable in args.trainable:
            for threads in args.threads:
                for procs in args.procs:
                    rows.append(launch(procs, threads, trainable, data, ckpt, args, root))
                    print(f"done: {procs} process(es) x {threads} thread(s), {trainable}",
                          file=sys.stderr)
    print(f"{args.cells} Baron human cells, CPU default model, {args.epochs} epochs, "
          f"{args.batch_size} cells per step per process, device {args.device}")
    head = (f"{'trainable':<9} {'procs':>5} {'threads':>7} {'steps':>5} {'s/step':>8} "
            f"{'cells/s':>8} {'cache s':>8} {'stage s':>8} {'val acc':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['trainable']:<9} {r['processes']:>5} {r['threads']:>7} {r['steps']:>5} "
              f"{r['seconds_per_step']:>8.3f} {r['train_cells_per_second']:>8.1f} "
              f"{r['cache_seconds']:>8.2f} {r['stage_seconds']:>8.1f} "
              f"{r['best_val_accuracy']:>7.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
