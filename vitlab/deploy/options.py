"""The choices of `vitlab export` and `vitlab predict`, apart from the code that needs torch (so the
command line can list them without importing it)."""
FORMATS = ("onnx", "torchscript", "exported-program")
# formats for people who use transformers or timm (vitlab.models.publish): weights + config + model card
PUBLISH_FORMATS = ("hf", "timm")
DTYPES = ("fp32", "int8")
EXPORTERS = ("torchscript", "dynamo")
BACKENDS = ("torch", "onnxruntime")
PREDICT_FORMATS = ("table", "csv", "jsonl")
