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
