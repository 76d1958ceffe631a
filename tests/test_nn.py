from __future__ import annotations

import math

import pytest
import torch

from canal import pp
from canal.nn import CanalNet, ModelConfig, load_scbert_state_dict
from tests.conftest import TINY


@pytest.fixture
def tokens(baron, panel):
    return pp.bin_tokens(pp.prepare(baron[:12], panel))


def test_forward_shapes_and_batch_independence(tokens):
    net = CanalNet(TINY.replace(n_genes=tokens.shape[1] - 1), n_classes=5).eval()
    with torch.no_grad():
        out = net(tokens)
        alone = net(tokens[3:4])
        mlm = net.mlm_logits(tokens)
    assert out.representation.shape == (12, TINY.rep_dim)
    assert out.logits.shape == (12, 5)
    assert mlm.shape == (12, tokens.shape[1], TINY.n_tokens)
    # one cell's output does not depend on the other cells in its batch
    torch.testing.assert_close(alone.logits[0], out.logits[3], rtol=1e-4, atol=1e-5)
    assert out.representation.std(0).sum() > 0  # real cells give different representations


def test_cached_prefix_equals_full_pass(tokens):
    net = CanalNet(TINY.replace(n_genes=tokens.shape[1] - 1, depth=3), n_classes=3).eval()
    with torch.no_grad():
        full = net(tokens)
        prefix = net.encode(tokens, stop=1)
        resumed = net(hidden=prefix, start=1)
    torch.testing.assert_close(resumed.logits, full.logits)


def test_grow_keeps_known_rows(tokens):
    net = CanalNet(TINY.replace(n_genes=tokens.shape[1] - 1), n_classes=3).eval()
    with torch.no_grad():
        before = net(tokens).logits
        net.head.grow(2)
        after = net(tokens).logits
    assert after.shape == (12, 5)
    torch.testing.assert_close(after[:, :3], before)


def test_seeded_construction_and_sizes():
    a, b = CanalNet(TINY.replace(n_genes=30)), CanalNet(TINY.replace(n_genes=30))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    paper = ModelConfig.paper()
    assert (paper.dim, paper.depth, paper.heads, paper.n_genes) == (200, 6, 10, 1000)
    with pytest.raises(ValueError, match="tokens per cell"):
        a(torch.zeros(2, 10, dtype=torch.long))


def _scbert_state_dict(n_genes: int, depth: int = 6, dim: int = 200, heads: int = 10,
                       dim_head: int = 64, n_tokens: int = 7) -> dict[str, torch.Tensor]:
    """A synthetic state dict with scBERT PerformerLM's key names and shapes (written by hand)."""
    g = torch.Generator().manual_seed(1)
    inner, nb = heads * dim_head, int(dim_head * math.log(dim_head))
    sd = {"token_emb.weight": (n_tokens, dim), "pos_emb.emb.weight": (n_genes + 1, dim),
          "norm.weight": (dim,), "norm.bias": (dim,),
          "to_out.weight": (n_tokens, dim), "to_out.bias": (n_tokens,)}
    for i in range(depth):
        for prefix in ("performer.net.layers", "performer.proj_updater.instance.layers"):
            p = f"{prefix}.{i}"
            sd |= {f"{p}.0.norm.weight": (dim,), f"{p}.0.norm.bias": (dim,),
                   f"{p}.0.fn.fast_attention.projection_matrix": (nb, dim_head),
                   f"{p}.0.fn.to_q.weight": (inner, dim), f"{p}.0.fn.to_k.weight": (inner, dim),
                   f"{p}.0.fn.to_v.weight": (inner, dim), f"{p}.0.fn.to_out.weight": (dim, inner),
                   f"{p}.0.fn.to_out.bias": (dim,),
                   f"{p}.1.norm.weight": (dim,), f"{p}.1.norm.bias": (dim,),
                   f"{p}.1.fn.fn.w1.weight": (dim * 4, dim), f"{p}.1.fn.fn.w1.bias": (dim * 4,),
                   f"{p}.1.fn.fn.w2.weight": (dim, dim * 4), f"{p}.1.fn.fn.w2.bias": (dim,)}
    return {k: torch.randn(*shape, generator=g) for k, shape in sd.items()}


def test_loads_scbert_keys_and_shapes():
    scbert_genes = [f"G{i}" for i in range(300)]
    panel = scbert_genes[50:150][::-1]
    sd = _scbert_state_dict(len(scbert_genes), depth=2)
    net = CanalNet(ModelConfig.paper(n_genes=len(panel), depth=2), n_classes=4)
    loaded = load_scbert_state_dict(net, {"model_state_dict": sd}, scbert_genes=scbert_genes,
                                    panel=panel)
    own = net.state_dict()
    encoder_keys = [k for k in sd if "proj_updater" not in k and k != "pos_emb.emb.weight"]
    for k in encoder_keys:
        assert torch.equal(own[k], sd[k]), k
    assert set(encoder_keys) <= set(loaded)
    # gene rows are picked by symbol, the extra token takes scBERT's last row
    torch.testing.assert_close(own["pos_emb.emb.weight"][0], sd["pos_emb.emb.weight"][149])
    torch.testing.assert_close(own["pos_emb.emb.weight"][-1], sd["pos_emb.emb.weight"][-1])
    with pytest.raises(ValueError, match="not in scBERT's gene list"):
        load_scbert_state_dict(net, sd, scbert_genes=scbert_genes, panel=["NOPE"] * 100)
    small = CanalNet(TINY.replace(n_genes=len(panel), depth=2))
    with pytest.raises(ValueError, match="ModelConfig.paper"):
        load_scbert_state_dict(small, sd, scbert_genes=scbert_genes, panel=panel)


def test_attention_kernel_matches_favor_formula_with_and_without_grad():
    # the fused, in-place kernel must equal FAVOR+'s textbook form, and give the same gradient
    from canal.nn.performer import (
        gaussian_orthogonal_random_matrix,
        linear_attention,
        softmax_kernel,
    )

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16, generator=gen) for _ in range(3))
    proj = gaussian_orthogonal_random_matrix(44, 16, generator=gen)

    def reference(q, k, v):
        def feats(x, query):
            norm, ratio = x.shape[-1] ** -0.25, proj.shape[0] ** -0.5
            dash = (norm * x) @ proj.T
            diag = (x * x).sum(-1, keepdim=True) * 0.5 * norm**2
            stab = dash.amax(-1, keepdim=True) if query else dash.amax((-1, -2), keepdim=True)
            return ratio * (torch.exp(dash - diag - stab.detach()) + 1e-4)
        qf, kf = feats(q, True), feats(k, False)
        d_inv = 1.0 / torch.einsum("...nd,...d->...n", qf, kf.sum(-2))
        return torch.einsum("...de,...nd,...n->...ne", kf.transpose(-1, -2) @ v, qf, d_inv)

    def fused(q, k, v):
        return linear_attention(softmax_kernel(q, proj, is_query=True),
                                softmax_kernel(k, proj, is_query=False), v)

    with torch.no_grad():
        torch.testing.assert_close(fused(q, k, v), reference(q, k, v))
    qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
    fused(qa, k, v).square().sum().backward()
    reference(qb, k, v).square().sum().backward()
    torch.testing.assert_close(qa.grad, qb.grad)
