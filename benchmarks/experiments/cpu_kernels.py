"""vitlab's CPU kernels (vitlab/csrc/cpu_kernels.cpp) against PyTorch's, in isolation and in the models.

    python benchmarks/experiments/cpu_kernels.py [--rounds 30]

Builds the kernels if needed (~25 s once; g++, ninja and an AMX CPU), then prints seven tables:
1. the fused attention alone against `F.scaled_dot_product_attention` at ViT-S/16, ViT-B/16 and
   CvT-13 shapes (batch 32, bf16), alternating call by call, with each one's error against float32;
2. what each part of the fused attention costs at ViT-S/16's shape (by skipping it: `parts`);
3. the GELU kernel against PyTorch's on ViT-S/16's fc1 output (after the product, as in the model),
   with each one's largest error over every bf16 input, in bf16 units in the last place;
4. CvT-13's norm1 + depthwise q/k/v projections by vitlab's kernel against the layer norm kernel,
   oneDNN's three convs and the copies/concatenations that attach the class token, per stage;
5. vitlab's ViT-S/16 and CvT-13 forward (batch 32, bf16, `optimize_for_inference`) with PyTorch's
   kernels and with vitlab's (`fast.use_cpu_kernels` on/off), alternating, medians of `--rounds`;
   and CvT-13 with the projection kernel alone switched off;
6. the training kernels (GELU and layer norm, forward + backward) against PyTorch's at ViT-S/16's
   and CvT-13's shapes, and the bf16 training step of both models with and without vitlab's kernels
   (attention, GELU, layer norm);
7. the attention with its backward (forward + backward, from q, k, v laid out as the models make
   them) against explicit bf16 products with autograd and against SDPA, at the five shapes of table 1,
   with each one's relative error in dq, dk, dv against float64.

    python benchmarks/experiments/cpu_kernels.py --tables 6    # only some of the tables
"""
from __future__ import annotations

import argparse
import copy
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


def projection_table(ck, mod, rounds: int) -> str:
    """CvT's norm1 + three depthwise q/k/v projections: vitlab's kernel against what runs without it
    (vitlab's layer norm kernel, three oneDNN depthwise convs with BN folded, the dense copy of the
    patch tokens and the concatenations with the class token), with each one's error against float32."""
    rows = ["| CvT-13 stage (batch 32) | LN + oneDNN convs + copies (ms) | vitlab kernel (ms) | speed-up | "
            "max rel. err vs fp32 (vitlab / oneDNN) |", "|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for stage, (p, h, C) in enumerate([(0, 56, 64), (0, 28, 192), (1, 14, 384)], 1):
        B = 32
        x = (torch.randn(B, p + h * h, C, generator=g) * 2).to(torch.bfloat16)
        wt, bt = torch.randn(3, 9, C, generator=g) * 0.3, torch.randn(3, C, generator=g) * 0.1
        lw, lb = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.1
        w16 = [wt[i].t().reshape(C, 1, 3, 3).to(torch.bfloat16) for i in range(3)]
        b16 = [bt[i].to(torch.bfloat16) for i in range(3)]

        def unfused(z=x):
            hN = mod.layer_norm_bf16(z, lw.to(torch.bfloat16), lb.to(torch.bfloat16), 1e-5)
            pre, tok = hN[:, :p], hN[:, p:].contiguous()
            fm = tok.reshape(B, h, h, C).permute(0, 3, 1, 2)
            outs = []
            for i, s in enumerate((1, 2, 2)):
                y = F.conv2d(fm, w16[i], b16[i], s, 1, 1, C).permute(0, 2, 3, 1).reshape(B, -1, C)
                outs.append(torch.cat([pre, y], 1) if p else y)
            return outs

        def fused():
            return ck.dwconv_qkv(mod, x, p, (h, h), wt, bt, 2, True, (lw, lb, 1e-5))

        z = F.layer_norm(x.float(), (C,), lw, lb, 1e-5)
        fm = z[:, p:].reshape(B, h, h, C).permute(0, 3, 1, 2)
        ref = [torch.cat([z[:, :p], F.conv2d(fm, wt[i].t().reshape(C, 1, 3, 3), bt[i], s, 1, 1, C)
                          .permute(0, 2, 3, 1).reshape(B, -1, C)], 1) for i, s in enumerate((1, 2, 2))]
        err = lambda outs: max(((o.float() - r).abs().max() / r.abs().max()).item() for o, r in zip(outs, ref))
        e_f, e_u = err(fused()), err(unfused())
        t, _ = alternate({"unfused": unfused, "fused": fused}, rounds)
        rows.append(f"| {stage}: {h}x{h} x {C}{' + class token' if p else ''} | {t['unfused'] * 1e3:.2f} | "
                    f"{t['fused'] * 1e3:.2f} | {t['unfused'] / t['fused']:.2f}x | {e_f:.4f} / {e_u:.4f} |")
    return "\n".join(rows)


def _on_off_row(label: str, run, rounds: int) -> str:
    """One table row: `run(False)` against `run(True)`, alternating, with the largest logit difference."""
    diff = (run(False)().float() - run(True)().float()).abs().max().item()
    med, times = alternate({"off": run(False), "on": run(True)}, rounds)
    ratios = [a / b for a, b in zip(times["off"], times["on"])]
    q = statistics.quantiles(ratios, n=4)
    return (f"| {label} | {med['off'] * 1e3:.1f} | {med['on'] * 1e3:.1f} | {statistics.median(ratios):.3f}x | "
            f"{q[0]:.3f}-{q[2]:.3f} | {diff:.4f} |")


def model_table(rounds: int) -> str:
    from vitlab.accel import ops as fast
    from vitlab.models import create_model

    rows = ["| model (batch 32, bf16, one stream) | without (ms) | with (ms) | median per-round ratio | "
            "quartiles | max logit diff |", "|---|---|---|---|---|---|"]
    x = torch.randn(32, 3, 224, 224)
    for name in ("vit_s16", "cvt_13"):
        m = fast.optimize_for_inference(create_model(name), streams=1)

        def kernels(on):
            def f():
                fast.use_cpu_kernels(m, on)
                with torch.no_grad():
                    return m(x)
            return f

        def projections(on):  # the projection kernel alone: every other kernel on in both
            def f():
                fast.use_cpu_kernels(m, True)
                for mod_ in m.modules():
                    if hasattr(mod_, "fused_projections"):
                        mod_.fused_projections = on
                with torch.no_grad():
                    return m(x)
            return f
        rows.append(_on_off_row(f"{name}: vitlab's kernels", kernels, rounds))
        if name == "cvt_13":
            rows.append(_on_off_row("cvt_13: norm1 + q/k/v projection kernel (other kernels on)", projections, rounds))
    return "\n".join(rows)


def training_table(ck, mod, rounds: int) -> str:
    """Forward + backward of one GELU / layer norm (fresh leaves each round, so no gradient
    accumulation is timed), PyTorch's against vitlab's kernels, then whole bf16 training steps."""
    from torch import nn

    rows = ["| forward + backward, bf16 | PyTorch (ms) | vitlab (ms) | median per-round ratio |", "|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)

    def case(label, fns):
        _, times = alternate(fns, rounds)
        ratio = statistics.median([a / b for a, b in zip(times["torch"], times["vitlab"])])
        rows.append(f"| {label} | {statistics.median(times['torch']) * 1e3:.2f} | "
                    f"{statistics.median(times['vitlab']) * 1e3:.2f} | {ratio:.2f}x |")

    for shape, where in (((32, 197, 1536), "ViT-S/16, CvT-13 stage 3"), ((32, 3136, 256), "CvT-13 stage 1")):
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        gy = torch.randn(*shape, generator=g).to(torch.bfloat16)

        def run(fn):
            def f():
                leaf = x.detach().requires_grad_(True)
                fn(leaf).backward(gy)
            return f
        case(f"GELU {shape} ({where})", {"torch": run(F.gelu), "vitlab": run(ck.gelu)})
    for shape, where in (((32, 197, 384), "ViT-S/16, CvT-13 stage 3"), ((32, 3136, 64), "CvT-13 stage 1"),
                         ((32, 785, 192), "CvT-13 stage 2")):
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        gy = torch.randn(*shape, generator=g).to(torch.bfloat16)
        plain = nn.LayerNorm(shape[-1]).to(torch.bfloat16)
        ours = ck.FastLayerNorm(shape[-1]).to(torch.bfloat16)

        def run(ln):
            def f():
                leaf = x.detach().requires_grad_(True)
                ln(leaf).backward(gy)
            return f
        case(f"layer norm {shape} ({where})", {"torch": run(plain), "vitlab": run(ours)})

    from vitlab import bench
    from vitlab.accel import ops as fast
    from vitlab.models import create_model

    rows += ["", "| bf16 training step (batch 32, fp32 masters) | without (ms) | with (ms) | median per-round ratio | "
             "quartiles |", "|---|---|---|---|---|"]
    x = torch.randn(32, 3, 224, 224)
    y = torch.randint(0, 1000, (32,))
    for name in ("vit_s16", "cvt_13"):
        base = create_model(name)
        steps = {}
        for on in (False, True):
            m = bench.prepare(copy.deepcopy(base), "train", torch.bfloat16,
                              torch.device("cpu"), fast=True)
            fast.use_cpu_kernels(m, on)
            xm = x.contiguous(memory_format=torch.channels_last) if getattr(m, "memory_format_channels_last", False) else x
            steps["on" if on else "off"] = bench.make_step(m, m, "train", xm, y, dtype=torch.bfloat16, fast=True,
                                                           device=torch.device("cpu"), optimizer="foreach")
        _, times = alternate(steps, max(3, min(rounds, 9)))
        ratios = [a / b for a, b in zip(times["off"], times["on"])]
        q = statistics.quantiles(ratios, n=4)
        rows.append(f"| {name}: vitlab's training kernels | {statistics.median(times['off']) * 1e3:.0f} | "
                    f"{statistics.median(times['on']) * 1e3:.0f} | {statistics.median(ratios):.3f}x | {q[0]:.3f}-{q[2]:.3f} |")
    return "\n".join(rows)


def attention_training_table(ck, rounds: int) -> str:
    """Attention forward + backward: vitlab's kernel pair against PyTorch's explicit products and SDPA."""
    from vitlab.accel import ops as fast

    rows = ["| shape (B, H, Nq, Nk, d) | where | explicit (ms) | SDPA (ms) | vitlab (ms) | explicit / vitlab | "
            "SDPA / vitlab | rel. err dq, dk, dv vs fp64 (vitlab / explicit) |", "|---|---|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for B, H, Nq, N, d, where in [(32, 6, 197, 197, 64, "ViT-S/16"), (32, 12, 197, 197, 64, "ViT-B/16"),
                                  (32, 1, 3136, 784, 64, "CvT-13 stage 1"), (32, 3, 784, 196, 64, "CvT-13 stage 2"),
                                  (32, 6, 197, 50, 64, "CvT-13 stage 3")]:
        q = torch.randn(B, Nq, H, d, generator=g).to(torch.bfloat16).transpose(1, 2)
        k, v = [torch.randn(B, N, H, d, generator=g).to(torch.bfloat16).transpose(1, 2) for _ in range(2)]
        gy = torch.randn(B, H, Nq, d, generator=g).to(torch.bfloat16)
        fns = {"explicit": lambda a, b, c: fast.attention_reference(a, b, c, d ** -0.5)[0],
               "sdpa": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=d ** -0.5),
               "vitlab": lambda a, b, c: ck.attention_train(a, b, c, d ** -0.5)}

        def run(fn, keep=None):
            def f():
                leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
                fn(*leaves).backward(gy)
                if keep is not None:
                    keep[:] = [t.grad for t in leaves]
            return f
        grads = {}
        for name in ("explicit", "vitlab"):
            grads[name] = []
            run(fns[name], grads[name])()
        leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        fast.attention_reference(*leaves, d ** -0.5)[0].backward(gy.double())
        err = {n: max(((a.double() - r.grad).norm() / r.grad.norm()).item() for a, r in zip(grads[n], leaves))
               for n in grads}
        t, _ = alternate({n: run(fn) for n, fn in fns.items()}, rounds)
        rows.append(f"| {(B, H, Nq, N, d)} | {where} | {t['explicit'] * 1e3:.1f} | {t['sdpa'] * 1e3:.1f} | "
                    f"{t['vitlab'] * 1e3:.1f} | {t['explicit'] / t['vitlab']:.2f}x | {t['sdpa'] / t['vitlab']:.2f}x | "
                    f"{err['vitlab']:.4f} / {err['explicit']:.4f} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tables", default="1,2,3,4,5,6,7", help="which tables to print (comma-separated numbers)")
    args = ap.parse_args(argv)
    which = {int(t) for t in args.tables.split(",")}
    torch.set_num_threads(args.threads)
    from vitlab.accel import kernels as ck

    t = time.perf_counter()
    mod = ck.get()
    if mod is None:
        raise SystemExit(f"vitlab's CPU kernels are not available here: {ck.unavailable_reason()}")
    print(f"kernels ready in {time.perf_counter() - t:.1f} s\n")
    tables = {1: lambda: kernel_table(ck, mod, args.rounds), 2: lambda: parts_table(ck, mod, args.rounds),
              3: lambda: gelu_table(ck, mod, args.rounds), 4: lambda: projection_table(ck, mod, args.rounds),
              5: lambda: model_table(args.rounds), 6: lambda: training_table(ck, mod, args.rounds),
              7: lambda: attention_training_table(ck, args.rounds)}
    for n, table in tables.items():
        if n in which:
            print(table(), "\n", flush=True)


if __name__ == "__main__":
    main()
