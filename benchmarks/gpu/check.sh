#!/usr/bin/env bash
# One command for a lent GPU (the device tool): run it from the repository root with `carry: [".whl"]` after
# benchmarks/gpu/wheels.sh, e.g. `STEPS="2 4" bash benchmarks/gpu/check.sh` with timeout_s 600.  The steps run
# in order of what matters most, each under its own time limit, logs in $OUT (they come back).  All five take
# more than one call's 10 minutes: run them as two calls, STEPS="2 4" then STEPS="3 5" (see NOTES.md).
#   1. the wheels into /tmp/site, the GPU and the imports;
#   2. tests/test_gpu.py: MONAI's answer on the GPU, the CUDA graph, the reduced precisions, one worker per GPU;
#   3. bench_engine.py on the GPU: 16384^2 side by side (tilemask, MONAI, the bare model), then 1 gigapixel;
#   4. forward.py: the bare model's forward passes eager, as a CUDA graph, under autocast, beside busy threads;
#   5. bench_precision.py on the GPU: how far bfloat16 and float16 move the answer.
# STEPS="2 3" runs only those steps (1 always runs).  PyTorch's CUDA sanitizer is not a step: it checks the
# kernels of the thread that imported torch (its dispatch mode is per thread), and a worker launches its
# kernels from its Dask threads and its compute thread, so it would pass unchecked.
set -uo pipefail
out=${OUT:-/tmp/gpu-check}
steps=" ${STEPS:-2 3 4 5} "
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "check.sh: the wheels in .whl/ did not install (run benchmarks/gpu/wheels.sh here, carry .whl)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TILEMASK_CACHE_DIR=/tmp/tilemask-cache
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
    nproc
    python3 -c "import torch, monai, dask, rasterio, zarr, tilemask; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$out/gpu_setup.log"
# a machine whose CUDA does not work would skip every GPU test and still exit 0
python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" || exit 1
step() { [[ $steps == *" $1 "* ]]; }
if step 2; then
    timeout 260 python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs --timeout 60 tests/test_gpu.py 2>&1 \
        | tee "$out/gpu_tests.log"
fi
if step 3; then
    timeout "${BENCH_SECONDS:-220}" python3 benchmarks/bench_engine.py --device cuda --sizes 16384 --giga 32768 \
        --workdir /tmp/bench 2>&1 | tee "$out/gpu_bench.log"
fi
if step 4; then
    timeout 45 python3 benchmarks/gpu/forward.py 2>&1 | tee "$out/gpu_forward.log"
fi
if step 5; then
    timeout 120 python3 benchmarks/bench_precision.py --device cuda 2>&1 | tee "$out/gpu_precision.log"
fi
