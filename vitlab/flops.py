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
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

aten = torch.ops.aten


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Backward of a convolution: the input gradient and the weight gradient each cost as
    many multiply-adds as the forward. PyTorch's own formula treats the weight of a grouped
    (depthwise) convolution as dense in backward, over-counting ConvMixer's training FLOPs
    about 20x; the forward count (weight shape (C_out, C_in/groups, k, k)) is right."""
    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


_CUSTOM_FLOPS = {aten.convolution_backward: _conv_backward_flop}


def _nominal_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's function as the papers count it: every token through every block. (A
    class-token ViT's `forward` computes only the class token in its last block, which is all
    the logits need; the papers' GFLOPs, and model-FLOPs utilisation, count the whole encoder.)"""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x))
    return model(x)


def count_flops(model: nn.Module, img_size=None, in_chans: int | None = None, batch_size: int = 1,
                backward: bool = False) -> int:
    """FLOPs of one forward (and backward when asked) pass on `batch_size` images (the whole
    encoder, as the papers count them; see `_nominal_forward`)."""
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
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
            if backward:
                _nominal_forward(model, x).float().sum().backward()
            else:
                with torch.no_grad():
                    _nominal_forward(model, x)
    finally:
        model.train(was_training)
        if backward:
            model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
