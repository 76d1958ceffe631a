"""Marker recovery: do a trained model's most important genes per cell type include the known
markers? canal's integrated-gradients attribution vs scanpy's rank_genes_groups baseline.

Takes a trained checkpoint (e.g. the ``model`` folder that ``canal demo`` / ``canal stream``
writes) and labelled cells, computes per-type gene importance
(:meth:`canal.Annotator.gene_importance`) and the baseline (t-test scores of
``sc.tl.rank_genes_groups`` on the same panel genes, each type against the rest), and reports, for each, the share of types
whose known marker (``canal.explain.KNOWN_MARKERS``) is among the type's top ``n_top`` genes.

Run: ``python benchmarks/markers.py --model runs/demo/pancreas/model --markers pancreas
--data ../shared/data/pancreas/baron_human.h5ad --where batch=human4`` (or the immune model with
``--markers immune`` and the Kang unseen donors). Writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import canal
from canal import Annotator
from canal.explain import KNOWN_MARKERS, marker_recovery, rank_genes_baseline

canal.settings.progress = False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--markers", choices=sorted(KNOWN_MARKERS), required=True)
    ap.add_argument("--where", default=None, help="KEY=V1,V2: keep these cells")
    ap.add_argument("--max-per-type", type=int, default=60,
                    help="at most this many cells per type (seeded), to bound the cost")
    ap.add_argument("--n-top", type=int, default=20)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Annotator.from_pretrained(args.model)
    adata = ad.read_h5ad(args.data)
    if args.where:
        key, _, values = args.where.partition("=")
        adata = adata[adata.obs[key].astype(str).isin(values.split(",")).to_numpy()]
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    keep = []
    for t in model.cell_types:
        idx = np.flatnonzero(labels == t)
        if len(idx):
            keep.append(np.sort(rng.choice(idx, min(len(idx), args.max_per_type), replace=False)))
    adata = adata[np.sort(np.concatenate(keep))].copy()
    t0 = time.perf_counter()
    model.gene_importance(adata, groupby="cell_type", n_top=args.n_top, steps=args.steps)
    seconds = time.perf_counter() - t0
    from canal.explain import GeneImportance

    scores = GeneImportance.from_uns(adata.uns["canal_gene_importance"]).scores
    markers = KNOWN_MARKERS[args.markers]
    canal_rec = marker_recovery(scores, markers, n_top=args.n_top)
    base = rank_genes_baseline(adata, model.genes, groupby="cell_type")
    base_rec = marker_recovery(base, markers, n_top=args.n_top)
    report = {"model": args.model, "data": args.data, "where": args.where,
              "n_cells": int(adata.n_obs), "seconds": seconds, "n_top": args.n_top,
              "canal": canal_rec, "rank_genes_groups": base_rec}
    for name, rec in (("canal (integrated gradients)", canal_rec),
                      ("rank_genes_groups (t-test)", base_rec)):
        print(f"{name}: {rec['n_recovered']} of {rec['n_in_panel']} types with a marker in the "
              f"panel have one in their top {args.n_top} ({rec['share']:.0%})")
        print("    " + "; ".join(f"{t}: {v['status']} ({v['best']}, rank "
                                  f"{v['ranks'].get(v['best']) if v['best'] else '-'})"
                                  for t, v in rec["per_type"].items()))
    print(f"{adata.n_obs} cells explained in {seconds:.0f}s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
