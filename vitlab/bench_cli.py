"""`vitlab bench`'s options. They live apart from vitlab/bench.py, which imports torch at module
level, so `vitlab --help` does not pay for torch; the handler imports vitlab.bench when it runs."""
from __future__ import annotations

# the same choices as vitlab.bench.MODES / DTYPES (tests/test_cli_help.py checks they agree); a wrong
# --compare is left to vitlab.bench, whose error suggests the closest peer
MODES = ("infer", "train")
DTYPES = ("bf16", "fp32")


def register(sub) -> None:
    p = sub.add_parser("bench", help="time a model (images/s, TFLOP/s, fraction of the matmul peak, memory), "
                                     "optionally against transformers / timm / the paper's definition",
                       description="Benchmark a model: warm-up, then the median of timed steps; images/s, "
                                   "achieved TFLOP/s, the fraction of a matrix-product peak measured now on the "
                                   "same device and dtype, peak memory; with --compare, the peer implementation "
                                   "with the same weights, run alternately in the same process.")
    p.add_argument("--model", default="vit_s16",
                   help="model name or alias (see `vitlab models`; default: %(default)s)")
    p.add_argument("--mode", default="infer", choices=MODES,
                   help="infer: a forward pass; train: forward + backward + optimizer step (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's own)")
    p.add_argument("--dtype", default="auto", choices=("auto",) + DTYPES,
                   help="auto: bf16 where the device runs it natively (AVX-512 BF16, AMX, CUDA sm80+), else "
                        "fp32; bf16 where it is emulated warns (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps, the median reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks (of the peer too); "
                                                          "compile time is reported (default: off)")
    p.add_argument("--compare", default=None,
                   help="also time the peer with the same weights: transformers (ViT, CvT), timm (where "
                        "installed) or paper (ConvMixer in plain PyTorch) (default: no peer)")
    p.add_argument("--reference", action="store_true",
                   help="vitlab without its fast paths, the 'before' (default: off)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute blocks in backward, less memory (default: off)")
    p.add_argument("--loader", action="store_true",
                   help="also time the data loader's batch transform (default: off)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="classes of the model's head (default: %(default)s, as ImageNet)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .bench import run

    return run(args)
