"""The registry of fast paths: every way vitlab computes the models' math faster, as data.

Each entry names what it needs of the hardware (a predicate on `Capabilities`), the dtype and mode
it applies to, the plain fallback that runs otherwise, the test that checks it against the float32
reference, and the gain measured for it (docs/speed.md). `vitlab env` prints which are on here and
why the others are off; docs/speed.md opens with the same table (`python -m vitlab.accel.paths`
prints it as Markdown).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .caps import Capabilities


@dataclasses.dataclass(frozen=True)
class FastPath:
    name: str
    where: str                                  # the code that runs it
    needs: str                                  # in words
    available: Callable[[Capabilities], str | None]  # None when available, else why not
    dtype: str                                  # fp32, bf16, any
    mode: str                                   # inference, training, both
    fallback: str
    test: str
    gain: str


def _always(c: Capabilities) -> str | None:
    return None


def _bf16_native(c: Capabilities) -> str | None:
    return None if c.cpu_bf16_native else c.cpu_bf16_reason


def _kernels(c: Capabilities) -> str | None:
    from . import kernels

    if c.arch not in ("x86_64", "AMD64") or c.os != "Linux":
        return f"vitlab's C++ kernels are built for x86-64 Linux only (this is {c.os} {c.arch})"
    why = kernels.static_reason()
    return why


def _amx(c: Capabilities) -> str | None:
    why = _kernels(c)
    if why:
        return why
    return None if c.has("amx_tile") and c.has("amx_bf16") else "this CPU has no AMX tiles"


def _onednn_f32(c: Capabilities) -> str | None:
    from .caps import onednn_f32_linear_reason

    return onednn_f32_linear_reason(c)


def _cuda_flash(c: Capabilities) -> str | None:
    if not c.cuda:
        return "no CUDA device"
    return None if c.sdpa_flash else f"flash attention needs sm80+ (this GPU is sm{c.cuda_capability})"


def _cuda(c: Capabilities) -> str | None:
    return None if c.cuda else "no CUDA device"


def _glibc(c: Capabilities) -> str | None:
    import platform

    return None if platform.libc_ver()[0] == "glibc" else "the C library is not glibc"


PATHS: tuple[FastPath, ...] = (
    FastPath("patch embedding as one product", "modules.FastPatchEmbed", "CPU", _always, "any", "both",
             "strided nn.Conv2d", "test_fastpaths.py::test_patch_embedding_as_one_matrix_product_is_the_strided_conv",
             "ViT-S/16 bf16 batch 32: 2.8 vs 6.6 ms"),
    FastPath("explicit attention products for CPU training", "ops.attention (auto)", "CPU", _always, "bf16",
             "training", "scaled_dot_product_attention (always in fp32, where it is faster)",
             "test_fastpaths.py::test_training_attention_kernel_choice_keeps_gradients",
             "forward+backward 2-3x SDPA at 197 tokens (AMX CPU)"),
    FastPath("GELU in place", "modules.FastMlp", "CPU or GPU", _always, "any", "inference", "nn.GELU",
             "test_accel.py::test_accelerated_models_compute_the_plain_function", "one buffer less per block"),
    FastPath("CvT BN folded into the depthwise conv", "modules._dw_bn", "any device", _always, "any", "inference",
             "conv then BatchNorm", "test_fast_cvt_convmixer.py::test_optimized_inference_matches_float32_reference_and_intermediates",
             "one pass less per projection"),
    FastPath("fused drop-path add", "modules.FastCvTBlock", "any device", _always, "any", "training",
             "x + DropPath(y)", "test_fast_cvt_convmixer.py::test_drop_path_add_is_x_plus_drop_path", "one kernel for three"),
    FastPath("oneDNN linear with fused bias / residual", "ops.linear", "native bf16 on CPU (AVX-512 BF16, AMX)",
             _bf16_native, "bf16", "both", "F.linear + add",
             "test_fastpaths.py::test_fused_linear_matches_float32", "one pass over the output less per layer"),
    FastPath("float32 linear through oneDNN", "ops.linear", "x86-64 AVX-512, oneDNN", _onednn_f32, "fp32", "both",
             "F.linear (MKL) + add", "test_fastpaths.py::test_float32_linear_and_its_gradients_match_the_plain_layer",
             "train step CPU work: CvT-13 1.06x, ViT-S/16 1.04x (Zen 4, batch 8, one thread)"),
    FastPath("oneDNN MLP in row blocks (CvT)", "ops.mlp_inference", "native bf16 on CPU", _bf16_native, "bf16",
             "inference", "Mlp.forward", "test_fast_cvt_convmixer.py::test_fused_mlp_in_row_chunks_equals_plain_mlp",
             "CvT-13 stage 1: 41 vs 63 ms"),
    FastPath("ConvMixer conv+act+BN fused", "modules.FastConvMixerLayer", "native bf16 on CPU", _bf16_native, "bf16",
             "inference", "ConvMixerLayer.forward",
             "test_fast_cvt_convmixer.py::test_convmixer_layer_fused_equals_definition_on_random_statistics",
             "4 memory passes instead of 7"),
    FastPath("depthwise conv in float32 for bf16 training", "ops.depthwise_conv_f32_pays", "CPU", _always, "bf16",
             "training", "oneDNN bf16 depthwise conv",
             "test_fast_cvt_convmixer.py::test_convmixer_bf16_training_runs_depthwise_in_float32_with_matching_gradients",
             "ConvMixer-768/32 9x9: 593 vs 1072 ms"),
    FastPath("vitlab attention kernel (AVX-512 BF16)", "kernels.attention_bf16", "x86-64 AVX-512 BF16, g++, ninja",
             _kernels, "bf16", "both", "ops.attention (SDPA / explicit)", "test_cpu_kernels.py, test_cpu_attention_training.py",
             "2.2-2.9x SDPA (Zen 4)"),
    FastPath("vitlab float32 attention kernel (training)", "kernels.attention_fwd_f32 / attention_backward_f32",
             "x86-64 AVX-512 BF16, g++, ninja; >= 32 keys", _kernels, "fp32", "training", "SDPA (PyTorch's flash kernel)",
             "test_cpu_attention_f32.py", "forward + backward 1.29x SDPA at ViT-S/16, ViT-S/16 step 1.04x (Zen 4, one core)"),
    FastPath("attention products on AMX tiles", "kernels (use_amx)", "AMX", _amx, "bf16", "both",
             "AVX-512 BF16 dot products", "test_cpu_kernels.py (amx parameter)", "see docs/speed.md (AMX CPU)"),
    FastPath("layer norm / GELU kernels", "kernels.FastLayerNorm, kernels.gelu_", "x86-64 AVX-512 BF16", _kernels,
             "bf16", "both", "nn.LayerNorm, nn.GELU", "test_cpu_kernels.py, test_cpu_kernels_training.py",
             "ViT-S/16 fc1 GELU 1.6-2.2 vs 2.2-2.9 ms"),
    FastPath("CvT depthwise q/k/v projection kernel", "kernels.dwconv_qkv", "x86-64 AVX-512 BF16", _kernels, "bf16",
             "inference", "three oneDNN depthwise convs",
             "test_cpu_kernels.py::test_cvt_uses_the_projection_kernel_and_follows_its_weights", "1.3-2x"),
    FastPath("depthwise weight-gradient kernel", "kernels.depthwise_conv", "x86-64 AVX-512 BF16", _kernels, "bf16",
             "training", "depthwise conv in float32", "test_cpu_depthwise_training.py", "ConvMixer 7x7: 26-28 vs 330-410 ms"),
    FastPath("inference streams", "ops.run_in_streams", "CPU with 2-4 threads", _always, "any", "inference",
             "intra-op threads", "test_fastpaths.py::test_inference_streams_compute_the_same_logits",
             "1.06-1.23x ViT-S/16 (2 cores)"),
    FastPath("training streams", "ops.train_in_streams", "CPU with 2-4 threads; a model without batch norm or "
             "random layers, a per-sample objective", _always, "fp32", "training", "intra-op threads",
             "test_fastpaths.py::test_training_streams_compute_the_whole_batch_gradient",
             "ViT-S/16 train step vs transformers 1.26x, intra-op 1.06x (batch 16, loaded 2-core CPU)"),
    FastPath("tuned glibc allocator", "ops.tune_cpu_allocator", "glibc", _glibc, "any", "both", "glibc defaults",
             "test_fastpaths.py (allocator tests)", "ConvMixer-768/32 bf16 training 2.4x"),
    FastPath("fused AdamW", "ops.fused_adamw", "CPU or CUDA", _always, "any", "training", "foreach AdamW",
             "test_fastpaths.py::test_master_weight_bf16_training_follows_float32_training", "one kernel per step"),
    FastPath("flash attention (SDPA)", "F.scaled_dot_product_attention", "CUDA sm80+", _cuda_flash, "bf16/fp16",
             "both", "memory-efficient or math SDPA", "benchmarks/gpu_check.sh", "not measured here (no GPU)"),
    FastPath("torch.compile of repeated blocks", "ops.compile_blocks", "a C++ compiler (CPU) or CUDA", _always, "any",
             "both", "eager", "test_fastpaths.py::test_compiled_blocks_compute_the_same_function", "see docs/speed.md"),
)


def status(c: Capabilities | None = None) -> list[tuple[FastPath, str | None]]:
    """Every fast path with None (on here) or the reason it is off."""
    from .caps import capabilities

    c = c or capabilities()
    return [(p, p.available(c)) for p in PATHS]


def markdown_table() -> str:
    rows = ["| fast path | needs | dtype | mode | fallback | parity test | measured gain |", "|---|---|---|---|---|---|---|"]
    for p in PATHS:
        rows.append(f"| {p.name} (`{p.where}`) | {p.needs} | {p.dtype} | {p.mode} | {p.fallback} | `{p.test}` | {p.gain} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table())
