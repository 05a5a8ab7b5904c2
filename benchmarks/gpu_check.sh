#!/usr/bin/env bash
# GPU check, under 8 minutes on one GPU: model-only images/s with MFU for ViT-S/B/L at 224 and ViT-B
# at 518 (eager fp32/bf16/fp16, compile bf16, TensorRT fp16 where installed, each with its cosine to
# eager fp32), and the generated-DICOM → decode → device mapping → embed pipeline's slices/s with the
# milliseconds of each stage. Needs only torch, timm, numpy and pydicom; everything else missing is
# skipped with the reason printed.
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --smoke    # tiny sizes on the CPU: checks the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, timm, numpy, pydicom" || { echo "gpu_check needs torch, timm, numpy and pydicom"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
exec timeout 470 python3 benchmarks/gpu_check.py "$@"
