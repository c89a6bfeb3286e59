"""vitlab's acceleration layer: the one place that knows the hardware and computes the models' math faster.

The model files (`vitlab.models`) hold the papers' math in plain PyTorch and never test CPU flags.
Everything here computes the same functions with fewer or faster kernels where the hardware allows:

- `caps`: what the machine can do, probed once (CPU instruction sets, native bf16, CUDA, SDPA
  backends, MPS); `vitlab env` prints it.
- `paths`: the registry of fast paths, each with what it needs, its fallback and its parity test.
- `modules`: accelerated subclasses of the models' modules; `accelerate(model)` swaps them in.
- `ops`: the fused operations they call (oneDNN-fused linear layers, attention kernel choice,
  inference preparation, streams, allocator tuning, fused optimizers).
- `kernels`: vitlab's own C++ CPU kernels (x86-64 with AVX-512 BF16 only; off elsewhere, with the reason).

    model = vitlab.create_model("vit_s16")
    vitlab.accel.accelerate(model)                 # same function, faster kernels; the trainer does this
    vitlab.accel.optimize_for_inference(model)     # + eval, BN folding, bf16 where native, streams
"""
from . import caps
from .caps import Capabilities, capabilities
from .modules import accelerate, is_accelerated
from .ops import (GLIBC_MMAP_MAX, MIN_IMAGES_PER_STREAM, MasterWeightAdamW, attention, attention_choices,
                  attention_reference, auto_inference_streams, block_lists, compile_blocks, conv2d_f32,
                  depthwise_conv_bf16_train, depthwise_conv_f32_pays, fold_batchnorm, fused_adamw,
                  gelu_kernel, gelu_kernel_, gelu_kernel_ok, gelu_train_kernel_ok, linear, mlp_inference,
                  mlp_inference_ok, optimize_for_inference, run_in_streams, set_attention_kernel,
                  set_grad_checkpointing, streams_for, tune_cpu_allocator, use_cpu_kernels)
from .state import fast_paths_enabled, plain_context, reference_mode

__all__ = ["caps", "Capabilities", "capabilities", "accelerate", "is_accelerated", "optimize_for_inference",
           "reference_mode", "fast_paths_enabled", "plain_context", "linear", "attention", "attention_reference",
           "set_attention_kernel", "attention_choices", "tune_cpu_allocator", "fused_adamw", "MasterWeightAdamW",
           "set_grad_checkpointing", "fold_batchnorm", "compile_blocks", "block_lists", "use_cpu_kernels",
           "streams_for", "run_in_streams", "auto_inference_streams", "GLIBC_MMAP_MAX", "MIN_IMAGES_PER_STREAM",
           "conv2d_f32", "depthwise_conv_bf16_train", "depthwise_conv_f32_pays", "gelu_kernel", "gelu_kernel_",
           "gelu_kernel_ok", "gelu_train_kernel_ok", "mlp_inference", "mlp_inference_ok"]
