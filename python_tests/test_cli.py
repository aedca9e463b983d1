"""The calm-fast command line: help, info, data builders, clear errors."""
import json
import shutil
import subprocess

import pytest

from calm_fast.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["native extension"].startswith("yes")


def test_console_script_is_installed():
    exe = shutil.which("calm-fast")
    assert exe, "the calm-fast entry point is not on PATH"
    res = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "data" in res.stdout


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="TTS engines not installed")
def test_data_speech(tmp_path, capsys):
    assert main(["data", "speech", str(tmp_path), "--n", "2", "--workers", "1"]) == 0
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 2


def test_bad_arguments_exit_cleanly(capsys):
    assert main(["data", "speech", "/tmp/calm-unused", "--n", "0"]) == 1
    assert "n_utterances must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["nope"])
