#!/usr/bin/env bash
# One command for a lent GPU (the device tool): run it from the repository root with `carry: [".whl"]`
# after benchmarks/gpu/wheels.sh, e.g. `bash benchmarks/gpu/check.sh` with timeout_s 600.
#   1. the wheels into /tmp/site; 2. tests/test_gpu.py (MONAI's answer on the GPU, reduced precisions, one
#   worker per GPU), the streams' test again under CUDA's sanitizer; 3. bench_engine.py on the GPU, 16384^2
#   side by side (tilemask, MONAI, the bare model) then 1 gigapixel (tilemask and the bare model).
#   Logs land in $OUT (they come back) and on stdout.
set -uo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "check.sh: the wheels in .whl/ did not install (run benchmarks/gpu/wheels.sh here, carry .whl)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TILEMASK_CACHE_DIR=/tmp/tilemask-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, monai, dask, rasterio, zarr, tilemask; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    || exit 1
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
# the streams' ordering under PyTorch's CUDA sanitizer (CSAN), which reports kernels of different streams
# touching the same memory unordered, beyond what a matching answer shows
TORCH_CUDA_SANITIZER=1 timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py \
    -k blocks_copied 2>&1 | tee "$out/gpu_sanitizer.log"
timeout "${BENCH_SECONDS:-330}" python3 benchmarks/bench_engine.py --device cuda --sizes 16384 --giga 32768 \
    --workdir /tmp/bench 2>&1 | tee "$out/gpu_bench.log"
