"""Deployment: export a trained run to ONNX / TorchScript / torch.export files checked against
vitlab, int8 quantisation with ONNX Runtime, and batched, streamed prediction over folders.

    from vitlab.deploy import export, predict_iter
    report = export("runs/NAME", "onnx", dtype="int8")     # model.onnx, preprocess.json, check.json
    for r in predict_iter("runs/NAME", ["photos/"], batch_size=64):
        print(r["path"], r.get("top") or r["error"])
"""
from .._lazy import lazy_names as _lazy_names

from .options import FORMATS

# imported on first use (PEP 562): the `vitlab` command registers `export` without importing torch
_LAZY = {"export": "export", "predict_iter": "predict", "iter_image_paths": "predict", "Preprocess": "preprocess",
         "load_spec": "preprocess"}


__getattr__, __dir__ = _lazy_names(__name__, _LAZY, globals())

__all__ = ["FORMATS", "export", "predict_iter", "iter_image_paths", "Preprocess", "load_spec"]
