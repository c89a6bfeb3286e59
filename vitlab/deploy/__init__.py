"""Deployment: export a trained run to ONNX / TorchScript / torch.export files checked against
vitlab, int8 quantisation with ONNX Runtime, and batched, streamed prediction over folders.

    from vitlab.deploy import export, predict_iter
    report = export("runs/NAME", "onnx", dtype="int8")     # model.onnx, preprocess.json, check.json
    for r in predict_iter("runs/NAME", ["photos/"], batch_size=64):
        print(r["path"], r.get("top") or r["error"])
"""
from .export import FORMATS, export
from .predict import iter_image_paths, predict_iter
from .preprocess import Preprocess, load_spec

__all__ = ["FORMATS", "export", "predict_iter", "iter_image_paths", "Preprocess", "load_spec"]
