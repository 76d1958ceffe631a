"""Command-line interface: thin subcommands over the public API.

``main(argv) -> int`` so tests can call it in-process.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger(__name__)


def _say(message: str) -> None:
    """Print a result line (once, from rank 0, under torchrun)."""
    from canal import distributed

    if distributed.is_main():
        print(message)


def _read(path: str, *, backed: bool = False):
    import anndata as ad

    if not Path(path).exists():
        raise ValueError(f"{path} does not exist")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except (OSError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a readable .h5ad file ({type(err).__name__}: {err}); "
                         "convert it first, e.g. sc.read_10x_mtx(...).write_h5ad(...) or "
                         "anndata.read_csv(...).write_h5ad(...)") from err


def _add_match_args(p: argparse.ArgumentParser) -> None:
    """How the data's expression is read and genes matched (``canal.GeneMatch``); flags not
    given keep the model's stored setting."""
    g = p.add_argument_group("reading the data (default: the model's stored setting)")
    g.add_argument("--layer", default=None, help="read expression from this layer, not X")
    g.add_argument("--orthologs", action="store_const", const=True, default=None,
                   help="match genes across human/mouse through the 1:1 ortholog table")
    g.add_argument("--case-insensitive", action="store_const", const=True, default=None,
                   help="match gene symbols ignoring case")
    g.add_argument("--min-overlap", type=float, default=None,
                   help="refuse data measuring less than this share of the model's genes "
                        "(canal's default 0.05)")


def _add_config_args(p: argparse.ArgumentParser, cls, *, title: str) -> None:
    """One ``--field-name`` flag per field of the config dataclass ``cls`` (choices from its
    ``Literal`` types, defaults from the class)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    g = p.add_argument_group(title)
    for f in dataclasses.fields(cls):
        hint, default = hints[f.name], f.default
        flag = "--" + f.name.replace("_", "-")
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        if isinstance(default, bool):
            g.add_argument(flag, dest=f"cfg_{f.name}",
                           type=lambda v: v.lower() in ("1", "true", "yes"),
                           default=default, metavar="BOOL", help=f"{cls.__name__}.{f.name}")
            continue
        kind = type(default) if default is not None else float
        g.add_argument(flag, dest=f"cfg_{f.name}", type=kind, choices=choices, default=default,
                       metavar=None if choices else f.name.upper(),
                       help=f"{cls.__name__}.{f.name}")


def _config_from_args(cls, args: argparse.Namespace, **overrides):
    import dataclasses

    values = {f.name: getattr(args, f"cfg_{f.name}") for f in dataclasses.fields(cls)}
    return cls(**(values | overrides))


def _match(args: argparse.Namespace) -> dict:
    """The gene-match fields given on the command line (changes to the model's match)."""
    fields = {"layer": args.layer, "orthologs": args.orthologs,
              "case_insensitive": args.case_insensitive, "min_overlap": args.min_overlap}
    return {k: v for k, v in fields.items() if v is not None}


def _cmd_init(args: argparse.Namespace) -> int:
    from canal import Annotator, ModelConfig, io

    io.check_out(args.out, *args.data)
    adatas = [_read(p) for p in args.data]
    config = ModelConfig.paper() if args.size == "paper" else ModelConfig()
    model = Annotator.create(adatas, n_genes=args.n_genes, config=config)
    model.save(args.out)
    _say(f"{model} written to {args.out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from canal import Annotator

    model = Annotator.from_pretrained(args.model)
    print(model, "(shipped weights)" if args.model is None else f"from {args.model}")
    print(f"gene panel: {len(model.genes)} genes ({', '.join(model.genes[:8])}, ...)")
    chosen = model.meta.get("panel")
    if chosen:
        print(f"panel chosen at stage 1: {chosen.get('source')}, {chosen.get('n_genes')} genes "
              f"({chosen.get('n_from_vocabulary', chosen.get('n_genes'))} from a vocabulary of "
              f"{chosen.get('vocabulary_size')}, {chosen.get('n_coexpression', 0)} from "
              "co-expression)")
    vocab = model.vocabulary
    print(f"gene vocabulary: {len(vocab)} genes" if vocab is not None
          else "gene vocabulary: none (the panel's genes)")
    print(f"gene match: {model.match}")
    print("cell types:", ", ".join(model.cell_types) or "(none yet)")
    for h in model.history:
        acc = h.get("best_val_accuracy")
        print(f"stage {h['stage']}: {h['n_cells']} cells (+{h.get('n_replayed', 0)} replayed), "
              f"new types {h.get('new_types') or 'none'}, strategy "
              f"{h.get('config', {}).get('strategy')}, best validation accuracy "
              + (f"{acc:.3f}" if isinstance(acc, float) else "n/a"))
    if model.bank is not None:
        print(f"example bank: {len(model.bank)} cells, {len(model.bank.counts())} types")
    cal = model.meta.get("novelty")
    if cal:
        rule = cal.get("rule", "mixup")
        print(f"novelty calibration: {rule}, stage {cal.get('stage')}"
              + (f", fpr {cal['fpr']}" if "fpr" in cal else ""))
    pre = model.meta.get("pretrain")
    if pre:
        print(f"pre-training: {pre.get('n_cells')} cells, {pre.get('step')} steps"
              + (f", over a vocabulary of {pre['vocabulary_size']} genes"
                 if pre.get("vocabulary_size") else ""))
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from canal import Annotator, distributed, io

    io.check_out(args.out, args.data, args.model)
    model = Annotator.from_pretrained(args.model)
    adata = _read(args.data, backed=True)
    model.embed(adata, key_added=args.key_added, match=_match(args), batch_size=args.batch_size)
    distributed.on_main(io.write_h5ad, adata, args.out)  # under torchrun: rank 0 writes
    _say(f"embedding written to {args.out} (obsm['X_{args.key_added}'])")
    return 0


def _parse_where(where: Sequence[str] | None) -> dict[str, list[str]]:
    """``--where KEY=V1,V2`` filters as a dict."""
    out: dict[str, list[str]] = {}
    for cond in where or []:
        key, sep, values = cond.partition("=")
        if not sep or not key:
            raise ValueError(f"--where {cond!r}: expected KEY=VALUE[,VALUE] with KEY an obs "
                             "column")
        out[key] = values.split(",")
    return out


def _panel(value: str | None) -> str | list[str] | None:
    """``--panel``: a choice, or a text file of gene symbols (one per line, ``#`` comments)."""
    if value is None or value in ("auto", "hvg", "pretrained"):
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--panel {value!r}: expected auto, hvg, pretrained or a text file of "
                         "gene symbols, one per line")
    genes = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [g for g in genes if g]


def _cmd_fit(args: argparse.Namespace) -> int:
    from canal import Annotator, io
    from canal.data import read_labels
    from canal.datasets import type_mask, where_mask
    from canal.train import StageConfig

    io.check_out(args.out, args.data)
    model = Annotator.from_pretrained(args.from_)
    adata = _read(args.data)
    read_labels(adata, args.labels)  # a clear error for a missing or incomplete column
    mask = where_mask(adata, _parse_where(args.where), name="--where: ")
    mask &= type_mask(adata, labels_key=args.labels,
                      types=args.types.split(",") if args.types else None,
                      min_cells=args.min_cells, within=mask)
    if not mask.any():
        raise ValueError(f"--where/--types/--min-cells select no cells of {args.data}")
    adata = adata[mask]
    config = _config_from_args(StageConfig, args)
    model.fit_stage(adata.copy(), labels_key=args.labels, config=config, match=_match(args),
                    panel=_panel(args.panel))
    model.save(args.out)
    h = model.history[-1]
    procs = f" on {h['world_size']} processes" if h.get("world_size", 1) > 1 else ""
    _say(f"stage {model.stage}: {h['n_cells']} cells (+{h['n_replayed']} replayed), "
         f"new types {h['new_types'] or 'none'}, best validation accuracy "
         f"{h['best_val_accuracy']}, {h['wall_seconds']:.0f}s{procs}; written to {args.out}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from canal import Annotator, ModelConfig, io
    from canal.pretrain import PretrainConfig
    from canal.stream import load_corpus

    io.check_out(args.out, *(args.data or []))
    if bool(args.data) == bool(args.corpus):
        raise ValueError("pass the cells to pre-train on with --data FILE [FILE ...] or "
                         "--corpus NAME (one of the two)")
    if args.corpus:
        named = load_corpus(args.corpus, root=args.data_dir)
        matches = [_match(args) | ({"orthologs": True} if spec.orthologs else {})
                   for _, _, spec in named]
    else:
        named = [(Path(p).stem, _read(p), None) for p in args.data]
        matches = [_match(args)] * len(named)
    names, adatas = [n for n, _, _ in named], [a for _, a, _ in named]
    if args.from_:
        model = Annotator.from_pretrained(args.from_)
    else:
        size = ModelConfig.paper() if args.size == "paper" else ModelConfig()
        emb = None if args.gene_embedding == "random" else args.gene_embedding
        model = Annotator.create(adatas, n_genes=args.n_genes, config=size.replace(seed=args.seed),
                                 gene_embedding=emb, combine=args.panel,
                                 vocabulary=True if args.vocabulary else None, match=matches)
    config = PretrainConfig(epochs=args.epochs, max_steps=args.max_steps,
                            batch_size=args.batch_size, lr=args.lr, mask_prob=args.mask_prob,
                            mask_on=args.mask_on, precision=args.precision, seed=args.seed,
                            checkpoint_every=args.checkpoint_every,
                            eval_every=args.eval_every, panel_dropout=args.panel_dropout)
    _say(f"pre-training {model} on {sum(a.n_obs for a in adatas)} cells from "
         f"{len(adatas)} dataset(s)")
    rec = model.pretrain(adatas, config=config, out=args.out, resume=not args.restart,
                         names=names, match=matches)
    f = rec.get("final") or {}
    _say(f"{rec['step']} steps, {rec.get('train_seconds', 0):.0f}s of training; held-out "
         f"masked-token accuracy {f.get('val_accuracy', float('nan')):.4f} (majority bin "
         f"{f.get('val_baseline_accuracy', float('nan')):.4f}), on expressed tokens "
         f"{f.get('val_expressed_accuracy', float('nan')):.4f} (majority "
         f"{f.get('val_expressed_baseline_accuracy', float('nan')):.4f}); written to {args.out}")
    return 0


def _cmd_stream(args: argparse.Namespace) -> int:
    from canal import io
    from canal.stream import format_table, run_stream

    out = Path(args.out or Path("runs") / Path(args.config).stem)
    io.check_out(out, args.config)
    res = run_stream(args.config, out_dir=out, root=args.data_dir, strategy=args.strategy,
                     seed=args.seed, epochs=args.epochs, test_every_stage=not args.tests_last)
    print(f"\n{res['name']} ({res['strategy']}, seed {res['seed']}, {res['seconds']:.0f}s)")
    print(format_table(res))
    print(f"results, tables and plots in {out}/; the report: {res['report']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from canal.stream import format_table, run_stream

    out = Path(args.out)
    names = ["pancreas"] + (["novel_pancreas"] if args.novel else [])
    for name in names:
        print(f"canal demo: running the {name} experiment from canal's pre-trained weights "
              f"(data: {args.data_dir or 'the shared data folder'})", flush=True)
        res = run_stream(name, out_dir=out / name, root=args.data_dir, seed=args.seed)
        print(f"\n{name}: {len(res['stages'])} stages in {res['seconds']:.0f}s, cell types "
              f"{', '.join(res['cell_types'])}")
        print(format_table(res))
        print(f"plots, tables and the final model (canal predict --model {out / name / 'model'}): "
              f"{out / name}/\n")
    for name in names:
        print(f"report of the {name} run: {out / name / 'report.html'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from canal import report

    page = report.write_report(args.run, umap_cells=args.umap_cells)
    print(f"report written to {page}")
    return 0


# --- predict / evaluate ----------------------------------------------------------------------


def _cmd_predict(args: argparse.Namespace) -> int:
    from canal import Annotator, distributed, io

    io.check_out(args.out, args.data, args.model)
    model = Annotator.from_pretrained(args.model)
    adata = _read(args.data, backed=True)
    # under torchrun every rank runs its block of the cells and gets all results; rank 0 writes
    model.predict(adata, key_added=args.key_added, novelty=args.novelty,
                  novelty_fpr=args.novelty_fpr, groupby=args.groupby,
                  batch_size=args.batch_size, precision=args.precision, match=_match(args))
    distributed.on_main(io.write_h5ad, adata, args.out)
    counts = adata.obs[args.key_added].value_counts()
    where = f" on {distributed.world_size()} processes" if distributed.active() else ""
    _say(f"{adata.n_obs} cells annotated{where}; {int(counts.get('Unassigned', 0))} "
         f"Unassigned; written to {args.out} (obs[{args.key_added!r}], "
         f"obsm['X_{args.key_added}'])")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from canal import io, metrics, pl

    if args.out:
        io.check_out(args.out, args.pred)
    adata = _read(args.pred, backed=True)
    novel = [t.strip() for t in args.novel_types.split(",") if t.strip()] if args.novel_types \
        else []
    scores = metrics.evaluate(adata, truth=args.truth, key=args.key, novel_types=novel)
    truth = adata.obs[args.truth].astype(str).to_numpy()
    probs = adata.obsm.get(f"{args.key}_probabilities")
    known_types = [str(c) for c in probs.columns] if hasattr(probs, "columns") else []
    closed_key = f"{args.key}_closed"
    if closed_key in adata.obs and known_types:
        known = np.isin(truth, known_types)
        if known.any():
            scores["closed_accuracy"] = metrics.accuracy(
                truth[known], adata.obs[closed_key].astype(str).to_numpy()[known])
    unseen = sorted(set(truth) - set(known_types) - set(novel)) if known_types else []
    if unseen:
        print(f"note: true types {unseen[:8]} are not in the model's library; they count as "
              f"errors unless given as --novel-types {','.join(unseen[:8])}", file=sys.stderr)
    out = Path(args.out) if args.out else Path(args.pred).with_name(
        f"{Path(args.pred).stem}_evaluation")
    out.mkdir(parents=True, exist_ok=True)
    params = dict(dict(adata.uns.get(args.key, {})).get("params", {}))
    report = {"pred": str(args.pred), "truth": args.truth, "key": args.key,
              "novel_types": novel, "metrics": scores,
              "params": {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}}
    io.write_text(out / "metrics.json", json.dumps(report, indent=2, default=str))
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
    p_key = f"{args.key}_novelty_p"
    if p_key in adata.obs and adata.obs[p_key].notna().any():
        plots["novelty_tradeoff.png"] = lambda: pl.novelty_tradeoff(
            adata, key=args.key, truth=args.truth, novel_types=novel).figure
    figures = {name: make() for name, make in plots.items()}
    for name, fig in figures.items():
        io.save_figure(fig, out / name, dpi=120)
    from canal import report

    page = report.write_prediction_report(
        adata, out / report.REPORT, truth=args.truth, key=args.key, novel_types=novel,
        scores=scores, title=Path(args.pred).name, umap_cells=args.umap_cells,
        figures={k.removesuffix(".png"): f for k, f in figures.items()})
    print(f"metrics.json and {', '.join(plots)} written to {out}; the page: {page}")
    return 0


# --- explain ---------------------------------------------------------------------------------


def _cmd_explain(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from canal import Annotator, io, pl
    from canal.explain import KNOWN_MARKERS, GeneImportance, marker_recovery

    io.check_out(args.out, args.data, args.model)
    model = Annotator.from_pretrained(args.model)
    adata = _read(args.data, backed=True)
    groupby = None if args.groupby.lower() == "none" else args.groupby
    key = "canal_gene_importance"
    top = model.gene_importance(adata, groupby=groupby, n_top=args.n_top, method=args.method,
                                match=_match(args),
                                steps=args.steps, batch_size=args.batch_size, key_added=key)
    result = GeneImportance.from_uns(adata.uns[key])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    io.write_csv(top, out / "top_genes.csv", index=False)
    io.write_csv(result.scores, out / "gene_importance.csv", index_label="gene")
    io.save_figure(pl.gene_importance_heatmap(result.scores, n_top=args.plot_top),
                   out / "gene_importance.png", dpi=120)
    report = {"params": result.params, "n_cells": result.n_cells.to_dict()}
    if args.markers:
        rec = marker_recovery(result.scores, KNOWN_MARKERS[args.markers], n_top=args.n_top)
        report["marker_recovery"] = rec
        print(f"markers ({args.markers}) in their type's top {args.n_top}: "
              f"{rec['n_recovered']} of {rec['n_in_panel']} types with a marker in the panel")
    io.write_text(out / "params.json", json.dumps(report, indent=2, default=str))
    p = result.params
    print(f"{p['n_cells']} cells, {len(result.scores.columns)} types explained "
          f"({p['method']}, {1e3 * p['seconds_per_cell']:.0f} ms per cell); top_genes.csv, "
          f"gene_importance.csv, gene_importance.png written to {out}")
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default when it has one worth showing (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or not action.help:
            return action.help or ""
        return super()._get_help_string(action)


def _global_args(p: argparse.ArgumentParser, *, default) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="log progress details")
    p.add_argument("--quiet", action="store_true", default=default, help="no progress bars")
    p.add_argument("--device", default=default if default is argparse.SUPPRESS else None,
                   help="torch device (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    from canal.datasets import MIN_CELLS_PER_TYPE

    parser = argparse.ArgumentParser(prog="canal", description=__doc__.splitlines()[0])
    _global_args(parser, default=False)
    # the same flags after the subcommand (canal predict ... -v); SUPPRESS keeps the ones given
    # before it
    common = argparse.ArgumentParser(add_help=False)
    _global_args(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return add_parser(name, parents=[common],
                          formatter_class=_Help, **kwargs)

    sub.add_parser = add  # type: ignore[method-assign]

    p = sub.add_parser("init", help="a randomly initialised model on a panel of HVGs")
    p.add_argument("--data", nargs="+", required=True, help=".h5ad files to choose genes from")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--n-genes", type=int, default=1000)
    p.add_argument("--size", choices=["default", "paper"], default="default")
    p.set_defaults(func=_cmd_init)

    from canal.train import StageConfig

    d = StageConfig()
    p = sub.add_parser("fit", help="fine-tune on one labelled dataset (a stage)")
    p.add_argument("--data", required=True, help="labelled .h5ad")
    p.add_argument("--labels", default="cell_type", help="obs column with cell types")
    p.add_argument("--from", dest="from_", default=None,
                   help="checkpoint to start from (default: canal's shipped pre-trained weights)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--where", action="append", metavar="KEY=V1,V2",
                   help="keep cells whose obs[KEY] is one of the values (repeatable)")
    p.add_argument("--types", default=None, help="comma-separated cell types to keep")
    p.add_argument("--min-cells", type=int, default=MIN_CELLS_PER_TYPE,
                   help="leave out types with fewer cells than this: a type with a handful of "
                        "cells can be neither learnt nor validated (the reference experiments' "
                        "rule)")
    p.add_argument("--panel", default=None, metavar="auto|hvg|pretrained|FILE",
                   help="the gene panel, chosen at the first stage: hvg (the data's --n-panel "
                        "most highly variable genes), pretrained (the model's panel), a text "
                        "file of gene symbols (one per line); default auto: hvg for a model "
                        "with a gene vocabulary, else pretrained")
    _add_config_args(p, StageConfig, title="stage hyper-parameters (canal.StageConfig)")
    _add_match_args(p)
    p.set_defaults(func=_cmd_fit)

    from canal.pretrain import PretrainConfig

    d = PretrainConfig()
    p = sub.add_parser("pretrain", help="masked-expression pre-training on unlabeled cells")
    p.add_argument("--data", nargs="+", default=None, help=".h5ad files (labels ignored)")
    p.add_argument("--corpus", default=None,
                   help="a corpus TOML, or 'corpus': the shared data minus the reference "
                        "experiments' test cells")
    p.add_argument("--data-dir", default=None, help="folder the corpus' files resolve against "
                   "(default $CANAL_DATA or ../shared/data)")
    p.add_argument("--out", required=True, help="checkpoint directory (written periodically; "
                   "an unfinished run there is resumed)")
    p.add_argument("--from", dest="from_", default=None,
                   help="continue from this checkpoint (default: a new model on an HVG panel "
                        "of the data)")
    p.add_argument("--n-genes", type=int, default=1000, help="panel size of a new model")
    p.add_argument("--size", choices=["default", "paper"], default="default")
    p.add_argument("--panel", choices=["interleave", "votes"], default="interleave",
                   help="how the datasets' HVGs are combined into the panel (see "
                        "canal.pp.select_panel)")
    p.add_argument("--vocabulary", action="store_true",
                   help="give a new model a gene vocabulary: an embedding for every gene the "
                        "corpus expresses; each batch then reads a panel of --n-genes genes "
                        "drawn from the genes its cells' file measures (weighted toward "
                        "variable genes), and fine-tuning chooses its own panel from it")
    p.add_argument("--gene-embedding", default="corpus",
                   help="'corpus' (co-expression, gene2vec-like), 'random', or a gene2vec-style "
                        "text file")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--mask-prob", type=float, default=d.mask_prob)
    p.add_argument("--mask-on", choices=["all", "expressed", "balanced"], default=d.mask_on)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--panel-dropout", type=float, default=d.panel_dropout,
                   help="hide up to this share of measured genes in half the cells")
    _add_match_args(p)
    p.add_argument("--restart", action="store_true",
                   help="ignore an unfinished run in --out and start afresh")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("stream", help="run a stream of stages from a TOML config")
    p.add_argument("config", help="TOML file or a shipped config name: pancreas, immune, "
                   "novel_pancreas, novel_immune, cross_species")
    p.add_argument("--out", default=None, help="output folder (default runs/NAME)")
    p.add_argument("--data-dir", default=None, help="folder of the data files (default "
                   "$CANAL_DATA or ../shared/data)")
    p.add_argument("--strategy", default=None,
                   choices=["canal", "naive", "replay", "distill", "joint"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tests-last", action="store_true",
                   help="annotate the test sets after the last stage only (faster; the stages' "
                        "held-out cells are still scored after every stage)")
    p.set_defaults(func=_cmd_stream)

    p = sub.add_parser("demo", help="the pancreas reference experiment from shipped weights")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--novel", action="store_true", help="also run the novel-cell experiment "
                   "(alpha withheld) and report its H-score")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("report", help="(re)write report.html of a canal stream output folder")
    p.add_argument("run", help="the output folder of canal stream (holds results.json)")
    p.add_argument("--umap-cells", type=int, default=5000,
                   help="UMAP of at most this many cells per test set (0: no UMAP)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("info", help="describe a checkpoint (default: the shipped weights)")
    p.add_argument("model", nargs="?", default=None)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("embed", help="write cell representations to obsm")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--key-added", default="canal", help="writes obsm['X_<key-added>']")
    p.add_argument("--batch-size", type=int, default=64)
    _add_match_args(p)
    p.set_defaults(func=_cmd_embed)

    # --- predict / evaluate ---
    p = sub.add_parser("predict", help="annotate cells (novel cells come out Unassigned)")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--data", required=True, help=".h5ad to annotate (read backed)")
    p.add_argument("--out", required=True, help=".h5ad to write")
    p.add_argument("--key-added", default="canal")
    p.add_argument("--novelty", choices=["calibrated", "mixup", "none", "energy"],
                   default="calibrated",
                   help="how novel cells are called Unassigned. calibrated: a per-cell "
                        "split-conformal rule fitted on held-out known cells after training; "
                        "it rejects about --novelty-fpr of cells of known types, whatever the "
                        "other cells in the file. mixup: CANAL's transductive rule (scores "
                        "normalised over this file, mixup threshold); it rejected 15-25%% of "
                        "known cells in our runs and a cell's call depends on the others "
                        "(energy: its former name). none: every cell gets a known type")
    p.add_argument("--novelty-fpr", type=float, default=None,
                   help="share of known cells to reject with --novelty calibrated (default: "
                        "the model's, 0.05); obs['<key>_novelty_p'] <= alpha re-thresholds "
                        "without a re-run")
    p.add_argument("--groupby", default=None,
                   help="obs column of clusters (or 'auto': Leiden on the representation): "
                        "call Unassigned and types per cluster by majority vote")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    _add_match_args(p)
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

    # --- explain ---
    p = sub.add_parser("explain", help="genes driving each cell type (attribution), heatmap")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--data", required=True, help=".h5ad with the cells to explain")
    p.add_argument("--out", required=True, help="directory for the CSV tables and the PNG")
    p.add_argument("--groupby", default="cell_type",
                   help="obs column with cell types; 'none' or a missing column explains the "
                        "model's own predictions")
    p.add_argument("--n-top", type=int, default=20, help="genes per type in top_genes.csv")
    p.add_argument("--method", choices=["integrated_gradients", "grad_x_input"],
                   default="integrated_gradients")
    p.add_argument("--steps", type=int, default=8, help="integrated-gradients steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--plot-top", type=int, default=5, help="genes per type in the heatmap")
    p.add_argument("--markers", choices=["pancreas", "immune"], default=None,
                   help="also report recovery of these known markers")
    _add_match_args(p)
    p.set_defaults(func=_cmd_explain)
    return parser


#: Subcommands that run under ``torchrun`` (the others would repeat their work and race on
#: their outputs in every process): training is data-parallel, predict and embed are sharded.
DISTRIBUTED_COMMANDS = ("init", "fit", "pretrain", "predict", "embed")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``canal`` command line; returns the exit code.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes join one process group for the
    command (see :mod:`canal.distributed`); only rank 0 logs progress and prints results.
    """
    from canal import distributed
    from canal._settings import settings

    parser = build_parser()
    args = parser.parse_args(argv)
    settings.verbosity = "info" if args.verbose else "warning"
    if getattr(args, "quiet", False):
        settings.progress = False
    if args.device:
        settings.device = args.device
    if distributed.launched() and args.command not in DISTRIBUTED_COMMANDS:
        print(f"canal {args.command}: error: it runs in one process; start it without torchrun "
              f"(data-parallel: {', '.join(DISTRIBUTED_COMMANDS)})", file=sys.stderr)
        return 2
    with distributed.session():
        if not distributed.is_main():
            settings.verbosity = "warning"
        try:
            return int(args.func(args) or 0)
        except (ValueError, KeyError, OSError) as err:  # OSError: io.OutputError, bad files
            where = f" (rank {distributed.rank()})" if distributed.active() else ""
            print(f"canal {args.command}{where}: error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
