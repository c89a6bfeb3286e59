"""vitlab: patch-based image models (ViT, hybrid, CvT, ConvMixer, BiT ResNet) — build, train,
fine-tune, study and explain them."""
from .errors import CheckpointError, ConfigError, DataError, VitlabError
from .models import create_model, list_models
from .models.convert import from_transformers, load_weights

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "from_transformers", "load_weights", "ConfigError", "DataError",
           "CheckpointError", "VitlabError"]
