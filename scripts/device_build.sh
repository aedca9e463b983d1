#!/usr/bin/env bash
# Build calm_fast in place on a machine without scikit-build-core (the lent GPU machine has
# torch, triton, numpy, pybind11 and pytest but no network): compile the extension with g++
# and make `calm_fast.kernels` resolve to kernels/, as the editable install does.
#   bash scripts/device_build.sh && PYTHONPATH=$PWD python -m pytest ...
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
inc=$($py -c "import sysconfig; print(sysconfig.get_paths()['include'])")
pyb=$($py -c "import pybind11; print(pybind11.get_include())")
ext=$($py -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
g++ -O3 -march=native -fopenmp -DCALM_FAST_OPENMP=1 -shared -fPIC -std=c++17 \
  -I"$inc" -I"$pyb" -Icsrc csrc/bindings.cpp csrc/kv_manager.cpp csrc/paged_attention_cpu.cpp \
  -o "calm_fast/_C$ext"
ln -sfn ../kernels calm_fast/kernels
echo "built calm_fast/_C$ext"
