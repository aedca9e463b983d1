"""What ships: the wheel holds every module of the package (and calm_fast._C, and
calm_fast.kernels, no top-level ``kernels``) and imports in a fresh virtual environment;
torch is a runtime requirement only; scripts/device_build.sh builds the same extension
from the one source list in CMakeLists.txt."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
C_FUNCTIONS = ("KVManager", "paged_decode_attention", "window_attention", "decode_step",
               "linear", "conv_rows", "conv_rows_to_one", "has_openmp", "isa", "runnable_isas")
checkout = pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(),
                              reason="needs a source checkout")


def source_modules() -> list[str]:
    mods = []
    for p in sorted((ROOT / "calm_fast").rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    kernels = [p.stem for p in sorted((ROOT / "kernels").glob("*.py")) if p.stem != "__init__"]
    return mods + ["calm_fast.kernels"] + [f"calm_fast.kernels.{k}" for k in kernels]


@pytest.mark.slow
@checkout
def test_wheel_holds_every_module_and_imports_in_a_fresh_venv(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True,
                   env={**os.environ, "CALM_FAST_NATIVE": "OFF"})
    (wheel,) = tmp_path.glob("calm_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    mods = source_modules()
    shipped = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names
               if n.endswith(".py")}
    assert [m for m in mods if m not in shipped] == []  # calm_fast/data/ included
    assert any(n.startswith("calm_fast/_C.") and n.endswith(".so") for n in names)
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and not any(t.startswith("torch") for t in tops)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist: torch")]
    assert requires  # torch is a runtime requirement...
    # ...met here by this interpreter's packages: a path line, not a site dir, so no
    # editable-install hook of the checkout runs in the venv
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    Path(site.stdout.strip(), "host.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                    str(wheel)], check=True)  # (the host may have calm_fast installed too)
    code = ("import importlib, sys, calm_fast\n"
            f"assert calm_fast.__file__.startswith({str(venv)!r}), calm_fast.__file__\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "import calm_fast._C\nprint(len(sys.modules))")
    res = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
@checkout
def test_device_build_compiles_the_cmake_sources_in_a_clean_copy(tmp_path):
    """The GPU machine's build, in a copy of the tracked files, without CMake: every _C
    entry point is there (it once compiled 3 of the 7 sources)."""
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    pytest.importorskip("pybind11")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.startswith(("csrc/", "calm_fast/", "kernels/", "scripts/")) or f == "CMakeLists.txt":
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, tmp_path / f)
    res = subprocess.run(["bash", "scripts/device_build.sh"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "CALM_FAST_NO_CMAKE": "1",
                                         "CALM_FAST_NATIVE": "OFF", "PYTHON": sys.executable})
    assert res.returncode == 0, res.stderr[-3000:]
    (so,) = (tmp_path / "calm_fast").glob("_C*.so")
    assert (tmp_path / "calm_fast" / "kernels" / "fused_head.py").exists()
    # in a fresh interpreter: pybind11 refuses a second KVManager type in one process
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('_C', {str(so)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"print([f for f in {C_FUNCTIONS!r} if not hasattr(m, f)], m.isa, m.runnable_isas)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    # one copy of the kernels, for the script's own flags (CMake builds the others)
    assert res.stdout.strip() == "[] build ['build']"
    # That copy is the x86-64 baseline (SSE2: simd.h's 16 lanes as 4 registers, which a
    # native build never compiles): the kernel tests against their references, run on it.
    from isa_runs import KERNEL_TESTS

    tests = [str(ROOT / "python_tests" / "fast" / f) for f in KERNEL_TESTS]
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('calm_fast._C', {str(so)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "sys.modules['calm_fast._C'] = m\n"
            "import calm_fast; calm_fast._C = m\n"
            "from calm_fast.fast import ops; assert ops._C is m\n"
            "import pytest\n"
            f"sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', *{tests!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "CALM_FAST_ISA"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT / "python_tests", env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout.strip().splitlines()[-1]


def test_torch_is_not_a_build_requirement_and_there_is_no_cuda_switch():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(r.startswith("torch") for r in cfg["build-system"]["requires"])
    assert "CALM_FAST_CUDA" not in cfg["tool"]["scikit-build"]["cmake"]["define"]
    assert "CUDA" not in (ROOT / "CMakeLists.txt").read_text()  # no .cu source exists
