"""Training, evaluation, fine-tuning and prediction (the engine behind `vitlab train`).

    from vitlab.train import TrainConfig, train, evaluate, finetune, predict, load_model

The names are imported on first use (PEP 562): `vitlab.train.cli` registers the sub-commands
without importing torch.
"""
from .._lazy import lazy_names as _lazy_names
import sys as _sys
import types as _types

# public name -> submodule that defines it
_LAZY = {
    "evaluate": "api", "finetune": "api", "predict": "api", "train": "api",
    "load_model": "checkpoint",
    "TrainConfig": "config", "apply_overrides": "config", "load_config": "config",
    "RunResult": "engine",
    "ClassificationObjective": "objectives", "Objective": "objectives", "register_objective": "objectives",
}

__all__ = ["TrainConfig", "train", "evaluate", "finetune", "predict", "load_model", "RunResult",
           "apply_overrides", "load_config", "Objective", "ClassificationObjective", "register_objective"]


__getattr__, __dir__ = _lazy_names(__name__, _LAZY, globals())


# `vitlab.train(config)` trains (the API the README shows) while `vitlab.train.checkpoint` etc.
# stay importable: the package module itself is callable.
class _CallableModule(_types.ModuleType):
    def __call__(self, config=None, **overrides):
        return __getattr__("train")(config, **overrides)


_sys.modules[__name__].__class__ = _CallableModule
