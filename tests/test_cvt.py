"""CvT (Wu et al. 2021): sizes against the paper, equality with Hugging Face's independent
implementation after conversion, attention on request, every ablation switch, bad configs."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from vitlab.errors import ConfigError
from vitlab.flops import count_flops, count_params
from vitlab.models import create_model
from vitlab.models.cvt import ConvolutionalVisionTransformer, convert_hf_cvt


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: one intra-op thread is fastest and avoids thread contention on
    # a busy 2-core machine (restored afterwards for other test files)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


# ----------------------------------------------------------------------------- sizes
def _expected_params(dims, depths, kernels=(7, 3, 3), in_chans=3, num_classes=1000, mlp_ratio=4):
    """Parameter count written from the paper's description (not from the code):
    token embedding conv (k*k*C_in*D + D) + LayerNorm (2D); per block two LayerNorms (4D),
    q/k/v each a depthwise 3x3 conv without bias (9D) + BatchNorm (2D) + linear (D^2 + D),
    output projection (D^2 + D), MLP (D*4D + 4D + 4D*D + D); a class token (D) in the last
    stage; final LayerNorm (2D) and the classifier (D*classes + classes)."""
    total, c = 0, in_chans
    for i, (d, n) in enumerate(zip(dims, depths)):
        total += kernels[i] ** 2 * c * d + d + 2 * d
        block = 4 * d + 3 * (9 * d + 2 * d + d * d + d) + (d * d + d)
        block += d * mlp_ratio * d + mlp_ratio * d + mlp_ratio * d * d + d
        total += n * block
        c = d
    total += dims[-1]  # class token
    total += 2 * dims[-1] + dims[-1] * num_classes + num_classes
    return total


@pytest.mark.parametrize("name,alias,dims,depths,paper_m,paper_gmacs", [
    ("cvt_13", "CvT-13", (64, 192, 384), (1, 2, 10), 20.0, 4.5),
    ("cvt_21", "CvT-21", (64, 192, 384), (1, 4, 16), 32.0, 7.1),
    ("cvt_w24", "CvT-W24", (192, 768, 1024), (2, 2, 20), 277.0, 60.8),
])
def test_param_counts_and_flops_match_paper(name, alias, dims, depths, paper_m, paper_gmacs):
    # The paper's Table 2 counts include the 1000-way linear head and its final LayerNorm
    # (0.39M for CvT-13/21, 1.03M for CvT-W24): our counts include them too, no head excluded.
    with torch.device("meta"):
        model = create_model(name)
        by_alias = create_model(alias)
    n = count_params(model)
    assert n == count_params(by_alias)
    assert n == _expected_params(dims, depths)
    assert abs(n / 1e6 - paper_m) / paper_m < 0.02, n
    # the paper's "FLOPs" are multiply-adds; count_flops returns 2 x MACs
    gmacs = count_flops(model) / 2e9
    assert abs(gmacs - paper_gmacs) / paper_gmacs < 0.03, gmacs


# ----------------------------------------------------------------------------- Hugging Face
def _randomize(hf: nn.Module) -> None:
    """Move every parameter/buffer away from its trivial init so that a wrong mapping or a
    wrong op shows up in the logits (BatchNorm statistics, LayerNorm affine, attention
    sharpness, head scale)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for mod in hf.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0, 0.2)
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0, 0.2)
            elif isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.bias is not None:
                mod.bias.normal_(0, 0.05)
        for name, p in hf.named_parameters():
            if name.endswith("cls_token"):
                p.normal_(0, 1.0)
            elif name.endswith(("projection_query.weight", "projection_key.weight")):
                # sharp, non-uniform attention: keys and queries (and the scale) must be right
                p.normal_(0, 0.5)
        if hasattr(hf, "classifier"):
            hf.classifier.weight.normal_(0, 0.25)


# transformers indexes its per-layer drop-path list by the stage index, so stage i needs
# at least i + 1 layers to build at all: depths 1/2/3.
SMALL = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])


@pytest.mark.parametrize("name,overrides,sizes", [
    ("small", {}, (64, 48)),
    ("small_no_qkv_bias_gap", dict(qkv_bias=[False, True, False], cls_token=[False, False, False]), (64, 72)),
    ("small_kv_stride1", dict(stride_kv=[1, 2, 1]), (64, 56)),
    ("small_cls_in_stage2", dict(embed_dim=[16, 48, 48], num_heads=[2, 3, 4], cls_token=[False, True, True]),
     (64, 40)),
    ("cvt_13_real_config", {}, (224, 160)),
])
def test_logits_equal_hf_cvt(name, overrides, sizes):
    from transformers import CvtConfig, CvtForImageClassification

    torch.manual_seed(0)
    kwargs = dict(num_labels=11)
    if name != "cvt_13_real_config":
        kwargs.update(SMALL)
    kwargs.update(overrides)
    hf = CvtForImageClassification(CvtConfig(**kwargs)).eval()
    _randomize(hf)
    model = convert_hf_cvt(hf).eval()
    assert isinstance(model, ConvolutionalVisionTransformer)
    if name == "cvt_13_real_config":  # HF's default config is CvT-13: same size as our registered variant
        with torch.device("meta"):
            ref = create_model("cvt_13", num_classes=11)
        assert count_params(model) == count_params(ref)
    for size in sizes:
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            if hf.config.cls_token[-1]:
                want = hf(pixel_values=x).logits
            else:
                # transformers' classification forward fails without a last-stage class token
                # (it indexes a missing output); apply its head as written there: LayerNorm over
                # the final tokens, mean, classifier
                tokens = hf.cvt(pixel_values=x).last_hidden_state.flatten(2).transpose(1, 2)
                want = hf.classifier(hf.layernorm(tokens).mean(dim=1))
            got = model(x)
            got_attn = model.forward_intermediates(x)["logits"]
        assert want.std() > 0.1  # not a trivially small output
        assert (got - want).abs().max().item() < 1e-4, size
        assert (got_attn - want).abs().max().item() < 1e-4, size


def test_hf_cvt_model_without_head_gives_equal_hidden_states():
    from transformers import CvtConfig, CvtModel

    hf = CvtModel(CvtConfig(**SMALL)).eval()
    _randomize(hf)
    model = convert_hf_cvt(hf).eval()
    assert model.num_classes == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = hf(pixel_values=x)
        ours = model.forward_intermediates(x)["hidden_states"][-1]  # last block, before the final LayerNorm
    b, c, h, w = out.last_hidden_state.shape
    assert (ours[:, :1] - out.cls_token_value).abs().max() < 1e-4
    assert (ours[:, 1:] - out.last_hidden_state.flatten(2).transpose(1, 2)).abs().max() < 1e-4


def test_convert_rejects_unsupported_hf_config():
    from transformers import CvtConfig, CvtForImageClassification

    hf = CvtForImageClassification(CvtConfig(**SMALL, stride_q=[1, 2, 1]))
    with pytest.raises(ConfigError, match="stride_q"):
        convert_hf_cvt(hf)
    hf = CvtForImageClassification(CvtConfig(**SMALL, qkv_projection_method=["dw_bn", "avg", "dw_bn"]))
    with pytest.raises(ConfigError, match="qkv_projection_method"):
        convert_hf_cvt(hf)


# ----------------------------------------------------------------------------- attention
def test_attention_probabilities_shapes_and_fused_path():
    torch.manual_seed(0)
    model = create_model("cvt_13", num_classes=5).eval()
    with torch.no_grad():  # make BatchNorm non-trivial so the conv projection matters
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 96, 128)  # non-square: catches a height/width mix-up
    with torch.no_grad():
        fused = model(x)
        out = model.forward_intermediates(x)
    assert (out["logits"] - fused).abs().max() < 1e-5
    assert len(out["attentions"]) == len(out["attention_grids"]) == len(out["hidden_states"]) == 13
    # grids from the paper's arithmetic: 7x7/4 pad 2, then 3x3/2 pad 1; keys/values 3x3/2 pad 1
    h, w, stride = 96, 128, 1
    expected = []
    for stage, (k, s, p, depth, heads) in enumerate([(7, 4, 2, 1, 1), (3, 2, 1, 2, 3), (3, 2, 1, 10, 6)]):
        h, w, stride = _conv_out(h, k, s, p), _conv_out(w, k, s, p), stride * s
        kh, kw = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
        expected += [(stage, (h, w), (kh, kw), heads, 1 if stage == 2 else 0, stride)] * depth
    for attn, info, hid, (stage, qg, kg, heads, prefix, stride) in zip(out["attentions"], out["attention_grids"],
                                                                      out["hidden_states"], expected):
        nq, nk = prefix + qg[0] * qg[1], prefix + kg[0] * kg[1]
        assert attn.shape == (1, heads, nq, nk)
        assert nk < nq
        assert hid.shape[:2] == (1, nq)
        assert info == dict(stage=stage, q_grid=qg, kv_grid=kg, num_prefix_tokens=prefix, stride_px=stride,
                            kv_stride_px=2 * stride)
        assert (attn >= 0).all()
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-5, rtol=0)
    assert out["num_prefix_tokens"] == model.num_prefix_tokens == 1
    assert out["grid"] == (h, w)


def test_class_token_is_not_convolved():
    """Changing only the class token must leave the convolutional projection of the patch
    tokens untouched: the patch-token queries of the first last-stage block stay the same
    up to the linear projection, i.e. patch rows of q = proj_q(conv(map)) do not move."""
    torch.manual_seed(0)
    model = create_model("cvt_tiny", num_classes=3).eval()
    blk = model.stages[-1].blocks[0]
    seen = []
    blk.attn.proj_q.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        model(x)
        model.stages[-1].cls_token.add_(torch.randn_like(model.stages[-1].cls_token))
        model(x)
    before, after = seen
    assert not torch.allclose(before[:, :1], after[:, :1])
    torch.testing.assert_close(before[:, 1:], after[:, 1:])


# ----------------------------------------------------------------------------- ablations
@pytest.mark.parametrize("conv_embed,conv_proj,kv_stride,pos_embed",
                         list(itertools.product([True, False], [True, False], [1, 2], ["none", "learned"])))
def test_ablation_combinations_forward_backward(conv_embed, conv_proj, kv_stride, pos_embed):
    torch.manual_seed(0)
    model = create_model("cvt_tiny", num_classes=10, in_chans=1, conv_embed=conv_embed, conv_proj=conv_proj,
                         kv_stride=kv_stride, pos_embed=pos_embed, drop_path_rate=0.1).train()
    x = torch.randn(4, 1, 28, 28)
    out = model.forward_intermediates(x)
    assert out["logits"].shape == (4, 10)
    out["logits"].logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert has_bn == conv_proj
    for stage in model.stages:
        proj = stage.patch_embed.proj
        if conv_embed:
            assert proj.kernel_size[0] > proj.stride[0]  # overlapping
        else:
            assert proj.kernel_size == proj.stride and proj.padding == (0, 0)
        assert (stage.pos_embed is not None) == (pos_embed == "learned")
    # grids are 14/7/4 either way at 28 px; keys shrink only with kv_stride 2
    for attn, info in zip(out["attentions"], out["attention_grids"]):
        qh, qw = info["q_grid"]
        kh, kw = info["kv_grid"]
        assert (kh, kw) == ((qh, qw) if kv_stride == 1 else (-(-qh // 2), -(-qw // 2)))
        assert attn.shape[-1] == info["num_prefix_tokens"] + kh * kw
    assert [i["q_grid"] for i in out["attention_grids"]] == [(14, 14), (7, 7), (4, 4), (4, 4)]
    # any other size runs too (learned position tables are resampled)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 36, 44)).shape == (1, 10)


def test_learned_pos_embed_is_added_per_stage():
    torch.manual_seed(0)
    model = create_model("cvt_tiny", num_classes=3, pos_embed="learned").eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        base = model.forward_intermediates(x)["stage_embeddings"]
        model.stages[1].pos_embed.add_(1.0)
        moved = model.forward_intermediates(x)["stage_embeddings"]
    torch.testing.assert_close(base[0], moved[0])
    # stage 2 embeds LayerNorm(conv(...)) + pos: the difference is exactly the added constant
    torch.testing.assert_close(moved[1] - base[1], torch.ones_like(base[1]), atol=1e-5, rtol=0)
    assert {n for n in model.no_weight_decay()} == {"stages.0.pos_embed", "stages.1.pos_embed",
                                                    "stages.2.pos_embed", "stages.2.cls_token"}


def test_reset_classifier_and_meta_construction():
    model = create_model("cvt_tiny", num_classes=10)
    model.reset_classifier(4)
    assert model.head.out_features == 4 and model.num_classes == 4
    assert model.head.weight.abs().sum() == 0
    model.reset_classifier(6, zero_init=False)
    assert model.head.weight.abs().sum() > 0
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 6)
    with torch.device("meta"):
        m = create_model("cvt_13", pos_embed="learned", conv_proj=False)
        y = m(torch.empty(1, 3, 224, 224))
    assert y.shape == (1, 1000) and y.device.type == "meta"


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("overrides,match", [
    (dict(num_heads=(1, 3, 5)), "not divisible by num_heads"),
    (dict(depths=(1, 2)), "one entry per stage"),
    (dict(num_heads=(1, 3, 6, 6)), "one entry per stage"),
    (dict(kv_stride=3), "kv_stride"),
    (dict(kv_stride=(1, 2, 4)), "kv_stride"),
    (dict(pos_embed="sincos_2d"), "pos_embed"),
    (dict(attn_scale="sqrt"), "attn_scale"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
    (dict(embed_dims=64), "embed_dims"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ConfigError, match=match):
        create_model("cvt_13", **overrides)


def test_bad_inputs_raise():
    with pytest.raises(ConfigError, match="too small"):
        create_model("cvt_13", img_size=2)
    with pytest.raises(ConfigError, match="no option"):
        create_model("cvt_13", kv_strid=2)
    model = create_model("cvt_tiny", num_classes=3)
    with pytest.raises(ConfigError, match="3-channel"):
        model(torch.randn(1, 1, 28, 28))
    with pytest.raises(ConfigError, match="shape"):
        model(torch.randn(3, 28, 28))
    with pytest.raises(ConfigError, match="too small"):
        model(torch.randn(1, 3, 0, 28))


def test_class_token_forward_in_eval_equals_the_full_model():
    """In evaluation `forward` computes only the class token in the last block (skipping its
    query convolution, the patch tokens' attention rows, projection and MLP); the logits equal
    the head on the full final tokens. In training every token is computed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model("cvt_13", num_classes=7, img_size=64, depths=(1, 1, 2)).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model.train()
    model(x)  # give the BatchNorms running statistics that are not the identity
    model.eval()
    with torch.no_grad():
        fast_logits = model(x)
        full_logits = model.forward_head(model.forward_features(x))
    torch.testing.assert_close(fast_logits, full_logits, rtol=1e-10, atol=1e-12)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        with FlopCounterMode(display=False) as fast_count:
            model(x)
        with FlopCounterMode(display=False) as full_count:
            model.forward_head(model.forward_features(x))
        model.train()
        with FlopCounterMode(display=False) as train_count:
            model(x)
    assert fast_count.get_total_flops() < full_count.get_total_flops() == train_count.get_total_flops()
