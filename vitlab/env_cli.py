"""`vitlab env`: what a bug report needs — versions, the device, its capabilities, which fast paths
are on here and why the others are off."""
from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("env", help="print versions, the hardware's capabilities and which fast paths are on",
                       description="Print what a bug report needs: versions, the CPU and GPU, what they can do "
                                   "(instruction sets, native bf16, SDPA backends), and every fast path of "
                                   "vitlab.accel with whether it is on here and why not.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: off)")
    p.set_defaults(func=_run)


def report() -> dict:
    import platform
    import sys

    import torch

    from . import __version__
    from .accel import kernels, paths
    from .accel.caps import auto_dtype, capabilities

    c = capabilities()
    return {
        "vitlab": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "capabilities": c.as_dict(),
        "defaults": {"inference_dtype_cpu": str(auto_dtype("cpu")).replace("torch.", ""),
                     "inference_dtype_cuda": str(auto_dtype("cuda")).replace("torch.", "") if c.cuda else None,
                     "train_precision_auto_cpu": "fp32"},
        "cpu_kernels": {"usable": kernels.static_reason() is None, "why_not": kernels.static_reason(),
                        "env": f"{kernels.ENV}=0 turns them off"},
        "fast_paths": [{"name": p.name, "on": why is None, "why_not": why, "needs": p.needs, "dtype": p.dtype,
                        "mode": p.mode} for p, why in paths.status(c)],
    }


def _run(args: argparse.Namespace) -> int:
    r = report()
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    c = r["capabilities"]
    print(f"vitlab {r['vitlab']}  python {r['python']}  torch {r['torch']}")
    print(f"platform: {r['platform']}")
    print(f"cpu: {c['cpu_model']} ({c['arch']}), {c['num_threads']} threads")
    print(f"  instruction sets: {', '.join(c['cpu_flags']) or 'none reported'}")
    print(f"  ATen kernels: {c['aten_cpu_capability']}; oneDNN: {'yes' if c['onednn'] else 'no'}"
          + (f" (ONEDNN_MAX_CPU_ISA={c['onednn_max_isa']})" if c["onednn_max_isa"] else ""))
    print(f"  native bf16: {'yes' if c['cpu_bf16_native'] else 'no'} ({c['cpu_bf16_reason']})")
    if c["cuda"]:
        print(f"cuda: {', '.join(c['cuda_devices'])}, sm{''.join(map(str, c['cuda_capability']))}, "
              f"bf16 {'native' if c['cuda_bf16_native'] else 'not native'}, SDPA flash "
              f"{'yes' if c['sdpa_flash'] else 'no'}, memory-efficient {'yes' if c['sdpa_mem_efficient'] else 'no'}")
    else:
        print("cuda: none")
    print(f"mps: {'yes' if c['mps'] else 'no'}")
    d = r["defaults"]
    print(f"defaults: optimize_for_inference dtype on cpu = {d['inference_dtype_cpu']}; "
          f"train precision=auto on cpu = {d['train_precision_auto_cpu']}")
    k = r["cpu_kernels"]
    print(f"vitlab CPU kernels: {'usable' if k['usable'] else 'off: ' + str(k['why_not'])} ({k['env']})")
    print("fast paths:")
    width = max(len(p["name"]) for p in r["fast_paths"])
    for p in r["fast_paths"]:
        state = "on " if p["on"] else "off"
        print(f"  {state} {p['name']:<{width}}  [{p['dtype']}, {p['mode']}]" + ("" if p["on"] else f"  {p['why_not']}"))
    return 0
