"""`vitlab export`: write a trained run as an ONNX, TorchScript or torch.export file, then check
the written file against vitlab on real images of the run's validation split.

Each export writes, in one folder (default <run>/export-<format>/):
  model.onnx | model.pt | model.pt2   the model (fp32), taking preprocessed float32 NCHW images
  model.int8.onnx                     with --dtype int8: weights quantised to int8 (ONNX Runtime)
  preprocess.json                     size, resize, channels, mean/std, class names (see preprocess.py)
  check.json                          what the check measured (logit difference, agreement, accuracy)
"""
from __future__ import annotations

from .options import DTYPES, EXPORTERS, FORMATS  # noqa: F401 (re-exported)

import contextlib
import io
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError
from .preprocess import Preprocess, spec_from_info

FILENAMES = {"onnx": "model.onnx", "torchscript": "model.pt", "exported-program": "model.pt2"}
# fp32 files compute the same function with other kernels: differences are rounding only. Above
# this the file is reported as not matching (and `vitlab export` exits with status 1).
FP32_TOLERANCE = 1e-3
# position embeddings resampled at run time by Python code: a traced graph keeps the export size
_SIZE_FIXED_POS_EMBED = ("learned", "learned_2d", "relative")


def _need(module: str, extra: str = "deploy"):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        pkg = {"onnxruntime.quantization": "onnxruntime"}.get(module, module)
        raise ConfigError(f"{module} is not installed; pip install {pkg} (or pip install 'vitlab[{extra}]')") from None


def ort_session(path: str | Path):
    """An ONNX Runtime CPU session with as many threads as PyTorch uses, so both sides of a
    comparison get the same cores (and tests running one thread per worker do not oversubscribe)."""
    ort = _need("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # idle threads sleep instead of spinning: on a shared or busy CPU (this project's 2-core machine)
    # spinning workers took cores from the ones with work (11.9 vs 14.1 img/s for ViT-Ti/16, batch 8)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise DataError(f"ONNX Runtime cannot load {str(path)!r} ({type(e).__name__}: {str(e)[:200]}); "
                        f"re-export it with `vitlab export RUN --format onnx`") from None


class OrtRunner:
    """float32 NCHW batch -> logits with ONNX Runtime; a file exported for a fixed batch size is
    fed in chunks of that size (the last one padded)."""

    def __init__(self, path: str | Path):
        self.session = ort_session(path)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(torch.float32).contiguous()
        if self.fixed_batch is None:
            return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])
        n, b, out = x.shape[0], self.fixed_batch, []
        for s in range(0, n, b):
            chunk = x[s:s + b]
            pad = b - chunk.shape[0]
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros(pad, *chunk.shape[1:])])
            out.append(torch.from_numpy(self.session.run(None, {self.input_name: chunk.numpy()})[0])[:b - pad])
        return torch.cat(out)


class TorchRunner:
    """float32 NCHW batch -> logits with a PyTorch callable (vitlab model, TorchScript, exported program)."""

    def __init__(self, fn, fixed_batch: int | None = None):
        self.fn = fn
        self.fixed_batch = fixed_batch

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = self.fixed_batch
        if b is None:
            return self.fn(x).float()
        out = []
        for s in range(0, x.shape[0], b):
            chunk = x[s:s + b]
            pad = b - chunk.shape[0]
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros(pad, *chunk.shape[1:])])
            out.append(self.fn(chunk).float()[:b - pad])
        return torch.cat(out)


def load_exported(path: str | Path, fixed_batch: int | None = None):
    """A runner for an exported file, chosen by its extension (`fixed_batch`: the batch size an
    exported program was written for; ONNX files carry theirs)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{str(p)!r} does not exist; export the run first: vitlab export RUN --format onnx")
    if p.suffix == ".onnx":
        return OrtRunner(p)
    if p.suffix == ".pt":
        return TorchRunner(torch.jit.load(str(p), map_location="cpu").eval())
    if p.suffix == ".pt2":
        return TorchRunner(torch.export.load(str(p)).module(), fixed_batch)
    raise ConfigError(f"{p.name}: unknown exported file type; expected .onnx, .pt (TorchScript) or .pt2 (torch.export)")


# images per forward pass in the checks. It matters for int8: dynamic quantisation takes one
# activation scale per tensor, i.e. per batch, so an image's int8 logits depend slightly on its batch.
CHECK_BATCH = 64


def _parse_batch(batch) -> int | None:
    if batch in (None, "dynamic"):
        return None
    try:
        b = int(batch)
    except (TypeError, ValueError):
        b = 0
    if b < 1:
        raise ConfigError(f"--batch {batch!r} is not valid; use 'dynamic' or a positive batch size such as 8")
    return b


def _runs_at(model, in_chans: int, size: list[int]) -> bool:
    """Whether the model takes images of `size`: ViTs say so (dynamic_img_size); convolutional
    models without position tables (ConvMixer, ResNet, CvT) take any size, which one forward shows."""
    flag = getattr(model, "dynamic_img_size", None)
    if flag is not None:
        return bool(flag)
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, *size))
        return True
    except Exception:
        return False


def _export_size(model, info: dict, img_size, fmt: str) -> tuple[list[int], bool]:
    """(H, W) of the example input, and whether the file must accept other sizes."""
    from ..models.registry import builder_params, get_spec

    trained = [int(info["img_size"])] * 2 if isinstance(info["img_size"], int) else list(info["img_size"])
    name = info["config"].get("model")
    if img_size in (None, "", "trained"):
        return trained, False
    try:
        hint = ("train/fine-tune with model_kwargs.dynamic_img_size=true"
                if "dynamic_img_size" in builder_params(get_spec(name).builder) else "it has no dynamic_img_size option")
    except Exception:  # a model outside the registry
        hint = "fine-tune it at the size you need"
    if img_size == "dynamic":
        if not _runs_at(model, int(info["in_chans"]), [2 * s for s in trained]):
            raise ConfigError(f"{name} was built for {trained[0]}x{trained[1]} images only; export it at that size "
                              f"(drop --img-size) or {hint}")
        kind = getattr(model, "pos_embed_kind", None)
        if kind in _SIZE_FIXED_POS_EMBED:
            raise ConfigError(f"{name} resamples its {kind} position embeddings in Python at run time, which an "
                              f"exported graph fixes to one size; export one file per size with --img-size S")
        if fmt == "exported-program":
            raise ConfigError("exported-program files are exported at one image size; use --img-size S, "
                              "or --format onnx / torchscript for a dynamic size")
        return trained, True
    try:
        s = int(img_size)
    except (TypeError, ValueError):
        raise ConfigError(f"--img-size {img_size!r} is not valid; use a size in pixels or 'dynamic'") from None
    if s < 1:
        raise ConfigError(f"--img-size {s} must be a positive number of pixels")
    if [s, s] != trained and not _runs_at(model, int(info["in_chans"]), [s, s]):
        raise ConfigError(f"{name} was built for {trained[0]}x{trained[1]} images and cannot run at {s}x{s}; "
                          f"export it at its size, or fine-tune it at {s} first (vitlab finetune RUN --img-size {s})")
    return [s, s], False


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and deprecation notes; the check below is the report that matters."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def write_model(model, example: torch.Tensor, path: Path, fmt: str, fixed_batch: int | None,
                 dynamic_size: bool, opset: int, exporter: str) -> None:
    # vitlab's fast paths (oneDNN bf16 calls, its compiled kernels, thread streams) are switched
    # off while tracing: the file must hold standard operators only, so that it runs anywhere.
    from ..accel import reference_mode

    with reference_mode(), _quiet(), torch.no_grad():
        if fmt == "onnx":
            axes = {} if fixed_batch else {0: "batch"}
            if dynamic_size:
                axes.update({2: "height", 3: "width"})
            if exporter == "torchscript":
                # The TorchScript-based exporter (dynamo=False) is the default: with torch 2.13 it
                # exports every family and option (the dynamo exporter fails to decompose the
                # relative position bias), takes about a second instead of five for small models and
                # needs no onnxscript. Both give the same logits to ~1e-6 where both work.
                torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": axes, "logits": {0: "batch"} if not fixed_batch else {}},
                                  opset_version=opset, dynamo=False)
            else:
                _need("onnxscript")
                dims = {i: torch.export.Dim.AUTO for i in axes}
                torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                                  dynamic_shapes=(dims,), opset_version=opset, dynamo=True,
                                  external_data=False)  # one self-contained file, as the other exporter writes
        elif fmt == "torchscript":
            # the trace records the tensor operations; the check below runs the saved file on
            # other batch sizes (and sizes) than the example, which is what trace's own check cannot
            traced = torch.jit.trace(model, (example,), check_trace=False)
            torch.jit.save(traced, str(path))
        else:
            shapes = None if fixed_batch else ({0: torch.export.Dim("batch", min=1, max=65536)},)
            ep = torch.export.export(model, (example,), dynamic_shapes=shapes)
            torch.export.save(ep, str(path))


def quantize_int8(src: Path, dst: Path) -> str:
    """Dynamic int8 quantisation with ONNX Runtime: int8 weights, activations quantised per batch
    at run time, no calibration data. Every MatMul/Gemm/Conv is quantised except the first
    convolution (the patch embedding or stem), which sees raw pixels: quantising it cost ViTs on
    MNIST 0.4 points of top-1 agreement with fp32 (98.9% -> 99.3% without it). Returns what was done."""
    onnx = _need("onnx")
    q = _need("onnxruntime.quantization")
    pre = dst.with_suffix(".pre.onnx")
    with _quiet():
        try:  # shape inference and graph clean-up first, as ONNX Runtime recommends before quantising
            q.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            source = pre
        except Exception:  # an optimisation only; quantise the plain file if it fails
            source = src
        graph = onnx.load(str(source)).graph
        first_conv = next((n.name for n in graph.node if n.op_type == "Conv"), None)
        q.quantize_dynamic(str(source), str(dst), weight_type=q.QuantType.QInt8,
                           op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                           nodes_to_exclude=[first_conv] if first_conv else [])
    pre.unlink(missing_ok=True)
    return ("onnxruntime quantize_dynamic: int8 weights of MatMul/Gemm/Conv"
            + (" except the first convolution (kept fp32)" if first_conv else ""))


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def export(run: str | Path, fmt: str = "onnx", out: str | Path | None = None, *, dtype: str = "fp32",
           batch: int | str | None = "dynamic", img_size: int | str | None = None, opset: int = 18,
           check_images: int | None = 512, which: str = "last", ema: bool | None = None,
           exporter: str = "torchscript") -> dict[str, Any]:
    """Export a trained run (or checkpoint) and check the written file on the run's validation
    images: max |logit difference| and top-1 agreement against vitlab, and with dtype='int8'
    the accuracy of the quantised file against the fp32 one. Returns the report (also written
    to check.json beside the file)."""
    from ..train.api import _load_eval_data
    from ..train.checkpoint import load_model

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not known; choose {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not known; choose {' or '.join(DTYPES)}")
    if dtype == "int8" and fmt != "onnx":
        raise ConfigError("int8 quantisation is done by ONNX Runtime; use --format onnx with --dtype int8")
    if exporter not in EXPORTERS:
        raise ConfigError(f"--exporter {exporter!r} is not known; choose {' or '.join(EXPORTERS)}")
    if check_images is not None and check_images < 1:
        raise ConfigError(f"--check-images {check_images} must be at least 1")
    fixed_batch = _parse_batch(batch)
    if fmt == "onnx":
        _need("onnx")
        _need("onnxruntime")

    model, info = load_model(run, which=which, ema=ema)
    model.float().eval()
    size, dynamic_size = _export_size(model, info, img_size, fmt)
    bundle = _load_eval_data(info, None, None, None)
    if bundle.num_classes != info["num_classes"]:
        raise DataError(f"the model predicts {info['num_classes']} classes but its data set {bundle.name} now has "
                        f"{bundle.num_classes}; check the run's data_dir")
    spec = spec_from_info(info, bundle.mean, bundle.std, dynamic_size)
    spec["size"] = size
    pre = Preprocess(spec)

    val = bundle.val
    if len(val.labels) == 0:
        raise DataError(f"the run's validation split of {bundle.name} is empty; nothing to check the export on")
    n = len(val.labels) if check_images is None else min(check_images, len(val.labels))
    # a seeded sample: validation splits are often ordered by class
    idx = torch.randperm(len(val.labels), generator=torch.Generator().manual_seed(0))[:n].sort().values
    labels = val.labels[idx].long()
    chunks = [idx[s:s + CHECK_BATCH] for s in range(0, n, CHECK_BATCH)]

    out_dir = Path(out) if out is not None else Path(info["run_dir"]) / f"export-{fmt}"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILENAMES[fmt]
    for stale in (out_dir / "model.int8.onnx", out_dir / "model.onnx.data"):  # from an earlier export here
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    want_b = fixed_batch or 2
    example = pre.batch(val.images[idx[:want_b]])
    if example.shape[0] < want_b:  # fewer validation images than the batch: repeat them
        example = example.repeat(want_b // example.shape[0] + 1, 1, 1, 1)[:want_b]
    try:
        write_model(model, example, path, fmt, fixed_batch, dynamic_size, opset, exporter)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"exporting {info['config'].get('model')} to {fmt} failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300] if str(e) else ''}); try --format exported-program or "
                          f"--exporter {'dynamo' if exporter == 'torchscript' else 'torchscript'}") from None
    export_s = time.perf_counter() - t0
    qpath, method, quantize_s = out_dir / "model.int8.onnx", None, None
    if dtype == "int8":
        t0 = time.perf_counter()
        method = quantize_int8(path, qpath)
        quantize_s = time.perf_counter() - t0

    # ---- the check: the saved file, loaded back, against vitlab's own forward pass, batch by
    # batch (only logits are kept, so --check-images all works on large validation sets)
    reference = TorchRunner(model)
    runner = load_exported(path, fixed_batch)
    int8 = OrtRunner(qpath) if dtype == "int8" else None
    want, got, q_logits = [], [], []
    for i in chunks:
        xb = pre.batch(val.images[i])
        want.append(reference(xb))
        got.append(runner(xb))
        if int8 is not None:
            q_logits.append(int8(xb))
    want, got = torch.cat(want), torch.cat(got)
    diff = float((got - want).abs().max())
    report: dict[str, Any] = {
        "format": fmt, "file": str(path), "bytes": path.stat().st_size, "model": info["config"].get("model"),
        "checkpoint": info["checkpoint"], "dataset": bundle.name, "split": "val", "images": n,
        "size": size, "dynamic_size": dynamic_size, "batch": fixed_batch or "dynamic",
        "opset": opset if fmt == "onnx" else None, "exporter": exporter if fmt == "onnx" else None,
        "export_s": round(export_s, 2), "max_abs_logit_diff": diff, "max_abs_logit": float(want.abs().max()),
        "top1_agreement": _agreement(got, want),
        "accuracy_vitlab": float((want.argmax(1) == labels).float().mean()),
        "accuracy_exported": float((got.argmax(1) == labels).float().mean()),
        "tolerance": FP32_TOLERANCE, "torch": torch.__version__,
    }
    if fmt == "onnx":
        report["onnxruntime"] = _need("onnxruntime").__version__
    if dynamic_size:
        # another size than the example's proves the file did not keep the traced one
        other = [2 * s for s in size]
        x2 = Preprocess({**spec, "size": other}).batch(val.images[idx[:8]])
        d2 = float((runner(x2) - reference(x2)).abs().max())
        report["other_size"] = {"size": other, "images": int(x2.shape[0]), "max_abs_logit_diff": d2}
        diff = max(diff, d2)
    report["ok"] = bool(diff <= FP32_TOLERANCE)

    if int8 is not None:
        q_logits = torch.cat(q_logits)
        acc_fp32 = report["accuracy_exported"]
        acc_int8 = float((q_logits.argmax(1) == labels).float().mean())
        report["int8"] = {
            "file": str(qpath), "bytes": qpath.stat().st_size, "method": method,
            "quantize_s": round(quantize_s, 2), "accuracy_fp32": acc_fp32, "accuracy_int8": acc_int8,
            "accuracy_change": acc_int8 - acc_fp32, "top1_agreement_with_fp32": _agreement(q_logits, got),
            "max_abs_logit_diff_vs_fp32": float((q_logits - got).abs().max()),
        }
    (out_dir / "preprocess.json").write_text(json.dumps(spec, indent=1))
    (out_dir / "check.json").write_text(json.dumps(report, indent=1))
    report["preprocess_json"] = str(out_dir / "preprocess.json")
    report["check_json"] = str(out_dir / "check.json")
    return report
