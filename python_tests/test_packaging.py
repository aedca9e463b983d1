"""The built wheel ships calm_fast._C and calm_fast.kernels, and no top-level `kernels`."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs a source checkout")
def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, env={
                        **__import__("os").environ, "CALM_FAST_NATIVE": "OFF"})
    (wheel,) = tmp_path.glob("calm_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "calm_fast/kernels/__init__.py" in names
    assert any(n.startswith("calm_fast/_C.") and n.endswith(".so") for n in names)
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and not any(t.startswith("torch") for t in tops)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist: torch")]
    assert requires  # torch is a runtime requirement...


def test_torch_is_not_a_build_requirement():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(r.startswith("torch") for r in cfg["build-system"]["requires"])
    assert cfg["tool"]["scikit-build"]["cmake"]["define"]["CALM_FAST_CUDA"]["default"] == "OFF"
