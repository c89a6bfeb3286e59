"""BiT ResNet (weight-standardised convs, group norm, pre-activation) and the hybrid
ResNet + ViT: layers against hand-written functional computations, parameter counts against
published tables, the paper's two hybrid forms, and the promised errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import ConfigError
from vitlab.flops import count_params
from vitlab.models import create_model, list_models
from vitlab.models.resnet import (Bottleneck, MaxPool2dSame, PreActBottleneck, StdConv2d, build_hybrid_stem,
                                  same_pad_amounts)


def _meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def _standardise(w: torch.Tensor, eps: float) -> torch.Tensor:
    """Each output filter to zero mean / unit (biased) variance, written out filter by filter."""
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        f = w[o].double()
        mu = f.sum() / f.numel()
        var = ((f - mu) ** 2).sum() / f.numel()
        out[o] = ((f - mu) / torch.sqrt(var + eps)).to(w.dtype)
    return out


# ----------------------------------------------------------------------------- layers
def test_stdconv_equals_conv_with_manually_standardised_weights():
    conv = StdConv2d(6, 8, 3, stride=2, padding=1, bias=True, eps=1e-8)
    nn.init.normal_(conv.weight, mean=0.3, std=2.0)  # far from standardised, so WS must matter
    nn.init.normal_(conv.bias)
    x = torch.randn(2, 6, 11, 11)
    ref = F.conv2d(x, _standardise(conv.weight.detach(), 1e-8), conv.bias.detach(), stride=2, padding=1)
    out = conv(x)
    assert (out - ref).abs().max() < 1e-5
    plain = F.conv2d(x, conv.weight.detach(), conv.bias.detach(), stride=2, padding=1)
    assert (out - plain).abs().max() > 1e-2  # really different from an ordinary conv
    out.sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    out = out.detach()
    # WS makes the conv invariant to a positive per-filter scale and shift of its weights
    with torch.no_grad():
        conv.weight.mul_(torch.rand(8, 1, 1, 1) + 0.5).add_(torch.randn(8, 1, 1, 1))
    assert (conv(x) - out).abs().max() < 1e-4


@pytest.mark.parametrize("size,k,s,expected", [(8, 3, 2, (0, 1)), (9, 3, 2, (1, 1)), (224, 7, 2, (2, 3)),
                                               (56, 3, 1, (1, 1)), (7, 1, 2, (0, 0))])
def test_tf_same_padding_amounts(size, k, s, expected):
    # TF 'SAME': out = ceil(size/s), total = (out-1)*s + k - size, the odd pixel goes after
    assert same_pad_amounts(size, k, s) == expected


def test_same_padded_stdconv_and_maxpool_match_explicit_padding():
    conv = StdConv2d(3, 4, 7, stride=2, padding="same")
    x = torch.randn(1, 3, 20, 20)
    # 20 px, k7 s2: out 10, total pad 5 -> 2 before, 3 after (not PyTorch's symmetric 3/3)
    ref = F.conv2d(F.pad(x, (2, 3, 2, 3)), _standardise(conv.weight.detach(), conv.eps), stride=2)
    out = conv(x)
    assert out.shape == (1, 4, 10, 10) and (out - ref).abs().max() < 1e-5
    pool = MaxPool2dSame(3, 2)
    neg = -torch.rand(1, 2, 8, 8) - 1.0  # all negative: a zero pad would leak zeros into the maxima
    y = pool(neg)
    assert y.shape == (1, 2, 4, 4) and (y < 0).all()
    ref = F.max_pool2d(F.pad(neg, (0, 1, 0, 1), value=float("-inf")), 3, 2)
    assert torch.equal(y, ref)


def test_preact_bottleneck_matches_functional_definition():
    blk = PreActBottleneck(64, 128, 32, stride=2, groups=32, gn_eps=1e-5, ws_eps=1e-8)
    for m in blk.modules():  # non-trivial norm affines
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.2)
            nn.init.normal_(m.bias, 0.0, 0.2)
    x = torch.randn(2, 64, 9, 9)
    ws = lambda c: _standardise(c.weight.detach(), 1e-8)  # noqa: E731
    gn = lambda t, n: F.group_norm(t, 32, n.weight, n.bias, 1e-5)  # noqa: E731
    pre = F.relu(gn(x, blk.norm1))  # v2: norm + ReLU first; the projection reads the pre-activated input
    shortcut = F.conv2d(pre, ws(blk.downsample), stride=2)
    y = F.conv2d(pre, ws(blk.conv1))
    y = F.conv2d(F.relu(gn(y, blk.norm2)), ws(blk.conv2), stride=2, padding=1)
    y = F.conv2d(F.relu(gn(y, blk.norm3)), ws(blk.conv3))
    out = blk(x)
    assert out.shape == (2, 128, 5, 5)
    assert (out - (y + shortcut)).abs().max() < 1e-4


def test_hybrid_bottleneck_is_post_activation_and_starts_as_identity_on_its_shortcut():
    blk = Bottleneck(64, 64, 16, stride=1, groups=16)  # no projection: same width, stride 1
    x = torch.randn(2, 64, 6, 6)
    # gn3's scale starts at zero (as in the ViT authors' ResNet): the unit is relu(x) at init
    assert torch.allclose(blk(x), F.relu(x))
    nn.init.normal_(blk.norm3.weight)
    ws = lambda c: _standardise(c.weight.detach(), c.eps)  # noqa: E731
    gn = lambda t, n: F.group_norm(t, 16, n.weight, n.bias, n.eps)  # noqa: E731
    y = F.relu(gn(F.conv2d(x, ws(blk.conv1)), blk.norm1))
    y = F.relu(gn(F.conv2d(y, ws(blk.conv2), padding=1), blk.norm2))
    y = gn(F.conv2d(y, ws(blk.conv3)), blk.norm3)
    assert (blk(x) - F.relu(y + x)).abs().max() < 1e-4


# ----------------------------------------------------------------------------- ResNet classifier
@pytest.mark.parametrize("name,paper_m", [
    ("resnet50_bit", 25.5),     # BiT-M R50x1 (torchvision/timm ResNet-50: 25.5M)
    ("resnet101_bit", 44.5),    # BiT R101x1
    ("resnet50x3_bit", 217.3),  # BiT R50x3
    ("resnet152x2_bit", 236),   # BiT R152x2 (timm resnetv2_152x2_bit: 236.3M with a 1000-class head)
    ("resnet152x4_bit", 936),   # BiT-L R152x4 (timm resnetv2_152x4_bit: 936.5M with a 1000-class head)
])
def test_resnet_param_counts(name, paper_m):
    n = count_params(_meta(name)) / 1e6   # on the meta device: no memory, instant even at 936M
    assert abs(n - paper_m) / paper_m < 0.02, f"{name}: {n:.2f}M vs {paper_m}M"


def test_resnet50_bit_is_gn_ws_everywhere():
    m = _meta("resnet50_bit")
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert convs and all(isinstance(c, StdConv2d) for c in convs)
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    norms = [mod for mod in m.modules() if isinstance(mod, nn.GroupNorm)]
    assert norms and all(g.num_groups == 32 for g in norms)
    assert [len(s) for s in m.stages] == [3, 4, 6, 3]
    assert m.stem[0].kernel_size == (7, 7) and m.stem[0].stride == (2, 2)


@pytest.mark.parametrize("name,size,shape", [("resnet50_bit", 32, (2048, 1, 1)), ("resnet_small", 32, (256, 4, 4)),
                                             ("resnet_small", 28, (256, 4, 4))])
def test_resnet_feature_map_and_backward(name, size, shape):
    m = create_model(name, num_classes=7, img_size=size)
    x = torch.randn(2, 3, size, size)
    feats = m.forward_features(x)
    assert feats.shape == (2, *shape) and (feats >= 0).all()  # after the final GN + ReLU
    assert m.img_size == (size, size)
    logits = m.forward_head(feats)
    assert logits.shape == (2, 7)
    assert torch.count_nonzero(logits) == 0  # BiT zero-initialises the head
    nn.init.normal_(m.head.weight, std=0.1)
    F.cross_entropy(m(x), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.forward_head(feats, pre_logits=True).shape == (2, shape[0])


def test_resnet_channels_last_matches_and_stem_options():
    m = create_model("resnet_small", num_classes=5, in_chans=1, img_size=28).eval()
    nn.init.normal_(m.head.weight)
    x = torch.randn(2, 1, 28, 28)
    ref = m(x)
    m_cl = m.to(memory_format=torch.channels_last)
    out = m_cl(x.contiguous(memory_format=torch.channels_last))
    assert (out - ref).abs().max() < 1e-4
    same = create_model("resnet50_bit", stem="same", layers=(1, 1), num_classes=0, img_size=64)
    assert same(torch.randn(1, 3, 64, 64)).shape == (1, 512)  # num_classes=0: pooled features
    assert same.feature_stride == 8


def test_resnet_reset_classifier_and_no_weight_decay():
    m = create_model("resnet_small", num_classes=10)
    nn.init.normal_(m.head.weight)
    m.reset_classifier(3)
    x = torch.randn(1, 3, 32, 32)
    assert m(x).shape == (1, 3) and torch.count_nonzero(m(x)) == 0
    m.reset_classifier(4, zero_init=False)
    assert torch.count_nonzero(m(x)) > 0
    assert m.no_weight_decay() == set()


# ----------------------------------------------------------------------------- hybrid
def test_hybrid_stems_strides_and_channels():
    with torch.device("meta"):
        s16, c16, st16 = build_hybrid_stem("r50_s16", 3)
        s32, c32, st32 = build_hybrid_stem("r50_s32", 3)
        assert s16(torch.empty(1, 3, 224, 224)).shape == (1, 1024, 14, 14)
        assert s32(torch.empty(1, 3, 224, 224)).shape == (1, 2048, 7, 7)
    assert (c16, st16, c32, st32) == (1024, 16, 2048, 32)
    # option (ii): stage 4 removed and its 3 blocks moved into stage 3 -> same number of blocks
    assert [len(s) for s in s32.stages] == [3, 4, 6, 3]
    assert [len(s) for s in s16.stages] == [3, 4, 9]
    small, c, s = build_hybrid_stem("rsmall_s4", 1)
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, c, 7, 7) and s == 4
    # 'same' padding root: 7x7/2 with TF padding, then a SAME max pool (stride 4 overall)
    assert s16.root[0].kernel_size == (7, 7) and s16.root[0].same_pad


def test_hybrid_sequence_lengths_and_param_count():
    b16, b32 = _meta("r50_vit_b16"), _meta("R50+ViT-B/32")
    x = torch.empty(1, 3, 224, 224, device="meta")
    t16, g16 = b16.patch_tokens(x)
    t32, g32 = b32.patch_tokens(x)
    assert t16.shape[1] == 4 * t32.shape[1] == 196 and g16 == (14, 14) and g32 == (7, 7)
    assert b16.patch_size == (16, 16) and b32.patch_size == (32, 32)
    assert b16.patch_embed.proj.kernel_size == (1, 1) and b16.patch_embed.proj.in_channels == 1024
    # ViT paper gives no parameter count for hybrids; the authors' released R50+ViT-B/16 as ported to
    # timm (vit_base_r50_s16_224, no head) has 97.9M; a 1000-class head adds 768*1000+1000.
    n_headless = count_params(_meta("r50_vit_b16", num_classes=0)) / 1e6
    assert abs(n_headless - 97.9) / 97.9 < 0.02
    assert count_params(b16) - count_params(_meta("r50_vit_b16", num_classes=0)) == 768 * 1000 + 1000
    # stem = BiT R50 body up to stage 3 + transformer = ViT-B/16 minus its pixel patch projection
    vit = _meta("vit_b16")
    stem = sum(p.numel() for p in b16.stem.parameters())
    pixel_proj = sum(p.numel() for p in vit.patch_embed.parameters())
    assert count_params(b16) == count_params(vit) - pixel_proj + stem + 1024 * 768 + 768


def test_hybrid_forward_backward_small_image():
    m = create_model("r50_vit_b16", num_classes=3, img_size=32)
    x = torch.randn(2, 3, 32, 32)
    out = m.forward_intermediates(x)
    assert out["grid"] == (2, 2) and out["logits"].shape == (2, 3)
    assert out["attentions"][0].shape == (2, 12, 5, 5)
    F.cross_entropy(out["logits"], torch.tensor([0, 2])).backward()
    assert m.stem.root[0].weight.grad is not None and m.stem.root[0].weight.grad.abs().sum() > 0


def test_hybrid_small_cpu_variant_trains_a_step():
    m = create_model("rsmall_vit_micro", num_classes=10, in_chans=1, img_size=28)
    assert m.grid_size == (7, 7) and m.patch_size == (4, 4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(6):  # the stem and the transformer learn together: a batch can be fitted
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# ----------------------------------------------------------------------------- every variant
_BIG_OVERRIDES = {  # big variants: same config with fewer blocks, so the CPU test stays fast (resnet50_bit and
    # r50_vit_b16 run at full depth in the tests above; every variant is built at full size on meta)
    "resnet50_bit": dict(layers=(1, 1, 1, 1)),
    "resnet101_bit": dict(layers=(1, 1, 2, 1)),
    "resnet50x3_bit": dict(layers=(1, 1, 1, 1)),
    "resnet152x2_bit": dict(layers=(1, 1, 1, 1), width_factor=1),
    "resnet152x4_bit": dict(layers=(1, 1, 1, 1), width_factor=1),
    "r50_vit_b16": dict(depth=2),
    "r50_vit_b32": dict(depth=2),
    "r50_vit_l16": dict(depth=2),
    "r50_vit_l32": dict(depth=2),
}


@pytest.mark.parametrize("name", list_models("resnet") + list_models("hybrid"))
def test_every_variant_builds_on_meta_and_runs_forward_backward(name):
    meta = _meta(name)
    assert all(p.is_meta for p in meta.parameters())
    m = create_model(name, num_classes=4, img_size=32, **_BIG_OVERRIDES.get(name, {}))
    x = torch.randn(2, 3, 32, 32)
    logits = m(x)
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    logits.float().pow(2).sum().add(m.forward_features(x).float().mean()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


# ----------------------------------------------------------------------------- errors
def test_bad_configurations_raise_config_error():
    with pytest.raises(ConfigError, match="divisible by 32"):
        create_model("resnet_small", width_factor=0.25)  # 16-channel stem cannot have 32 groups
    with pytest.raises(ConfigError, match="Did you mean: cifar"):
        create_model("resnet_small", stem="cifr")
    with pytest.raises(ConfigError, match="block"):
        create_model("resnet_small", block="bottle")
    with pytest.raises(ConfigError, match="layers"):
        create_model("resnet_small", layers=())
    with pytest.raises(ConfigError, match="layers"):
        create_model("resnet_small", layers=(2, 0))
    with pytest.raises(ConfigError, match="width_factor"):
        create_model("resnet_small", width_factor=-1)
    with pytest.raises(ConfigError, match="r50_s16"):
        create_model("vit_b16", hybrid_stem="r50_s61")
    with pytest.raises(ConfigError, match="divisible by the hybrid's token stride 16"):
        create_model("r50_vit_b16", img_size=200)
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("r50_vit_b8")
    m = create_model("resnet_small", in_chans=1, img_size=28)
    with pytest.raises(ConfigError, match="in_chans=3"):
        m(torch.randn(1, 3, 28, 28))
    with pytest.raises(ConfigError, match="shape"):
        m(torch.randn(1, 28, 28))
    h = create_model("rsmall_vit_micro", img_size=32)
    with pytest.raises(ConfigError, match="channels"):
        h(torch.randn(1, 1, 32, 32))
