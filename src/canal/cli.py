"""Command-line interface: thin subcommands over the public API.

``main(argv) -> int`` so tests can call it in-process.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def _read(path: str, *, backed: bool = False):
    import anndata as ad

    return ad.read_h5ad(path, backed="r" if backed else None)


def _cmd_init(args: argparse.Namespace) -> int:
    from canal import Annotator, ModelConfig

    adatas = [_read(p) for p in args.data]
    config = ModelConfig.paper() if args.size == "paper" else ModelConfig()
    model = Annotator.create(adatas, n_genes=args.n_genes, config=config)
    model.save(args.out)
    print(f"{model} written to {args.out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from canal import Annotator

    model = Annotator.from_pretrained(args.model)
    print(model)
    print("cell types:", ", ".join(model.cell_types) or "(none yet)")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from canal import Annotator

    model = Annotator.from_pretrained(args.model)
    adata = _read(args.data)
    model.embed(adata, key_added=args.key_added)
    adata.write_h5ad(args.out)
    print(f"embedding written to {args.out} (obsm[{args.key_added!r}])")
    return 0


# --- predict / evaluate ----------------------------------------------------------------------


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from canal import Annotator

    if Path(args.out).resolve() == Path(args.data).resolve():
        raise ValueError(f"--out {args.out} is the input file; write the result to a new file")
    model = Annotator.from_pretrained(args.model)
    adata = _read(args.data, backed=True)
    model.predict(adata, key_added=args.key_added, novelty=args.novelty,
                  batch_size=args.batch_size, precision=args.precision,
                  orthologs=args.orthologs, case_insensitive=args.case_insensitive,
                  layer=args.layer)
    adata.write_h5ad(args.out)
    counts = adata.obs[args.key_added].value_counts()
    print(f"{adata.n_obs} cells annotated; {int(counts.get('Unassigned', 0))} Unassigned; "
          f"written to {args.out} (obs[{args.key_added!r}], obsm['X_{args.key_added}'])")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from canal import metrics, pl

    adata = _read(args.pred, backed=True)
    novel = [t.strip() for t in args.novel_types.split(",") if t.strip()] if args.novel_types \
        else []
    scores = metrics.evaluate(adata, truth=args.truth, key=args.key, novel_types=novel)
    out = Path(args.out) if args.out else Path(args.pred).with_name(
        f"{Path(args.pred).stem}_evaluation")
    out.mkdir(parents=True, exist_ok=True)
    params = dict(dict(adata.uns.get(args.key, {})).get("params", {}))
    report = {"pred": str(args.pred), "truth": args.truth, "key": args.key,
              "novel_types": novel, "metrics": scores,
              "params": {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}}
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
    width = max(len(k) for k in scores)
    print(f"{'metric':<{width}}  value")
    for name, value in scores.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown}")

    plots = {"confusion.png": lambda: pl.confusion(adata, truth=args.truth, key=args.key).figure}
    if f"X_{args.key}" in adata.obsm and args.umap_cells > 0:
        plots["umap.png"] = lambda: pl.umap(adata, rep=f"X_{args.key}",
                                            color=(args.key, args.truth),
                                            max_cells=args.umap_cells)
    scored = f"{args.key}_novelty"
    if scored in adata.obs and adata.obs[scored].notna().any():
        plots["novelty.png"] = lambda: pl.novelty_hist(adata, key=args.key, truth=args.truth,
                                                       novel_types=novel).figure
    for name, make in plots.items():
        make().savefig(out / name, dpi=120)
    print(f"metrics.json and {', '.join(plots)} written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canal", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--device", default=None, help="torch device (default: auto)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="a randomly initialised model on a panel of HVGs")
    p.add_argument("--data", nargs="+", required=True, help=".h5ad files to choose genes from")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--n-genes", type=int, default=1000)
    p.add_argument("--size", choices=["default", "paper"], default="default")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("model")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("embed", help="write cell representations to obsm")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--key-added", default="X_canal")
    p.set_defaults(func=_cmd_embed)

    # --- predict / evaluate ---
    p = sub.add_parser("predict", help="annotate cells (novel cells come out Unassigned)")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--data", required=True, help=".h5ad to annotate (read backed)")
    p.add_argument("--out", required=True, help=".h5ad to write")
    p.add_argument("--key-added", default="canal")
    p.add_argument("--novelty", choices=["energy", "calibrated", "none"], default="energy")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--layer", default=None, help="read expression from this layer, not X")
    p.add_argument("--orthologs", action="store_true",
                   help="match genes across human/mouse through the 1:1 ortholog table")
    p.add_argument("--case-insensitive", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="score predictions against true labels; plots")
    p.add_argument("--pred", required=True, help=".h5ad written by canal predict")
    p.add_argument("--truth", required=True, help="obs column with the true labels")
    p.add_argument("--key", default="canal", help="key_added of the prediction")
    p.add_argument("--novel-types", default="",
                   help="comma-separated true labels the model never saw")
    p.add_argument("--out", default=None,
                   help="directory for metrics.json and plots (default: <pred>_evaluation)")
    p.add_argument("--umap-cells", type=int, default=20000,
                   help="UMAP of at most this many cells (0: no UMAP)")
    p.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``canal`` command line; returns the exit code."""
    from canal._settings import settings

    parser = build_parser()
    args = parser.parse_args(argv)
    settings.verbosity = "info" if args.verbose else "warning"
    if args.quiet:
        settings.progress = False
    if args.device:
        settings.device = args.device
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"canal {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
