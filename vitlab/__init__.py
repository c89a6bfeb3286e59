"""vitlab: patch-based image models (ViT, hybrid, CvT, ConvMixer, BiT ResNet) — build, train,
fine-tune, study and explain them.

The public names below are imported on first use (PEP 562), so `import vitlab` and the
`vitlab` command's --help/--version do not pay for importing torch.
"""
from __future__ import annotations

import importlib

from .errors import CheckpointError, ConfigError, DataError, VitlabError

__version__ = "0.1.0"  # keep equal to pyproject.toml's version (tests/test_cli_help.py checks)

# public name -> module that defines it
_LAZY = {
    "create_model": "vitlab.models", "list_models": "vitlab.models",
    "from_transformers": "vitlab.models.convert", "load_weights": "vitlab.models.convert",
    "RunResult": "vitlab.train", "TrainConfig": "vitlab.train", "evaluate": "vitlab.train",
    "finetune": "vitlab.train", "load_model": "vitlab.train", "predict": "vitlab.train",
}

__all__ = ["create_model", "list_models", "from_transformers", "load_weights", "ConfigError", "DataError",
           "CheckpointError", "VitlabError",
           "train", "evaluate", "finetune", "predict", "load_model", "TrainConfig", "RunResult"]


# sub-packages reachable as attributes (`vitlab.models.create_model`) without an import of their own
_SUBMODULES = {"accel", "analysis", "bench", "cli", "data", "flops", "models", "studies", "train"}


def __getattr__(name: str):
    if name in _SUBMODULES:  # vitlab.train is the callable module: vitlab.train(config) -> RunResult
        return importlib.import_module(f"vitlab.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
