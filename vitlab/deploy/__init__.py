"""Deployment: export a trained run to ONNX / TorchScript / torch.export files checked against
vitlab, int8 quantisation with ONNX Runtime, and batched, streamed prediction over folders.

    from vitlab.deploy import export, predict_iter
    report = export("runs/NAME", "onnx", dtype="int8")     # model.onnx, preprocess.json, check.json
    for r in predict_iter("runs/NAME", ["photos/"], batch_size=64):
        print(r["path"], r.get("top") or r["error"])
"""
import importlib as _importlib

from .options import FORMATS

# imported on first use (PEP 562): the `vitlab` command registers `export` without importing torch
_LAZY = {"export": "export", "predict_iter": "predict", "iter_image_paths": "predict", "Preprocess": "preprocess",
         "load_spec": "preprocess"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["FORMATS", "export", "predict_iter", "iter_image_paths", "Preprocess", "load_spec"]
