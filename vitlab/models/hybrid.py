"""Hybrid ResNet + ViT (Dosovitskiy et al., section 3.1 "Hybrid Architecture").

The patch embedding E is applied to a CNN feature map instead of raw pixels; with 1x1 patches
the sequence is the flattened map projected to D. The CNN is the BiT ResNet-50 (group norm,
weight-standardised convs; `vitlab.models.resnet.build_hybrid_stem`) in the paper's two forms:

  (i)  `r50_s32`: the output of a regular ResNet-50's stage 4 -> stride 32  (R50+ViT-B/32)
  (ii) `r50_s16`: stage 4 removed, its blocks moved into stage 3 (3, 4, 9) -> stride 16,
       four times the sequence length and a more expensive transformer     (R50+ViT-B/16)

In a hybrid's name the "/16" or "/32" is that total stride, not a pixel patch size. The
transformer is the ordinary `VisionTransformer` (every option of it applies); `patch_size`
is ignored for hybrids (patches are 1x1 cells of the feature map) and `model.patch_size`
reports the stem's stride.
"""
from __future__ import annotations

from .registry import register_family
from .vit import VisionTransformer

_B = dict(embed_dim=768, depth=12, num_heads=12)
_L = dict(embed_dim=1024, depth=24, num_heads=16)

VARIANTS: dict[str, dict] = {
    "r50_vit_b16": dict(hybrid_stem="r50_s16", patch_size=1, **_B),
    "r50_vit_b32": dict(hybrid_stem="r50_s32", patch_size=1, **_B),
    "r50_vit_l16": dict(hybrid_stem="r50_s16", patch_size=1, **_L),
    "r50_vit_l32": dict(hybrid_stem="r50_s32", patch_size=1, **_L),
    # CPU studies on 28-32 px images: stride-4 stem (3x3 root + two short stages) feeding the
    # same transformer as vit_micro_p4 (128 wide, 6 deep, 4 heads): 64 tokens at 32 px
    "rsmall_vit_micro": dict(hybrid_stem="rsmall_s4", patch_size=1, embed_dim=128, depth=6, num_heads=4),
}
ALIASES = {
    "R50+ViT-B/16": "r50_vit_b16", "R50x1+ViT-B/16": "r50_vit_b16",
    "R50+ViT-B/32": "r50_vit_b32", "R50x1+ViT-B/32": "r50_vit_b32",
    "R50+ViT-L/16": "r50_vit_l16", "R50x1+ViT-L/16": "r50_vit_l16",
    "R50+ViT-L/32": "r50_vit_l32", "R50x1+ViT-L/32": "r50_vit_l32",
}
DESCRIPTIONS = {
    "r50_vit_b16": "BiT R50 stages 1-3 (3,4,9), stride 16, + ViT-B on 1x1 patches",
    "r50_vit_b32": "BiT R50 stages 1-4 (3,4,6,3), stride 32, + ViT-B on 1x1 patches",
    "r50_vit_l16": "BiT R50 stages 1-3 (3,4,9), stride 16, + ViT-L on 1x1 patches",
    "r50_vit_l32": "BiT R50 stages 1-4 (3,4,6,3), stride 32, + ViT-L on 1x1 patches",
    "rsmall_vit_micro": "small stride-4 ResNet stem + 6-layer ViT, for 28-32 px images",
}
DEFAULT_IMG = {"rsmall_vit_micro": 32}

register_family("hybrid", VisionTransformer, VARIANTS, ALIASES, DESCRIPTIONS, DEFAULT_IMG)
