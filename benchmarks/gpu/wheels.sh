#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for tilemask's run path, its CUDA tests and bench_engine.py, fetched
# here into .whl/ (ignored by git) for CPython 3.12 on x86-64 Linux, the versions this project tests with.
# That machine has torch (CUDA), numpy, scipy, pandas, xarray, pyyaml, click, rich, cloudpickle, msgpack,
# psutil, toolz, fsspec, jinja2, pytest, pytest-timeout and hypothesis, and no network: see check.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl  # pip download keeps older versions beside new ones: two of a package stop the install there
mkdir -p .whl
wheels=(
    dask==2026.8.0 distributed==2026.8.0 importlib_metadata==10.2.0 lazy-importer==0.1.0 tornado==6.6.1 tblib==3.2.2 zict==3.0.0 locket==1.0.0 partd==1.4.2
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
    rasterio==1.4.4 affine==3.0.1 cligj==0.7.2 click-plugins==1.1.1.2
    monai==1.6.1 nibabel==5.4.2 indexed_gzip==1.10.3 pydicom==3.0.2
    pydantic==2.12.5 pydantic_core==2.41.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${wheels[@]}"
du -sh .whl
