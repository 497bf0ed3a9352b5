#!/usr/bin/env bash
# The GPU comparison in a few calls of a lent machine (each part < 10 minutes). Results land in
# $OUT (or bench_out/): JSON per benchmark and a log. Parts:
#   a  train step: jaxmed fp32 / bf16 and PyTorch eager fp32 / AMP bf16, ResNet-18 / 50 at 224
#   b  train step: PyTorch torch.compile AMP bf16, ResNet-18 / 50
#   c  pruning (mask sweep, masked vs dense, compaction), PruneCXR sweep, input pipeline
#   d  BiasPruner task-agnostic inference (2 / 5 / 10 subnetworks, map / vmap vs PyTorch)
#   r  ResNet-50 bf16 at batch 128 and 256 in one call: jaxmed (with MFU) under the default
#      XLA flags and under the convnet options of the XLA GPU docs (autotune level 4, cuDNN
#      fusions, no layout-changing copies), PyTorch eager and torch.compile
#   s  the seed axis: S = 1..32 seeds' train steps as one program (vmap) vs one seed, ResNet-18
#      at 64 and 224 px and TEAR's quick FixMatch step (benchmarks/seeds_step.py)
#   usage: bash benchmarks/gpu_suite.sh a|b|c|d|r|s [batch]
set -uo pipefail
part=${1:?part a, b, c, d, r or s}; batch=${2:-128}
out=${OUT:-bench_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.75}
log="$out/gpu_suite_$part.log"
run() { echo "== $*" | tee -a "$log"; timeout "${T:-280}" "$@" 2>&1 | grep -v "^W[0-9]" | tee -a "$log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
case $part in
  a)
    T=330 run python benchmarks/train_step.py --models resnet18,resnet50 --dtypes bfloat16,float32 \
      --batch-sizes "$batch" --steps 20 --out "$out/train_step_jax.json"
    T=200 run python benchmarks/torch_reference/train_step.py --models resnet18,resnet50 \
      --modes eager --dtypes bfloat16,float32 --batch-sizes "$batch" --steps 20 \
      --out "$out/train_step_torch_eager.json" ;;
  b)
    T=500 run python benchmarks/torch_reference/train_step.py --models resnet18,resnet50 \
      --modes compile --dtypes bfloat16 --batch-sizes "$batch" --steps 20 \
      --out "$out/train_step_torch_compile.json" ;;
  c)
    T=240 run python benchmarks/pruning.py --size 224 --batch "$batch" --infer-batch 256 \
      --dtype bfloat16 --steps 20 --repeats 5 --out "$out/pruning.json"
    T=200 run python benchmarks/prunecxr_sweep.py --n-test 2048 --size 256 --batch 128 \
      --chunk 10 --dtype bfloat16 --out "$out/prunecxr_sweep.json"
    T=90 run python benchmarks/input_pipeline.py --workers 1,2,4,8,16 --images 3000 \
      --image .devdata/ISIC_0024310.jpg --out "$out/input_pipeline.json" ;;
  d)
    T=500 run python benchmarks/biaspruner_inference.py --tasks 2,5,10 --n-test 2048 --size 224 \
      --batch "$batch" --dtype bfloat16 --out "$out/biaspruner_inference.json" ;;
  r)
    T=150 run python benchmarks/train_step.py --models resnet50 --dtypes bfloat16 \
      --batch-sizes 128,256 --steps 20 --out "$out/r50_jax_default.json"
    XLA_FLAGS="--xla_gpu_autotune_level=4 --xla_gpu_enable_cudnn_fusion=true" \
      T=150 run python benchmarks/train_step.py --models resnet50 --dtypes bfloat16 \
      --batch-sizes 128,256 --steps 20 --out "$out/r50_jax_xlaflags.json"
    T=100 run python benchmarks/torch_reference/train_step.py --models resnet50 --modes eager \
      --dtypes bfloat16 --batch-sizes 128,256 --steps 20 --out "$out/r50_torch_eager.json"
    T=180 run python benchmarks/torch_reference/train_step.py --models resnet50 --modes compile \
      --dtypes bfloat16 --batch-sizes 128,256 --steps 20 --out "$out/r50_torch_compile.json" ;;
  s)
    T=500 run python benchmarks/seeds_step.py --seeds 1,2,4,8,16,32 --cases r18_64,r18_224,tear \
      --batch 64 --dtype bfloat16 --steps 10 --out "$out/seeds_step.json" ;;
esac
