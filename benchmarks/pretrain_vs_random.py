"""Does pre-training help? Fine-tuning from canal's shipped weights vs from random weights.

For each reference experiment (default: pancreas and immune) the same stream is run twice with
the same seed, splits and stage settings: once from the shipped pre-trained weights
(``Annotator.from_pretrained()``), once from a network of the same size and the same gene panel
whose weights are freshly initialised (random gene embeddings too). Both fine-tune with CANAL's
defaults (final norm, second-to-last encoder layer and head trained), so the frozen layers are
where pre-training can matter. Prints the final accuracy / macro-F1 per test set and writes JSON.

Run: ``python benchmarks/pretrain_vs_random.py [--experiments pancreas immune] [--seeds 0]
[--epochs N] [--candidate CKPT ...] [--no-shipped] [--out benchmarks/results/pretrain_vs_random]``.
``--candidate`` adds other pre-trained checkpoints of the shipped panel and size (e.g. a new
pre-training recipe) to compare on the same streams; ``--no-shipped`` leaves the shipped
weights' runs out (when they were run already at this commit).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import canal
from canal.stream import StreamConfig, run_stream

canal.settings.progress = False


def random_twin(path: Path, *, seed: int) -> Path:
    """A checkpoint with the shipped model's panel and size but fresh random weights (the same
    builder as ``benchmarks/reference.py --init twin``, whose grid supersedes this script)."""
    spec = importlib.util.spec_from_file_location(
        "reference_bench", Path(__file__).resolve().parent / "reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    return reference.random_twin(path, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", default=["pancreas", "immune"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the stage epochs (default: the config's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidate", nargs="*", default=[],
                        help="other pre-trained checkpoints (same panel and size) to compare")
    parser.add_argument("--no-shipped", action="store_true",
                        help="leave out the runs from the shipped weights")
    parser.add_argument("--out", default="benchmarks/results/pretrain_vs_random")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.experiments:
            for seed in args.seeds:
                twin = random_twin(Path(tmp) / f"random_{seed}", seed=seed)
                inits = [] if args.no_shipped else [("pretrained", "pretrained")]
                inits += [(f"candidate {Path(c).name}", str(c)) for c in args.candidate]
                inits.append(("random", str(twin)))
                for init, source in inits:
                    cfg = StreamConfig.from_toml(name)
                    cfg.model = {"init": source}
                    t0 = time.perf_counter()
                    res = run_stream(cfg, out_dir=out / f"{name}_{init.replace(' ', '_')}_seed{seed}",
                                     seed=seed,
                                     epochs=args.epochs, plots=False)
                    runs.append({"experiment": name, "init": init, "seed": seed,
                                 "seconds": time.perf_counter() - t0,
                                 "average_accuracy": res["average_accuracy"],
                                 "backward_transfer": res["backward_transfer"],
                                 "final": {r["test"]: {k: r.get(k) for k in
                                                       ("accuracy", "closed_accuracy",
                                                        "macro_f1", "ari")}
                                           for r in res["final"]}})
                    print(f"{name} seed {seed} {init}: " + "; ".join(
                        f"{t} acc {m['accuracy']:.3f}" for t, m in runs[-1]["final"].items())
                        + f" ({runs[-1]['seconds']:.0f}s)", flush=True)
    lines = ["| experiment | test set | init | accuracy | closed-set acc | macro-F1 | ARI |",
             "|---|---|---|---|---|---|---|"]
    for name in args.experiments:
        tests = list(next(r for r in runs if r["experiment"] == name)["final"])
        for test in tests:
            for init in dict.fromkeys(r["init"] for r in runs):
                sel = [r["final"][test] for r in runs
                       if r["experiment"] == name and r["init"] == init]

                def cell(key, sel=sel):
                    v = np.array([np.nan if s[key] is None else s[key] for s in sel])
                    return f"{v.mean():.3f}" + (f" ± {v.std():.3f}" if len(v) > 1 else "")

                lines.append(f"| {name} | {test} | {init} | {cell('accuracy')} | "
                             f"{cell('closed_accuracy')} | {cell('macro_f1')} | {cell('ari')} |")
    table = "\n".join(lines)
    print(table)
    meta = {"machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(),
                        "torch": torch.__version__, "threads": args.threads},
            "seeds": args.seeds, "epochs": args.epochs, "runs": runs, "table": table}
    (out / "pretrain_vs_random.json").write_text(json.dumps(meta, indent=2))
    print(f"written to {out}/pretrain_vs_random.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
