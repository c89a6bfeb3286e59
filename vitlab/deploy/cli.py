"""`vitlab export` (registered here) and the body of `vitlab predict` (its options are parsed in
vitlab/train/cli.py, beside train/eval/finetune)."""
from __future__ import annotations

import argparse
import csv
import json
import sys

from .options import DTYPES, EXPORTERS, FORMATS, PREDICT_FORMATS, PUBLISH_FORMATS  # noqa: F401


def register(sub) -> None:
    e = sub.add_parser(
        "export", help="write a trained model as ONNX / TorchScript / torch.export, checked on real images",
        description="Export a trained run for deployment and check the written file in the same command: it is "
                    "loaded back (ONNX Runtime for .onnx) and run on images of the run's validation split; the "
                    "largest logit difference and top-1 agreement against vitlab are printed and written to "
                    "check.json beside the file, with preprocess.json (size, channels, mean/std, class names).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("checkpoint", metavar="RUN", help="run directory or .safetensors checkpoint")
    e.add_argument("--format", default="onnx", choices=FORMATS + PUBLISH_FORMATS,
                   help="onnx (model.onnx), torchscript (model.pt), exported-program (torch.export, model.pt2), "
                        "hf (a transformers folder: ViTForImageClassification / CvtForImageClassification) or "
                        "timm (timm's key layout + config.json); hf and timm come with a model card README.md")
    e.add_argument("--dtype", default="fp32", choices=DTYPES,
                   help="int8: also write model.int8.onnx (ONNX Runtime dynamic quantisation) and report its "
                        "accuracy change on the validation images")
    e.add_argument("--batch", default="dynamic", metavar="dynamic|N", help="batch dimension of the file")
    e.add_argument("--img-size", metavar="S|dynamic",
                   help="image size of the file (default: the training size); 'dynamic' accepts any multiple of "
                        "the patch size (ViT/hybrid built with dynamic_img_size, sinusoidal or no position embedding)")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset")
    e.add_argument("--exporter", default="torchscript", choices=EXPORTERS,
                   help="ONNX exporter: torch's TorchScript-based one, or the torch.export-based one (needs onnxscript)")
    e.add_argument("--check-images", default="512", metavar="N|all",
                   help="validation images the check (and the int8 accuracy) runs on")
    e.add_argument("--out", metavar="DIR", help="output folder (default RUN/export-FORMAT)")
    e.add_argument("--best", action="store_true", help="the run's best checkpoint instead of the last")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.set_defaults(func=run_export)


def _check_images(value: str) -> int | None:
    from ..errors import ConfigError

    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--check-images {value!r} is not valid; use a number of images or 'all'") from None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def run_export(args) -> int:
    if args.format in PUBLISH_FORMATS:
        from pathlib import Path

        from ..models.publish_cli import export_formats

        out = Path(args.out) if args.out else Path(args.checkpoint) / f"export-{args.format}"
        # the model card names the command that made the weights (the run's source.json), not this one
        written = export_formats()[args.format](args.checkpoint, out)
        print(f"exported {args.checkpoint} in {args.format} format to {written} (weights, config.json, README.md)")
        return 0
    from .export import export

    r = export(args.checkpoint, args.format, args.out, dtype=args.dtype, batch=args.batch, img_size=args.img_size,
               opset=args.opset, check_images=_check_images(args.check_images),
               which="best" if args.best else "last", exporter=args.exporter)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        h, w = r["size"]
        size = f"{h}x{w}" + (" (any multiple of the patch size)" if r["dynamic_size"] else "")
        extra = f", opset {r['opset']}" if r["opset"] else ""
        print(f"exported {r['model']} ({size}, batch {r['batch']}{extra}) to {r['file']} "
              f"({_mb(r['bytes'])}, {r['export_s']:.1f} s)")
        engine = "ONNX Runtime" if r["format"] == "onnx" else f"the reloaded {r['format']} file"
        print(f"check on {r['images']} {r['dataset']} validation images: {engine} vs vitlab max |logit diff| "
              f"{r['max_abs_logit_diff']:.2e}, top-1 agreement {100 * r['top1_agreement']:.2f}%, "
              f"accuracy {100 * r['accuracy_exported']:.2f}% (vitlab {100 * r['accuracy_vitlab']:.2f}%)")
        if "other_size" in r:
            o = r["other_size"]
            print(f"  at {o['size'][0]}x{o['size'][1]} ({o['images']} images): max |logit diff| "
                  f"{o['max_abs_logit_diff']:.2e}")
        if "int8" in r:
            q = r["int8"]
            print(f"int8: {q['file']} ({_mb(q['bytes'])}): accuracy {100 * q['accuracy_fp32']:.2f}% -> "
                  f"{100 * q['accuracy_int8']:.2f}% ({100 * q['accuracy_change']:+.2f} points), "
                  f"top-1 agreement with fp32 {100 * q['top1_agreement_with_fp32']:.2f}%")
        print(f"preprocess: {r['preprocess_json']}   check: {r['check_json']}")
    if not r["ok"]:
        print(f"vitlab export: the exported file does not match vitlab (max |logit diff| above {r['tolerance']}); "
              f"do not deploy it; try --exporter dynamo or another --format", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- predict
def _table_line(r: dict) -> str:
    return f"{r['path']}: " + ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top"])


def run_predict(args) -> int:
    from .predict import predict_iter

    fmt = "jsonl" if args.json else args.format
    records = predict_iter(args.checkpoint, args.images, batch_size=args.batch_size, topk=args.topk,
                           backend=args.backend, onnx=args.onnx, which="best" if args.best else "last")
    out = sys.stdout
    try:
        failed, total = _write_records(records, fmt, out)
    except BrokenPipeError:  # `vitlab predict ... | head`: the reader has all it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if failed:
        if failed < total:  # (when nothing was predicted, the lines above say it all)
            print(f"vitlab predict: {failed} of {total} images could not be read (named above); "
                  f"the other {total - failed} were predicted", file=sys.stderr)
        return 1
    return 0


def _write_records(records, fmt: str, out) -> tuple[int, int]:
    writer = None
    total = failed = 0
    for r in records:
        total += 1
        if "error" in r:
            failed += 1
            where = "" if r["path"] in r["error"] else f"{r['path']}: "
            print(f"vitlab predict: {where}{r['error']}", file=sys.stderr)
            continue
        if r.get("note"):
            print(r["note"], file=sys.stderr)
        if fmt == "jsonl":
            out.write(json.dumps(r) + "\n")
        elif fmt == "csv":
            if writer is None:
                writer = csv.writer(out)
                k = len(r["top"])
                writer.writerow(["path"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "prob")])
            writer.writerow([r["path"]] + [v for t in r["top"] for v in (t["class"], f"{t['prob']:.6f}")])
        else:
            out.write(_table_line(r) + "\n")
        out.flush()
    return failed, total
