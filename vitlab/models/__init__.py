"""The model zoo. The first use of any name here (or of the registry's lookups) imports every
family's module, which registers its named variants; importing the package itself stays light
(PEP 562), so the `vitlab` command can register its sub-commands without importing torch."""
import importlib as _importlib

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


def __getattr__(name: str):
    # Any other name (a submodule: `from . import fast`) is AttributeError without side effects,
    # so that the import system then imports the submodule itself.
    if name in _LAZY:
        from .registry import load_families

        load_families()  # every family registered before any name is used
        value = getattr(_importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
