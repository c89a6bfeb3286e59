"""The model zoo. Importing this package registers every family's named variants."""
from . import vit  # noqa: F401  (registers ViT variants)
from .registry import create_model, get_spec, list_models, resolve_name
from .vit import VisionTransformer, load_resampled_state_dict, resample_state_dict
from .convert import LoadResult, from_transformers, load_weights
from .layers import resample_abs_pos_embed, sincos_1d, sincos_2d

# Families registered by their own modules; imported here so `list_models()` sees them all.
import importlib as _importlib

for _mod in ("resnet", "hybrid", "cvt", "convmixer"):
    try:
        _importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _e:  # pragma: no cover - only while a family is being written
        if _e.name != f"{__name__}.{_mod}":
            raise

__all__ = ["create_model", "list_models", "get_spec", "resolve_name", "VisionTransformer",
           "load_resampled_state_dict", "resample_state_dict", "from_transformers", "load_weights", "LoadResult",
           "resample_abs_pos_embed", "sincos_1d", "sincos_2d"]
