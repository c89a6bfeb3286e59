"""Training, evaluation, fine-tuning and prediction (the engine behind `vitlab train`).

    from vitlab.train import TrainConfig, train, evaluate, finetune, predict, load_model
"""
from .api import evaluate, finetune, predict, train
from .checkpoint import load_model
from .config import TrainConfig, apply_overrides, load_config
from .engine import RunResult
from .objectives import ClassificationObjective, Objective, register_objective

__all__ = ["TrainConfig", "train", "evaluate", "finetune", "predict", "load_model", "RunResult",
           "apply_overrides", "load_config", "Objective", "ClassificationObjective", "register_objective"]


# `vitlab.train(config)` trains (the API the README shows) while `vitlab.train.checkpoint` etc.
# stay importable: the package module itself is callable.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, config=None, **overrides):
        return train(config, **overrides)


_sys.modules[__name__].__class__ = _CallableModule
