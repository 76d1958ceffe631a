"""Training and inference throughput of canal's models on this machine.

Prints one table and writes JSON. For the CPU default model and the paper-size model (dim 200,
depth 6, 10 heads, 1,000 genes + 1 token) it measures, on real Baron pancreas cells:

- inference cells/s: one cell per forward pass (the original CANAL path) vs batches, fp32 vs
  bf16 autocast, and the agreement of bf16 predictions with fp32; the attention kernel as
  written in the FAVOR+ paper (five passes over the tokens x features tensor, "textbook") vs
  canal's fused one (three passes, in place when no gradient is needed);
- training cells/s for one epoch of a stage: every layer recomputed each step (no cache), vs the
  frozen-prefix cache computed once per stage; fp32 vs bf16;
- the teacher (distillation, stages >= 2): its full forward pass on every batch, as the
  original CANAL code does, vs its representations computed once per stage from the cached
  prefix (only its last layers run);
- the "before vs after" of issue #7 at each size: before = the original path (one cell per
  pass / batches of 14, fp32, textbook kernel, no cache, teacher on every batch); after =
  canal's path. A training epoch is an epoch of a 20-epoch stage with distillation (stage >= 2)
  and of a first stage (no teacher); the once-per-stage costs (prefix cache, teacher
  representations) are spread over the stage's 20 epochs;
- the data path (slice the sparse matrix + bin into tokens) as a share of a training step;
- the achieved share of this machine's matmul peak (2048 x 2048 matmul, measured in this run);
- peak RSS of the process;
- issue #17 (``--only heap``), before vs after, with no tcmalloc: glibc's malloc as it comes
  (every large temporary a fresh mmap) vs :func:`canal.runtime.keep_heap`, and the masked
  full-length pass vs the compacted one (a file's unmeasured panel genes dropped from the
  sequence) on Kang (1,287 genes: 429 of the 1,000 panel genes measured) and Baron (935); for
  inference batches of 64 and for one training epoch; then ``canal predict`` end to end in a
  fresh process (``CANAL_KEEP_HEAP=0`` vs default) on Baron tiled to 2,142 and 10,710 cells,
  cells/s from the slope (start-up excluded).

Run: ``python benchmarks/speed.py [--quick] [--device cuda] [--only heap|throughput] [--out
speed.json]``. On a GPU machine pass ``--device cuda``; ``--only throughput`` measures only
inference at large batches (up to 4,096 cells) and ``predict`` end to end (issue #17's GPU
goal). For the allocator effect, run it once with and once without
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4`` (the ``canal`` command
preloads it by itself when installed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import torch

import canal
from canal import Annotator, ModelConfig, runtime
from canal.continual import Distiller
from canal.nn import net as net_module
from canal.nn import performer
from canal.train import StageConfig, run_stage, set_trainable, trainable_start

if TYPE_CHECKING:
    from canal.data import CellData

canal.settings.progress = False


STAGE_EPOCHS = 20
"""Epochs of a stage over which the once-per-stage costs are spread (CANAL's default maximum)."""


def _textbook_features(data, projection, *, is_query, eps=1e-4):
    normalizer = data.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    data = data.float()
    dash = torch.matmul(normalizer * data, projection.float().T)
    diag = (data * data).sum(dim=-1, keepdim=True) * (0.5 * normalizer**2)
    dims = -1 if is_query else (-1, -2)
    stab = dash.amax(dim=dims, keepdim=True).detach()
    return ratio * (torch.exp(dash - diag - stab) + eps)


def _textbook_attention(q, k, v):
    d_inv = 1.0 / torch.einsum("...nd,...d->...n", q, k.sum(dim=-2))
    context = torch.einsum("...nd,...ne->...de", k, v.float())
    return torch.einsum("...de,...nd,...n->...ne", context, q, d_inv)


class textbook_kernel:
    """Context manager: the FAVOR+ kernel written as in the paper (the "before" of the fusion)."""

    def __enter__(self):
        self.saved = performer.softmax_kernel, performer.linear_attention
        performer.softmax_kernel, performer.linear_attention = (_textbook_features,
                                                                _textbook_attention)

    def __exit__(self, *exc):
        performer.softmax_kernel, performer.linear_attention = self.saved


class masked_pass:
    """Context manager: always run the masked full-length pass (no sequence compaction)."""

    def __enter__(self):
        self.saved = net_module.shared_columns
        net_module.shared_columns = lambda present: None

    def __exit__(self, *exc):
        net_module.shared_columns = self.saved


def _heap(on: bool):
    canal.settings.keep_heap = on


def heap_and_compaction(data_root: Path, *, device: torch.device, quick: bool) -> dict:
    """Issue #17's before/after: allocator (keep_heap) and compaction, in-process and end to end.

    Runs before anything else in the process touches mallopt, so "before" is glibc as it comes.
    """
    res: dict = {}
    files = {"baron": data_root / "pancreas" / "baron_human.h5ad",
             "kang": data_root / "immune" / "kang_ctrl_8donors.h5ad"}
    n_inf, n_train = (128, 128) if quick else (256, 256)
    setups = {}
    for name, path in files.items():
        adata = ad.read_h5ad(path)
        labels = adata.obs["cell_type"].astype(str).to_numpy()
        classes = sorted(set(labels))
        model = Annotator.from_pretrained()
        model.net.head.grow(len(classes))
        model.cell_types = classes
        data = model.prepare(adata[:max(n_inf, n_train)])
        data.labels = np.asarray([classes.index(x) for x in labels[:data.n_cells]])
        setups[name] = model, data
        res[name] = {"panel_genes_measured": int(data.measured.sum())
                     if data.measured is not None else model.config.n_genes}
    idx = np.arange(n_inf)

    def infer(model, data):
        out = runtime.forward_cells(model.net.eval(), (b for _, b in data.batches(64, index=idx)),
                                    n_cells=len(idx), device=device)
        return out.logits

    # glibc as it comes first: once mallopt has run, the process never returns to that state
    for label, heap, compact in (("before", False, False), ("heap", True, False),
                                 ("after", True, True)):
        _heap(heap)
        for name, (model, data) in setups.items():
            r = res[name]
            with contextlib.nullcontext() if compact else masked_pass():
                sec, _ = timed(lambda m=model, d=data: infer(m, d), device=device,
                               min_seconds=2.0 if quick else 5.0)
                r[f"infer_{label}"] = n_inf / sec
                train = training(model, data.subset(np.arange(n_train)), bf16=False, cache=True,
                                 device=device, batch=32)
                r[f"train_{label}"] = train["cells_per_s_epoch"]
            print(f"  heap/compaction {name} {label}: infer {r[f'infer_{label}']:.1f} cells/s, "
                  f"train epoch {r[f'train_{label}']:.1f} cells/s", flush=True)
    for name, (model, data) in setups.items():
        r = res[name]
        with masked_pass():
            ref = infer(model, data)
        r["max_logit_difference_compacted_vs_masked"] = float((infer(model, data) - ref)
                                                              .abs().max())
        r["infer_speedup"] = r["infer_after"] / r["infer_before"]
        r["train_speedup"] = r["train_after"] / r["train_before"]
    _heap(True)
    res["end_to_end"] = end_to_end(data_root, quick=quick)
    return res


def end_to_end(data_root: Path, *, quick: bool) -> dict:
    """``canal predict --novelty none`` in a fresh process, as a user runs it (no tcmalloc)."""
    baron = ad.read_h5ad(data_root / "pancreas" / "baron_human.h5ad")
    labels = baron.obs["cell_type"].astype(str)
    out: dict = {"file": "baron_human tiled", "sizes": [len(baron), len(baron) * (3 if quick
                                                                                    else 5)]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Annotator.from_pretrained()
        model.fit_stage(baron[baron.obs["batch"] == "human1"], labels_key="cell_type",
                        config=StageConfig(epochs=1, bank_size=100, seed=0))
        model.save(tmp / "model")
        del labels
        for n in out["sizes"]:
            tiled = ad.concat([baron] * (n // len(baron)), index_unique="-")
            tiled.write_h5ad(tmp / f"cells{n}.h5ad")
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        for label, keep in (("before", "0"), ("after", "1")):
            times = []
            for n in out["sizes"]:
                cmd = [sys.executable, "-m", "canal", "predict", "--model", str(tmp / "model"),
                       "--data", str(tmp / f"cells{n}.h5ad"), "--out", str(tmp / "o.h5ad"),
                       "--novelty", "none", "--quiet"]
                t = time.perf_counter()
                subprocess.run(cmd, check=True, env=env | {"CANAL_KEEP_HEAP": keep},
                               stdout=subprocess.DEVNULL)
                times.append(time.perf_counter() - t)
            n1, n2 = out["sizes"]
            out[label] = {"seconds": times, "cells_per_s": (n2 - n1) / (times[1] - times[0])}
            print(f"  end to end {label}: {times[0]:.1f} s / {times[1]:.1f} s for {n1} / {n2} "
                  f"cells: {out[label]['cells_per_s']:.1f} cells/s", flush=True)
    out["speedup"] = out["after"]["cells_per_s"] / out["before"]["cells_per_s"]
    return out


def _rate(net, tokens, *, bf16: bool, device: torch.device, min_seconds: float) -> float:
    """Forward passes per second of ``net`` on ``tokens()`` (called inside the timing)."""

    def once():
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            net(tokens())

    sec, _ = timed(once, device=device, min_seconds=min_seconds)
    return 1.0 / sec


def throughput(data_root: Path, *, device: torch.device, quick: bool) -> dict:
    """Inference cells/s at large batches, the read-out of issue #17 for a GPU.

    For the default (shipped) and the paper-size model, fp32 and bf16, on Baron cells (tiled):
    ``model`` times the network alone on tokens already on the device; ``tokens + model`` adds
    binning the cells' sparse rows on the CPU and the copy to the device, as ``predict`` does
    per batch. Then ``Annotator.predict`` end to end in this process (``novelty="none"``, so
    it is the forward pass, the data path and the output) on Baron tiled 25 times (53,550
    cells; 5 times with ``--quick``), at the best batch of the default model, after a warm-up
    call on its 2,142 cells.
    """
    baron = ad.read_h5ad(data_root / "pancreas" / "baron_human.h5ad")
    labels = baron.obs["cell_type"].astype(str).to_numpy()
    classes = sorted(set(labels))
    out: dict = {"device": str(device), "name": torch.cuda.get_device_name(device)
                 if device.type == "cuda" else "cpu", "models": {}}
    sizes = {"default": [256, 1024, 4096], "paper": [256, 1024]}
    min_s = 1.0 if quick else 2.0
    best = (0.0, 0, "fp32")  # the default model's fastest (cells/s, batch, precision) with tokens
    for size, batches in sizes.items():
        if size == "default":
            model = Annotator.from_pretrained()
        else:
            model = Annotator.create(baron, n_genes=1000, config=ModelConfig.paper())
        model.net.head.grow(len(classes))
        model.cell_types = classes
        if size == "default":
            shipped = model
        data = model.prepare(baron)
        net = model.net.to(device).eval()
        r: dict = {"gflop_per_cell_forward": forward_gflop(model.net.config)}
        for batch in batches:
            if device.type == "cpu":
                batch = min(batch, 256)
            rows = np.arange(batch) % data.n_cells
            tokens = data.tokens(rows).to(device)
            for bf16 in (False, True):
                key = f"b{batch}_{'bf16' if bf16 else 'fp32'}"
                r[f"model_{key}"] = _rate(net, lambda t=tokens: t, bf16=bf16, device=device,
                                          min_seconds=min_s) * batch
                r[f"tokens_model_{key}"] = _rate(
                    net, lambda d=data, x=rows: d.tokens(x).to(device), bf16=bf16,
                    device=device, min_seconds=min_s) * batch
                if size == "default":
                    best = max(best, (r[f"tokens_model_{key}"], batch,
                                      "bf16" if bf16 else "fp32"))
                print(f"  throughput {size} batch {batch} {key.split('_')[1]}: model "
                      f"{r[f'model_{key}']:.0f} cells/s, tokens + model "
                      f"{r[f'tokens_model_{key}']:.0f} cells/s", flush=True)
            if device.type == "cpu":
                break
        out["models"][size] = r
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # end to end: the shipped model as a user calls it, at its fastest batch and precision
    _, batch, precision = best
    n_predict = len(baron) * (5 if quick else 25)
    tiled = ad.concat([baron] * (n_predict // len(baron)), index_unique="-")
    shipped.predict(baron, novelty="none", batch_size=batch, precision=precision,
                    inplace=False, device=device)
    t = time.perf_counter()
    shipped.predict(tiled, novelty="none", batch_size=batch, precision=precision,
                    inplace=False, device=device)
    sec = time.perf_counter() - t
    out["predict"] = {"cells": tiled.n_obs, "batch_size": batch, "precision": precision,
                      "seconds": sec, "cells_per_s": tiled.n_obs / sec}
    print(f"  predict end to end: {tiled.n_obs} cells in {sec:.1f} s = "
          f"{tiled.n_obs / sec:.0f} cells/s (batch {batch}, {precision})", flush=True)
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_gflop(c: ModelConfig) -> float:
    """Multiply-adds x 2 of one cell's forward pass (encoder + head), in GFLOP."""
    n, d, inner = c.seq_len, c.dim, c.heads * c.dim_head
    m = c.nb_features or int(c.dim_head * np.log(c.dim_head))
    per_layer = (
        2 * n * d * inner * 3  # q, k, v
        + 2 * 2 * n * c.heads * m * c.dim_head  # random features of q and k
        + 2 * 2 * n * c.heads * m * c.dim_head  # k^T v and q (k^T v)
        + 2 * n * inner * d  # output projection
        + 2 * 2 * n * d * d * c.ff_mult  # feed-forward
    )
    head = 2 * n * d + 2 * n * c.head_hidden + 2 * c.head_hidden * c.rep_dim
    return (c.depth * per_layer + head) / 1e9


def timed(fn, *, device: torch.device, min_seconds: float = 2.0) -> tuple[float, int]:
    """Run ``fn`` repeatedly for at least ``min_seconds``; returns (seconds per call, calls)."""
    fn()
    _sync(device)
    calls, t = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        _sync(device)
        el = time.perf_counter() - t
        if el >= min_seconds:
            return el / calls, calls


def inference(model: Annotator, data: CellData, *, batch: int, bf16: bool, device: torch.device,
              n_cells: int, min_seconds: float) -> float:
    net = model.net.to(device).eval()
    idx = np.arange(min(n_cells, data.n_cells))

    def run():
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            for s in range(0, len(idx), batch):
                net(data.tokens(idx[s:s + batch]).to(device))

    sec, _ = timed(run, device=device, min_seconds=min_seconds)
    return len(idx) / sec


def agreement(model: Annotator, data: CellData, device: torch.device) -> float:
    net = model.net.to(device).eval()
    preds = []
    for bf16 in (False, True):
        out = []
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            for _, tok in data.batches(64):
                out.append(net(tok.to(device)).logits.float().argmax(1).cpu())
        preds.append(torch.cat(out))
    return float((preds[0] == preds[1]).float().mean())


def training(model: Annotator, data: CellData, *, bf16: bool, cache: bool, device: torch.device,
             batch: int) -> dict:
    """One epoch of :func:`canal.train.run_stage` (no validation split)."""
    cfg = StageConfig(epochs=1, batch_size=batch, val_fraction=0.0, bank_size=10,
                      precision="bf16" if bf16 else "fp32", cache_limit_gb=8.0 if cache else 0.0)
    res = run_stage(model.net, data, config=cfg, device=device)
    h = res.history
    return {"epoch_seconds": h["train_seconds"] + h["cache_seconds"],
            "cells_per_s_epoch": data.n_cells / (h["train_seconds"] + h["cache_seconds"]),
            "cells_per_s_steps": h["train_cells_per_second"], "cache_seconds": h["cache_seconds"],
            "steps_seconds": h["train_seconds"]}


def data_path_share(model: Annotator, data: CellData, *, batch: int, device: torch.device,
                    bf16: bool) -> dict:
    idx = np.arange(min(data.n_cells, batch))
    t_data, _ = timed(lambda: data.tokens(idx), device=device, min_seconds=1.0)
    net = model.net.to(device)
    set_trainable(net, "canal")
    start = trainable_start(net, "canal")
    with torch.no_grad():
        hidden = net.encode(data.tokens(idx).to(device), stop=start)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    labels = torch.zeros(len(idx), dtype=torch.long, device=device)

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = net(hidden=hidden, start=start)
        loss = torch.nn.functional.cross_entropy(out.logits.float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_step, _ = timed(step, device=device, min_seconds=2.0)
    for p in net.parameters():
        p.requires_grad_(True)
    return {"data_seconds": t_data, "step_seconds": t_step, "share": t_data / (t_data + t_step)}


def teacher_cost(model: Annotator, data: CellData, *, device: torch.device) -> dict:
    """Seconds per cell of the teacher: full pass per batch of 14 (CANAL, textbook kernel) vs
    the pass over its trained tail from the cached prefix (canal, once per stage)."""
    d = Distiller(0.1)
    d.snapshot(model.net, n_old_types=1)
    teacher = d.teacher.to(device).eval()
    idx = np.arange(min(data.n_cells, 14))
    tokens = data.tokens(idx).to(device)
    start = trainable_start(teacher, "canal")
    with torch.no_grad():
        hidden = teacher.encode(tokens, stop=start)

    def full():
        with torch.no_grad():
            teacher(tokens)

    def tail():
        with torch.no_grad():
            teacher(hidden=hidden, start=start)

    with textbook_kernel():
        full_s, _ = timed(full, device=device, min_seconds=1.0)
    tail_s, _ = timed(tail, device=device, min_seconds=1.0)
    return {"full_seconds_per_cell": full_s / len(idx), "tail_seconds_per_cell": tail_s / len(idx)}


def stage_epochs(r: dict, n_cells: int) -> dict:
    """Cells/s of one epoch of a 20-epoch stage, before and after, from the measured parts."""
    base = r["train_original_b14_fp32_textbook"]
    t_before = base["steps_seconds"] / n_cells
    new = max((r["train_cache_fp32"], r["train_cache_bf16"]), key=lambda x: x["cells_per_s_steps"])
    t_after = new["steps_seconds"] / n_cells + new["cache_seconds"] / n_cells / STAGE_EPOCHS
    te = r["teacher"]
    out = {"stage1_before": 1 / t_before, "stage1_after": 1 / t_after,
           "distill_before": 1 / (t_before + te["full_seconds_per_cell"]),
           "distill_after": 1 / (t_after + te["tail_seconds_per_cell"] / STAGE_EPOCHS)}
    out["stage1_speedup"] = out["stage1_after"] / out["stage1_before"]
    out["distill_speedup"] = out["distill_after"] / out["distill_before"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cells, shorter timings")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="default,paper")
    ap.add_argument("--only", choices=["heap", "throughput"], default=None,
                    help="heap: only issue #17's allocator/compaction before/after; "
                    "throughput: only large-batch inference and predict (a GPU's read-out)")
    ap.add_argument("--out", default="benchmarks/results/speed.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    data_root = canal._settings.data_dir()
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        print("note: tcmalloc is preloaded; users get glibc's malloc (unset LD_PRELOAD)")
    print(f"threads {torch.get_num_threads()}", flush=True)
    if args.only == "throughput":
        res = {"threads": torch.get_num_threads(),
               "throughput": throughput(data_root, device=device, quick=args.quick)}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"written {out}")
        return 0
    heap = heap_and_compaction(data_root, device=device, quick=args.quick)
    if args.only == "heap":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"threads": torch.get_num_threads(), "heap": heap}, indent=2))
        print(f"written {out}")
        return 0
    baron = ad.read_h5ad(data_root / "pancreas" / "baron_human.h5ad")
    baron = baron[baron.obs["batch"] == "human1"]
    labels_all = baron.obs["cell_type"].astype(str).to_numpy()
    classes = sorted(set(labels_all))
    tcmalloc = "tcmalloc" in os.environ.get("LD_PRELOAD", "")
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    print(f"device {device}, threads {torch.get_num_threads()}, tcmalloc {tcmalloc}; matmul peak "
          f"fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True)
    results = {"device": str(device), "threads": torch.get_num_threads(), "tcmalloc": tcmalloc,
               "matmul_gflops": peaks, "heap": heap, "models": {}}
    for size in args.sizes.split(","):
        cfg = ModelConfig.paper() if size == "paper" else ModelConfig()
        model = Annotator.create(baron, n_genes=1000, config=cfg)
        model.net.head.grow(len(classes))
        model.cell_types = classes
        n_train = 64 if size == "paper" else 256
        if args.quick:
            n_train //= 2
        data = model.prepare(baron[:n_train])
        data.labels = np.asarray([classes.index(x) for x in labels_all[:n_train]])
        gf = forward_gflop(cfg)
        r: dict = {"gflop_per_cell_forward": gf, "n_train_cells": data.n_cells}
        min_s = 1.0 if args.quick else 3.0
        n_inf = 16 if size == "paper" else 128
        with textbook_kernel():
            r["infer_batch1_fp32_textbook"] = inference(model, data, batch=1, bf16=False,
                                                        device=device, n_cells=16,
                                                        min_seconds=min_s)
            r["infer_batch64_fp32_textbook"] = inference(model, data, batch=64, bf16=False,
                                                         device=device, n_cells=max(n_inf, 64),
                                                         min_seconds=min_s)
        r["infer_batch1_fp32"] = inference(model, data, batch=1, bf16=False, device=device,
                                           n_cells=16, min_seconds=min_s)
        for key in ("infer_batch1_fp32_textbook", "infer_batch64_fp32_textbook",
                    "infer_batch1_fp32"):
            print(f"  {size} {key}: {r[key]:.1f} cells/s", flush=True)
        for bs in (16, 64):
            for bf16 in (False, True):
                key = f"infer_batch{bs}_{'bf16' if bf16 else 'fp32'}"
                r[key] = inference(model, data, batch=bs, bf16=bf16, device=device,
                                   n_cells=max(n_inf, bs), min_seconds=min_s)
                print(f"  {size} {key}: {r[key]:.1f} cells/s", flush=True)
        r["bf16_agreement"] = agreement(model, data, device)
        for bf16 in (False, True):
            for cache in (False, True):
                key = f"train_{'cache' if cache else 'nocache'}_{'bf16' if bf16 else 'fp32'}"
                r[key] = training(model, data, bf16=bf16, cache=cache, device=device, batch=32)
                print(f"  {size} {key}: {r[key]['cells_per_s_epoch']:.1f} cells/s", flush=True)
        with textbook_kernel():
            base = training(model, data, bf16=False, cache=False, device=device, batch=14)
        r["train_original_b14_fp32_textbook"] = base
        r["data_path"] = data_path_share(model, data, batch=32, device=device, bf16=False)
        r["teacher"] = teacher_cost(model, data, device=device)
        best_inf = max(r[k] for k in r if k.startswith("infer_batch") and "textbook" not in k)
        r["infer_best"] = best_inf
        r["infer_speedup_vs_original"] = best_inf / r["infer_batch1_fp32_textbook"]
        r["stage_epoch"] = stage_epochs(r, data.n_cells)
        r["infer_share_of_peak_fp32"] = r["infer_batch64_fp32"] * gf / peaks["fp32"]
        r["infer_share_of_peak_bf16"] = r["infer_batch64_bf16"] * gf / peaks["bf16"]
        results["models"][size] = r
    results["peak_rss_gb"] = peak_rss_gb()
    _print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written {out}")
    return 0


def _print_table(res: dict) -> None:
    print("\n| model | GFLOP/cell | infer b1 fp32 textbook (before) | infer b64 fp32 textbook "
          "| infer b1 fp32 | infer b64 fp32 | infer b64 bf16 | bf16 agree | % peak fp32/bf16 "
          "| infer x |")
    print("|---" * 10 + "|")
    for size, r in res["models"].items():
        print(f"| {size} | {r['gflop_per_cell_forward']:.2f} "
              f"| {r['infer_batch1_fp32_textbook']:.1f} | {r['infer_batch64_fp32_textbook']:.1f} "
              f"| {r['infer_batch1_fp32']:.1f} | {r['infer_batch64_fp32']:.1f} "
              f"| {r['infer_batch64_bf16']:.1f} | {r['bf16_agreement']:.3f} "
              f"| {100 * r['infer_share_of_peak_fp32']:.0f}% / "
              f"{100 * r['infer_share_of_peak_bf16']:.0f}% | {r['infer_speedup_vs_original']:.2f}x |")
    print("\n| model | train b14 no-cache fp32 textbook (before) | train no-cache fp32 "
          "| train cache fp32 (steps) | train cache bf16 (steps) | cache s/cell | teacher full "
          "s/cell | teacher tail s/cell | stage-1 epoch before -> after | distill epoch before "
          "-> after | data path |")
    print("|---" * 11 + "|")
    for size, r in res["models"].items():
        e = r["stage_epoch"]
        n = r["n_train_cells"]
        print(f"| {size} | {r['train_original_b14_fp32_textbook']['cells_per_s_steps']:.1f} "
              f"| {r['train_nocache_fp32']['cells_per_s_steps']:.1f} "
              f"| {r['train_cache_fp32']['cells_per_s_steps']:.1f} "
              f"| {r['train_cache_bf16']['cells_per_s_steps']:.1f} "
              f"| {r['train_cache_fp32']['cache_seconds'] / n:.3f} "
              f"| {r['teacher']['full_seconds_per_cell']:.3f} "
              f"| {r['teacher']['tail_seconds_per_cell']:.3f} "
              f"| {e['stage1_before']:.1f} -> {e['stage1_after']:.1f} ({e['stage1_speedup']:.2f}x) "
              f"| {e['distill_before']:.1f} -> {e['distill_after']:.1f} "
              f"({e['distill_speedup']:.2f}x) | {100 * r['data_path']['share']:.2f}% |")
    print(f"cells/s throughout; a stage epoch spreads the once-per-stage costs over "
          f"{STAGE_EPOCHS} epochs. peak RSS {res['peak_rss_gb']:.2f} GB; threads "
          f"{res['threads']}; tcmalloc {res['tcmalloc']}")


if __name__ == "__main__":
    sys.exit(main())
