"""The choices of `vitlab export` and `vitlab predict`, apart from the code that needs torch (so the
command line can list them without importing it)."""
FORMATS = ("onnx", "torchscript", "exported-program")
DTYPES = ("fp32", "int8")
EXPORTERS = ("torchscript", "dynamo")
BACKENDS = ("torch", "onnxruntime")
PREDICT_FORMATS = ("table", "csv", "jsonl")
