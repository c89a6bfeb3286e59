"""The model zoo. The first use of any name here (or of the registry's lookups) imports every
family's module, which registers its named variants; importing the package itself stays light
(PEP 562), so the `vitlab` command can register its sub-commands without importing torch."""
from .._lazy import lazy_names as _lazy_names

# public name -> submodule that defines it
_LAZY = {
    "create_model": "registry", "get_spec": "registry", "list_models": "registry", "resolve_name": "registry",
    "VisionTransformer": "vit", "load_resampled_state_dict": "vit", "resample_state_dict": "vit",
    "LoadResult": "convert", "from_transformers": "convert", "load_weights": "convert",
    "resample_abs_pos_embed": "layers", "sincos_1d": "layers", "sincos_2d": "layers",
}

__all__ = ["create_model", "list_models", "get_spec", "resolve_name", "VisionTransformer",
           "load_resampled_state_dict", "resample_state_dict", "from_transformers", "load_weights", "LoadResult",
           "resample_abs_pos_embed", "sincos_1d", "sincos_2d"]


def _load_families() -> None:
    from .registry import load_families

    load_families()  # every family registered before any name is used


__getattr__, __dir__ = _lazy_names(__name__, _LAZY, globals(), before=_load_families)
