"""Finding the external programs and data files the builders need, with clear errors."""
from __future__ import annotations

import shutil
from pathlib import Path

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
