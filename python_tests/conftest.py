"""Test-wide setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is set here,
before test modules import calm_fast.kernels. On a CUDA machine set CALM_FAST_TRITON_GPU=1
to run the same kernel tests on the GPU instead of the interpreter.
"""
import os
import sys
from pathlib import Path

# Test the installed package: `python -m pytest` (and every `python -m calm_fast.cli`
# subprocess a test starts from the checkout) puts the checkout first on sys.path, whose
# calm_fast/ has neither the built extension nor calm_fast.kernels unless it was built in
# place (scripts/device_build.sh) or installed editable. PYTHONSAFEPATH keeps the
# subprocesses from doing so.
_ROOT = Path(__file__).resolve().parent.parent
if not list((_ROOT / "calm_fast").glob("_C*.so")):
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
    os.environ["PYTHONSAFEPATH"] = "1"

# The fp32 CPU layout is measured per host ("auto", fast/calibrate.py): tests run ours on
# every host, so that what they check does not depend on which one a host measured faster
# (python_tests/fast/test_calibrate.py tests the choice itself).
os.environ.setdefault("CALM_FAST_CPU_GEMM", "native")

if os.environ.get("CALM_FAST_TRITON_GPU", "0") == "0":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# Two cores: keep intra-op threads fixed so timings and reductions are repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tts():
    """The tiny TTS model with random non-zero weights (generation tests)."""
    from calm_fast.model.config import preset
    from calm_fast.model.calm import CALM
    from golden import perturbed

    torch.manual_seed(0)
    return perturbed(CALM(preset("tiny")))


@pytest.fixture(scope="session")
def music():
    """The tiny music model (consistency head, short context, tags), random weights."""
    from calm_fast.model.config import preset
    from calm_fast.model.calm import CALM
    from golden import perturbed

    torch.manual_seed(0)
    return perturbed(CALM(preset("tiny_music")))
