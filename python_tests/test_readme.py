"""The README's runnable snippets run: every ```bash / ```python block preceded by
``<!-- readme-test: run -->`` runs in a folder holding tiny random models exported as
``lm.safetensors`` / ``vae.safetensors`` and a prompt ``me.wav``. Blocks marked
``<!-- readme-test: skip (reason) -->`` (or unmarked) are not run; a skip needs a reason.
Port 8000 in a snippet becomes a free loopback port."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(?:<!--\s*readme-test:\s*(?P<mark>[^>]*?)\s*-->\s*\n)?"
                   r"```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)


def blocks():
    out = []
    for m in BLOCK.finditer(README.read_text()):
        line = README.read_text()[:m.start("code")].count("\n") + 1
        out.append((m.group("mark") or "", m.group("lang"), m.group("code"), line))
    return out


def runnable():
    return [b for b in blocks() if b[0] == "run"]


def test_marks_are_run_or_skip_with_a_reason():
    for mark, lang, _, line in blocks():
        if mark:
            assert mark == "run" or re.fullmatch(r"skip \(.+\)", mark), (line, mark)
    assert len(runnable()) >= 3  # the first-screen tts / serve / python snippets


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    import soundfile as sf
    from tiny_models import export_tiny

    d = tmp_path_factory.mktemp("readme")
    export_tiny(d)
    t = np.arange(1600) / 1600
    sf.write(str(d / "me.wav"), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 1600)
    return d


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@pytest.mark.parametrize("i", range(len(runnable())))
def test_snippet_runs(i, workdir):
    _, lang, code, line = runnable()[i]
    code = code.replace("8000", str(_port()))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if lang == "bash":
        cmd = ["timeout", "300", "bash", "-euo", "pipefail", "-c", code]
    else:
        cmd = [sys.executable, "-c", code]
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=320,
                         env=env)
    assert res.returncode == 0, f"README.md line {line}:\n{res.stdout}\n{res.stderr}"
