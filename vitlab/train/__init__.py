"""Training, evaluation, fine-tuning and prediction (the engine behind `vitlab train`).

    from vitlab.train import TrainConfig, train, evaluate, finetune, predict, load_model

The names are imported on first use (PEP 562): `vitlab.train.cli` registers the sub-commands
without importing torch.
"""
import importlib as _importlib
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


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


# `vitlab.train(config)` trains (the API the README shows) while `vitlab.train.checkpoint` etc.
# stay importable: the package module itself is callable.
class _CallableModule(_types.ModuleType):
    def __call__(self, config=None, **overrides):
        return __getattr__("train")(config, **overrides)


_sys.modules[__name__].__class__ = _CallableModule
