"""Load scBERT (``PerformerLM``) weights into a :class:`~canal.nn.net.CanalNet`.

scBERT's encoder names and shapes match canal's; its gene embedding covers scBERT's own gene
list (16,906 genes + 1 extra row), so the rows of the model's panel genes are picked by symbol.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from canal.nn.net import CanalNet

logger = logging.getLogger(__name__)


def load_scbert_state_dict(net: CanalNet, state_dict: Mapping[str, torch.Tensor], *,
                           scbert_genes: Sequence[str], panel: Sequence[str]) -> list[str]:
    """Copy scBERT encoder weights into ``net``; the classification head is left as it is.

    Parameters
    ----------
    net
        A network built with :meth:`ModelConfig.paper` (or sizes equal to the checkpoint's).
    state_dict
        scBERT's state dict (the ``model_state_dict`` entry of ``panglao_pretrain.pth``, with or
        without a ``module.`` prefix).
    scbert_genes
        scBERT's gene list, in the order of its gene-embedding rows.
    panel
        The model's gene panel; every panel gene must be in ``scbert_genes``.

    Returns
    -------
    The parameter names that were loaded.
    """
    if "model_state_dict" in state_dict:
        state_dict = state_dict["model_state_dict"]
    sd = {k.removeprefix("module."): v for k, v in state_dict.items() if "proj_updater" not in k}
    if "pos_emb.emb.weight" not in sd:
        raise ValueError("not a scBERT PerformerLM state dict (no pos_emb.emb.weight); pass the "
                         "'model_state_dict' of scBERT's checkpoint")
    gene_rows = sd.pop("pos_emb.emb.weight")
    if gene_rows.shape[0] < len(scbert_genes):
        raise ValueError(f"scBERT gene embedding has {gene_rows.shape[0]} rows but "
                         f"{len(scbert_genes)} genes were given; pass scBERT's own gene list")
    position = {g: i for i, g in enumerate(scbert_genes)}
    missing = [g for g in panel if g not in position]
    if missing:
        raise ValueError(f"{len(missing)} panel genes are not in scBERT's gene list (e.g. "
                         f"{missing[:5]}); build the panel from scBERT's genes")
    rows = torch.tensor([position[g] for g in panel] + [gene_rows.shape[0] - 1])
    sd["pos_emb.emb.weight"] = gene_rows[rows]
    own = net.state_dict()
    encoder = {k: v for k, v in sd.items() if not k.startswith("head.")}
    unknown = sorted(set(encoder) - set(own))
    if unknown:
        raise ValueError(f"unexpected scBERT keys {unknown[:5]}; is this a PerformerLM with "
                         "local attention heads or reversible layers? Those are not supported")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in encoder.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"shape mismatch {bad[:3]} (key, scBERT, canal); build the model with "
                         "ModelConfig.paper() and a panel of scBERT genes")
    net.load_state_dict(encoder, strict=False)
    logger.info("loaded %d scBERT tensors", len(encoder))
    return sorted(encoder)
