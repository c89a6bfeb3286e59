"""Masked patch prediction (MPP): the ViT paper's self-supervised pre-training (Appendix B.1.2).

Following BERT's masked language modelling, 50% of the patch embeddings are corrupted
*after* the patch projection and *before* the position embeddings are added:

    of the corrupted ones: 80% -> a learnable [MASK] embedding,
                           10% -> another random patch embedding (taken from the batch),
                           10% -> left unchanged,

and the encoder's outputs at the corrupted positions predict a target computed from the
original pixels. The paper compares three targets (Appendix B.1.2):

    'color3bit'  the patch's mean colour at 3 bits per channel: one 512-way classification
                 (8-way for grey images; (2^bits)^C-way in general) -- the paper's choice;
    'patch4x4'   the patch downsized to 4x4, every pixel's colour at 3 bits: 16 predictions
                 of 512 colours in parallel;
    'l2'         regression of the full (normalised) patch with the L2 loss.

The MPP parameters (the [MASK] embedding and the prediction head) live in the objective,
not in the ViT, so the ViT's state dict is exactly that of a supervised model: the
checkpoint loads into `vitlab finetune` like any other (the MPP part is stored beside it
and ignored there).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, did_you_mean

TARGETS = ("color3bit", "patch4x4", "l2")

# What happened to each token (the `kind` tensor returned by `corrupt`).
KEPT_CLEAN, MASKED, RANDOMISED, UNCHANGED = 0, 1, 2, 3


@dataclass
class MPPConfig:
    target: str = "color3bit"
    mask_rate: float = 0.5      # fraction of patches corrupted (the paper: 50%; BERT and a paper ablation: 15%)
    mask_prob: float = 0.8      # of the corrupted ones, replaced by [MASK]
    random_prob: float = 0.1    # ... replaced by a random patch embedding of the batch (the rest: unchanged)
    bits: int = 3               # colour depth per channel of the classification targets
    downsample: int = 4         # side of the downsized patch for 'patch4x4'

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ConfigError(f"unknown MPP target {self.target!r}.{did_you_mean(self.target, TARGETS)} "
                              f"Choose one of: {', '.join(TARGETS)}.")
        if not 0.0 < self.mask_rate <= 1.0:
            raise ConfigError(f"mask_rate={self.mask_rate} must be in (0, 1] (the paper uses 0.5)")
        if self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1.0 + 1e-9:
            raise ConfigError(f"mask_prob={self.mask_prob} and random_prob={self.random_prob} must be >= 0 and sum "
                              f"to at most 1 (the rest of the corrupted patches are kept unchanged); the paper uses "
                              f"0.8 and 0.1")
        if not 1 <= self.bits <= 8:
            raise ConfigError(f"bits={self.bits} must be between 1 and 8 (the paper uses 3)")
        if self.downsample < 1:
            raise ConfigError(f"downsample={self.downsample} must be a positive integer (the paper uses 4)")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- corruption
def corrupt(tokens: torch.Tensor, mask_token: torch.Tensor, mask_rate: float = 0.5, mask_prob: float = 0.8,
            random_prob: float = 0.1, generator: torch.Generator | None = None):
    """Corrupt patch embeddings (B, N, D) as BERT/ViT-MPP does.

    Exactly round(mask_rate * N) positions per image are selected (at least one); each
    selected position is independently replaced by `mask_token` (prob. mask_prob), by a
    patch embedding drawn uniformly from the whole batch (prob. random_prob), or kept.

    Returns (corrupted tokens, selected (B, N) bool, kind (B, N) long with values
    KEPT_CLEAN / MASKED / RANDOMISED / UNCHANGED).
    """
    B, N, D = tokens.shape
    dev = tokens.device
    n_sel = min(N, max(1, round(mask_rate * N)))
    # a random permutation per image (argsort of uniform noise): the first n_sel are selected
    order = torch.rand(B, N, generator=generator, device=dev).argsort(dim=1)
    selected = torch.zeros(B, N, dtype=torch.bool, device=dev)
    selected.scatter_(1, order[:, :n_sel], True)
    u = torch.rand(B, N, generator=generator, device=dev)
    kind = torch.where(u < mask_prob, MASKED, torch.where(u < mask_prob + random_prob, RANDOMISED, UNCHANGED))
    kind = torch.where(selected, kind, KEPT_CLEAN)
    src = torch.randint(0, B * N, (B, N), generator=generator, device=dev)
    random_tokens = tokens.reshape(B * N, D)[src]
    out = torch.where((kind == MASKED)[..., None], mask_token.to(tokens.dtype).expand(B, N, D), tokens)
    out = torch.where((kind == RANDOMISED)[..., None], random_tokens, out)
    return out, selected, kind


# ----------------------------------------------------------------------------- targets
def patchify(images: torch.Tensor, patch_size) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C, ph, pw), patches in the row-major order of the token grid."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    B, C, H, W = images.shape
    if H % ph or W % pw:
        raise ConfigError(f"image size {H}x{W} is not divisible by the patch size {ph}x{pw}")
    x = images.reshape(B, C, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // ph) * (W // pw), C, ph, pw)


def quantize(values01: torch.Tensor, bits: int = 3) -> torch.Tensor:
    """Intensities in [0, 1] -> integer levels 0 .. 2^bits - 1 (equal-width bins; 1.0 is the top bin)."""
    levels = 2 ** bits
    return (values01 * levels).floor().clamp(0, levels - 1).long()


def color_class(levels: torch.Tensor, bits: int = 3) -> torch.Tensor:
    """Per-channel levels (..., C) -> one colour class: the levels read as a base-2^bits number,
    first channel most significant (RGB: r * 64 + g * 8 + b at 3 bits)."""
    base = 2 ** bits
    C = levels.shape[-1]
    weights = base ** torch.arange(C - 1, -1, -1, device=levels.device)
    return (levels * weights).sum(-1)


def num_color_classes(in_chans: int, bits: int = 3) -> int:
    return (2 ** bits) ** in_chans


def downsized_side(patch_size, downsample: int) -> tuple[int, int]:
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    return min(downsample, ph), min(downsample, pw)


def mpp_targets(images01: torch.Tensor, patch_size, target: str = "color3bit", bits: int = 3, downsample: int = 4,
                images_normalized: torch.Tensor | None = None) -> torch.Tensor:
    """Prediction targets for every patch, from the original pixels.

    Args:
        images01: (B, C, H, W) pixels in [0, 1] (the colour targets quantise these).
        images_normalized: the model's normalised input, regressed by 'l2' (defaults to images01).
    Returns:
        'color3bit': (B, N) long class of the patch's mean colour;
        'patch4x4':  (B, N, s*s) long classes of the s x s downsized patch's pixel colours (row-major);
        'l2':        (B, N, C*ph*pw) float: the flattened patch (channel, row, column order).
    """
    if target == "l2":
        src = images01 if images_normalized is None else images_normalized
        p = patchify(src, patch_size)
        return p.flatten(2)
    p = patchify(images01, patch_size)  # (B, N, C, ph, pw)
    B, N, C, ph, pw = p.shape
    if target == "color3bit":
        mean = p.mean(dim=(3, 4))  # (B, N, C)
        return color_class(quantize(mean, bits), bits)
    if target == "patch4x4":
        sh, sw = downsized_side((ph, pw), downsample)
        small = F.adaptive_avg_pool2d(p.reshape(B * N, C, ph, pw), (sh, sw))  # area average
        small = small.reshape(B, N, C, sh * sw).transpose(2, 3)  # (B, N, s*s, C)
        return color_class(quantize(small, bits), bits)
    raise ConfigError(f"unknown MPP target {target!r}. Choose one of: {', '.join(TARGETS)}.")


# ----------------------------------------------------------------------------- model part
class MPPHead(nn.Module):
    """[MASK] embedding + a linear prediction head on the encoder outputs of corrupted patches."""

    def __init__(self, embed_dim: int, in_chans: int, patch_size, cfg: MPPConfig):
        super().__init__()
        self.cfg = cfg
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.in_chans, self.patch_size = in_chans, (ph, pw)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.num_classes = num_color_classes(in_chans, cfg.bits)
        if cfg.target == "color3bit":
            self.out_shape = (self.num_classes,)
        elif cfg.target == "patch4x4":
            sh, sw = downsized_side((ph, pw), cfg.downsample)
            self.out_shape = (sh * sw, self.num_classes)
        else:
            self.out_shape = (in_chans * ph * pw,)
        n_out = 1
        for s in self.out_shape:
            n_out *= s
        self.head = nn.Linear(embed_dim, n_out)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        """(M, D) encoder outputs of M corrupted patches -> (M, *out_shape)."""
        return self.head(outputs).reshape(outputs.shape[0], *self.out_shape)


def check_mpp_model(model) -> None:
    for attr in ("patch_tokens", "embed_tokens", "encode"):
        if not hasattr(model, attr):
            name = getattr(model, "variant_name", type(model).__name__)
            raise ConfigError(f"masked patch prediction needs a ViT (patch_tokens/embed_tokens/encode); model "
                              f"{name!r} has none. Use a vit_* or hybrid model for `vitlab pretrain --objective mpp`")


def mpp_loss(model, head: MPPHead, images: torch.Tensor, pixel_mean=None, pixel_std=None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """One MPP step's loss on normalised images (B, C, H, W).

    `pixel_mean`/`pixel_std` (per channel, in [0, 1] pixel units) undo the input
    normalisation so the colour targets are computed from the original pixels.
    """
    cfg = head.cfg
    B, C = images.shape[:2]
    if pixel_mean is not None:
        mean = torch.as_tensor(pixel_mean, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
        std = torch.as_tensor(pixel_std, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
        images01 = images * std + mean
    else:
        images01 = images
    with torch.no_grad():
        targets = mpp_targets(images01.float().clamp(0, 1), head.patch_size, cfg.target, cfg.bits, cfg.downsample,
                              images_normalized=images.float())
    tokens, grid = model.patch_tokens(images)
    corrupted, selected, kind = corrupt(tokens, head.mask_token, cfg.mask_rate, cfg.mask_prob, cfg.random_prob,
                                        generator=generator)
    z = model.embed_tokens(corrupted, grid)
    out = model.encode(z, grid)["tokens"][:, model.num_prefix_tokens:]  # (B, N, D) patch outputs
    pred = head(out[selected]).float()  # only the corrupted patches are predicted
    tgt = targets[selected]
    # metrics stay tensors (detached): the engine sums them on the device without a sync per step
    metrics = {"mpp_frac_corrupted": selected.float().mean().detach()}
    if cfg.target == "l2":
        loss = F.mse_loss(pred, tgt.float())
        metrics["mpp_mse"] = loss.detach()
    else:
        loss = F.cross_entropy(pred.reshape(-1, head.num_classes), tgt.reshape(-1))
        metrics["mpp_acc"] = (pred.argmax(-1) == tgt).float().mean().detach()
    metrics["mpp_score"] = metrics.get("mpp_acc", -loss.detach())
    return loss, metrics


# ----------------------------------------------------------------------------- the engine's objective
HEAD_ATTR = "mpp_head"


class MPPObjective:
    """`objective=mpp` for the training engine (`vitlab pretrain --objective mpp`).

    `prepare_model` attaches an `MPPHead` to the ViT as `model.mpp_head`, so the engine's
    optimiser, checkpoints and resume cover it; `vitlab finetune` drops it (see
    `strip_pretraining_heads`). The colour targets need the original pixels, so the data's
    per-channel mean/std ([0, 1] units) are options (`vitlab pretrain` fills them in).
    Validation corrupts with a fixed seed, so the validation loss of a checkpoint is a
    deterministic number.
    """

    name = "mpp"
    primary_metric = "mpp_score"       # accuracy of the colour classes, or -MSE for 'l2'
    find_unused_parameters = True      # under DDP: the classifier head takes no part in MPP

    def __init__(self, target: str = "color3bit", mask_rate: float = 0.5, mask_prob: float = 0.8,
                 random_prob: float = 0.1, bits: int = 3, downsample: int = 4, pixel_mean=None, pixel_std=None,
                 eval_seed: int = 0):
        self.cfg = MPPConfig(target, float(mask_rate), float(mask_prob), float(random_prob), int(bits),
                             int(downsample))
        if (pixel_mean is None) != (pixel_std is None):
            raise ConfigError("give both objective_kwargs.pixel_mean and pixel_std (per channel, [0, 1] units), "
                              "or neither")
        self.pixel_mean = None if pixel_mean is None else [float(v) for v in pixel_mean]
        self.pixel_std = None if pixel_std is None else [float(v) for v in pixel_std]
        self.eval_seed = int(eval_seed)

    def prepare_model(self, model):
        check_mpp_model(model)
        if not hasattr(model, HEAD_ATTR):
            setattr(model, HEAD_ATTR, MPPHead(model.embed_dim, model.in_chans, model.patch_size, self.cfg))
        # modules that belong to pre-training only: fine-tuning deletes them (strip_pretraining_heads)
        model.pretraining_heads = (HEAD_ATTR,)
        return model

    def strip_model(self, model):
        return strip_pretraining_heads(model)

    def _loss(self, raw, images):
        if self.pixel_mean is None:
            raise ConfigError("the MPP colour targets need the data's pixel mean/std: set objective_kwargs."
                              "pixel_mean and pixel_std, or start the run with `vitlab pretrain --objective mpp`, "
                              "which measures them")
        if len(self.pixel_mean) != images.shape[1]:
            raise ConfigError(f"pixel_mean has {len(self.pixel_mean)} channels but the images have "
                              f"{images.shape[1]}; use the statistics of this data set")
        gen = None
        if not raw.training:
            gen = torch.Generator(device=images.device).manual_seed(self.eval_seed)
        return mpp_loss(raw, getattr(raw, HEAD_ATTR), images, self.pixel_mean, self.pixel_std, generator=gen)

    def loss(self, model, images, targets):
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            return self._loss(model, images)
        # Under DDP the gradients are synchronised only through the wrapper's forward: run the
        # MPP pass as the module's forward for this one call (an instance attribute shadows
        # the class's forward).
        raw = model.module
        raw.forward = lambda x: self._loss(raw, x)
        try:
            return model(images)
        finally:
            del raw.forward


def strip_pretraining_heads(model):
    """Remove the MPP head (and [MASK] embedding) before fine-tuning: the result is a plain ViT
    whose state dict matches a freshly built one."""
    for name in getattr(model, "pretraining_heads", (HEAD_ATTR,)):
        if hasattr(model, name):
            delattr(model, name)
    model.pretraining_heads = ()
    return model


def _register() -> None:
    from ..train.objectives import register_objective

    register_objective("mpp", MPPObjective)


_register()
