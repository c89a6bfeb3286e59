"""vitlab: patch-based image models (ViT, hybrid, CvT, ConvMixer, BiT ResNet) — build, train,
fine-tune, study and explain them."""
from .errors import CheckpointError, ConfigError, DataError, VitlabError
from .models import create_model, list_models
from .models.convert import from_transformers, load_weights
from . import train  # callable module: vitlab.train(config) -> RunResult
from .train import RunResult, TrainConfig, evaluate, finetune, load_model, predict

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "from_transformers", "load_weights", "ConfigError", "DataError",
           "CheckpointError", "VitlabError",
           "train", "evaluate", "finetune", "predict", "load_model", "TrainConfig", "RunResult"]
