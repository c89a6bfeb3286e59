"""ViT (issue 2): sizes against the paper, every position-embedding and pooling option,
the slide deck's sinusoid formulas, 2D resampling, attention outputs and the promised
configuration errors. Every expected value is computed independently in the test."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab import ConfigError, create_model
from vitlab.flops import count_params
from vitlab.models import VisionTransformer, load_resampled_state_dict, resample_abs_pos_embed
from vitlab.models.layers import POS_EMBED_KINDS
from vitlab.models.registry import resolve_name

D, HEADS, DEPTH, P = 32, 4, 2, 4


def tiny(**kw) -> VisionTransformer:
    cfg = dict(img_size=16, patch_size=P, in_chans=3, num_classes=3, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    cfg.update(kw)
    return VisionTransformer(**cfg).eval()


# ----------------------------------------------------------------------------- sizes
# ViT paper, Table 1: ViT-Base 86M, ViT-Large 307M, ViT-Huge 632M parameters.
@pytest.mark.parametrize("name, paper_millions", [("vit_b16", 86), ("vit_l16", 307), ("vit_h14", 632)])
def test_parameter_counts_match_the_paper(name, paper_millions):
    with torch.device("meta"):  # no memory, no init cost; shapes are all a count needs
        linear = create_model(name, num_classes=1000, img_size=224)
        pre_logits = create_model(name, num_classes=1000, img_size=224, head="mlp_tanh")
    n_linear, n_pre = count_params(linear), count_params(pre_logits)
    # The linear head is the fine-tuning head; the pre-training head adds the paper's pre-logits
    # layer (D x D + D, tanh). Table 1 rounds; both stay within 2%. ViT-L/16 computes 304.3M with
    # the linear head (305.4M with the pre-logits layer) against the table's 307M.
    assert abs(n_linear / 1e6 - paper_millions) / paper_millions < 0.02, n_linear
    assert abs(n_pre / 1e6 - paper_millions) / paper_millions < 0.02, n_pre
    width = linear.embed_dim
    assert n_pre - n_linear == width * width + width
    # an independent count from the architecture's formula (eq. 1-4), not from the modules:
    p = linear.patch_size[0]
    n = (224 // p) ** 2
    mlp = 4 * width
    per_block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) \
        + (width * mlp + mlp) + (mlp * width + width)
    expected = (3 * p * p * width + width) + width + (n + 1) * width + len(linear.blocks) * per_block \
        + 2 * width + (width * 1000 + 1000)
    assert n_linear == expected


def test_paper_spelling_is_an_alias():
    assert resolve_name("ViT-B/16") == "vit_b16"
    assert resolve_name("ViT-H/14") == "vit_h14"
    assert resolve_name("ViT-L/32") == "vit_l32"


# ----------------------------------------------------------------------------- every option
def _shuffle_patches(x: torch.Tensor, perm: torch.Tensor, p: int) -> torch.Tensor:
    """The same image with its p x p patches in another (raster) order."""
    b, c, h, w = x.shape
    gh, gw = h // p, w // p
    patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p, p)
    patches = patches[:, perm]
    return patches.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("pos", POS_EMBED_KINDS)
def test_every_position_embedding_and_pooling_runs_forward_and_backward(pos, pool):
    model = tiny(pos_embed=pos, global_pool=pool, dynamic_img_size=True).train()
    learned = [n for n, p in model.named_parameters()
               if n.startswith(("pos_embed", "cls_pos")) or n.startswith("rel_pos")]
    assert bool(learned) == (pos in ("learned", "learned_2d", "relative"))
    for size in [(16, 16), (24, 20)]:  # the built size and a second, non-square one
        model.zero_grad(set_to_none=True)
        x = torch.randn(2, 3, *size)
        out = model(x)
        assert out.shape == (2, 3)
        out.square().sum().backward()
        for n, p in model.named_parameters():
            if n.startswith("rel_pos") and n.endswith("prefix") and pool == "avg":
                continue
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        for n in learned:  # position tables are trained, also when resampled to the second size
            if n.endswith("prefix") or (n.startswith(f"rel_pos.{DEPTH - 1}.") and pool == "token"):
                continue  # (the last layer's patch-patch bias cannot reach the class token's output)
            assert model.get_parameter(n).grad.abs().sum() > 0, n

    # Position information is what the option adds: without it the model cannot tell a
    # shuffled image from the original; with it, it can.
    model.eval()
    with torch.no_grad():
        for n in learned:  # make the (0.02-scale) learned tables matter at float32 precision
            model.get_parameter(n).mul_(20)
        x = torch.randn(2, 3, 16, 16)
        perm = torch.randperm(16)
        pooled = [model.forward_head(model.forward_features(img), pre_logits=True)  # normalised: O(1)
                  for img in (x, _shuffle_patches(x, perm, P))]
    # (at random init attention is near uniform, so position matters only weakly: the changes
    # are ~1e-3, still far above the float32 round-off that bounds the 'none' case)
    if pos == "none":
        torch.testing.assert_close(pooled[0], pooled[1], atol=1e-5, rtol=1e-5)
    else:
        assert (pooled[0] - pooled[1]).abs().max() > 1e-4


def test_dropout_and_stochastic_depth_options_are_active_in_training_only():
    model = tiny(drop_rate=0.3, attn_drop_rate=0.3, drop_path_rate=0.5, pos_drop_rate=0.2)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))
    assert [b.drop_path.p for b in model.blocks] == [0.0, 0.5]  # linear rule over depth


def test_head_options():
    model = tiny(head="mlp_tanh", representation_size=48, head_zero_init=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        pooled = model.forward_features(x)[:, 0]
        w, b = model.pre_logits[0].weight, model.pre_logits[0].bias
        torch.testing.assert_close(feats, torch.tanh(pooled @ w.T + b))
        assert feats.shape == (2, 48)
        assert torch.count_nonzero(model(x)) == 0  # zero-initialised head
    model.reset_classifier(7)
    assert model.head.in_features == D and isinstance(model.pre_logits, torch.nn.Identity)
    assert torch.count_nonzero(model.head.weight) == 0


# ----------------------------------------------------------------------------- sinusoids
def _slide_sincos_1d(n: int, dim: int) -> torch.Tensor:
    """Slide deck p.78: PE(x, 2i) = sin(x / 10000^(2i/D)), PE(x, 2i+1) = cos(x / 10000^(2i/D))."""
    out = torch.empty(n, dim, dtype=torch.float64)
    for x in range(n):
        for i in range(dim // 2):
            out[x, 2 * i] = math.sin(x / 10000 ** (2 * i / dim))
            out[x, 2 * i + 1] = math.cos(x / 10000 ** (2 * i / dim))
    return out


def _slide_sincos_2d(gh: int, gw: int, dim: int) -> torch.Tensor:
    """Slide deck p.86: PE(x, y, 2i) = sin(x / 10000^(4i/D)), PE(x, y, 2i+1) = cos(...),
    PE(x, y, 2j + D/2) = sin(y / 10000^(4j/D)), PE(x, y, 2j+1+D/2) = cos(...), i, j < D/4;
    x is the patch's column, y its row, patches in raster order (row by row)."""
    out = torch.empty(gh * gw, dim, dtype=torch.float64)
    for y in range(gh):
        for x in range(gw):
            n = y * gw + x
            for i in range(dim // 4):
                w = 10000 ** (4 * i / dim)
                out[n, 2 * i], out[n, 2 * i + 1] = math.sin(x / w), math.cos(x / w)
                out[n, 2 * i + dim // 2], out[n, 2 * i + 1 + dim // 2] = math.sin(y / w), math.cos(y / w)
    return out


def test_sincos_1d_matches_the_slide_formula():
    torch.testing.assert_close(vitlab.models.sincos_1d(50, 24).double(), _slide_sincos_1d(50, 24),
                               atol=1e-6, rtol=0)
    model = tiny(img_size=(12, 20), pos_embed="sincos_1d")  # grid 3 x 5: x is the patch index
    pe = model.position_embedding(model.grid_size)[0].double()
    torch.testing.assert_close(pe, _slide_sincos_1d(15, D), atol=1e-6, rtol=0)


def test_sincos_2d_matches_the_slide_formula():
    torch.testing.assert_close(vitlab.models.sincos_2d((3, 5), 16).double(), _slide_sincos_2d(3, 5, 16),
                               atol=1e-6, rtol=0)
    model = tiny(img_size=(12, 20), pos_embed="sincos_2d")
    pe = model.position_embedding(model.grid_size)[0].double()
    torch.testing.assert_close(pe, _slide_sincos_2d(3, 5, D), atol=1e-6, rtol=0)
    # the model adds exactly that table to the patch embeddings and nothing to the class token
    z0 = model.embed_tokens(torch.zeros(1, 15, D), (3, 5))
    torch.testing.assert_close(z0[0, 1:].double(), _slide_sincos_2d(3, 5, D), atol=1e-6, rtol=0)
    torch.testing.assert_close(z0[0, 0], model.cls_token[0, 0])
    # at another size (dynamic) the table is recomputed for the new grid, not resampled
    model2 = tiny(img_size=(12, 20), pos_embed="sincos_2d", dynamic_img_size=True)
    torch.testing.assert_close(model2.position_embedding((4, 2))[0].double(), _slide_sincos_2d(4, 2, D),
                               atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- resampling
def test_resampling_to_the_same_grid_is_the_identity():
    pe = torch.randn(1, 1 + 3 * 5, 8)
    assert torch.equal(resample_abs_pos_embed(pe, (3, 5), (3, 5), 1), pe)
    for pos in ("learned", "learned_2d", "relative"):
        model = tiny(pos_embed=pos)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.set_input_size(16)
        after = model.state_dict()
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), (pos, k)


def _row_col_functions(gh, gw, dim):
    """A table that is a smooth function of the row only, and one of the column only."""
    f = torch.stack([torch.linspace(-1, 1, gh) * (k + 1) + 0.3 * torch.linspace(-1, 1, gh) ** 2
                     for k in range(dim)], dim=1)  # (gh, dim)
    g = torch.stack([torch.cos(torch.linspace(0, 2, gw) * (k + 1)) for k in range(dim)], dim=1)  # (gw, dim)
    row_only = f[:, None, :].expand(gh, gw, dim)
    col_only = g[None, :, :].expand(gh, gw, dim)
    return row_only, col_only


def _assert_row_only(grid_table: torch.Tensor):
    """(gh, gw, dim): constant along each row (up to float32 round-off), varying down the rows."""
    scale = grid_table.abs().max()
    assert (grid_table - grid_table[:, :1]).abs().max() < 1e-6 * scale
    assert (grid_table[1:, 0] - grid_table[:-1, 0]).abs().max() > 1e-2 * scale


def _assert_col_only(grid_table: torch.Tensor):
    scale = grid_table.abs().max()
    assert (grid_table - grid_table[:1]).abs().max() < 1e-6 * scale
    assert (grid_table[0, 1:] - grid_table[0, :-1]).abs().max() > 1e-2 * scale


def test_resampling_keeps_the_2d_structure_on_non_square_grids():
    # A row/column transpose (or a square-grid assumption) turns a row-only table into one
    # that varies along the columns; these checks would catch it.
    gh, gw, new = 3, 5, (6, 7)
    row_only, col_only = _row_col_functions(gh, gw, 8)
    for table, check in ((row_only, _assert_row_only), (col_only, _assert_col_only)):
        cls = torch.randn(1, 1, 8)
        pe = torch.cat([cls, table.reshape(1, gh * gw, 8)], dim=1)
        out = resample_abs_pos_embed(pe, new, (gh, gw), num_prefix_tokens=1)
        assert out.shape == (1, 1 + 6 * 7, 8)
        assert torch.equal(out[:, :1], cls)  # class token left alone
        check(out[0, 1:].reshape(*new, 8))
        # and downsampling too
        small = resample_abs_pos_embed(pe, (2, 4), (gh, gw), num_prefix_tokens=1)
        check(small[0, 1:].reshape(2, 4, 8))
    # upsampling a linear ramp down the rows keeps it increasing down the rows
    ramp = torch.arange(gh, dtype=torch.float32)[:, None, None].expand(gh, gw, 1).reshape(1, -1, 1)
    up = resample_abs_pos_embed(ramp, (9, 5), (gh, gw), num_prefix_tokens=0)[0, :, 0].reshape(9, 5)
    assert (up[1:, 0] >= up[:-1, 0]).all() and up[0, 0] < up[-1, 0]


def test_set_input_size_keeps_the_2d_structure():
    # learned (1D table resampled in 2D) on a non-square grid
    model = tiny(img_size=(12, 20))  # grid 3 x 5
    row_only, _ = _row_col_functions(3, 5, D)
    with torch.no_grad():
        model.pos_embed[0, 1:] = row_only.reshape(15, D)
    model.set_input_size((24, 28))
    assert model.grid_size == (6, 7) and model.pos_embed.shape == (1, 1 + 42, D)
    _assert_row_only(model.pos_embed[0, 1:].detach().reshape(6, 7, D))
    assert model(torch.randn(1, 3, 24, 28)).shape == (1, 3)
    # learned_2d: the row table is resampled along the rows, the column table along the columns
    model = tiny(img_size=(12, 20), pos_embed="learned_2d")
    with torch.no_grad():
        model.pos_embed_col.zero_()
        model.pos_embed_row.copy_(torch.linspace(-1, 1, 3)[:, None] * torch.arange(1, D // 2 + 1))
    model.set_input_size((24, 28))
    assert model.pos_embed_row.shape == (6, D // 2) and model.pos_embed_col.shape == (7, D // 2)
    _assert_row_only(model.position_embedding((6, 7))[0].detach().reshape(6, 7, D))
    # relative: the bias table has one entry per offset (2*gh - 1, 2*gw - 1)
    model = tiny(img_size=(12, 20), pos_embed="relative")
    model.set_input_size((24, 28))
    assert model.rel_pos[0].table.shape == (HEADS, 11, 13)


@pytest.mark.parametrize("pos", ["learned", "learned_2d", "relative"])
def test_a_state_dict_saved_at_one_grid_loads_into_a_model_at_another(pos):
    small = tiny(pos_embed=pos, dynamic_img_size=True)  # trained at 16 px: grid 4 x 4
    big = tiny(pos_embed=pos, img_size=24)  # fine-tuned at 24 px: grid 6 x 6
    with torch.no_grad():
        for p in small.parameters():
            p.normal_(0, 0.3)
    with pytest.raises(RuntimeError):
        big.load_state_dict(small.state_dict())  # plain loading fails on the position tables
    load_resampled_state_dict(big, small.state_dict())
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        # the dynamic model resamples on the fly with the same function: same network
        torch.testing.assert_close(big(x), small(x), atol=1e-5, rtol=1e-5)
    if pos == "learned":
        assert torch.equal(big.pos_embed[:, :1], small.pos_embed[:, :1])


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("pos, pool", [("learned", "token"), ("relative", "token"), ("sincos_2d", "avg")])
def test_returned_attention_is_a_distribution_and_matches_the_fused_path(pos, pool):
    model = tiny(pos_embed=pos, global_pool=pool, img_size=(16, 12))
    x = torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        out = model.forward_intermediates(x)
        logits = model(x)
    n = 12 + model.num_prefix_tokens
    assert len(out["attentions"]) == DEPTH and len(out["hidden_states"]) == DEPTH + 1
    assert out["grid"] == (4, 3)
    for a in out["attentions"]:
        assert a.shape == (2, HEADS, n, n)
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(2, HEADS, n), atol=1e-5, rtol=0)
    # the explicit softmax path computes the same function as the fused SDPA path
    torch.testing.assert_close(out["logits"], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["tokens"], model.forward_features(x), atol=1e-5, rtol=1e-5)
    # and the probabilities are softmax(q k^T / sqrt(d) + bias) of each layer's input, recomputed here
    hd = D // HEADS
    for layer, (blk, z, a) in enumerate(zip(model.blocks, out["hidden_states"], out["attentions"])):
        with torch.no_grad():
            h = F.layer_norm(z, (D,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
            w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
            q = (h @ w[:D].T + b[:D]).reshape(2, n, HEADS, hd).transpose(1, 2)
            k = (h @ w[D:2 * D].T + b[D:2 * D]).reshape(2, n, HEADS, hd).transpose(1, 2)
            logits_qk = q @ k.transpose(-1, -2) / math.sqrt(hd)
            if pos == "relative":
                logits_qk = logits_qk + model.rel_pos[layer](out["grid"])
        torch.testing.assert_close(a, logits_qk.softmax(-1), atol=1e-5, rtol=1e-5)
    # hidden states chain: z_L after the final LayerNorm is the returned token sequence
    torch.testing.assert_close(model.norm(out["hidden_states"][-1]), out["tokens"])


# ----------------------------------------------------------------------------- errors
def test_image_size_not_divisible_by_the_patch_size():
    with pytest.raises(ConfigError, match=r"not divisible by the patch size.*multiple of 4"):
        tiny(img_size=30)
    with torch.device("meta"), pytest.raises(ConfigError, match="not divisible by the patch size"):
        create_model("vit_b16", img_size=100)
    model = tiny()
    with pytest.raises(ConfigError, match="not divisible by the patch size"):
        model.set_input_size(18)


def test_width_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"width 64 is not divisible by num_heads=5"):
        create_model("vit_nano_p2", num_heads=5)


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"unknown model 'vit_b61'.*Did you mean:.*vit_b16"):
        create_model("vit_b61")
    with pytest.raises(ConfigError, match=r"vitlab models"):
        create_model("resnet9000x")


def test_unknown_override_key_names_the_key_and_the_closest_option():
    with pytest.raises(ConfigError, match=r"no option 'pos_embd'.*Did you mean:.*pos_embed"):
        create_model("vit_nano_p2", pos_embd="learned")


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(pos_embed="sincos"), r"pos_embed='sincos' is not valid.*sincos_1d.*sincos_2d"),
    (dict(global_pool="gap"), r"global_pool='gap' is not valid.*token, avg"),
    (dict(head="mlp"), r"head='mlp' is not valid.*mlp_tanh"),
    (dict(global_pool="token", class_token=False), r"class_token=False.*global_pool='avg'"),
    (dict(pos_embed="learned_2d", embed_dim=27, num_heads=3), r"learned_2d.*odd"),
    (dict(pos_embed="sincos_2d", embed_dim=30, num_heads=3), r"divisible by 4"),
    (dict(drop_path_rate=1.0), r"drop_path_rate=1.0 must be in \[0, 1\)"),
    (dict(depth=0), r"depth must be a positive integer"),
])
def test_bad_options_raise_config_errors(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny(**kwargs)
    assert issubclass(ConfigError, ValueError)


def test_wrong_input_at_run_time():
    model = tiny()
    with pytest.raises(ConfigError, match=r"3-channel images but got 1 channels.*in_chans=1"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ConfigError, match=r"built for 16x16 images but got 20x20.*set_input_size.*dynamic_img_size"):
        model(torch.randn(1, 3, 20, 20))
    with pytest.raises(ConfigError, match=r"expected images of shape"):
        model(torch.randn(3, 16, 16))
    dynamic = tiny(dynamic_img_size=True)
    with pytest.raises(ConfigError, match=r"input 18x16 is not divisible by the patch size"):
        dynamic(torch.randn(1, 3, 18, 16))


@pytest.mark.parametrize("kw", [{}, {"pos_embed": "relative"}, {"drop_path_rate": 0.2}, {"grad_checkpointing": True}])
def test_class_token_forward_equals_the_full_encoder_in_value_and_gradient(kw):
    """`forward` runs the last block for the class token only; in float64 its logits and every
    parameter's gradient equal those of the head on the full encoder's output (forward_features)."""
    kw = dict(kw)
    ckpt = kw.pop("grad_checkpointing", False)
    model = create_model("vit_nano_p2", num_classes=5, img_size=8, depth=3, **kw).double().train()
    if ckpt:
        model.set_grad_checkpointing(True)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    params = list(model.parameters())
    torch.manual_seed(7)  # the same stochastic-depth draws on both paths
    fast_logits = model(x)
    g_fast = torch.autograd.grad(fast_logits.square().sum(), params)
    torch.manual_seed(7)
    ref_logits = model.forward_head(model.forward_features(x))
    g_ref = torch.autograd.grad(ref_logits.square().sum(), params)
    assert fast_logits.shape == (3, 5)
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-10, atol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
