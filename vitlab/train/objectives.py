"""Training objectives: what a batch is turned into a loss by.

The engine's step is generic (batch -> objective.loss -> backward), so other objectives
(e.g. the paper's masked patch prediction) plug in through `register_objective`:

    class MyObjective:
        name = "masked_patch"
        def prepare_model(self, model): ...        # optional: add/replace heads before training
        def loss(self, model, images, targets):    # -> (scalar loss, {metric: batch mean})
            ...

`loss` is called under autocast with the (possibly DDP-wrapped) model in train mode, and in
eval mode (no grad) on validation batches; metrics are batch means the engine averages
weighted by batch size and logs as `train_<name>` / `val_<name>`. `prepare_model` is applied
both to a fresh model and before a checkpoint is loaded, so the weights it adds are saved.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, did_you_mean


class Objective(Protocol):
    name: str

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        ...


class ClassificationObjective:
    """Cross-entropy on the logits; targets are class indices (B,) or soft distributions
    (B, K) from mixup/cutmix/label smoothing. Accuracy counts the arg-max of soft targets."""

    name = "classification"
    #: the headline metric used to pick the best checkpoint (higher is better)
    primary_metric = "acc"
    #: the loss and metrics are means of per-sample values: the engine may split a batch into parts
    #: (CPU training streams) and weight the parts' results by their size
    per_sample_mean = True

    def __init__(self, **kwargs):
        if kwargs:
            raise ConfigError(f"the classification objective takes no options, got {sorted(kwargs)}")

    def loss(self, model, images, targets):
        logits = model(images).float()
        if targets.ndim == 2:
            loss = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
            hard = targets.argmax(dim=-1)
        else:
            loss = F.cross_entropy(logits, targets)
            hard = targets
        acc = (logits.argmax(dim=-1) == hard).float().mean()
        return loss, {"acc": acc.detach()}


_OBJECTIVES: dict[str, Callable[..., Any]] = {"classification": ClassificationObjective}


def register_objective(name: str, factory: Callable[..., Any]) -> None:
    """Make `objective=name` available; `factory(**config.objective_kwargs)` builds it."""
    _OBJECTIVES[name] = factory


def build_objective(name: str, kwargs: dict | None = None):
    if name not in _OBJECTIVES:
        # objectives written by other areas register themselves on import
        import importlib

        for mod in ("vitlab.studies.objectives", "vitlab.studies.pretrain"):
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:
                    raise
    if name not in _OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}.{did_you_mean(name, _OBJECTIVES)} "
                          f"Choose one of: {', '.join(sorted(_OBJECTIVES))}.")
    return _OBJECTIVES[name](**(kwargs or {}))
