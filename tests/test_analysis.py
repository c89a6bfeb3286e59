"""Known-answer tests of the analysis functions (attention distance, rollout, position-embedding
similarity, filter PCA, CvT geometry, ConvMixer kernels). Expected values are computed here
independently: explicit loops over positions, hand arithmetic, numpy's SVD."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import vitlab
from vitlab.analysis import (attention_distance, attention_rollout, collect_attentions, depthwise_kernels,
                             embedding_filter_components, pos_embed_similarity)
from vitlab.errors import ConfigError
from vitlab.models.layers import sincos_1d, sincos_2d


def centres(gh, gw, sy, sx, oy=None, ox=None):
    oy = sy / 2 if oy is None else oy
    ox = sx / 2 if ox is None else ox
    return [(oy + i * sy, ox + j * sx) for i in range(gh) for j in range(gw)]


# --------------------------------------------------------------------------- attention distance
@pytest.mark.parametrize("prefix", [0, 1])
def test_identity_attention_has_distance_zero(prefix):
    n = prefix + 3 * 4
    attn = torch.eye(n).expand(2, 5, n, n)
    d = attention_distance(attn, (3, 4), 8, num_prefix_tokens=prefix)
    assert d.shape == (2, 5)
    assert torch.allclose(d, torch.zeros(2, 5), atol=1e-6)


@pytest.mark.parametrize("grid,patch", [((3, 3), 4), ((2, 5), 16), ((4, 4), 1)])
def test_uniform_attention_gives_mean_pairwise_distance(grid, patch):
    gh, gw = grid
    pts = centres(gh, gw, patch, patch)
    # closed form, independently: mean over all ordered pairs (with self-pairs) of the distance
    expected = sum(math.dist(a, b) for a, b in itertools.product(pts, pts)) / len(pts) ** 2
    n = gh * gw
    attn = torch.full((n, n), 1.0 / n)
    assert attention_distance(attn, grid, patch).item() == pytest.approx(expected, rel=1e-5)
    # with a class token holding half of every row: renormalisation makes it the same answer
    attn_p = torch.full((n + 1, n + 1), 0.5 / n)
    attn_p[:, 0] = 0.5
    assert attention_distance(attn_p, grid, patch, num_prefix_tokens=1).item() == pytest.approx(expected, rel=1e-5)


def test_prefix_tokens_dropped_and_rows_renormalised_by_hand():
    # grid 1x2, patches 10 px: centres (5, 5) and (5, 15), 10 px apart
    attn = torch.tensor([[0.9, 0.05, 0.05],   # class token's row: ignored
                         [0.5, 0.25, 0.25],   # patch 0 -> renormalised (0.5, 0.5): 0.5 * 10 = 5
                         [0.2, 0.6, 0.2]])    # patch 1 -> (0.75, 0.25): 0.75 * 10 = 7.5
    assert attention_distance(attn, (1, 2), 10, num_prefix_tokens=1).item() == pytest.approx((5 + 7.5) / 2)


def test_rectangular_patches_use_height_for_rows():
    # grid 2 rows x 1 column, patch 4 px tall and 8 px wide: the two centres are 4 px apart
    attn = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert attention_distance(attn, (2, 1), (4, 8)).item() == pytest.approx(4.0)
    attn3 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert attention_distance(attn3, (1, 2), (4, 8)).item() == pytest.approx(8.0)


def test_wrong_shape_is_a_clear_error():
    with pytest.raises(ConfigError, match="does not match"):
        attention_distance(torch.eye(10), (3, 3), 4)


# --------------------------------------------------------------------------- CvT: coarser key grid
def test_coarser_key_grid_by_hand():
    # queries: 2x2 grid of 4 px tokens, centres (2,2) (2,6) (6,2) (6,6); one key on a 1x1 grid of 8 px
    attn = torch.ones(4, 1)
    cell_centred = attention_distance(attn, (2, 2), 4, kv_grid_size=(1, 1), kv_patch_size=8)
    assert cell_centred.item() == pytest.approx(2 * math.sqrt(2))  # key at (4, 4)
    # a 3x3 stride-2 conv with padding 1 centres key 0 on query 0, at (2, 2)
    conv = attention_distance(attn, (2, 2), 4, kv_grid_size=(1, 1), kv_patch_size=8, kv_offset_px=2)
    assert conv.item() == pytest.approx((0 + 4 + 4 + 4 * math.sqrt(2)) / 4)


def test_coarser_key_grid_uniform_matches_loops():
    q = centres(4, 3, 4, 4)
    k = centres(2, 2, 8, 8, 2, 2)
    expected = sum(math.dist(a, b) for a in q for b in k) / (len(q) * len(k))
    attn = torch.full((1 + 12, 1 + 4), 1.0 / 5)  # with a class token in both
    got = attention_distance(attn, (4, 3), 4, 1, kv_grid_size=(2, 2), kv_patch_size=8, kv_offset_px=(2, 2))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_cvt_collect_uses_the_coarse_key_grid():
    model = vitlab.create_model("cvt_tiny", num_classes=3, img_size=28, in_chans=1)
    x = torch.randn(2, 1, 28, 28)
    stats = collect_attentions(model, x, batch_size=2)
    with torch.no_grad():
        model.eval()
        out = model.forward_intermediates(x)
    # stage 1 of cvt_tiny: 3x3/2 token embedding -> 14x14 queries 2 px apart; keys via 3x3 stride-2
    # conv (padding 1) -> 7x7, key j centred on query 2j, i.e. at pixel 1 + 4j
    a = out["attentions"][0].double()  # (B, 1, 196, 49)
    assert a.shape[-2:] == (196, 49)
    q = np.array(centres(14, 14, 2, 2))
    k = np.array(centres(7, 7, 4, 4, 1, 1))
    dist = np.sqrt(((q[:, None, :] - k[None, :, :]) ** 2).sum(-1))
    expected = (a.numpy() * dist).sum(-1).mean(-1).mean(0)  # mean over queries then images
    assert stats.distance[0].numpy() == pytest.approx(expected, rel=1e-4)
    assert stats.stage == [0, 1, 2, 2]
    assert stats.rollout is None and stats.cls_attention.shape == (2, 2, 2)  # last stage's 2x2 key grid


# --------------------------------------------------------------------------- rollout
def test_rollout_two_layers_by_hand():
    a1 = torch.tensor([[0.2, 0.4, 0.4], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a2 = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    # A1' = [[.6,.2,.2],[0,1,0],[0,0,1]], A2' = [[.5,.5,0],[.25,.75,0],[0,.25,.75]]
    # R = A2' A1', row 0 = .5*[.6,.2,.2] + .5*[0,1,0] = [.3, .6, .1] -> map over patches [.6, .1]
    m = attention_rollout([a1[None, None], a2[None, None]], num_prefix_tokens=1, grid_size=(1, 2))
    assert m.shape == (1, 1, 2)
    assert m.flatten().tolist() == pytest.approx([0.6, 0.1])


def test_rollout_without_class_token_averages_patch_rows():
    a = torch.tensor([[0.5, 0.5], [0.0, 1.0]])  # A' = [[.75,.25],[0,1]] -> column means [.375, .625]
    m = attention_rollout([a[None, None]], num_prefix_tokens=0, grid_size=(1, 2))
    assert m.flatten().tolist() == pytest.approx([0.375, 0.625])


def test_rollout_head_fusion_by_hand():
    h1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    h2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    a = torch.stack([h1, h2])[None]  # (1, 2 heads, 2, 2)
    # max: [[1,1],[0,1]] -> .5A + .5I = [[1,.5],[0,1]] -> rows [[2/3,1/3],[0,1]] -> [1/3, 2/3]
    assert attention_rollout([a], 0, "max", grid_size=(1, 2)).flatten().tolist() == pytest.approx([1 / 3, 2 / 3])
    # min: [[0,0],[0,1]] -> [[.5,0],[0,1]] -> rows [[1,0],[0,1]] -> [.5, .5]
    assert attention_rollout([a], 0, "min", grid_size=(1, 2)).flatten().tolist() == pytest.approx([0.5, 0.5])
    # mean: [[.5,.5],[0,1]] -> [[.75,.25],[0,1]] -> [.375, .625]
    assert attention_rollout([a], 0, "mean", grid_size=(1, 2)).flatten().tolist() == pytest.approx([0.375, 0.625])
    with pytest.raises(ConfigError, match="head_fusion"):
        attention_rollout([a], 0, "median")


def test_rollout_discard_keeps_class_token_paths():
    a1 = torch.tensor([[0.2, 0.4, 0.4], [0.1, 0.6, 0.3], [0.3, 0.1, 0.6]])
    a2 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # discard 50% of the 4 patch-to-patch weights (0.3 and 0.1); the class column's 0.1 stays:
    # A1 -> [[.2,.4,.4],[.1,.6,0],[.3,0,.6]]; A1' rows: [.6,.2,.2], [.05,.8,0]/.85, [.15,0,.8]/.95
    # A2' = [[.5,.5,0],[0,1,0],[0,0,1]]; R row 0 = .5*A1'[0] + .5*A1'[1]
    m = attention_rollout([a1[None, None], a2[None, None]], 1, discard_ratio=0.5, grid_size=(1, 2))
    assert m.flatten().tolist() == pytest.approx([0.1 + 0.4 / 0.85, 0.1])


def test_rollout_infers_square_grid_and_batches():
    a = torch.softmax(torch.randn(3, 2, 17, 17), -1)
    m = attention_rollout([a, a], 1)
    assert m.shape == (3, 4, 4)
    # batched == one image at a time
    assert torch.allclose(m[1], attention_rollout([a[1:2], a[1:2]], 1)[0], atol=1e-6)


# --------------------------------------------------------------------------- collect_attentions
def test_collect_attentions_matches_per_image_computation():
    model = vitlab.create_model("vit_nano_p2", num_classes=4, img_size=8, in_chans=1)
    model.train()
    imgs = (torch.rand(5, 1, 8, 8) * 255).to(torch.uint8)
    stats = collect_attentions(model, imgs, batch_size=2, mean=[0.3], std=[0.2])
    assert model.training  # state restored
    model.eval()
    per_image, maps = [], []
    with torch.no_grad():
        for i in range(5):
            x = (imgs[i:i + 1].float() / 255 - 0.3) / 0.2
            out = model.forward_intermediates(x)
            per_image.append(torch.stack([attention_distance(a, (4, 4), 2, 1)[0] for a in out["attentions"]]))
            maps.append(attention_rollout(out["attentions"], 1, grid_size=(4, 4)))
    assert torch.allclose(stats.distance_matrix(), torch.stack(per_image).mean(0), atol=1e-5)
    assert torch.allclose(stats.rollout, torch.cat(maps), atol=1e-6)
    assert stats.logits.shape == (5, 4) and stats.num_images == 5


def test_collect_attentions_rejects_models_without_attention():
    model = vitlab.create_model("convmixer_256_8", num_classes=3, img_size=8, in_chans=1)
    with pytest.raises(ConfigError, match="no attention"):
        collect_attentions(model, torch.zeros(1, 1, 8, 8))


# --------------------------------------------------------------------------- position embeddings
def _anisotropic_sinusoid(gh, gw, dim):
    """Columns encoded at unit spacing, rows at 3x the spacing: a row step moves the embedding
    further than a column step, so horizontal neighbours are the most similar."""
    ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    tx = sincos_1d(gw, dim // 2)[xs.reshape(-1)]
    ty = sincos_1d(3 * gh, dim // 2)[3 * ys.reshape(-1)]
    return torch.cat([tx, ty], dim=1)


def test_pos_similarity_of_2d_sinusoid_on_a_non_square_grid():
    gh, gw, dim = 3, 5, 64
    model = vitlab.create_model("vit_nano_p2", num_classes=2, img_size=(2 * gh, 2 * gw), in_chans=1, embed_dim=dim)
    with torch.no_grad():
        model.pos_embed[0, 1:] = _anisotropic_sinusoid(gh, gw, dim)
        model.pos_embed[0, 0] = 5.0  # class token's entry must be left out
    sim = pos_embed_similarity(model)
    assert sim.shape == (gh, gw, gh, gw)
    for i, j in itertools.product(range(gh), range(gw)):
        panel = sim[i, j].clone()
        assert panel[i, j] == pytest.approx(1.0, abs=1e-5)
        assert panel.flatten().argmax().item() == i * gw + j  # each panel peaks at its own patch
        panel[i, j] = -2
        r, c = divmod(panel.flatten().argmax().item(), gw)
        assert r == i and abs(c - j) == 1, f"nearest neighbour of ({i},{j}) is ({r},{c})"  # same row, next column
    # similarity falls with distance along a row and a column
    assert sim[1, 0, 1, 1] > sim[1, 0, 1, 2] > sim[1, 0, 1, 4]
    assert sim[0, 2, 1, 2] > sim[0, 2, 2, 2]
    # and a row step costs more than a column step (would flip if rows/columns were swapped)
    assert sim[1, 2, 1, 3] > sim[1, 2, 2, 2]


def test_pos_similarity_learned_1d_equals_fixed_sincos_2d():
    kw = dict(num_classes=2, img_size=(6, 10), in_chans=1, embed_dim=32)
    learned = vitlab.create_model("vit_nano_p2", pos_embed="learned", **kw)
    fixed = vitlab.create_model("vit_nano_p2", pos_embed="sincos_2d", **kw)
    with torch.no_grad():
        learned.pos_embed[0, 1:] = sincos_2d((3, 5), 32)
    assert torch.allclose(pos_embed_similarity(learned), pos_embed_similarity(fixed), atol=1e-6)


def test_pos_similarity_learned_2d_and_sincos_1d():
    m2 = vitlab.create_model("vit_nano_p2", num_classes=2, img_size=(6, 10), in_chans=1, embed_dim=32,
                             pos_embed="learned_2d")
    with torch.no_grad():
        m2.pos_embed_col.copy_(sincos_1d(5, 16))
        m2.pos_embed_row.copy_(sincos_1d(3, 16) * 0)  # rows carry nothing: all rows identical
    sim = pos_embed_similarity(m2)
    assert sim.shape == (3, 5, 3, 5)
    # patches in the same column are identical, whatever the row
    assert torch.allclose(sim[0, 1, 2, 1], torch.tensor(1.0), atol=1e-6)
    assert sim[0, 1, 2, 2] < 0.999
    m1 = vitlab.create_model("vit_nano_p2", num_classes=2, img_size=(6, 10), in_chans=1, embed_dim=32,
                             pos_embed="sincos_1d")
    s1 = pos_embed_similarity(m1).reshape(15, 15)
    # 1D sinusoid over the raster order: similarity depends on |index difference| only
    assert s1[3, 4] == pytest.approx(s1[10, 11].item(), abs=1e-5)
    assert s1[0, 1] > s1[0, 5]


@pytest.mark.parametrize("kind", ["none", "relative"])
def test_pos_similarity_without_absolute_embeddings_says_so(kind):
    model = vitlab.create_model("vit_nano_p2", num_classes=2, pos_embed=kind)
    with pytest.raises(ConfigError, match="no absolute position embeddings"):
        pos_embed_similarity(model)
    with pytest.raises(ConfigError, match="no absolute position embeddings"):
        pos_embed_similarity(vitlab.create_model("cvt_tiny", num_classes=2))


# --------------------------------------------------------------------------- filter PCA
def test_filter_components_match_numpy_svd_and_are_orthonormal():
    w = torch.randn(40, 3, 4, 4) * torch.linspace(0.2, 2.0, 48).reshape(1, 3, 4, 4)
    fc = embedding_filter_components(w, k=28)
    comps = fc.components.reshape(28, -1).double()
    assert torch.allclose(comps @ comps.T, torch.eye(28, dtype=torch.float64), atol=1e-5)
    x = w.reshape(40, -1).double().numpy()
    x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    ratio = s ** 2 / (s ** 2).sum()
    assert fc.explained_variance_ratio.numpy() == pytest.approx(ratio[:28], rel=1e-4, abs=1e-7)
    assert np.abs((comps.numpy() * vt[:28]).sum(1)) == pytest.approx(np.ones(28), abs=1e-5)  # same up to sign
    full = embedding_filter_components(w, k=1000)
    assert full.components.shape[0] == 40  # at most min(D, C*p*p) components
    assert float(full.explained_variance_ratio.sum()) == pytest.approx(1.0, abs=1e-5)
    assert fc.explained_variance.numpy() == pytest.approx(s[:28] ** 2 / 39, rel=1e-4)


def test_filter_components_recover_planted_directions():
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(12, 2, generator=g, dtype=torch.float64))
    coef = torch.randn(500, 2, generator=g, dtype=torch.float64)
    coef = (coef - coef.mean(0)) / coef.std(0) * torch.tensor([3.0, 1.0], dtype=torch.float64)
    coef, _ = torch.linalg.qr(coef)  # exactly uncorrelated coefficients ...
    coef = coef * torch.tensor([3.0, 1.0], dtype=torch.float64)  # ... with variances 9 : 1
    w = (coef @ basis.T).float().reshape(500, 3, 2, 2)
    fc = embedding_filter_components(w, k=2)
    assert fc.explained_variance_ratio.tolist() == pytest.approx([0.9, 0.1], abs=1e-4)
    got = fc.components.reshape(2, -1).double()
    assert abs(float(got[0] @ basis[:, 0])) == pytest.approx(1.0, abs=1e-4)
    assert abs(float(got[1] @ basis[:, 1])) == pytest.approx(1.0, abs=1e-4)


def test_filter_components_of_models():
    vit = vitlab.create_model("vit_nano_p2", num_classes=2)  # 64 filters of 3x2x2
    fc = embedding_filter_components(vit, k=28)
    assert fc.components.shape == (12, 3, 2, 2) and fc.num_filters == 64
    with pytest.raises(ConfigError, match="hybrid"):
        embedding_filter_components(vitlab.create_model("rsmall_vit_micro", num_classes=2))


# --------------------------------------------------------------------------- ConvMixer
def test_convmixer_depthwise_kernels_are_the_depthwise_conv_weights():
    model = vitlab.create_model("convmixer_256_8", num_classes=2, img_size=8, in_chans=1, dim=16, depth=3)
    dws = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 16]
    assert len(dws) == 3
    for layer in (0, 2, -1):
        k = depthwise_kernels(model, layer)
        assert k.shape == (16, 5, 5)
        assert torch.equal(k, dws[layer].weight[:, 0])
    with pytest.raises(ConfigError, match="out of range"):
        depthwise_kernels(model, 3)
    fc = embedding_filter_components(model, k=3)  # patch 2x2 on one channel: 4 dimensions
    assert fc.components.shape == (3, 1, 2, 2)
