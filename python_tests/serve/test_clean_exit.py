"""Clean exits: processes that generate through calm_fast end with exit code 0 and no C++
runtime abort at interpreter exit ("terminate called without an active exception", which a
C++ thread still joinable at exit causes). The pocket-tts package's processes were seen to
abort at exit; calm_fast's own must not, through the CLI and through the Python API."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serve_helpers import export_tiny

API = """
import sys
from calm_fast.runtime.tts import TTS
tts = TTS.from_files(sys.argv[1], sys.argv[2])
wavs = tts.synthesize(["hello there", "a second line"], max_seconds=1.0, seed=int(sys.argv[3]))
assert len(wavs) == 2 and all(w.numel() > 0 for w in wavs)
print("ok")
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("clean_exit"))


def _run(args, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], capture_output=True, timeout=120, env=env,
                          cwd=tmp_path)


@pytest.mark.parametrize("i", range(10))
def test_cli_and_api_processes_exit_cleanly(models, tmp_path, i):
    """20 processes in all: 10 `calm-fast tts` runs and 10 Python API runs."""
    cli = _run(["-m", "calm_fast.cli", "tts", f"hello number {i}.", "-o", "out.wav",
                "--seed", str(i), "--checkpoint", models["lm"], "--vae", models["vae"]],
               tmp_path)
    api = _run(["-c", API, str(models["lm"]), str(models["vae"]), str(i)], tmp_path)
    for name, res in (("cli", cli), ("api", api)):
        err = res.stderr.decode(errors="replace")
        assert res.returncode == 0, f"{name} exited {res.returncode}: {err[-800:]}"
        assert "terminate called" not in err and "Aborted" not in err, f"{name}: {err[-800:]}"
    assert (tmp_path / "out.wav").stat().st_size > 44
    assert api.stdout.decode().strip().endswith("ok")


SERVICE = """
import sys
from calm_fast.serve.models import load_synth
from calm_fast.serve.service import Job, Service
synth = load_synth(sys.argv[1], vae=sys.argv[2])
svc = Service(synth, max_streams=2).start()
job = svc.submit(Job.speech(synth, "hello there. and a second sentence.", seed=1))
kind, _ = next(iter(job.chunks()))
print(kind)
# no svc.close(): the engine thread is still running when the interpreter exits
"""


@pytest.mark.parametrize("i", range(3))
def test_a_service_left_running_at_exit_exits_cleanly(models, tmp_path, i):
    res = _run(["-c", SERVICE, str(models["lm"]), str(models["vae"])], tmp_path)
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 0 and "terminate called" not in err, err[-800:]
    assert res.stdout.decode().split()[-1] in ("audio", "done")
