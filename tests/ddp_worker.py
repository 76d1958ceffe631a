"""One rank of the two-process checks in test_distributed.py (run by torchrun, not by pytest).

Usage: ``torchrun --nproc_per_node=2 tests/ddp_worker.py DATA.h5ad CHECKPOINT OUT_PREFIX``.
Each rank writes what it saw to ``OUT_PREFIX.<rank>.json``; the test compares the ranks.
"""

from __future__ import annotations

import hashlib
import json
import sys

import anndata as ad
import numpy as np
import torch
from torch import nn

from canal import Annotator, distributed, settings
from canal.train import StageConfig


def _collectives() -> dict:
    r = distributed.rank()
    out: dict = {"rank": r, "world_size": distributed.world_size(), "is_main": distributed.is_main()}
    mine = distributed.shard(np.arange(11), seed=3, pad=False)
    values = torch.from_numpy(np.stack([mine * 10.0, -mine], axis=1))
    out["gathered"] = distributed.gather_cells(mine, values, 11).tolist()
    out["sum"] = distributed.sum_across([r + 0.1, 1.0])
    out["broadcast"] = distributed.broadcast_object({"from": r})
    out["on_main"] = distributed.on_main(distributed.rank)

    def fail() -> None:
        raise ValueError("disk full")

    try:
        distributed.on_main(fail)
        out["on_main_error"] = None
    except (ValueError, RuntimeError) as err:
        out["on_main_error"] = f"{type(err).__name__}: {err}"

    # sharded inference: contiguous blocks gathered back in order; a failure on one rank only
    rows = distributed.block(11, multiple=2)
    out["block"] = [rows.start, rows.stop]
    out["gathered_blocks"] = distributed.gather_blocks(torch.arange(11.0)[rows]).tolist()

    def fail_on_rank_1() -> str:
        if distributed.rank() == 1:
            raise ValueError("cell 7 has no counts")
        return "ok"

    try:
        distributed.agree(fail_on_rank_1)
        out["agree_error"] = None
    except (ValueError, RuntimeError) as err:
        out["agree_error"] = f"{type(err).__name__}: {err}"
    out["agree"] = distributed.agree(lambda: distributed.rank() * 10)

    # DDP averages gradients: each rank's half-batch mean loss == the full batch's mean loss
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    torch.manual_seed(r)  # different initial weights: DDP must copy rank 0's
    net = nn.Linear(4, 2)
    model = distributed.wrap(net)
    out["wrapped"] = model is not net and distributed.unwrap(model) is net
    nn.functional.mse_loss(model(x[r::2]), y[r::2]).backward()
    ref = nn.Linear(4, 2)
    ref.load_state_dict(net.state_dict())
    nn.functional.mse_loss(ref(x), y).backward()
    out["grad"] = net.weight.grad.tolist()
    out["grad_full_batch"] = ref.weight.grad.tolist()
    return out


def _stages(data: str, checkpoint: str) -> dict:
    adata = ad.read_h5ad(data)
    types = adata.obs["cell_type"].astype(str)
    config = StageConfig(epochs=2, lr=3e-3, bank_size=40, seed=0)
    model = Annotator.from_pretrained(checkpoint)
    model.fit_stage(adata[types.isin(["alpha", "beta", "delta"]).to_numpy()].copy(),
                    config=config)
    model.fit_stage(adata[types.isin(["beta", "ductal", "endothelial"]).to_numpy()].copy(),
                    config=config)
    weights = hashlib.sha1(b"".join(v.detach().cpu().numpy().tobytes()
                                    for v in model.net.state_dict().values())).hexdigest()
    return {"weights": weights, "bank": model.bank.obs["cell"].tolist(),
            "bank_stages": sorted(set(model.bank.obs["stage"].tolist())),
            "val_accuracy": [h["val_accuracy"] for h in model.history],
            "train_loss": [h["train_loss"] for h in model.history],
            "world_size": [h["world_size"] for h in model.history],
            "novelty": model.meta["novelty"]}


def main(argv: list[str]) -> None:
    data, checkpoint, prefix = argv
    settings.progress = False
    torch.set_num_threads(1)
    with distributed.session():
        result = {"collectives": _collectives(), "stages": _stages(data, checkpoint)}
        with open(f"{prefix}.{distributed.rank()}.json", "w") as fh:
            json.dump(result, fh, default=str)


if __name__ == "__main__":
    main(sys.argv[1:])
