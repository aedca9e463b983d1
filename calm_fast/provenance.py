"""Where a result came from: the code (version + git commit) and the model files (hash)."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def file_label(path) -> str:
    """``name@sha256[:12]`` of a model file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return f"{Path(path).name}@{h.hexdigest()[:12]}"


def code_commit() -> str:
    """calm_fast's version and the git commit of its checkout (when it is one)."""
    import calm_fast

    root = Path(calm_fast.__file__).resolve().parent.parent
    commit = "unknown"
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                    capture_output=True, text=True, timeout=10,
                                    check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return f"{calm_fast.__version__}+{commit}"
