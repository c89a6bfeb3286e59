"""vitlab's CPU kernels (vitlab/csrc/cpu_kernels.cpp) against PyTorch's, in isolation and in the models.

    python benchmarks/experiments/cpu_kernels.py [--rounds 30]

Builds the kernels if needed (~25 s once; g++, ninja and an AMX CPU), then prints four tables:
1. the fused attention alone against `F.scaled_dot_product_attention` at ViT-S/16, ViT-B/16 and
   CvT-13 shapes (batch 32, bf16), alternating call by call, with each one's error against float32;
2. what each part of the fused attention costs at ViT-S/16's shape (by skipping it: `parts`);
3. the GELU kernel against PyTorch's on ViT-S/16's fc1 output (after the product, as in the model),
   with each one's largest error over every bf16 input, in bf16 units in the last place;
4. vitlab's ViT-S/16 and CvT-13 forward (batch 32, bf16, `optimize_for_inference`) with PyTorch's
   kernels and with vitlab's (`fast.use_cpu_kernels` on/off), alternating, medians of `--rounds`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def alternate(fns: dict, rounds: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median seconds of each callable, run in turn round by round (`vitlab.bench.time_alternating`), and all times."""
    from vitlab.bench import time_alternating

    times = time_alternating(fns, rounds, warmup=2)
    return {k: statistics.median(v) for k, v in times.items()}, times


def kernel_table(ck, mod, rounds: int) -> str:
    rows = ["| shape (B, H, Nq, Nk, d) | where | SDPA (ms) | vitlab (ms) | SDPA / vitlab | max abs err vs fp32 (vitlab / SDPA) |",
            "|---|---|---|---|---|---|"]
    for B, H, Nq, N, d, where in [(32, 6, 197, 197, 64, "ViT-S/16"), (32, 12, 197, 197, 64, "ViT-B/16"),
                                  (32, 1, 3136, 784, 64, "CvT-13 stage 1"), (32, 3, 784, 196, 64, "CvT-13 stage 2"),
                                  (32, 6, 197, 50, 64, "CvT-13 stage 3")]:
        q = torch.randn(B, Nq, H, d).to(torch.bfloat16).transpose(1, 2)
        k, v = [torch.randn(B, N, H, d).to(torch.bfloat16).transpose(1, 2) for _ in range(2)]
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        sd = lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Nq, H * d)
        fu = lambda: ck.attention(mod, q, k, v, d ** -0.5)
        err_f = (fu().float() - ref).abs().max().item()
        err_s = (F.scaled_dot_product_attention(q, k, v).float() - ref).abs().max().item()
        t, _ = alternate({"sdpa": sd, "fused": fu}, rounds)
        rows.append(f"| {(B, H, Nq, N, d)} | {where} | {t['sdpa'] * 1e3:.2f} | {t['fused'] * 1e3:.2f} | "
                    f"{t['sdpa'] / t['fused']:.2f}x | {err_f:.4f} / {err_s:.4f} |")
    return "\n".join(rows)


def parts_table(ck, mod, rounds: int) -> str:
    B, H, N, d = 32, 6, 197, 64
    q, k, v = [torch.randn(B, N, H, d).to(torch.bfloat16).transpose(1, 2) for _ in range(3)]
    names = {0: "all", 1: "without packing K, V", 2: "without Q K^T", 4: "without softmax", 8: "without P V"}
    t, _ = alternate({p: (lambda p=p: mod.attention_bf16(q, k, v, d ** -0.5, p)) for p in names}, rounds)
    rows = ["| ViT-S/16 layer (32, 6, 197, 197, 64) | ms | that part's cost (ms) |", "|---|---|---|"]
    for p, name in names.items():
        rows.append(f"| {name} | {t[p] * 1e3:.2f} | {'' if p == 0 else f'{(t[0] - t[p]) * 1e3:.2f}'} |")
    return "\n".join(rows)


def gelu_table(ck, mod, rounds: int) -> str:
    allv = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = allv[torch.isfinite(allv.float()) & (allv.float().abs() < 1e4)]
    exact = x.double() * torch.special.ndtr(x.double())
    big = exact.abs() > 1e-6
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    err = {"torch": ((F.gelu(x).double() - exact).abs() / ulp)[big].max().item(),
           "kernel": ((ck.gelu_(mod, x.clone()).double() - exact).abs() / ulp)[big].max().item()}
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32 * 197, 384, generator=g).to(torch.bfloat16)
    w = (torch.randn(1536, 384, generator=g) * 0.05).to(torch.bfloat16)
    b = torch.randn(1536, generator=g).to(torch.bfloat16)
    lin = lambda: torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")
    t, _ = alternate({"lin": lin, "torch": lambda: torch.ops.aten.gelu_(lin()), "kernel": lambda: ck.gelu_(mod, lin()),
                      "onednn": lambda: torch.ops.mkldnn._linear_pointwise(a, w, b, "gelu", [], "none")}, rounds)
    rows = ["| ViT-S/16 fc1 (6304 x 384 -> 1536), bf16 | ms | GELU's own cost (ms) | max error (ulp, |GELU| > 1e-6) |",
            "|---|---|---|---|", f"| product alone | {t['lin'] * 1e3:.2f} | - | - |"]
    for k, name in (("torch", "product + PyTorch's GELU in place"), ("kernel", "product + vitlab's GELU kernel in place"),
                    ("onednn", "product with oneDNN's erf-GELU epilogue")):
        rows.append(f"| {name} | {t[k] * 1e3:.2f} | {(t[k] - t['lin']) * 1e3:.2f} | {err.get(k, float('nan')):.2f} |")
    return "\n".join(rows).replace("| nan |", "| - |")


def model_table(rounds: int) -> str:
    from vitlab.models import create_model, fast

    rows = ["| model (batch 32, bf16) | PyTorch's kernels (ms) | vitlab's kernels (ms) | median per-round ratio | "
            "quartiles | max logit diff |", "|---|---|---|---|---|---|"]
    x = torch.randn(32, 3, 224, 224)
    for name in ("vit_s16", "cvt_13"):
        m = fast.optimize_for_inference(create_model(name))

        def run(on):
            def f():
                fast.use_cpu_kernels(m, on)
                with torch.no_grad():
                    return m(x)
            return f
        diff = (run(False)().float() - run(True)().float()).abs().max().item()
        med, times = alternate({"off": run(False), "on": run(True)}, rounds)
        ratios = [a / b for a, b in zip(times["off"], times["on"])]
        q = statistics.quantiles(ratios, n=4)
        rows.append(f"| {name} | {med['off'] * 1e3:.1f} | {med['on'] * 1e3:.1f} | {statistics.median(ratios):.3f}x | "
                    f"{q[0]:.3f}-{q[2]:.3f} | {diff:.4f} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vitlab.models import cpu_kernels as ck

    t = time.perf_counter()
    mod = ck.get()
    if mod is None:
        raise SystemExit(f"vitlab's CPU kernels are not available here: {ck.unavailable_reason()}")
    print(f"kernels ready in {time.perf_counter() - t:.1f} s\n")
    print(kernel_table(ck, mod, args.rounds), "\n", flush=True)
    print(parts_table(ck, mod, args.rounds), "\n", flush=True)
    print(gelu_table(ck, mod, args.rounds), "\n", flush=True)
    print(model_table(args.rounds), flush=True)


if __name__ == "__main__":
    main()
