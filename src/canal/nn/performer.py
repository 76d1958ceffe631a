"""A small Performer encoder (FAVOR+ softmax-kernel attention) with scBERT's parameter names.

Module and parameter names follow performer-pytorch as used by scBERT's ``PerformerLM``
(``net.layers.N.0.fn.to_q``, ``net.layers.N.1.fn.fn.w1``, ...), so scBERT weights load into it
directly. It is written here rather than taken from ``performer-pytorch`` because canal needs:

- random projections drawn once (seeded) and kept fixed, never redrawn behind the caller's back,
  so frozen layers give the same output every epoch and can be cached exactly;
- a forward pass over a range of layers (``start``/``stop``) for frozen-prefix caching;
- the softmax kernel computed in float32 under bf16 autocast (exp of large values is unstable);
- no dependency on einops / local-attention / axial-positional-embedding.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def gaussian_orthogonal_random_matrix(n_rows: int, n_cols: int, *,
                                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Random features for FAVOR+: orthogonal blocks with chi-distributed row norms."""
    blocks = []
    for _ in range(math.ceil(n_rows / n_cols)):
        g = torch.randn(n_cols, n_cols, generator=generator)
        q, _ = torch.linalg.qr(g)
        blocks.append(q.T)
    mat = torch.cat(blocks)[:n_rows]
    norms = torch.randn(n_rows, n_cols, generator=generator).norm(dim=1)
    return norms[:, None] * mat


def softmax_kernel(data: torch.Tensor, projection: torch.Tensor, *, is_query: bool,
                   eps: float = 1e-4, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Positive random features approximating exp(q.k / sqrt(d)) (Choromanski et al. 2021).

    ``data`` is (batch, heads, tokens, dim_head). Key features are stabilised with the max over
    the whole sequence of one cell, so one cell's result never depends on its batch neighbours.

    Computed as ``exp(dash - (diag + stab - log ratio)) + ratio * eps``, which equals
    ``ratio * (exp(dash - diag - stab) + eps)`` with three passes over the large
    (tokens x features) tensor instead of five; done in place when no gradient is needed.

    ``key_mask`` (``(batch, tokens)`` bool, keys only) marks the tokens that exist: the others
    get all-zero features, so they add nothing to the attention's numerator or normaliser, and
    they are left out of the stabiliser. A masked token's values never reach another token.
    """
    data = data.float()
    if key_mask is not None and not is_query:
        data = data.masked_fill(~key_mask[:, None, :, None], 0.0)
    normalizer = data.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    dash = torch.matmul(data, (normalizer * projection.float()).T)
    diag = (data * data).sum(dim=-1, keepdim=True) * (0.5 * normalizer**2)
    if key_mask is not None and not is_query:
        # masked keys: zeroed above (whatever they held), -inf before exp, zero after (eps)
        keep = key_mask[:, None, :, None]
        dash = dash.masked_fill_(~keep, -torch.inf)
    if is_query:
        stab = dash.amax(dim=-1, keepdim=True).detach()
    else:
        stab = dash.amax(dim=(-1, -2), keepdim=True).detach()
    offset = diag + (stab - math.log(ratio))
    if dash.requires_grad:
        out = torch.exp(dash - offset) + ratio * eps
        return out if key_mask is None or is_query else out * keep
    out = dash.sub_(offset).exp_().add_(ratio * eps)
    return out if key_mask is None or is_query else out.mul_(keep)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention: out = D^-1 q (k^T v), as three batched matmuls."""
    k_sum = k.sum(dim=-2).unsqueeze(-1)
    d_inv = 1.0 / torch.matmul(q, k_sum)
    context = torch.matmul(k.transpose(-1, -2), v.float())
    return torch.matmul(q, context) * d_inv


class FastAttention(nn.Module):
    """FAVOR+ attention with a fixed, persistent random projection (saved in the state dict)."""

    def __init__(self, dim_head: int, nb_features: int | None = None, *,
                 generator: torch.Generator | None = None):
        super().__init__()
        nb_features = nb_features or int(dim_head * math.log(dim_head))
        self.register_buffer("projection_matrix",
                             gaussian_orthogonal_random_matrix(nb_features, dim_head,
                                                               generator=generator))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device_type=q.device.type, enabled=False):
            qf = softmax_kernel(q, self.projection_matrix, is_query=True)
            kf = softmax_kernel(k, self.projection_matrix, is_query=False, key_mask=key_mask)
            if key_mask is not None:
                v = v.masked_fill(~key_mask[:, None, :, None], 0.0)
            return linear_attention(qf, kf, v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, *, heads: int, dim_head: int, nb_features: int | None,
                 dropout: float, generator: torch.Generator | None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.fast_attention = FastAttention(dim_head, nb_features, generator=generator)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, -1).transpose(1, 2)

        out = self.fast_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)),
                                  key_mask)
        out = out.transpose(1, 2).reshape(b, n, -1).to(x.dtype)
        return self.dropout(self.to_out(out))


class FeedForward(nn.Module):
    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, dim * mult)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.dropout(self.act(self.w1(x))))


class Chunk(nn.Module):
    """Holds the feed-forward under the name ``fn`` (scBERT's key layout); runs it in one go."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class PreLayerNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.fn(self.norm(x), *args)


class SequentialSequence(nn.Module):
    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, *, start: int = 0, stop: int | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for attn, ff in self.layers[start:stop]:
            x = x + attn(x, key_mask)
            x = x + ff(x)
        return x


class Performer(nn.Module):
    """Stack of pre-norm Performer blocks (attention + feed-forward, residual)."""

    def __init__(self, dim: int, *, depth: int, heads: int, dim_head: int,
                 nb_features: int | None = None, ff_mult: int = 4, attn_dropout: float = 0.0,
                 ff_dropout: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        layers = nn.ModuleList()
        for _ in range(depth):
            attn = SelfAttention(dim, heads=heads, dim_head=dim_head, nb_features=nb_features,
                                 dropout=attn_dropout, generator=generator)
            ff = Chunk(FeedForward(dim, mult=ff_mult, dropout=ff_dropout))
            layers.append(nn.ModuleList([PreLayerNorm(dim, attn), PreLayerNorm(dim, ff)]))
        self.net = SequentialSequence(layers)

    @property
    def depth(self) -> int:
        return len(self.net.layers)

    def forward(self, x: torch.Tensor, *, start: int = 0, stop: int | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Layers ``start:stop``; ``key_mask`` ``(batch, tokens)`` bool: tokens that exist."""
        return self.net(x, start=start, stop=stop, key_mask=key_mask)
