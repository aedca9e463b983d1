"""Finding the external programs and data files the builders need, with clear errors."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
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


class MissingToolError(CalmFastError, RuntimeError):
    """An external program or data file a builder needs is not installed."""


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


def run_jobs(fn, jobs: list, workers: int, chunksize: int = 1) -> list:
    """``[fn(j) for j in jobs]``, in ``workers`` processes when > 1 (results in job order).

    Workers are spawned, not forked: a forked child of a process whose torch/OpenMP thread
    pool has started can deadlock (seen in the test suite).
    """
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(fn, jobs, chunksize=chunksize))


def write_flac(path: Path, wav: np.ndarray, sample_rate: int) -> None:
    """PCM_16 FLAC written under a temporary name, then renamed: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.flac")
    sf.write(tmp, wav, sample_rate, subtype="PCM_16")
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
