"""The C++ kernels (fp32 GEMM, paged and window attention, the decode step, the VAE convs)
are compiled once per instruction set (csrc/isa.h) and one copy is picked at run time
(csrc/isa_kernels.h), so a portable build (CALM_FAST_NATIVE=OFF) still runs AVX2 or
AVX-512 where the CPU has them. A native build picks "build" (its -march=native flags), so
the other copies run only when CALM_FAST_ISA asks: here every copy this CPU can run goes
through the kernel tests against their torch references, each in its own process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from calm_fast.fast import ops
from isa_runs import KERNEL_TESTS

_C = ops._C
HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(_C is None, reason="calm_fast._C not built")


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def isa_in(env_value) -> str:
    env = {**os.environ}
    env.pop("CALM_FAST_ISA", None)
    if env_value is not None:
        env["CALM_FAST_ISA"] = env_value
    out = subprocess.run([sys.executable, "-W", "error", "-c",
                          "from calm_fast.fast import ops; print(ops._C.isa)"],
                         env=env, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "error: " + out.stderr[-400:]


def test_the_cpu_picks_the_widest_copy_unless_the_build_is_native():
    flags = cpu_flags()
    runnable = list(_C.runnable_isas)
    assert runnable[0] == "build"
    if "avx2" in flags and "fma" in flags and sys.platform.startswith("linux"):
        assert "avx2" in runnable
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        assert "avx512" in runnable
    assert isa_in(None) == ("build" if _C.native_build else runnable[-1])
    for isa in runnable:  # each one on request, and no warning
        assert isa_in(isa) == isa


def test_a_set_this_cpu_cannot_run_falls_back_and_is_said():
    env = {**os.environ, "CALM_FAST_ISA": "avx1024"}
    out = subprocess.run([sys.executable, "-c", "from calm_fast.fast import ops; print(ops._C.isa)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ("build" if _C.native_build else _C.runnable_isas[-1])
    assert "CALM_FAST_ISA='avx1024' is not an instruction set" in out.stderr
    assert "the kernels run" in out.stderr


@pytest.mark.parametrize("isa", ["build", "avx2", "avx512"])
def test_every_copy_passes_the_kernel_tests(isa):
    if isa not in _C.runnable_isas:
        pytest.skip(f"{isa}: not built, or this CPU cannot run it")
    if isa == ("build" if _C.native_build else _C.runnable_isas[-1]):
        pytest.skip(f"{isa} is this process's own copy: the suite itself tests it")
    env = {**os.environ, "CALM_FAST_ISA": isa}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          *[str(HERE / f) for f in KERNEL_TESTS]],
                         env=env, capture_output=True, text=True, cwd=HERE.parent)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout.splitlines()[-1]
