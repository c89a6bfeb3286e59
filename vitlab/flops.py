"""Counting FLOPs (one multiply-add = 2 FLOPs) of a forward pass.

PyTorch's own `FlopCounterMode` counts matrix products, convolutions and fused attention
at the operator level, so the count follows the model's real code path (not a formula that
can drift from it). Element-wise work (norms, activations, softmax) is not counted, as in
the papers' GFLOPs tables.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, img_size=None, in_chans: int | None = None, batch_size: int = 1,
                backward: bool = False) -> int:
    """FLOPs of one forward (and backward when asked) pass on `batch_size` images."""
    if img_size is None:
        img_size = getattr(model, "img_size", 224)
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    if in_chans is None:
        in_chans = getattr(model, "in_chans", 3)
    param = next(model.parameters())
    x = torch.zeros(batch_size, in_chans, *img_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        # The math SDPA backend decomposes attention into matrix products the counter sees;
        # the CPU flash kernel is not registered with it and would count as zero.
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            if backward:
                model(x).float().sum().backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        model.train(was_training)
        if backward:
            model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
