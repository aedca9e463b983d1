"""Run a kernel script in fresh processes under each value of one environment switch (the
kernels read CALM_FAST_BF16_DOT / CALM_FAST_INT8_DOT / CALM_FAST_ISA once, at first
use), and collect what each saved: the same host's instruction-set paths side by side."""
import os
import subprocess
import sys

import torch

# python_tests/fast/ files whose native paths are the kernels compiled once per instruction
# set (csrc/isa.h)
KERNEL_TESTS = ["test_paged_attention.py", "test_window_attention.py", "test_decode_step.py",
                "test_seanet.py", "test_cpu_linear.py", "test_backbone.py", "test_int8.py"]


def outputs_under(tmp_path, var: str, values, script: str) -> dict:
    """{value: the object the script saved to PATH} for each value of ``var``."""
    res = {}
    for value in values:
        path = tmp_path / f"{var}_{value}.pt"
        env = {**os.environ, var: value}
        subprocess.run([sys.executable, "-c", script.replace("PATH", str(path))], env=env,
                       check=True)
        res[value] = torch.load(path)
    return res
