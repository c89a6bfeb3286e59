"""CPU inference speed of one model deployed four ways, measured in one run:

    python benchmarks/deploy_speed.py                 # vit_s16 and vit_ti16 at 224 px, batch 8 (~3 min on 2 cores)
    python benchmarks/deploy_speed.py --write         # also put the table in benchmarks/RESULTS.md ("Deploy")

Rows: vitlab eager in float32 (model.eval(), as `vitlab predict` runs it), vitlab's bf16 inference
path (`optimize_for_inference`, as `vitlab bench` runs it), the same model exported by
`vitlab export` and run by ONNX Runtime in float32 and after int8 dynamic quantisation
(`--dtype int8`), and Hugging Face `transformers`' ViTForImageClassification built with the same
config and carrying the same weights (float32, SDPA attention). All implementations run in turn,
one timed batch each per round (a, b, c, ..., a, b, c, ...), so load from other processes on a
shared machine hits them alike; img/s is the median over rounds. PyTorch and ONNX Runtime get the
same number of threads.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitlab import bench
from vitlab.deploy.export import OrtRunner, quantize_int8, write_model

OUT = Path(__file__).resolve().parent / "RESULTS.md"
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> str:
    """Which of the instruction sets that decide these numbers the CPU has (from /proc/cpuinfo)."""
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "").split()
    except OSError:
        return "unknown"
    return ", ".join(f"{f}: {'yes' if f in flags else 'no'}" for f in FLAGS)


def implementations(name: str, batch: int, img_size: int, workdir: Path) -> dict:
    pair = bench.build_pair(name, "transformers", num_classes=1000, img_size=img_size)
    ours, hf = pair.ours.eval(), pair.peer.eval()
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    onnx = workdir / f"{name}.onnx"
    write_model(ours, x[:2], onnx, "onnx", None, False, 18, "torchscript")
    int8 = workdir / f"{name}.int8.onnx"
    quantize_int8(onnx, int8)
    bf16 = bench.prepare(copy.deepcopy(ours), "infer", torch.bfloat16, torch.device("cpu"), fast=True)
    ort_fp32, ort_int8 = OrtRunner(onnx), OrtRunner(int8)
    with torch.inference_mode():
        want = ours(x)
        for label, got in (("ONNX Runtime fp32", ort_fp32(x)), ("transformers", hf(pixel_values=x).logits)):
            print(f"  {name}: {label} vs vitlab fp32 max |logit diff| {float((got - want).abs().max()):.1e}")

    def infer(fn):
        def step():
            with torch.inference_mode():
                fn()
        return step

    return {
        "vitlab eager fp32": infer(lambda: ours(x)),
        "vitlab bf16 (optimize_for_inference)": infer(lambda: bf16(x)),
        "ONNX Runtime fp32 (vitlab export)": lambda: ort_fp32(x),
        "ONNX Runtime int8 (vitlab export --dtype int8)": lambda: ort_int8(x),
        "transformers fp32": infer(lambda: hf(pixel_values=x)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_s16", "vit_ti16"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=10, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (0: torch's default)")
    ap.add_argument("--write", action="store_true", help="put the table in benchmarks/RESULTS.md under 'Deploy'")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            impls = implementations(name, args.batch_size, args.img_size, Path(tmp))
            times = bench.time_alternating(impls, args.steps, warmup=args.warmup)
            ips = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
            for k, v in ips.items():
                rows.append((name, k, v, v / ips["transformers fp32"]))
                print(f"  {name:10s} {k:48s} {v:8.1f} img/s  {v / ips['transformers fp32']:.2f}x transformers",
                      flush=True)
    import onnxruntime
    import transformers

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python " + " ".join(["benchmarks/deploy_speed.py", *sys.argv[1:]])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    facts = (f"- command: `{cmd}`; date: {date}; run time {time.time() - t0:.0f} s; 1-min load average at the end: "
             f"{load:.1f} (the CPU is shared: compare rows of one run, not runs)\n"
             f"- CPU: {bench.cpu_model_name()}, {torch.get_num_threads()} threads; {cpu_flags()}\n"
             f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}; "
             f"batch {args.batch_size}, {args.img_size} px, random weights (the same in every implementation), "
             f"median of {args.steps} rounds after {args.warmup} warm-up rounds, implementations alternating")
    table = ("| model | implementation | img/s | vs transformers |\n|---|---|---:|---:|\n"
             + "\n".join(f"| {m} | {k} | {v:.1f} | {r:.2f}x |" for m, k, v, r in rows))
    section = (f"## Deploy: CPU inference, vitlab vs ONNX Runtime vs transformers\n\n{facts}\n\n{table}\n")
    print("\n" + section)
    if args.write:
        text = OUT.read_text() if OUT.exists() else "# vitlab speed on this machine\n"
        # replace an earlier Deploy section (up to the next heading), else insert it before the GPU one
        pat = re.compile(r"## Deploy:.*?(?=\n## |\Z)", re.S)
        if pat.search(text):
            text = pat.sub(lambda _: section.rstrip("\n") + "\n", text)
        elif "\n## GPU" in text:
            text = text.replace("\n## GPU", "\n" + section + "\n## GPU", 1)
        else:
            text = text.rstrip("\n") + "\n\n" + section
        OUT.write_text(text)
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
