"""The canal network: scBERT-style gene-token transformer + CANAL's classification head.

Tensors in, tensors out. A cell is a sequence of ``n_genes + 1`` tokens (the panel genes in
model order plus one extra token, as in scBERT); each token is its expression bin's embedding
plus its gene's embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from canal.nn.performer import Performer


@dataclass(frozen=True)
class ModelConfig:
    """Network sizes. The defaults are the CPU default model; :meth:`paper` is CANAL/scBERT size.

    Attributes
    ----------
    n_genes
        Gene-panel size; the sequence has ``n_genes + 1`` tokens.
    dim, depth, heads, dim_head
        Transformer width, layers, attention heads and per-head width.
    nb_features
        Random features per head (``None``: ``dim_head * ln(dim_head)``, as performer-pytorch).
    n_tokens
        Token ids: expression bins plus the mask token.
    head_hidden, rep_dim
        Classification-head MLP width and the cell-representation size.
    head_dropout
        Dropout in the classification head.
    seed
        Seed for the initial weights and the attention's random projections.
    n_vocab
        Genes of the gene vocabulary (``CanalNet.vocab``: one embedding per gene of the
        pre-training corpus, from which a task's panel takes its gene vectors); ``0``: no
        vocabulary (the panel is the vocabulary, as in checkpoints written before it).
    """

    n_genes: int = 1000
    dim: int = 64
    depth: int = 4
    heads: int = 4
    dim_head: int = 16
    nb_features: int | None = None
    ff_mult: int = 4
    n_tokens: int = 7
    head_hidden: int = 256
    rep_dim: int = 64
    head_dropout: float = 0.1
    seed: int = 0
    n_vocab: int = 0

    @classmethod
    def paper(cls, n_genes: int = 1000, **overrides) -> ModelConfig:
        """CANAL's (scBERT's) size: dim 200, depth 6, 10 heads of 64, head MLP 512."""
        sizes = dict(dim=200, depth=6, heads=10, dim_head=64, head_hidden=512) | overrides
        return cls(n_genes=n_genes, **sizes)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["n_vocab"]:  # checkpoints without a vocabulary keep their config.json
            del d["n_vocab"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; the checkpoint was "
                             "written by a newer canal: upgrade canal")
        return cls(**d)

    def replace(self, **changes) -> ModelConfig:
        return replace(self, **changes)

    @property
    def seq_len(self) -> int:
        return self.n_genes + 1


def shared_columns(present: torch.Tensor | None) -> torch.Tensor | None:
    """The positions measured when every row of ``present`` is the same mask, else ``None``."""
    if present is None or present.shape[0] == 0:
        return None
    first = present[0]
    if not bool((present == first).all()):
        return None
    return first.nonzero().squeeze(1)


@dataclass
class CellOutput:
    """What a forward pass returns: per-cell representation and class logits."""

    representation: torch.Tensor
    logits: torch.Tensor


#: Parameters added after the first checkpoints; loading an older state dict fills them in.
_NEW_PARAMETERS = ("head.unknown",)


class GeneEmbedding(nn.Module):
    """One learned vector per panel gene (plus the extra token): scBERT's ``pos_emb``."""

    def __init__(self, n_positions: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(n_positions, dim)

    def forward(self, n: int) -> torch.Tensor:
        return self.emb.weight[:n]


class ClassifierHead(nn.Module):
    """CANAL's head: per-gene projection to a scalar, MLP to the representation, linear classifier.

    A gene the cell's dataset did not measure contributes no projection of its own: its scalar
    is the learned ``unknown[gene]`` instead (zero until trained), so nothing of what its token
    carried reaches the representation. ``classifier`` grows as new cell types arrive
    (:meth:`grow`); rows of known types are kept.
    """

    def __init__(self, seq_len: int, dim: int, *, hidden: int, rep_dim: int, n_classes: int,
                 dropout: float):
        super().__init__()
        self.gene_proj = nn.Linear(dim, 1)
        self.unknown = nn.Parameter(torch.zeros(seq_len))
        self.fc1 = nn.Linear(seq_len, hidden)
        self.fc2 = nn.Linear(hidden, rep_dim)
        self.dropout = nn.Dropout(dropout)
        self.act = nn.GELU()
        self.classifier = nn.Linear(rep_dim, max(n_classes, 1))
        if n_classes == 0:
            self.classifier.weight = nn.Parameter(self.classifier.weight[:0].detach().clone())
            self.classifier.bias = nn.Parameter(self.classifier.bias[:0].detach().clone())
            self.classifier.out_features = 0

    @property
    def n_classes(self) -> int:
        return self.classifier.out_features

    def gene_values(self, h: torch.Tensor, present: torch.Tensor | None = None, *,
                    columns: torch.Tensor | None = None) -> torch.Tensor:
        """Each gene's scalar, ``(cells, seq_len)``; ``unknown[gene]`` where not measured.

        ``columns``: ``h`` holds only these positions (every cell measures exactly them); the
        others take ``unknown``.
        """
        z = self.gene_proj(h).squeeze(-1)
        if columns is not None:
            full = self.unknown.to(z.dtype).expand(z.shape[0], -1)
            return full.index_copy(1, columns, z)
        if present is not None:
            z = torch.where(present, z, self.unknown.to(z.dtype))
        return z

    def represent(self, h: torch.Tensor, present: torch.Tensor | None = None, *,
                  columns: torch.Tensor | None = None) -> torch.Tensor:
        z = self.gene_values(h, present, columns=columns)
        z = self.dropout(self.act(self.fc1(z)))
        return self.act(self.fc2(z))

    def classify(self, rep: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(rep))

    def forward(self, h: torch.Tensor, present: torch.Tensor | None = None, *,
                columns: torch.Tensor | None = None) -> CellOutput:
        rep = self.represent(h, present, columns=columns)
        return CellOutput(representation=rep, logits=self.classify(rep))

    @torch.no_grad()
    def grow(self, n_new: int, *, generator: torch.Generator | None = None) -> None:
        """Add ``n_new`` output rows; existing rows keep their weights exactly."""
        if n_new <= 0:
            return
        old = self.classifier
        in_f = old.in_features
        bound = in_f**-0.5
        w_new = (torch.rand(n_new, in_f, generator=generator) * 2 - 1) * bound
        b_new = (torch.rand(n_new, generator=generator) * 2 - 1) * bound
        new = nn.Linear(in_f, old.out_features + n_new).to(old.weight.device)
        new.weight.copy_(torch.cat([old.weight, w_new.to(old.weight)]))
        new.bias.copy_(torch.cat([old.bias, b_new.to(old.bias)]))
        new.weight.requires_grad_(old.weight.requires_grad)
        new.bias.requires_grad_(old.bias.requires_grad)
        self.classifier = new


class CanalNet(nn.Module):
    """Gene-token Performer encoder with a masked-expression head and a classification head.

    Parameter names of the encoder (``token_emb``, ``pos_emb.emb``, ``performer.net.layers``,
    ``norm``, ``to_out``) match scBERT's ``PerformerLM``.
    """

    def __init__(self, config: ModelConfig, *, n_classes: int = 0,
                 gene_embedding: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(config.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.token_emb = nn.Embedding(config.n_tokens, config.dim)
            self.pos_emb = GeneEmbedding(config.seq_len, config.dim)
            self.performer = Performer(config.dim, depth=config.depth, heads=config.heads,
                                       dim_head=config.dim_head, nb_features=config.nb_features,
                                       ff_mult=config.ff_mult, generator=gen)
            self.norm = nn.LayerNorm(config.dim)
            self.to_out = nn.Linear(config.dim, config.n_tokens)
            self.head = ClassifierHead(config.seq_len, config.dim, hidden=config.head_hidden,
                                       rep_dim=config.rep_dim, n_classes=n_classes,
                                       dropout=config.head_dropout)
            # created last, so that the other modules draw the same initial weights as a model
            # without a vocabulary
            self.vocab = (nn.Embedding(config.n_vocab, config.dim) if config.n_vocab > 0
                          else None)
        if gene_embedding is not None:
            self.set_gene_embedding(gene_embedding)

    @torch.no_grad()
    def set_gene_embedding(self, matrix: torch.Tensor) -> None:
        """Initialise gene vectors from a ``(n_genes, dim)`` or ``(n_genes + 1, dim)`` matrix."""
        matrix = torch.as_tensor(matrix, dtype=torch.float32)
        n, d = matrix.shape
        if d != self.config.dim or n not in (self.config.n_genes, self.config.seq_len):
            raise ValueError(f"gene embedding has shape {tuple(matrix.shape)}, expected "
                             f"({self.config.n_genes}, {self.config.dim}); pass one row per "
                             "panel gene with the model's dim")
        self.pos_emb.emb.weight[:n].copy_(matrix)
        if n == self.config.n_genes:
            self.pos_emb.emb.weight[n:].zero_()

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a state dict strictly, filling parameters that older checkpoints lack."""
        own = self.state_dict()
        filled = {k: own[k] for k in _NEW_PARAMETERS if k not in state_dict and k in own}
        self.load_state_dict(dict(state_dict) | filled, strict=True)

    @property
    def depth(self) -> int:
        return self.performer.depth

    def embed(self, tokens: torch.Tensor, genes: torch.Tensor | None = None) -> torch.Tensor:
        """Token + gene embeddings: the input of encoder layer 0.

        ``genes`` (``None``: the panel) reads the gene vectors from the vocabulary instead:
        ``(n_genes,)`` or ``(cells, n_genes)`` row indices of :attr:`vocab`, one per gene token
        (the extra token keeps its own vector). Pre-training draws a panel per batch this way.
        """
        if tokens.shape[-1] != self.config.seq_len:
            raise ValueError(f"expected {self.config.seq_len} tokens per cell, got "
                             f"{tokens.shape[-1]}; bin cells with canal.pp.bin_tokens")
        if genes is None:
            return self.token_emb(tokens) + self.pos_emb(tokens.shape[-1])
        if self.vocab is None:
            raise ValueError("genes= reads the gene vocabulary, and this network has none "
                             "(ModelConfig.n_vocab == 0)")
        if genes.shape[-1] != self.config.n_genes:
            raise ValueError(f"genes has {genes.shape[-1]} entries per cell, expected "
                             f"{self.config.n_genes}")
        vectors = self.vocab(genes)
        extra = self.pos_emb.emb.weight[self.config.n_genes:]
        extra = extra.expand(*vectors.shape[:-2], 1, extra.shape[-1])
        return self.token_emb(tokens) + torch.cat([vectors, extra], dim=-2)

    def encode(self, tokens: torch.Tensor | None = None, *, hidden: torch.Tensor | None = None,
               present: torch.Tensor | None = None, start: int = 0,
               stop: int | None = None, genes: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after encoder layers ``start:stop`` (no final norm).

        Give ``tokens`` to start from the embeddings (``start`` must be 0), or ``hidden`` (the
        output of layer ``start - 1``, e.g. cached) to resume from layer ``start``.
        ``present`` (``(cells, seq_len)`` bool, ``None``: all) marks the genes measured: the
        others are no attention keys, so they reach no other token. ``genes``: vocabulary rows
        of the gene tokens (see :meth:`embed`).
        """
        if hidden is None:
            if tokens is None or start != 0:
                raise ValueError("pass tokens (with start=0) or the hidden states of layer start-1")
            hidden = self.embed(tokens, genes)
        return self.performer(hidden, start=start, stop=stop, key_mask=present)

    def forward(self, tokens: torch.Tensor | None = None, *, hidden: torch.Tensor | None = None,
                present: torch.Tensor | None = None, start: int = 0) -> CellOutput:
        """Representation and logits, from tokens or from cached hidden states at layer ``start``.

        Genes marked absent in ``present`` take no part: the result does not depend on what
        their tokens hold. When every cell of the batch measures the same genes (one dataset),
        the others are dropped from the sequence instead of masked: the same result for less
        work (a file measuring half the panel runs about half as many token operations).
        """
        columns = shared_columns(present)
        if columns is None:
            h = self.norm(self.encode(tokens, hidden=hidden, present=present, start=start))
            return self.head(h, present)
        if hidden is None:
            if tokens is None or start != 0:
                raise ValueError("pass tokens (with start=0) or the hidden states of layer start-1")
            hidden = self.embed(tokens)
        if len(columns) == hidden.shape[1]:  # every gene measured: nothing to mask
            return self.head(self.norm(self.performer(hidden, start=start)))
        h = self.norm(self.performer(hidden[:, columns], start=start))
        return self.head(h, columns=columns)

    def mlm_logits(self, tokens: torch.Tensor, present: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Per-token bin logits of the masked-expression head, ``(cells, seq_len, n_tokens)``."""
        return self.to_out(self.norm(self.encode(tokens, present=present)))
