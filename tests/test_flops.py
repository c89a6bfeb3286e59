"""FLOPs counted by `vitlab.flops.count_flops` against the ViT's closed form, computed here
independently (FLOPs = 2 x multiply-adds; element-wise work such as norms and softmax is not
counted, as in the papers' tables):

    per block, N tokens of width D:  qkv 2*N*D*3D + attention 2*2*N^2*D (QK^T and AV)
                                     + projection 2*N*D*D + MLP 2*2*N*D*4D
    patch embedding: 2 * patches * D * (C*P*P);  head: 2 * D * K.
"""
from __future__ import annotations

import pytest
import torch

from vitlab import create_model
from vitlab.flops import count_flops


def block_flops(n: int, d: int, mlp_ratio: float = 4.0) -> int:
    h = int(d * mlp_ratio)
    return 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * h


def vit_flops(img: int, patch: int, chans: int, d: int, depth: int, classes: int, cls_token: bool,
              representation: int | None = None) -> int:
    patches = (img // patch) ** 2
    n = patches + int(cls_token)
    embed = 2 * patches * d * chans * patch * patch
    head = 2 * d * classes if representation is None else 2 * d * representation + 2 * representation * classes
    return embed + depth * block_flops(n, d) + head


def small_vit(**kw):
    base = dict(num_classes=10, in_chans=1, img_size=28, depth=2)
    base.update(kw)
    return create_model("vit_micro_p4", **base)


def test_one_block_equals_closed_form():
    # the difference between a 3-block and a 2-block model is exactly one block
    for gp, n in (("token", 50), ("avg", 49)):
        f2 = count_flops(small_vit(depth=2, global_pool=gp))
        f3 = count_flops(small_vit(depth=3, global_pool=gp))
        assert f3 - f2 == block_flops(n, 128)


def test_one_block_other_width_and_mlp_ratio():
    f1 = count_flops(create_model("vit_nano_p2", num_classes=5, in_chans=3, img_size=8, depth=1, mlp_ratio=2.0))
    f2 = count_flops(create_model("vit_nano_p2", num_classes=5, in_chans=3, img_size=8, depth=2, mlp_ratio=2.0))
    assert f2 - f1 == block_flops(16 + 1, 64, mlp_ratio=2.0)


@pytest.mark.parametrize("gp", ["token", "avg"])
def test_whole_small_vit_equals_closed_form(gp):
    model = small_vit(depth=2, global_pool=gp)
    assert count_flops(model) == vit_flops(28, 4, 1, 128, 2, 10, cls_token=(gp == "token"))


def test_pretraining_mlp_head_and_rgb_input():
    model = create_model("vit_nano_p2", num_classes=7, in_chans=3, img_size=8, head="mlp_tanh",
                         representation_size=32)
    assert count_flops(model) == vit_flops(8, 2, 3, 64, 4, 7, cls_token=True, representation=32)


def test_batch_meta_device_and_backward():
    model = small_vit(depth=1)
    f = vit_flops(28, 4, 1, 128, 1, 10, cls_token=True)
    assert count_flops(model, batch_size=3) == 3 * f
    with torch.device("meta"):
        meta = small_vit(depth=1)
    assert count_flops(meta) == f
    # backward: every product is done again for the gradient of each operand, except the
    # image's own gradient through the patch projection (the image needs none): 3F - embed
    embed = 2 * 49 * 128 * 16
    assert count_flops(model, backward=True) == 3 * f - embed
    assert count_flops(meta, backward=True) == 3 * f - embed


def test_depthwise_conv_backward_counts_like_its_forward():
    """Each of a convolution's two gradients costs its forward's multiply-adds, groups included
    (PyTorch's own formula counts a depthwise weight as dense in backward)."""
    from torch import nn

    from vitlab.flops import count_flops

    c, h = 8, 10
    net = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                        nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False))
    one_layer = 2 * h * h * c * 9  # 2 FLOPs per multiply-add, 9 taps per output, 1 input channel per group
    assert count_flops(net, img_size=h, in_chans=c) == 2 * one_layer
    # backward: layer 2 needs both gradients, layer 1 only its weight's (the images need none)
    assert count_flops(net, img_size=h, in_chans=c, backward=True) == 2 * one_layer + 3 * one_layer


def test_class_token_forward_skips_exactly_the_unused_last_block_work():
    """`model(x)` of a class-token ViT computes only the class token's output in the last block
    (all the head reads); count_flops still counts the whole encoder, as the papers do. The
    work skipped is, for the N-1 patch tokens of the last block: their attention rows (QK^T
    and AV), the output projection and the MLP."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    n, d = 50, 128
    for depth in (1, 3):
        model = small_vit(depth=depth).eval()
        # (the math backend: the counter does not see the CPU flash-attention kernel)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 1, 28, 28))
        skipped = (n - 1) * (2 * 2 * n * d + 2 * d * d + 2 * 2 * d * 4 * d)
        assert count_flops(model) == vit_flops(28, 4, 1, d, depth, 10, cls_token=True)
        assert counter.get_total_flops() == count_flops(model) - skipped
    # average pooling reads every token: nothing is skipped
    model = small_vit(depth=2, global_pool="avg").eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    assert counter.get_total_flops() == count_flops(model)
