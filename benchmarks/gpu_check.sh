#!/usr/bin/env bash
# The GPU check, prepared to run in under 10 minutes on a lent CUDA machine (one H100 or H200) whose
# image already holds torch, transformers and timm and cannot reach a package registry: vitlab runs
# from the checkout (PYTHONPATH), nothing is installed. Writes everything to $OUT (or ./gpu_check_out).
#
#   bash benchmarks/gpu_check.sh            # then copy the tables into benchmarks/RESULTS.md ("GPU")
#
# 1. `vitlab env`: the GPU, compute capability, native bf16, SDPA backends (flash must be available on sm80+)
# 2. the suite's device tests on CUDA (every parity test runs on each device present)
# 3. flash SDPA confirmed as the backend chosen for vitlab's attention (bf16, the flash backend alone)
# 4. bf16 and torch.compile training steps of ViT-B/16
# 5. the speed rows against transformers and timm (ViT-B/16 and ViT-S/16, train and infer, bf16)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PYTHON:-python3}
step() { echo; echo "=== $*" | tee -a "$OUT/summary.txt"; }

step "1. environment"
$PY -m vitlab env 2>&1 | tee "$OUT/env.txt"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'" || exit 1

step "2. device tests on CUDA"
timeout 240 $PY -m pytest -q -x -p no:cacheprovider tests/test_accel.py -k "cuda" 2>&1 | tail -n 15 | tee -a "$OUT/summary.txt"

step "3. flash SDPA is the backend vitlab's attention runs on"
timeout 60 $PY - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import torch, vitlab
from torch.nn.attention import SDPBackend, sdpa_kernel
m = vitlab.create_model("vit_b16", num_classes=10).cuda().to(torch.bfloat16).eval()
x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    want = m(x)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot run these shapes
        got = m(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        m(x)
names = {e.name for e in prof.events()}
flash = sorted(n for n in names if "flash" in n.lower())
print("flash kernels in the default forward:", flash[:3] or "NONE")
print("max |flash-only - default| logit difference:", (got.float() - want.float()).abs().max().item())
assert flash, "the default forward did not run flash attention"
EOF

step "4. bf16 and torch.compile training steps (ViT-B/16, batch 64)"
timeout 150 $PY -m vitlab bench --device cuda --model vit_b16 --mode train --dtype bf16 --batch-size 64 --steps 10 \
  --compare transformers 2>&1 | tee "$OUT/train_bf16.txt" | tail -n 8
timeout 200 $PY -m vitlab bench --device cuda --model vit_b16 --mode train --dtype bf16 --batch-size 64 --steps 10 \
  --compile --compare timm 2>&1 | tee "$OUT/train_compile.txt" | tail -n 8

step "5. speed rows (inference, bf16, batch 64)"
for m in vit_b16 vit_s16; do
  timeout 60 $PY -m vitlab bench --device cuda --model $m --mode infer --dtype bf16 --batch-size 64 --steps 20 \
    --compare transformers 2>&1 | tee "$OUT/infer_${m}.txt" | tail -n 6
done
echo; echo "done: $OUT"
