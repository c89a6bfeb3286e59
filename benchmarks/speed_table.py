"""The README's speed table, measured in one run on this machine.

    python benchmarks/speed_table.py            # full table + fast-path before/after, about 20 min on 2 cores
    python benchmarks/speed_table.py --quick    # fewer steps, no compile row (a smoke run)

Rows: ViT-S/16, ViT-B/16, CvT-13 (vs Hugging Face transformers, same config and weights) and
ConvMixer-768/32 (vs the paper's definition written in plain PyTorch, `vitlab.bench.
paper_convmixer`), inference and training steps, bf16, batch 32 at 224 px. Each row runs
vitlab and the peer alternately in one process (median of the timed steps), so load from
other processes hits both alike; TFLOP/s come from counted FLOPs and are compared with a
bf16 matrix-product peak measured at the start of the run.

A second table measures every fast path before and after, on the same shapes.
Both tables and the run's facts (device, command, date) go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitlab
from vitlab import bench
from vitlab.models import convmixer as convmixer_mod
from vitlab.accel import kernels as cpu_kernels, ops as fast
from vitlab.models.layers import Attention

ROWS = [("ViT-S/16", "vit_s16"), ("ViT-B/16", "vit_b16"), ("CvT-13", "cvt_13"), ("ConvMixer-768/32", "convmixer_768_32")]
TARGETS = {("vit_s16", "infer"): 2.0, ("vit_s16", "train"): 1.5, ("cvt_13", "infer"): 2.0, ("cvt_13", "train"): 1.5}
OUT = Path(__file__).resolve().parent / "RESULTS.md"
CONVMIXER_TRAIN_STEPS = 3
# every full run appends its ratios here; RESULTS.md shows all runs of the current vitlab code side
# by side, because one run on a CPU shared with other tenants does not settle a ratio near a target
HISTORY = Path(__file__).resolve().parent / "speed_runs.jsonl"
PACKAGE = Path(vitlab.__file__).resolve().parent


def _code_only(source: str) -> str:
    """The module's syntax tree without docstrings (comments are not in it): editing prose
    does not make earlier runs incomparable."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def code_fingerprint(package: Path | None = None) -> str:
    """A hash of vitlab's code (Python without docstrings and comments, and the C++ kernels):
    runs with the same fingerprint measured the same code."""
    import hashlib

    package = PACKAGE if package is None else package
    h = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        h.update(str(f.relative_to(package)).encode())
        h.update(_code_only(f.read_text()).encode())
    for f in sorted(package.rglob("*.cpp")):  # the CPU kernels (vitlab/csrc), byte for byte
        h.update(str(f.relative_to(package)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def spread_table(runs: list[dict]) -> str:
    """Ratios of every run (columns), with their range and how many runs met each target."""
    keys = []
    for run in runs:
        for r in run["rows"]:
            if (r["label"], r["mode"], r["model"]) not in keys:
                keys.append((r["label"], r["mode"], r["model"]))
    head = " | ".join(f"{run['end'].split()[1]} (peak {run['peak_tflops']:.2f})" for run in runs)
    lines = [f"| model | step | {head} | range | target |", "|---|---|" + "---|" * len(runs) + "---|---|"]
    for label, mode, model in keys:
        ratios = [next((r["ratio"] for r in run["rows"] if r["model"] == model and r["mode"] == mode), None)
                  for run in runs]
        got = [x for x in ratios if x is not None]
        target = TARGETS.get((model, mode))
        tgt = "-" if target is None else f">= {target:g}x: met in {sum(x >= target for x in got)} of {len(got)}"
        cells = " | ".join("-" if x is None else f"{x:.2f}x" for x in ratios)
        lines.append(f"| {label} | {mode} | {cells} | {min(got):.2f}-{max(got):.2f}x | {tgt} |")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- main table
FAST_PATH_STEPS = 7


def model_rows(args, name: str, peak: float, dtype: str = "bf16") -> list[dict]:
    """One model's inference and training rows, vitlab and the peer alternating step by step."""
    compare = peer_of(name)
    out = []
    for mode in ("infer", "train"):
        steps = args.steps if mode == "infer" else args.train_steps
        warmup = args.warmup
        if mode == "train" and name.startswith("convmixer"):
            # about 35 s per step and implementation on 2 cores: fewer steps keep the run short
            steps, warmup = min(steps, CONVMIXER_TRAIN_STEPS), 1
        t0 = time.perf_counter()
        res = bench.run_benchmark(name, mode=mode, batch_size=args.batch_size, img_size=224, dtype=dtype,
                                  steps=steps, warmup=warmup, compare=compare, peak=peak, measure_memory=False)
        ours, peer = res
        ratio = statistics.median([b / a for a, b in zip(ours.times, peer.times)])
        out.append(dict(model=name, mode=mode, ours=ours.images_per_s, peer=peer.images_per_s, peer_impl=peer.impl,
                        ratio=ratio, tflops=ours.tflops, frac=ours.frac_peak, peer_frac=peer.frac_peak,
                        seconds=time.perf_counter() - t0))
    return out


def model_rows_in_fresh_process(args, name: str, peak: float, dtype: str = "bf16") -> list[dict]:
    """`model_rows` in a new Python process. Each model gets the state a user's own process would
    have: measured on 2026-11-22, rows run after others in one process inherited a C heap grown by
    them, so the peer's large temporaries stopped page-faulting (transformers' CvT-13 inference:
    about 200,000 minor faults per step in a fresh process, none after the ViT-S/16 rows; its step
    560-640 ms instead of 780-850) and a row's ratio depended on the rows before it."""
    return _child(f"the rows of {name}", "--_model-rows", name, "--_peak", repr(peak), "--steps", str(args.steps),
                  "--train-steps", str(args.train_steps), "--warmup", str(args.warmup),
                  "--batch-size", str(args.batch_size), "--_dtype", dtype)


def _child(what: str, *argv: str):
    """Run this script in a fresh Python process with `argv`; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], stdout=subprocess.PIPE,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}); its messages are above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peer_of(name: str) -> str:
    """The speed table's peer: the paper's plain-PyTorch ConvMixer, else `transformers`."""
    return "paper" if name.startswith("convmixer") else "transformers"


def allocator_steps(name: str, tuned: bool, steps: int, batch_size: int, mode: str = "infer") -> dict:
    """In this (fresh) process, glibc as shipped or after `tune_cpu_allocator`: vitlab's and the
    peer's steps as the main table times them (alternating, one warm-up each)."""
    if tuned:
        fast.tune_cpu_allocator()
    ours, peer = bench.run_benchmark(name, mode=mode, batch_size=batch_size, img_size=224, dtype="bf16",
                                     steps=steps, warmup=1, compare=peer_of(name), peak=1.0, measure_memory=False)
    return dict(ours=ours.times, peer=peer.times, peer_impl=peer.impl)


# label, model, mode, rounds, steps. `vitlab train` tunes the allocator by default on CPU
# (`cpu_allocator=tuned`); ConvMixer's training row shows why (its steps take 13-45 s: one round)
ALLOCATOR_ROWS = [("ViT-S/16", "vit_s16", "infer", 3, 3), ("ConvMixer-768/32", "convmixer_768_32", "infer", 2, 2),
                  ("ConvMixer-768/32", "convmixer_768_32", "train", 1, 1)]


def allocator_rows(args, lines: list[str]) -> None:
    """The allocator rows of the fast-path table. glibc's settings cannot be put back once changed,
    and a heap grown by earlier rows serves large blocks without page faults (docs/speed.md,
    "Session 11"), so each variant runs in its own fresh process: as shipped ("before") and with
    `tune_cpu_allocator` ("after"), alternating process by process, round by round."""
    B = args.batch_size
    for label, name, mode, rounds, steps in ALLOCATOR_ROWS:
        if args.quick:
            rounds, steps = 1, 1
        res = {False: [], True: []}
        for r in range(rounds):
            for tuned in ((False, True) if r % 2 == 0 else (True, False)):
                res[tuned].append(_child(f"the allocator rows of {name}", "--_allocator-steps", name, "--_tuned",
                                         str(int(tuned)), "--steps", str(steps), "--batch-size", str(B),
                                         "--_allocator-mode", mode))
        med = statistics.median
        t = {(side, tuned): _Timed([med(x[side]) for x in res[tuned]]) for side in ("ours", "peer")
             for tuned in (False, True)}
        both_tuned = med([b / a for x in res[True] for a, b in zip(x["ours"], x["peer"])])
        as_shipped = med([b / a for x in res[False] for a, b in zip(x["ours"], x["peer"])])
        before = "glibc as shipped"
        _row(lines, "CPU allocator keeps freed memory (`tune_cpu_allocator`)", f"{label} {mode}, vitlab", before,
             t["ours", False], "tuned", t["ours", True], B, f"each variant in {rounds} fresh process"
             f"{'es' if rounds > 1 else ''} ({steps} timed steps each); the main table runs every "
             "implementation as shipped")
        _row(lines, "the same, given to the peer", f"{label} {mode}, {res[True][0]['peer_impl']}", before,
             t["peer", False], "tuned", t["peer", True], B, f"vitlab / peer: {as_shipped:.2f}x as shipped, "
             f"{both_tuned:.2f}x with both tuned")


def main_table(args, peak: float) -> tuple[str, list[dict]]:
    rows, lines = [], []
    # ceiling: the ratio vitlab would reach at 100% of the measured matrix-product peak (the peer's
    # time over the time of the step's FLOPs at the peak): a target above it cannot be met on this
    # machine by any implementation of the same model's arithmetic
    lines.append("| model | step | vitlab img/s | peer | peer img/s | vitlab / peer | target | vitlab TFLOP/s | "
                 "vitlab % of peak | peer % of peak | ceiling (vitlab at 100% of peak) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, name in ROWS:
        if args.models and name not in args.models:
            continue
        for r in model_rows_in_fresh_process(args, name, peak):
            mode, ratio = r["mode"], r["ratio"]
            target = TARGETS.get((name, mode))
            tgt = "-" if target is None else (f">= {target:g}x: " + ("met" if ratio >= target else "NOT met"))
            lines.append(f"| {label} | {mode} | {r['ours']:.1f} | {r['peer_impl']} | {r['peer']:.1f} | "
                         f"{ratio:.2f}x | {tgt} | {r['tflops']:.3f} | {100 * r['frac']:.1f} | "
                         f"{100 * r['peer_frac']:.1f} | {1 / r['peer_frac']:.2f}x |")
            rows.append(dict(label=label, model=name, mode=mode, ours=round(r["ours"], 2),
                             peer=round(r["peer"], 2), ratio=round(ratio, 3), frac=round(r["frac"], 4),
                             peer_frac=round(r["peer_frac"], 4)))
            log(f"  {label} {mode}: vitlab {r['ours']:.1f} img/s, {r['peer_impl']} {r['peer']:.1f} "
                f"img/s, {ratio:.2f}x ({r['seconds']:.0f} s)")
    return "\n".join(lines), rows


# fp32 rows: most CPUs have no native bf16 (AVX2-only AMD and Intel, AVX-512 without BF16), so what
# users there run is float32, against the peer in float32 (no autocast), alternating in one process
FP32_ROWS = [("ViT-S/16", "vit_s16"), ("CvT-13", "cvt_13")]
FP32_TARGET = 1.2
FP32_BEGIN, FP32_END = "<!-- fp32 rows: begin -->", "<!-- fp32 rows: end -->"


def capability_label() -> str:
    """What the rows ran with, in words: the CPU's vector level and whether bf16 is native."""
    from vitlab.accel import caps

    c = caps.capabilities()
    isa = "AMX" if c.has("amx_bf16") else "AVX-512 BF16" if c.has("avx512_bf16") else (
        "AVX-512" if c.has("avx512f") else "AVX2" if c.has("avx2") else c.arch)
    capped = f", capped: ATen {c.aten_cpu_capability}" if c.aten_cpu_capability.upper() not in ("AVX512", "AMX") else ""
    return f"{isa}{capped}, bf16 {'native' if c.cpu_bf16_native else 'emulated'}"


def fp32_table(args, peak32: float) -> tuple[str, list[dict]]:
    lines = [f"Capability: {capability_label()}; torch threads {torch.get_num_threads()}; fp32 weights and "
             f"activations on both sides (vitlab: `accelerate` / `optimize_for_inference(model, 'fp32')`; the peer: "
             f"`transformers` as shipped, SDPA where it has it); each model's rows in a fresh process, "
             f"alternating step by step; target: vitlab >= {FP32_TARGET:g}x the peer.", "",
             "| model | step | capability | vitlab img/s | peer img/s | vitlab / peer | target | vitlab % of fp32 peak | "
             "peer % of fp32 peak |", "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for label, name in FP32_ROWS:
        if args.models and name not in args.models:
            continue
        for r in model_rows_in_fresh_process(args, name, peak32, dtype="fp32"):
            ok = "met" if r["ratio"] >= FP32_TARGET else "NOT met"
            lines.append(f"| {label} | {r['mode']} | {capability_label()} | {r['ours']:.1f} | {r['peer']:.1f} | "
                         f"{r['ratio']:.2f}x | >= {FP32_TARGET:g}x: {ok} | {100 * r['frac']:.1f} | "
                         f"{100 * r['peer_frac']:.1f} |")
            rows.append(dict(label=label, model=name, mode=r["mode"], dtype="fp32", ratio=round(r["ratio"], 3)))
            log(f"  {label} {r['mode']} fp32: vitlab {r['ours']:.1f} img/s, {r['peer_impl']} {r['peer']:.1f} img/s, "
                f"{r['ratio']:.2f}x")
    return "\n".join(lines), rows


def write_fp32_section(section: str) -> None:
    """Replace the fp32 section of RESULTS.md (between its markers) or append it."""
    text = OUT.read_text() if OUT.exists() else "# vitlab speed on this machine\n"
    block = f"{FP32_BEGIN}\n{section}\n{FP32_END}"
    if FP32_BEGIN in text and FP32_END in text:
        head, rest = text.split(FP32_BEGIN, 1)
        text = head + block + rest.split(FP32_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    OUT.write_text(text)


# ----------------------------------------------------------------------------- fast paths
class _Timed(float):
    """The median of a callable's per-round seconds, remembering the rounds (for paired ratios)."""

    def __new__(cls, times):
        obj = super().__new__(cls, statistics.median(times))
        obj.times = list(times)
        return obj


def _alternate(fns: dict, steps: int) -> dict[str, float]:
    ts = bench.time_alternating(fns, steps, 1)
    return {k: _Timed(v) for k, v in ts.items()}


def _speedup(before_s: float, after_s: float) -> float:
    """Median of the per-round ratios where both come from one alternating run (the machine's
    speed changes between rounds cancel out), else the ratio of the medians."""
    b, a = getattr(before_s, "times", None), getattr(after_s, "times", None)
    if b and a and len(b) == len(a):
        return statistics.median([x / y for x, y in zip(b, a)])
    return before_s / after_s


def _row(lines, what, shape, before_label, before_s, after_label, after_s, unit_imgs=None, note=""):
    if unit_imgs:
        b, a = f"{unit_imgs / before_s:.1f} img/s", f"{unit_imgs / after_s:.1f} img/s"
    else:
        b, a = f"{1e3 * before_s:.1f} ms", f"{1e3 * after_s:.1f} ms"
    up = _speedup(before_s, after_s)
    lines.append(f"| {what} | {shape} | {before_label}: {b} | {after_label}: {a} | {up:.2f}x | {note} |")
    log(f"  {what}: {up:.2f}x")


def fast_path_table(args) -> str:
    B, S = args.batch_size, 224
    steps = min(args.steps, FAST_PATH_STEPS)
    lines = ["| fast path | where | before | after | speed-up | note |", "|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, S, S, generator=g)
    y = torch.randint(0, 1000, (B,), generator=g)

    torch.manual_seed(0)
    m = fast.optimize_for_inference(vitlab.create_model("vit_s16"))

    # 2. bf16 weights cast once vs float32 weights under autocast (everything else reference)
    ref = vitlab.create_model("vit_s16").eval()

    def autocast_fp32():
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16), fast.reference_mode():
            ref(x)

    def bf16_weights():
        with torch.inference_mode(), fast.reference_mode():
            m(x)

    kernels = fast.use_cpu_kernels(m, None)  # vitlab's CPU kernels, where they can be built

    def all_fast(with_kernels=False, streams=1):
        def f():
            fast.use_cpu_kernels(m, with_kernels)
            m.inference_streams = streams
            with torch.inference_mode():
                m(x)
        return f

    def full_last_block():  # every token through the last block, as forward_features computes it
        fast.use_cpu_kernels(m, False)
        with torch.inference_mode():
            m.forward_head(m.forward_features(x))
    fns = {"a": autocast_fp32, "b": bf16_weights, "full": full_last_block, "c": all_fast()}
    if kernels:
        fns["k"] = all_fast(True)
    streams = fast.auto_inference_streams()
    if streams > 1:
        fns["s"] = all_fast(kernels, streams)
    r = _alternate(fns, steps)
    _row(lines, "bf16 weights cast once (`optimize_for_inference`)", "ViT-S/16 infer", "fp32 + autocast", r["a"],
         "bf16 weights", r["b"], B, "no per-call weight casts; bf16 norms/residuals")
    _row(lines, "fused bias / residual add in the linear layers (oneDNN), GELU in place", "ViT-S/16 infer",
         "F.linear + add, new GELU output", r["b"], "fused", r["full"], B, "qkv is one fused projection in both")
    _row(lines, "last block computes the class token only (`forward`)", "ViT-S/16 infer", "all 197 tokens",
         r["full"], "class token", r["c"], B, "the head reads only the class token: same logits")
    if kernels:
        _row(lines, "vitlab's CPU kernels: fused attention + layer norm + GELU (`cpu_kernels`)", "ViT-S/16 infer",
             "PyTorch's SDPA + layer norm + GELU", r["c"], "vitlab kernels", r["k"], B,
             f"attention's products on {cpu_kernels.isa()} + AVX-512 softmax per 32 query rows; GELU by piecewise "
             f"cubic; on by default where they build")
    else:
        lines.append(f"| vitlab's CPU kernels (`cpu_kernels`) | ViT-S/16 infer | - | - | - | not measured: "
                     f"{cpu_kernels.unavailable_reason()} |")
    if streams > 1:
        _row(lines, f"inference streams: the batch in {streams} parts, one core each (`fast.run_in_streams`)",
             "ViT-S/16 infer", "intra-op threads", r["k" if kernels else "c"], f"{streams} streams", r["s"], B,
             "no barrier per operator where every core waits for the slowest; same logits")

    # 3. attention kernels at ViT-S and ViT-B shapes
    for label, heads in (("ViT-S/16", 6), ("ViT-B/16", 12)):
        q, k, v = (torch.randn(B, heads, 197, 64, dtype=torch.bfloat16, generator=g) for _ in range(3))

        def kern(kind):
            def f():
                fast.set_attention_kernel(kind)
                with torch.inference_mode():
                    fast.attention(q, k, v)
            return f
        def fused():
            with torch.inference_mode():
                fast.attention(q, k, v, cpu_kernel=True)
        r = _alternate({"matmul": kern("matmul"), "sdpa": kern("sdpa"), **({"fused": fused} if kernels else {})},
                       steps + 2)
        fast.set_attention_kernel("auto")
        flops = 4 * B * heads * 197 * 197 * 64
        best = min(r, key=r.get)
        _row(lines, "attention kernel for inference (`fast.attention`: SDPA)", f"{label} attention, bf16",
             "explicit matmul+softmax", r["matmul"], "SDPA", r["sdpa"], None,
             f"faster here: {best}; SDPA {flops / r['sdpa'] / 1e12:.2f} TFLOP/s (its exponentials, not its "
             f"products, bound it)")
        if kernels:
            _row(lines, "vitlab's fused CPU attention (`cpu_kernels`)", f"{label} attention, bf16", "SDPA",
                 r["sdpa"], "vitlab fused", r["fused"], None, f"{flops / r['fused'] / 1e12:.2f} TFLOP/s")

    # 3b. the MLP in row blocks with GELU in oneDNN's epilogue vs separate kernels, at ViT-B/16
    # (opt-in per model: `Mlp.fused_inference`, on for CvT)
    torch.manual_seed(0)
    vb = fast.optimize_for_inference(vitlab.create_model("vit_b16"))
    mlps = [blk.mlp for blk in vb.blocks]

    def vb_mlp(blocked):
        def f():
            for mlp in mlps:
                mlp.fused_inference = blocked
            with torch.inference_mode():
                vb(x)
        return f
    r = _alternate({"plain": vb_mlp(False), "blocked": vb_mlp(True)}, steps)
    _row(lines, "MLP in 16 MB row blocks, GELU fused (`fast.mlp_inference`)", "ViT-B/16 infer",
         "one piece, separate GELU", r["plain"], "row blocks", r["blocked"], B,
         "on for CvT only (`Mlp.fused_inference`)")
    del vb

    # 4. BN folding (CvT-13 inference) and channels-last + bf16 (ConvMixer)
    torch.manual_seed(0)
    cvt = vitlab.create_model("cvt_13").eval()
    cvt_nofold = fast.optimize_for_inference(copy.deepcopy(cvt), fold_bn=False)
    cvt_fold = fast.optimize_for_inference(copy.deepcopy(cvt))

    def run_(model):
        def f():
            with torch.inference_mode():
                model(x)
        return f

    def cvt_autocast():
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16), fast.reference_mode():
            cvt(x)
    def projections(model, fused, streams_=1):  # vitlab's depthwise-projection kernel on / off (oneDNN's convs)
        def f():
            for m_ in model.modules():
                if hasattr(m_, "fused_projections"):
                    m_.fused_projections = fused
            model.inference_streams = streams_
            with torch.inference_mode():
                model(x)
        return f
    cvt_fns = {"ac": cvt_autocast, "nofold": projections(cvt_nofold, False), "fold": projections(cvt_fold, False),
               "proj": projections(cvt_fold, True)}
    if streams > 1:
        cvt_fns["all"] = projections(cvt_fold, True, streams)
    r = _alternate(cvt_fns, steps)
    r.setdefault("all", r["proj"])
    _row(lines, "all inference fast paths", "CvT-13 infer", "fp32 + autocast (reference)", r["ac"], "vitlab",
         r["all"], B)
    _row(lines, "BatchNorm folded into the q/k/v depthwise convs", "CvT-13 infer", "BN kept", r["nofold"],
         "folded", r["fold"], B, "oneDNN's depthwise convs in both")
    if kernels:
        _row(lines, "norm1 + depthwise q/k/v projections in one kernel (`cpu_kernels.dwconv_qkv`)", "CvT-13 infer",
             "LN + 3 oneDNN convs + copies/concats", r["fold"], "vitlab kernel", r["proj"], B,
             "class token attached in place; BN folded; float32 sums")
    if streams > 1:
        _row(lines, f"inference streams ({streams} parts, one core each)", "CvT-13 infer", "intra-op threads",
             r["proj"], f"{streams} streams", r["all"], B)
    del cvt, cvt_nofold, cvt_fold

    cm = vitlab.create_model("convmixer_768_32").eval()
    # one stream each: these rows isolate the weights' dtype and the memory format
    cm_bf = fast.optimize_for_inference(copy.deepcopy(cm), channels_last=False, streams=1)
    cm_bf_cl = fast.optimize_for_inference(copy.deepcopy(cm), channels_last=True, streams=1)

    def cm_autocast():
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
            cm(x)
    r = _alternate({"ac": cm_autocast, "bf": run_(cm_bf), "cl": run_(cm_bf_cl)}, max(2, steps - 2))
    _row(lines, "bf16 weights", "ConvMixer-768/32 infer", "fp32 + autocast (NCHW)", r["ac"], "bf16 NCHW", r["bf"], B)
    _row(lines, "channels-last memory", "ConvMixer-768/32 infer", "bf16 NCHW", r["bf"], "bf16 channels-last",
         r["cl"], B)
    del cm, cm_bf, cm_bf_cl

    # 4b. ConvMixer training: oneDNN's bf16 depthwise backward is slow (its weight gradient for k >= 5):
    # the conv in float32 (the fallback), or in bf16 with vitlab's weight-gradient kernel (the default)
    torch.manual_seed(0)
    layer = convmixer_mod.ConvMixerLayer(768, 9, torch.nn.GELU).train().to(torch.bfloat16).to(
        memory_format=torch.channels_last)
    xl = torch.randn(B, 768, 32, 32, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    xl.requires_grad_(True)
    fast.use_cpu_kernels(layer)  # builds / loads the kernels (the layer has nothing to swap)
    kernel_ok = cpu_kernels.depthwise_conv_ok

    def dw_train(how):
        def f():
            ctx = fast.reference_mode() if how == "bf16" else contextlib.nullcontext()
            cpu_kernels.depthwise_conv_ok = kernel_ok if how == "kernel" else (lambda *a: False)
            try:
                with ctx:
                    layer(xl).float().square().mean().backward()
            finally:
                cpu_kernels.depthwise_conv_ok = kernel_ok
        return f
    kernel = cpu_kernels.get() is not None
    r = _alternate({"bf16": dw_train("bf16"), "f32": dw_train("f32"), **({"kernel": dw_train("kernel")} if kernel else {})},
                   max(2, args.train_steps))
    _row(lines, "depthwise conv in float32 for bf16 training (`fast.conv2d_f32`, the fallback)",
         "ConvMixer-768/32 layer (k=9), forward + backward", "bf16 (oneDNN)", r["bf16"], "float32 conv", r["f32"], B)
    if kernel:
        _row(lines, "bf16 depthwise conv with vitlab's weight-gradient kernel (`cpu_kernels.depthwise_conv`)",
             "ConvMixer-768/32 layer (k=9), forward + backward", "float32 conv", r["f32"], "vitlab kernel",
             r["kernel"], B, f"{_speedup(r['bf16'], r['kernel']):.2f}x oneDNN's bf16; k >= 5, in use by default")
    del layer, xl

    # 5. training: bf16 master-weight training vs autocast; fused vs foreach AdamW; checkpointing
    torch.manual_seed(0)
    base = vitlab.create_model("vit_s16")
    ac_model = copy.deepcopy(base).train()
    ac_opt = torch.optim.AdamW(ac_model.parameters(), lr=1e-4, weight_decay=0.05, foreach=True)
    bf_model = copy.deepcopy(base).train().to(torch.bfloat16)
    bf_opt = fast.MasterWeightAdamW(bf_model.parameters(), lr=1e-4, weight_decay=0.05)
    xb = x.bfloat16()

    def train_ac():
        with fast.reference_mode():
            with torch.autocast("cpu", torch.bfloat16):
                loss = F.cross_entropy(ac_model(x).float(), y)
            loss.backward()
            ac_opt.step()
            ac_opt.zero_grad(set_to_none=True)

    def train_bf():
        loss = F.cross_entropy(bf_model(xb).float(), y)
        loss.backward()
        bf_opt.step()
        bf_opt.zero_grad(set_to_none=True)
    r = _alternate({"ac": train_ac, "bf": train_bf}, args.train_steps)
    _row(lines, "bf16 training with float32 master weights (`MasterWeightAdamW`)", "ViT-S/16 train step",
         "fp32 weights + autocast, foreach AdamW", r["ac"], "bf16 + fp32 masters, fused AdamW", r["bf"], B)
    del ac_model, ac_opt, bf_model, bf_opt

    # vitlab's CPU kernels with their backward (attention, GELU, layer norm), in CvT-13's bf16 training step
    cvt = vitlab.create_model("cvt_13")
    kernel_steps = {}
    for on in (False, True):
        m = bench.prepare(copy.deepcopy(cvt), "train", torch.bfloat16, torch.device("cpu"), fast=True)
        fast.use_cpu_kernels(m, None if on else False)
        xm = x.contiguous(memory_format=torch.channels_last) if getattr(m, "memory_format_channels_last", False) else x
        kernel_steps["on" if on else "off"] = bench.make_step(m, m, "train", xm, y, dtype=torch.bfloat16, fast=True,
                                                              device=torch.device("cpu"), optimizer="foreach")
    r = _alternate(kernel_steps, args.train_steps)
    _row(lines, "vitlab's attention, GELU and layer-norm kernels with their backward (training)", "CvT-13 train step",
         "PyTorch's attention (explicit products / SDPA), GELU, layer norm", r["off"], "vitlab kernels", r["on"], B,
         "bf16 + fp32 masters in both; attention backward flash-style; GELU' from the same cubic table + exp; "
         "dw, db summed in a fixed order")
    del cvt, kernel_steps

    # the attention kernel alone, in ViT-S/16's bf16 training step (GELU and layer-norm kernels in both)
    attn_steps = {}
    for on in (False, True):
        m = bench.prepare(copy.deepcopy(base), "train", torch.bfloat16, torch.device("cpu"), fast=True)
        fast.use_cpu_kernels(m, None)
        for mod in m.modules():
            if isinstance(mod, Attention):
                mod.cpu_kernel = mod.cpu_kernel and on
        attn_steps["on" if on else "off"] = bench.make_step(m, m, "train", x, y, dtype=torch.bfloat16, fast=True,
                                                            device=torch.device("cpu"), optimizer="foreach")
    r = _alternate(attn_steps, args.train_steps)
    _row(lines, "vitlab's attention kernel with its backward (training)", "ViT-S/16 train step",
         "explicit bf16 products (PyTorch autograd)", r["off"], "vitlab kernel (qkv read and its gradient written in place)",
         r["on"], B, "GELU and layer-norm kernels in both")
    del attn_steps

    params = [p.detach().clone().requires_grad_(True) for p in base.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt_foreach = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    params2 = [p.detach().clone().requires_grad_(True) for p in params]
    for p, q in zip(params2, params):
        p.grad = q.grad.clone()
    opt_fused = fast.fused_adamw(params2, lr=1e-4)
    r = _alternate({"foreach": opt_foreach.step, "fused": opt_fused.step}, steps + 3)
    _row(lines, "fused AdamW (`fused_adamw`)", "ViT-S/16 optimizer step (22M params)", "foreach", r["foreach"],
         "fused", r["fused"])

    ck = copy.deepcopy(base).train().to(torch.bfloat16)
    ck_opt = fast.MasterWeightAdamW(ck.parameters(), lr=1e-4)

    def train_ck(flag):
        def f():
            ck.set_grad_checkpointing(flag)
            loss = F.cross_entropy(ck(xb).float(), y)
            loss.backward()
            ck_opt.step()
            ck_opt.zero_grad(set_to_none=True)
        return f
    mem = {}
    for flag in (False, True):
        train_ck(flag)()
        with bench.PeakMemory("cpu") as pm:
            train_ck(flag)()
        mem[flag] = pm.bytes
    r = _alternate({"off": train_ck(False), "on": train_ck(True)}, args.train_steps)
    fmt = lambda b: "?" if b is None else f"{b / 2**20:.0f} MB"  # noqa: E731
    _row(lines, "activation checkpointing (memory option)", "ViT-S/16 train step", "off", r["off"], "on", r["on"], B,
         f"peak tensor memory of a step {fmt(mem[False])} -> {fmt(mem[True])}")
    del ck, ck_opt

    # 6. data loading: the training batch transform vs the model's training step
    model_ips = B / r["off"]
    lps = bench.loader_throughput(224, B, src_size=256, steps=3)
    lines.append(f"| loader keeps up (`BatchTransform`: random resized crop + flip + normalise) | 256 px uint8 -> "
                 f"224 px, batch {B} | model train step: {model_ips:.1f} img/s | loader: {lps:.0f} img/s | "
                 f"{lps / model_ips:.1f}x headroom | {'keeps up' if lps >= model_ips else 'STARVES the model'} |")
    log(f"  loader {lps:.0f} img/s vs model {model_ips:.1f} img/s")

    # 7. torch.compile of the blocks (inference) with its compile time
    if not args.no_compile:
        torch.manual_seed(0)
        eager = fast.optimize_for_inference(vitlab.create_model("vit_s16"))
        comp = copy.deepcopy(eager)
        fast.compile_blocks(comp)
        t = time.perf_counter()
        with torch.inference_mode():
            comp(x)
        compile_s = time.perf_counter() - t
        r = _alternate({"eager": run_(eager), "compiled": run_(comp)}, steps)
        _row(lines, "torch.compile of the blocks (`compile_blocks`)", "ViT-S/16 infer (bf16, fast eager paths)",
             "eager", r["eager"], "compiled", r["compiled"], B,
             f"compile time {compile_s:.0f} s; {'pays' if r['compiled'] < 0.95 * r['eager'] else 'does not pay here: off by default'}")
    # 8. what `tune_cpu_allocator` gives vitlab and the peer, each variant in fresh processes
    allocator_rows(args, lines)

    return "\n".join(lines)


# ----------------------------------------------------------------------------- report
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, no compile row")
    ap.add_argument("--steps", type=int, default=None, help="timed inference steps per row of the main table (default 21)")
    ap.add_argument("--train-steps", type=int, default=None, help="timed training steps per row (default 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before each row (default 2, as "
                    "`vitlab bench`)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--models", nargs="*", default=None, help="only these (vit_s16 vit_b16 cvt_13 convmixer_768_32)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-fast-paths", action="store_true", help="only the main table")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/RESULTS.md")
    ap.add_argument("--fp32-only", action="store_true", help="only the fp32 rows (ViT-S/16, CvT-13 vs transformers "
                    "in fp32); replaces their section of RESULTS.md")
    ap.add_argument("--_dtype", dest="dtype", default="bf16", help=argparse.SUPPRESS)
    ap.add_argument("--_model-rows", dest="model_rows", default=None, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--_peak", dest="peak", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_allocator-steps", dest="allocator_steps", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_allocator-mode", dest="allocator_mode", default="infer", help=argparse.SUPPRESS)
    ap.add_argument("--_tuned", dest="tuned", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.allocator_steps:  # one allocator variant, in the fresh process `allocator_rows` started
        print(json.dumps(allocator_steps(args.allocator_steps, bool(args.tuned), args.steps, args.batch_size,
                                         args.allocator_mode)))
        return 0
    if args.model_rows:  # one model's rows, in the fresh process `model_rows_in_fresh_process` started
        print(json.dumps(model_rows(args, args.model_rows, args.peak, args.dtype)))
        return 0
    # 21 timed pairs per inference row (11 until session 10): on this shared machine the medians of
    # 5 consecutive per-pair ratios of one run ranged 1.9-2.8x (ViT-S/16), so a median over more
    # pairs moves less from run to run; an inference pair takes 1-3 s (ConvMixer 8 s). The
    # fast-path table keeps 7 (FAST_PATH_STEPS)
    args.steps = args.steps or (2 if args.quick else 21)
    args.train_steps = args.train_steps or (1 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.no_compile = args.no_compile or args.quick

    start = time.perf_counter()
    code = code_fingerprint()  # now: the code this process imports, even if files change during the run
    # every implementation runs with the C allocator as shipped (glibc's defaults); the fast-path
    # table measures what `tune_cpu_allocator` would give vitlab and the peer
    dev = torch.device("cpu")
    peak = bench.matmul_peak(dev, torch.bfloat16)
    peak32 = bench.matmul_peak(dev, torch.float32)
    device = bench.describe_device(dev)
    log(f"{device}: bf16 matmul peak {peak / 1e12:.2f} TFLOP/s, fp32 {peak32 / 1e12:.2f}")
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cmd = "python benchmarks/speed_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    f32_table, _ = fp32_table(args, peak32)
    f32_section = (f"## fp32 rows (CPU)\n\n{device}; fp32 matmul peak {peak32 / 1e12:.2f} TFLOP/s; `{cmd.strip()}`, "
                   f"{date}; median of {args.steps} inference / {args.train_steps} training steps, batch "
                   f"{args.batch_size}, 224 px.\n\n{f32_table}\n")
    if args.fp32_only:
        print(f32_section)
        if not args.no_write:
            write_fp32_section(f32_section)
            log(f"wrote the fp32 section of {OUT}")
        return 0
    table, rows = main_table(args, peak)
    fp_table = "" if args.no_fast_paths else fast_path_table(args)
    # measured again at the end: a machine shared with other tenants can change speed during a run
    peak_end = bench.matmul_peak(dev, torch.bfloat16)
    log(f"bf16 matmul peak at the end: {peak_end / 1e12:.2f} TFLOP/s")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    facts = (f"- device: {device}; torch {torch.__version__}, Python {platform.python_version()}\n"
             f"- measured bf16 matmul peak: {peak / 1e12:.2f} TFLOP/s (fp32: {peak32 / 1e12:.2f}), the best of a "
             f"4096^2 product and ViT-shaped (6272 x 384|768 x 4 width) products (fp32: 2048^2 and one ViT "
             f"shape), best of 5 each, at the start of the run (bf16 again at the end: {peak_end / 1e12:.2f})\n"
             f"- command: `{cmd.strip()}`; date: {date}; run time {time.perf_counter() - start:.0f} s; "
             f"1-min load average at the end: {load:.1f}\n"
             f"- batch {args.batch_size}, 224 px, bf16; median of {args.steps} inference / {args.train_steps} "
             f"training steps ({CONVMIXER_TRAIN_STEPS} for ConvMixer, whose steps take ~35 s; fast-path table: "
             f"{min(args.steps, FAST_PATH_STEPS)} per row) after {args.warmup} "
             f"warm-up steps (1 for ConvMixer training); each model's rows in a fresh Python process, vitlab and the peer "
             f"alternating step by step in it; C allocator: glibc's "
             f"defaults for every implementation (as shipped; see the allocator rows of the fast-path table)\n"
             f"- vitlab: `optimize_for_inference` (bf16 weights, fused linear epilogues, GELU in place, CvT's MLP "
             f"in row blocks, vitlab's CPU kernels on AVX-512 BF16 CPUs (attention, its products on AMX tiles where the CPU has them, else SDPA; layer norm; GELU; CvT's norm1 + depthwise q/k/v projections; here: {cpu_kernels.isa() if cpu_kernels.get() else 'not used: ' + str(cpu_kernels.unavailable_reason())}), BN folding, "
             f"inference streams (the batch in one part per core: `fast.auto_inference_streams`), "
             f"channels-last for conv models), the last block computing "
             f"only the class token the head reads, and bf16 training with float32 master weights, "
             f"vitlab's attention, GELU and layer-norm kernels with their backward, and fused AdamW. Peers: float32 weights under bf16 autocast, SDPA attention (transformers' ViT; its "
             f"CvT has no SDPA path), fused AdamW, channels-last for ConvMixer.")
    gpu = ("| model | step | vitlab | timm (compiled) | transformers | % of bf16 matmul peak |\n|---|---|---|---|---|---|\n"
           "| ViT-B/16 | train, bf16, 224 px | not yet measured | not yet measured | not yet measured | "
           "not yet measured (target >= 45% on H100) |\n"
           "| ViT-B/16 | infer, bf16, 224 px | not yet measured | not yet measured | not yet measured | "
           "not yet measured (target: >= timm compiled) |")
    report = (f"# vitlab speed on this machine\n\n{facts}\n\n## vitlab vs the well-known implementations (CPU)\n\n"
              f"{table}\n")
    full_run = not (args.models or args.quick or args.no_write) and args.batch_size == 32
    # `process`: since session 10 each model's rows run in a fresh process (before, all rows in one:
    # those runs are another series)
    settings = dict(steps=args.steps, train_steps=args.train_steps, warmup=args.warmup, process="per model")
    runs = []
    if HISTORY.exists():
        runs = [json.loads(line) for line in HISTORY.read_text().splitlines() if line.strip()]
    if full_run:
        run = dict(end=date, code=code, device=device, settings=settings, peak_tflops=round(peak / 1e12, 3), peak_end_tflops=round(peak_end / 1e12, 3),
                   load=round(load, 2), rows=rows)
        with HISTORY.open("a") as f:
            f.write(json.dumps(run) + "\n")
        runs.append(run)
    # one series: the same code, settings and machine (runs before session 12 name no device: they ran
    # on the 2-core AMX CPU that the project used until then)
    same = [r for r in runs if r["code"] == code and r.get("settings") == settings and r.get("device") == device]
    if same:
        report += (f"\n## Run-to-run spread\n\nvitlab / peer ratio in every full run of this command on the current "
                   f"vitlab code with these settings (sources fingerprint `{code}`; end times, with the bf16 matmul peak measured at each "
                   f"run's start; history in `benchmarks/{HISTORY.name}`). This CPU is shared with other tenants: "
                   f"alternating the implementations step by step keeps the ratios usable, but they still move "
                   f"between runs, so a target counts as met only where it holds in every run.\n\n"
                   f"{spread_table(same)}\n")
    report += f"\n{FP32_BEGIN}\n{f32_section}\n{FP32_END}\n"
    if fp_table:
        report += (f"\n## Fast paths, before and after (CPU)\n\nEach row's variants run alternately, round by round; "
                   f"img/s and ms are medians, the speed-up is the median of the per-round ratios.\n\n{fp_table}\n")
    report += (f"\n## GPU\n\nNo GPU was available to this run: the GPU rows are not yet measured. On a GPU run "
               f"`vitlab bench --device cuda --model vit_b16 --mode train --compile --compare timm` and "
               f"`... --compare transformers`.\n\n{gpu}\n")
    if OUT.exists():  # benchmarks/deploy_speed.py's section is kept across runs of this table
        import re

        kept = re.search(r"\n## Deploy:.*?(?=\n## |\Z)", OUT.read_text(), re.S)
        if kept:
            report = report.replace("\n## GPU", kept.group(0).rstrip("\n") + "\n\n## GPU", 1)
    print(report)
    if not args.no_write:
        OUT.write_text(report)
        log(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
