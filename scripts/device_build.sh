#!/usr/bin/env bash
# Build calm_fast in place on a machine without scikit-build-core or network (the lent GPU
# machine has torch, triton, numpy, pybind11 and pytest): the same extension as the wheel,
# from the one source list in CMakeLists.txt, and `calm_fast.kernels` resolving to kernels/
# as in the wheel.
#   bash scripts/device_build.sh && PYTHONPATH=$PWD python -m pytest ...
# With cmake on PATH it runs CMake itself; without, it compiles the sources CMakeLists.txt
# lists with the same flags (-O3 -march=native, OpenMP). CALM_FAST_NATIVE=OFF: no -march;
# CALM_FAST_NO_CMAKE=1: the compiler path even where cmake exists (how the tests run it).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
ext=$($py -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
native=${CALM_FAST_NATIVE:-ON}
if [ -z "${CALM_FAST_NO_CMAKE:-}" ] && command -v cmake >/dev/null; then
  pyb=$($py -c "import pybind11; print(pybind11.get_cmake_dir())")
  cmake -S . -B build/device -DCMAKE_BUILD_TYPE=Release -DCALM_FAST_NATIVE="$native" \
    -Dpybind11_DIR="$pyb" -DPython_EXECUTABLE="$(command -v "$py")" >/dev/null
  cmake --build build/device -j "$(nproc)" >/dev/null
  cp build/device/_C*"$ext" "calm_fast/_C$ext"
else
  # the sources of "pybind11_add_module(_C MODULE ...)" and "set(CALM_FAST_ISA_SOURCES ...)"
  # in CMakeLists.txt; the kernels once, for the flags below ("build" alone: csrc/isa.h)
  mapfile -t srcs < <(sed -n -e '/^pybind11_add_module(_C MODULE/,/^)/{/csrc\//s/^ *//p}' \
    -e '/^set(CALM_FAST_ISA_SOURCES/,/^)/{/csrc\//s/^ *//p}' CMakeLists.txt)
  inc=$($py -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  pyb=$($py -c "import pybind11; print(pybind11.get_include())")
  march=(); [ "$native" = ON ] && march=(-march=native -DCALM_FAST_NATIVE_BUILD=1)
  g++ -O3 -Wno-psabi "${march[@]}" -fopenmp -DCALM_FAST_OPENMP=1 -shared -fPIC -std=c++17 \
    -I"$inc" -I"$pyb" -Icsrc "${srcs[@]}" -o "calm_fast/_C$ext"
fi
ln -sfn ../kernels calm_fast/kernels
echo "built calm_fast/_C$ext"
