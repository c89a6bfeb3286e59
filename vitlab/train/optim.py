"""Optimizers, parameter groups and the learning-rate schedule.

The paper pre-trains with Adam (beta1 0.9, beta2 0.999, weight decay 0.1) and fine-tunes with
SGD momentum 0.9, both with a linear warmup then cosine (or linear) decay, stepped per
optimizer step. Weight decay shrinks weights towards zero; applying it to LayerNorm gains,
biases, position embeddings or the class token only biases them, so those get none.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weight matrices/kernels, and everything with ndim <= 1 or named by
    `model.no_weight_decay()` (norms, biases, position embeddings, class token) without decay."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip:
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "param_names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "param_names": no_decay_names})
    return groups


def layer_id(name: str, depth: int) -> int:
    """Depth of a ViT parameter for layer-wise lr decay (BEiT/timm convention): the embeddings
    (patch/stem, position, class token) are layer 0, block i is layer i + 1, and everything after the
    blocks (final norm, pooling, head) is layer depth + 1."""
    top = name.split(".", 1)[0]
    if top == "blocks":
        return int(name.split(".")[1]) + 1
    if "embed" in top or "token" in top or top in ("stem", "backbone"):
        return 0
    return depth + 1


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Fine-tuning's layer-wise learning-rate decay: the parameter groups of `param_groups`, split
    per layer, each with `lr_scale` = layer_decay ** (depth + 1 - layer): the head trains at the full
    lr, block i at layer_decay ** (depth - i) of it, the embeddings at layer_decay ** (depth + 1)."""
    from ..errors import ConfigError

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ConfigError(f"layer_decay needs a model with a list of transformer blocks (ViT or hybrid: "
                          f"model.blocks); {type(model).__name__} has none. Remove layer_decay.")
    depth = len(blocks)
    out: dict[tuple[int, float], dict] = {}
    for g in param_groups(model, weight_decay):
        named = dict(zip(g["param_names"], g["params"]))
        for name, p in named.items():
            lid = layer_id(name, depth)
            grp = out.setdefault((lid, g["weight_decay"]), {
                "params": [], "param_names": [], "weight_decay": g["weight_decay"], "layer": lid,
                "lr_scale": float(layer_decay) ** (depth + 1 - lid)})
            grp["params"].append(p)
            grp["param_names"].append(name)
    return [out[k] for k in sorted(out)]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    layer_decay = getattr(cfg, "layer_decay", None)
    if layer_decay is not None and layer_decay != 1.0:
        groups = layer_decay_groups(model, cfg.weight_decay, layer_decay)
    else:
        groups = param_groups(model, cfg.weight_decay)
    device_type = next(model.parameters()).device.type
    # Adam(W): one fused kernel on GPU and CPU (torch >= 2.4 has it for both; element-wise, so
    # deterministic, and 3.3x the multi-tensor path's speed for ViT-S/16's 22M parameters on the
    # development CPU: benchmarks/RESULTS.md); else, and for SGD, the multi-tensor (foreach) path
    fused = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    foreach = {"fused": True} if device_type == "cuda" else {"foreach": True}
    for name, cls, kw in (("adamw", torch.optim.AdamW, {}), ("adam", torch.optim.Adam, {})):
        # adam: the paper's "Adam with weight decay 0.1": L2 added to the gradient (torch Adam semantics)
        if cfg.optimizer == name:
            try:
                return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), **fused, **kw)
            except (RuntimeError, TypeError):  # no fused kernel for this device / torch
                return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=True, **kw)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **foreach)
    raise ValueError(cfg.optimizer)


def lr_at(step: int, *, base_lr: float, min_lr: float, total_steps: int, warmup_steps: int,
          schedule: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based).

    Warmup: linear from base_lr/warmup_steps up to base_lr over `warmup_steps` steps. Then
    cosine: min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2, or linear:
    base_lr - (base_lr - min_lr) * t, with t going from 0 to 1 over the remaining steps.
    """
    if schedule == "onecycle":
        return onecycle_lr(step, base_lr=base_lr, min_lr=min_lr, total_steps=total_steps, warmup_steps=warmup_steps)
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if schedule == "linear":
        return base_lr - (base_lr - min_lr) * t
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


ONECYCLE_DIV = 25.0        # the one-cycle schedule starts at base_lr / 25 (torch's OneCycleLR default)
ONECYCLE_PCT = 0.3         # its rise takes 30% of the steps unless a warmup length is given


def onecycle_lr(step: int, *, base_lr: float, min_lr: float, total_steps: int, warmup_steps: int) -> float:
    """The one-cycle schedule (Smith; the ConvMixer recipe), as torch's OneCycleLR with cosine phases:
    from base_lr/25 up to base_lr over the first `warmup_steps` steps (30% of them if 0), reached at
    step warmup_steps - 1, then down to min_lr at the last step."""
    total = max(int(total_steps), 2)
    rise = int(warmup_steps) if warmup_steps > 0 else max(int(ONECYCLE_PCT * total), 1)
    peak = min(max(rise - 1, 1), total - 2)     # step of the peak; both phases at least one step long
    start = base_lr / ONECYCLE_DIV

    def anneal(a: float, b: float, pct: float) -> float:
        return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * min(max(pct, 0.0), 1.0)))

    if step <= peak:
        return anneal(start, base_lr, step / peak)
    return anneal(base_lr, min_lr, (step - peak) / (total - 1 - peak))


class ModelEma:
    """Exponential moving average of the weights: ema = decay * ema + (1 - decay) * w after
    every optimizer step (floating tensors; integer buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_f, cur_f = [], []
        for (_, e), (_, c) in zip(self.module.state_dict().items(), model.state_dict().items()):
            if e.is_floating_point():
                ema_f.append(e)
                cur_f.append(c.detach())
            else:
                e.copy_(c)
        if ema_f:
            torch._foreach_lerp_(ema_f, cur_f, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd)
